"""The ``saliency``, ``saliency_method`` and ``saliency_device`` fixtures in real pytest runs."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
import torch

AUDIT = """
import pytest
import tinynet

@pytest.mark.saliency(methods={methods}, max_similarity={limit})
def test_audit(saliency, saliency_method):
    model, x = tinynet.make_model(), tinynet.make_inputs()
    saliency.assert_output_sensitive(model, x, saliency_method)
    saliency.assert_randomization_sensitive(model, x, saliency_method)
"""


def test_passing_audit_exits_0_with_the_table(tiny_project: pytest.Pytester) -> None:
    tiny_project.makepyfile(AUDIT.format(methods='["gradient"]', limit=0.99))
    result = tiny_project.runpytest()
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        [
            "*= saliency audits =*",
            "  method*metric*score*95% CI*noise/edge*threshold*verdict",
            "test_*.py::test_audit :: output_sensitivity",  # [gradient] is the row's method
            "  gradient*ssim*<= 0.990*pass",
            "test_*.py::test_audit :: parameter_randomization",
            "  gradient*ssim*pass",
            "2 audits: 2 pass",
        ]
    )


def test_failing_audit_exits_1_with_a_readable_table(tiny_project: pytest.Pytester) -> None:
    tiny_project.makepyfile(AUDIT.format(methods='["gradient"]', limit=-0.99))
    result = tiny_project.runpytest()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E*saliency audit failed: test_*.py::test_audit[[]gradient]",
            "E*method*gradient",
            "E*check*output_sensitivity",
            "E*metric*ssim",
            "E*score*95% CI [[]*, *]",
            "E*threshold*max_similarity -0.990",
            "E*verdict*FAIL: score * > max_similarity -0.990",
            "E*most similar samples:",
            "E*sample*target*other*similarity",
            "*= saliency audits =*",
            "*test_audit :: output_sensitivity",
            "  gradient*FAIL",
            "1 audit: 1 fail",
        ]
    )


def test_randomization_failure_shows_each_step(tiny_project: pytest.Pytester) -> None:
    tiny_project.makepyfile(
        """
        import tinynet

        def test_randomization(saliency):
            model, x = tinynet.make_model(), tinynet.make_inputs()
            saliency.assert_randomization_sensitive(model, x, "gradient", max_similarity=-0.99)
        """
    )
    result = tiny_project.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E*check*parameter_randomization",
            "E*per-step scores (cascading, top_down):",
            "E*step*randomized layer*mean similarity",
            "E*1*5*",  # the top layer (the Linear, module "5") is randomized first
            "E*most similar samples:",
        ]
    )


def test_method_ids_are_readable_and_selectable(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        METHODS = [
            "gradient",
            {"name": "gradcam"},
            {"name": "gradcam++", "positive": False},
            {"name": "gradcam++", "positive": True},
            {"name": "gradcam", "layer": "2", "id": "cam-early"},
            {"name": "gradcam", "layer": "2", "positive": True},  # the layer is not in the id
        ]

        @pytest.mark.saliency(methods=METHODS)
        def test_ids(saliency_method):
            print("METHOD", saliency_method)
        """
    )
    result = pytester.runpytest("--collect-only", "-q")
    result.stdout.fnmatch_lines(
        [
            "test_*.py::test_ids[[]gradient]",
            "test_*.py::test_ids[[]gradcam]",
            "test_*.py::test_ids[[]gradcam++-positive=false]",
            "test_*.py::test_ids[[]gradcam++]",  # a default option is not part of the id
            "test_*.py::test_ids[[]cam-early]",
            "test_*.py::test_ids[[]gradcam-positive=true]",
        ]
    )
    selected = pytester.runpytest("-k", "gradcam", "-s")
    selected.assert_outcomes(passed=4, deselected=2)
    selected.stdout.fnmatch_lines(["*METHOD {'name': 'gradcam++', 'positive': False}*"])


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ("", "*test_method uses the saliency_method fixture but has no methods*"),
        ("@pytest.mark.saliency(max_similarity=0.2)", "*has no methods to run*"),
        ("@pytest.mark.saliency(methods=['gradinet'])", "*unknown method 'gradinet'*'gradient'*"),
        ("@pytest.mark.saliency(methods=['gradient', {'name': 'gradient'}])", "*duplicate ids*"),
        ("@pytest.mark.saliency(methods=[{'layer': '2'}])", "*a method is a name or a mapping*"),
        (
            "@pytest.mark.saliency(methods=[{'name': 'gradcam++', 'postive': False}])",
            "*method 'gradcam++' has no option 'postive'; its options are: *positive*",
        ),
    ],
)
def test_bad_method_parametrization_is_a_collection_error(
    pytester: pytest.Pytester, marker: str, message: str
) -> None:
    pytester.makepyfile(f"import pytest\n\n{marker}\ndef test_method(saliency_method): pass\n")
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ERROR collecting*", message])


def test_marker_settings_reach_the_audit(tiny_project: pytest.Pytester) -> None:
    tiny_project.makepyfile(
        """
        import pytest
        import tinynet

        @pytest.mark.saliency(seed=5, similarity="pearson", max_similarity=0.95)
        def test_seeded(saliency, saliency_device):
            assert str(saliency_device) == "cpu"
            model, x = tinynet.make_model(), tinynet.make_inputs()
            result = saliency.output_sensitivity(model, x, {"name": "gradcam++", "positive": False})
            assert result.seed == 5 and result.similarity == "pearson"
        """
    )
    result = tiny_project.runpytest("--saliency-device=cpu", "--saliency-report=run.json")
    result.assert_outcomes(passed=1)
    (record,) = json.loads((tiny_project.path / "run.json").read_text())["records"]
    assert record["seed"] == 5
    assert record["similarity"] == "pearson"
    assert record["threshold"] == 0.95
    assert record["method_id"] == "gradcam++-positive=false"
    assert record["options"] == {"positive": False}
    assert record["device"] == "cpu"


def test_users_model_is_left_alone(tiny_project: pytest.Pytester) -> None:
    tiny_project.makepyfile(
        """
        import torch
        import tinynet
        from pytest_saliency.explainer import explain

        def test_model(saliency):
            model, x = tinynet.make_model(), tinynet.make_inputs()
            model.train()
            before = {k: v.clone() for k, v in model.state_dict().items()}
            x_before = x.clone()
            saliency.output_sensitivity(model, x, "gradient")
            saliency.parameter_randomization(model, x, "gradient")
            maps = saliency.explain(model, x, "gradient")
            assert maps.shape == (4, 8, 8)
            assert torch.equal(maps, explain(model, x, "gradient"))
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
            assert torch.equal(x, x_before)
            assert model.training and all(m.training for m in model.modules())
        """
    )
    tiny_project.runpytest("--saliency-device=cpu").assert_outcomes(passed=1)


def test_junitxml_carries_the_properties(tiny_project: pytest.Pytester) -> None:
    tiny_project.makepyfile(
        """
        import tinynet

        def test_prop(saliency):
            model, x = tinynet.make_model(), tinynet.make_inputs()
            result = saliency.output_sensitivity(model, x, "gradient", max_similarity=0.97)
            print("SCORE", repr(result.score))
        """
    )
    result = tiny_project.runpytest("--junitxml=junit.xml", "-s")
    result.assert_outcomes(passed=1)
    score = float(next(line for line in result.outlines if "SCORE " in line).split("SCORE ")[1])
    case = ET.parse(tiny_project.path / "junit.xml").find(".//testcase")
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert float(props["saliency_score"]) == pytest.approx(score)
    assert props["saliency_threshold"] == "0.97"
    assert props["saliency_verdict"] == ("pass" if score <= 0.97 else "fail")


def test_terminal_summary_never_raises(
    tiny_project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_saliency import report

    def broken(records):
        raise RuntimeError("boom")

    monkeypatch.setattr(report, "format_table", broken)
    tiny_project.makepyfile(AUDIT.format(methods='["gradient"]', limit=0.99))
    result = tiny_project.runpytest()
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*could not print the audit table: RuntimeError('boom')*"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_audits_a_moved_copy(tiny_project: pytest.Pytester) -> None:
    tiny_project.makepyfile(
        """
        import torch
        import tinynet
        from pytest_saliency.checks import output_sensitivity

        def test_cuda(saliency, saliency_device):
            assert saliency_device == torch.device("cuda", torch.cuda.current_device())
            model, x = tinynet.make_model(), tinynet.make_inputs()
            cpu = saliency.output_sensitivity(model, x, "gradient")
            assert next(model.parameters()).device.type == "cpu"  # the user's model stays put
            assert saliency.explain(model, x, "gradient").device == saliency_device
            ref = output_sensitivity(model, x, "gradient")
            assert torch.allclose(cpu.scores, ref.scores, atol=1e-3)
        """
    )
    result = tiny_project.runpytest("--saliency-device=cuda", "--saliency-report=r.json")
    result.assert_outcomes(passed=1)
    (record,) = json.loads((tiny_project.path / "r.json").read_text())["records"]
    assert record["device"].startswith("cuda:")


def test_strict_xfail_mark_shows_as_expected_failure_in_the_table(
    tiny_project: pytest.Pytester,
) -> None:
    tiny_project.makepyfile(
        """
        import pytest
        import tinynet

        @pytest.mark.xfail(strict=True, raises=AssertionError)
        @pytest.mark.saliency(methods=["gradient"], max_similarity=-0.99)
        def test_audit(saliency, saliency_method):
            model, x = tinynet.make_model(), tinynet.make_inputs()
            saliency.assert_output_sensitive(model, x, saliency_method)

        @pytest.mark.xfail(False, reason="condition false: a plain expectation")
        @pytest.mark.saliency(methods=["gradient"], max_similarity=0.99)
        def test_not_expected(saliency, saliency_method):
            model, x = tinynet.make_model(), tinynet.make_inputs()
            saliency.assert_output_sensitive(model, x, saliency_method)
        """
    )
    result = tiny_project.runpytest()
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(xfailed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_audit :: output_sensitivity",
            "  gradient*xfail",
            "*test_not_expected :: output_sensitivity",
            "  gradient*pass",
        ]
    )


def test_a_users_own_saliency_method_fixture_is_theirs(pytester: pytest.Pytester) -> None:
    """A conftest fixture of the same name wins, as in pytest: no parametrization, no error
    for a missing marker, and its own params stay its own."""
    pytester.makeconftest(
        """
        import pytest

        @pytest.fixture(params=["mine-a", "mine-b"])
        def saliency_method(request):
            return request.param
        """
    )
    pytester.makepyfile(
        """
        import pytest

        def test_plain(saliency_method):
            assert saliency_method.startswith("mine-")

        @pytest.mark.saliency(methods=["gradient"])
        def test_marked(saliency_method):
            assert saliency_method.startswith("mine-")
        """
    )
    result = pytester.runpytest("-v")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*test_plain?mine-a?*PASSED*", "*test_marked?mine-b?*PASSED*"])


def test_the_marker_says_what_the_fixture_explains(tiny_project: pytest.Pytester) -> None:
    """target= and output= on the marker apply to every call of the test; a call's own wins."""
    tiny_project.makepyfile(
        """
        import pytest
        import torch
        import pytest_saliency as ps
        import tinynet

        class Pair(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = tinynet.make_model()
            def forward(self, x):
                s = self.net(x)
                return s, s.detach()

        @pytest.mark.saliency(target=ps.MultiLabel([0, 2]), output=0, max_similarity=1.0)
        def test_tags(saliency):
            model, x = Pair(), tinynet.make_inputs()
            result = saliency.output_sensitivity(model, x, "gradient")
            assert result.target_kind == "multilabel" and result.others.tolist() == [1] * 4
            own = saliency.parameter_randomization(model, x, "gradient", target=1)
            assert own.target_kind == "class" and own.targets.tolist() == [1] * 4
            leaf = x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(model(leaf)[0][:, [0, 2]].sum(), leaf)
            torch.testing.assert_close(saliency.explain(model, x, "gradient"), g.sum(dim=1))

        @pytest.mark.saliency(output="nope")
        def test_bad(saliency):
            saliency.explain(tinynet.make_model(), tinynet.make_inputs(), "gradient")
        """
    )
    result = tiny_project.runpytest("--saliency-report=run.json")
    result.assert_outcomes(passed=1, failed=1)
    records = json.loads((tiny_project.path / "run.json").read_text())["records"]
    assert [r["target_kind"] for r in records] == ["multilabel", "class"]
    assert records[0]["targets"] == [[0, 2]] * 4
    assert records[0]["settings"]["target"] == {"kind": "multilabel", "labels": [0, 2],
                                                "output": "output[0]"}  # fmt: skip
    result.stdout.fnmatch_lines(["*output='nope' selects a key of a returned dict or an "
                                 "attribute*returned Tensor[[]4, 3[]], a tensor*"])  # fmt: skip
