"""Audits that raise are rows (table, JSON, HTML, junit), and ``expect:`` can declare a refusal."""

from __future__ import annotations

import json
import textwrap
import xml.etree.ElementTree as ET

import pytest

import pytest_saliency.html  # noqa: F401  (loaded once, before pytester's inner runs)
import pytest_saliency.suite  # noqa: F401
from pytest_saliency import report

from .conftest import REFUSED_MODEL, write_tinynet

# A model the propagation rules refuse (a custom autograd function on the signal path: the
# rules cannot vouch for its backward), and one whose backward breaks on inputs over 50 (an
# integrated-gradients baseline of 100 sends them): a crash inside torch, no refusal, for
# one method only.
MODELS = (
    REFUSED_MODEL
    + """

class Guard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.top = float(x.detach().abs().max())
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        if ctx.top > 50:
            raise RuntimeError(f"inputs out of range: {ctx.top:.0f}")
        return g


class InRange(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = tinynet.make_model()

    def forward(self, x):
        return self.net(Guard.apply(x))


def in_range():
    return InRange().eval()


class NoGrad(nn.Module):
    # runs under torch.no_grad only: every method's pass fails, with the same error

    def __init__(self):
        super().__init__()
        self.net = tinynet.make_model()

    def forward(self, x):
        if torch.is_grad_enabled():
            raise RuntimeError("this model runs under torch.no_grad only")
        return self.net(x)


def no_grad():
    return NoGrad().eval()
"""
)

REFUSING = """\
model: models:refused
inputs: tinynet:make_inputs
max_similarity: 1.0
methods:
  - gradient
  - guided_backprop
  - lrp_epsilon
  - deconvnet
checks:
  output_sensitivity: {{}}
expect:
{expect}
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    write_tinynet(pytester)
    pytester.makepyfile(models=MODELS)
    return pytester


def records(project: pytest.Pytester, name: str = "run.json") -> dict[str, dict]:
    doc = json.loads((project.path / name).read_text())
    return {r["method_id"]: r for r in doc["records"]}


def test_refusals_are_rows_and_expected_ones_xfail(project):
    expect = "  guided_backprop: unsupported\n  lrp_epsilon: error"
    project.makefile(".yaml", saliency_refused=REFUSING.format(expect=expect))
    result = project.runpytest(
        "-rA", "--saliency-report=run.json", "--saliency-report=run.html", "--junitxml=junit.xml"
    )
    result.assert_outcomes(passed=1, xfailed=2, failed=1)
    out = result.stdout.str()
    assert "4 audits: 1 pass, 1 error, 2 refused" in out
    # the error that was not expected fails its item with the located refusal, no traceback
    assert "saliency_refused.yaml:8: methods[3]" in out and "Doubler" in out
    assert "pytest_saliency/engine" not in out
    assert "refused as expected (expect: unsupported): UnsupportedActivationError" in out
    # the table lists what each row raised, the JSON has it whole
    assert "raised:" in out and "output_sensitivity[deconvnet]: UnsupportedActivationError" in out
    rows = records(project)
    assert set(rows) == {"gradient", "guided_backprop", "lrp_epsilon", "deconvnet"}
    assert rows["gradient"]["verdict"] == "pass" and "error" not in rows["gradient"]
    for ident, verdict in (("guided_backprop", "refused"), ("lrp_epsilon", "refused"),
                           ("deconvnet", "error")):  # fmt: skip
        row = rows[ident]
        assert row["verdict"] == verdict and row["score"] is None and row["scores"] is None
        assert row["error"]["type"] == "UnsupportedActivationError"
        assert row["error"]["kind"] == "unsupported" and "Doubler" in row["error"]["message"]
        assert row["threshold_key"] == "max_similarity" and row["check"] == "output_sensitivity"
    assert rows["lrp_epsilon"]["expected"] == "error"
    page = (project.path / "run.html").read_text()
    assert page.count("the audit raised") == 1 and page.count("refused as expected") == 2
    props = {
        case.get("name"): {p.get("name"): p.get("value") for p in case.iter("property")}
        for case in ET.parse(project.path / "junit.xml").getroot().iter("testcase")
    }
    assert props["output_sensitivity[deconvnet]"]["saliency_verdict"] == "error"
    assert "deconvnet" in props["output_sensitivity[deconvnet]"]["saliency_error"]
    assert props["output_sensitivity[gradient]"]["saliency_verdict"] == "pass"


def test_an_expected_refusal_is_strict(project):
    """Stated as refused, it ran: a failure saying so; refused otherwise than stated: too."""
    expect = "  gradient: error\n  guided_backprop: nonfinite\n  lrp_epsilon: unsupported"
    project.makefile(".yaml", saliency_refused=REFUSING.format(expect=expect))
    result = project.runpytest("--saliency-report=run.json")
    result.assert_outcomes(failed=3, xfailed=1)
    out = result.stdout.str()
    assert "expected a refusal (expect: error), but the audit ran and passed" in out
    assert "remove its 'expect' entry" in out
    assert "expect: nonfinite was stated, but this is the refusal 'unsupported'" in out
    rows = records(project)
    assert rows["gradient"]["verdict"] == "xpass"
    assert rows["guided_backprop"]["verdict"] == "error"
    assert rows["lrp_epsilon"]["verdict"] == "refused"


def test_expect_values_are_validated_with_the_choices(project):
    expect = "  guided_backprop: refused\n  lrp_epsilon: {output_sensitivity: crash}"
    project.makefile(".yaml", saliency_refused=REFUSING.format(expect=expect))
    result = project.runpytest()
    out = result.stdout.str()
    assert "saliency_refused.yaml:12: expect.guided_backprop: expected one of 'pass', 'fail', " \
           "'error', 'unsupported', 'nonfinite'" in out  # fmt: skip
    assert "expect.lrp_epsilon.output_sensitivity: expected one of" in out and "'crash'" in out
    assert "INTERNALERROR" not in out


def test_one_methods_crash_in_a_shared_audit_is_that_items_error_only(project, monkeypatch):
    """The shared call that raises is split in halves until the error is one method's."""
    import pytest_saliency.checks.base as base

    calls: list[list[str]] = []
    original = base.execute

    def spy(check, models, inputs, method, kwargs):
        calls.append([m.get("id") or m["name"] for m in method])
        return original(check, models, inputs, method, kwargs)

    monkeypatch.setattr(base, "execute", spy)
    project.makefile(
        ".yaml",
        saliency_small=textwrap.dedent(
            """\
            model: models:in_range
            inputs: tinynet:make_inputs
            max_similarity: 1.0
            methods:
              - gradient
              - input_x_gradient
              - {name: integrated_gradients, baseline: 100.0, id: ig}
            checks: {output_sensitivity: {}}
            expect: {ig: error}
            """
        ),
    )
    result = project.runpytest("--saliency-report=run.json")
    # the crash is no refusal, so expect: error does not cover it: the item fails with it
    result.assert_outcomes(passed=2, failed=1)
    out = result.stdout.str()
    assert "inputs out of range: 1" in out
    assert "expect: error was stated, but this is an error that is no refusal" in out
    rows = records(project)
    assert rows["gradient"]["verdict"] == rows["input_x_gradient"]["verdict"] == "pass"
    assert calls == [
        ["gradient", "input_x_gradient", "integrated_gradients"],
        ["gradient"],
        ["input_x_gradient", "integrated_gradients"],
        ["input_x_gradient"],
        ["integrated_gradients"],
    ]
    crashed = rows["ig"]
    assert crashed["verdict"] == "error" and crashed["error"]["type"] == "RuntimeError"
    assert crashed["error"]["kind"] is None


def test_a_fixture_audit_that_raises_is_a_row_and_can_be_an_expected_refusal(project):
    project.makepyfile(
        test_fix=textwrap.dedent(
            """\
            import pytest
            import models
            import tinynet
            from pytest_saliency import UnsupportedActivationError

            def test_refused(saliency):
                saliency.output_sensitivity(models.refused(), tinynet.make_inputs(), "deconvnet")

            @pytest.mark.xfail(raises=UnsupportedActivationError, strict=True)
            def test_declared(saliency):
                saliency.output_sensitivity(models.refused(), tinynet.make_inputs(), "rectgrad")

            @pytest.mark.xfail(raises=TypeError, strict=True)
            def test_declared_otherwise(saliency):
                saliency.output_sensitivity(models.refused(), tinynet.make_inputs(), "lrp_zplus")
            """
        )
    )
    result = project.runpytest("--saliency-report=run.json")
    result.assert_outcomes(failed=2, xfailed=1)
    rows = records(project)
    assert rows["deconvnet"]["verdict"] == "error" and rows["deconvnet"]["source"] == "python"
    assert rows["rectgrad"]["verdict"] == "refused"
    assert rows["lrp_zplus"]["verdict"] == "error"
    assert "3 audits: 2 error, 1 refused" in result.stdout.str()


def test_a_method_id_that_is_not_one_line_is_refused(project):
    project.makefile(
        ".yaml",
        saliency_ids=textwrap.dedent(
            """\
            model: tinynet:make_model
            inputs: tinynet:make_inputs
            methods:
              - {name: gradient, id: "grad\\nient"}
            """
        ),
    )
    out = project.runpytest().stdout.str()
    assert "saliency_ids.yaml:4: methods[0].id: expected one printable line" in out
    assert "'grad\\nient'" in out


def test_the_table_keeps_one_line_per_row_whatever_the_names():
    row = {
        "nodeid": "t.py::test[a\nb]", "method_id": "x\ty", "method": "gradient",
        "check": "output_sensitivity", "similarity": "spearman_abs", "score": 0.5,
        "ci": [0.4, 0.6], "controls": None, "threshold": 0.5, "verdict": "pass",
    }  # fmt: skip
    error = {**row, "verdict": "error", "score": None,
             "error": {"type": "SaliencyError", "message": "line one\r\nline two"}}  # fmt: skip
    lines = report.format_table([row, error]).splitlines()
    assert len(lines) == 8  # header, rule, heading, 2 rows, tally, "raised:", 1 entry
    assert lines[2] == r"t.py::test[a\nb] :: output_sensitivity" and r"x\ty" in lines[3]
    assert lines[-1].endswith("SaliencyError: line one")


def test_a_method_id_given_in_python_must_be_one_line_too():
    from pytest_saliency.errors import SaliencyError
    from pytest_saliency.specs import parse_method

    with pytest.raises(SaliencyError, match=r"method 'gradient': id 'a\\nb' is not one printable"):
        parse_method({"name": "gradient", "id": "a\nb"})
    with pytest.raises(SaliencyError, match="not one printable line"):
        parse_method({"name": "gradient", "id": "  "})
    with pytest.raises(SaliencyError, match="without '::'"):
        parse_method({"name": "gradient", "id": "a::b"})
    assert parse_method({"name": "gradient", "id": "grad ü"}).id == "grad ü"


def test_an_error_the_test_catches_is_no_row_and_xfail_is_read_as_pytest_reads_it(project):
    project.makepyfile(
        test_caught=textwrap.dedent(
            """\
            import sys
            import pytest
            import models
            import tinynet
            from pytest_saliency import SaliencyError, UnsupportedActivationError

            def test_caught(saliency):
                with pytest.raises(SaliencyError):
                    saliency.output_sensitivity(models.refused(), tinynet.make_inputs(),
                                                "deconvnet")

            @pytest.mark.xfail("sys.platform != 'no-such-platform'", strict=True,
                               raises=UnsupportedActivationError)
            def test_string_condition(saliency):
                saliency.output_sensitivity(models.refused(), tinynet.make_inputs(), "rectgrad")
            """
        )
    )
    result = project.runpytest("--saliency-report=run.json")
    result.assert_outcomes(passed=1, xfailed=1)
    rows = records(project)
    assert list(rows) == ["rectgrad"] and rows["rectgrad"]["verdict"] == "refused"
    # under --runxfail the test fails: the row says error, as pytest does
    result = project.runpytest("--saliency-report=run.json", "--runxfail")
    result.assert_outcomes(passed=1, failed=1)
    assert records(project)["rectgrad"]["verdict"] == "error"


def test_a_model_that_fails_for_every_method_costs_one_call_each_not_twice_that(
    project, monkeypatch
):
    import pytest_saliency.checks.base as base

    calls: list[int] = []
    original = base.execute

    def spy(check, models, inputs, method, kwargs):
        calls.append(len(method))
        return original(check, models, inputs, method, kwargs)

    monkeypatch.setattr(base, "execute", spy)
    methods = "[gradient, input_x_gradient, guided_backprop, deconvnet, rectgrad, lrp_epsilon, " \
              "fullgrad, {name: gradcam, layer: 'net.2'}]"  # fmt: skip
    project.makefile(
        ".yaml",
        saliency_all=(
            "model: models:no_grad\ninputs: tinynet:make_inputs\nmax_similarity: 1.0\n"
            f"methods: {methods}\nchecks: {{output_sensitivity: {{}}}}\n"
        ),
    )
    result = project.runpytest()
    result.assert_outcomes(failed=8)
    assert result.stdout.str().count("this model runs under torch.no_grad only") >= 8
    # the whole, its two halves (both the whole's error), then one call each: 11, not the
    # 2n - 1 = 15 calls of halving down to each method
    assert calls == [8, 4, 4] + [1] * 8
