"""Baselines: save every audit's score, then fail the audits that got worse than the tolerance."""

from __future__ import annotations

import json
import textwrap

import pytest

import pytest_saliency.baseline  # noqa: F401  (loaded once, before pytester's inner runs)
import pytest_saliency.suite  # noqa: F401
from pytest_saliency.baseline import SCHEMA, keys

from .conftest import write_tinynet

SUITE = """\
model: tinynet:make_model
inputs: tinynet:make_inputs
max_similarity: 1.0
methods: [gradient, input_x_gradient]
checks:
  output_sensitivity: {against: random}
  efficient_randomization: {bins: 10, min_rise: -1.0}
"""

FIXTURE = """\
import tinynet

def test_two_calls(saliency):
    model, x = tinynet.make_model(), tinynet.make_inputs()
    saliency.assert_output_sensitive(model, x, "gradient", max_similarity=1.0)
    saliency.output_sensitivity(model, x, "gradient", max_similarity=1.0, against="second")
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    write_tinynet(pytester)
    pytester.makefile(".yaml", saliency_base=SUITE)
    pytester.makepyfile(test_fix=FIXTURE)
    return pytester


def saved(project: pytest.Pytester, name: str = "base.json") -> dict:
    return json.loads((project.path / name).read_text())


def shift(project: pytest.Pytester, by: dict[str, float], name: str = "base.json") -> None:
    """Move the saved scores of the audits whose key ends with a given text."""
    doc = saved(project, name)
    for key, entry in doc["audits"].items():
        for part, delta in by.items():
            if key.endswith(part):
                entry["score"] += delta
    (project.path / name).write_text(json.dumps(doc))


def test_save_then_compare_unchanged(project):
    result = project.runpytest("--saliency-baseline-save=base.json")
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(["saliency baseline written: *base.json"])
    doc = saved(project)
    assert doc["schema"] == SCHEMA and doc["meta"]["plugin"] == "pytest-saliency"
    assert list(doc["audits"]) == [  # collection order; a test's second call of a check: #2
        "saliency_base.yaml::output_sensitivity[gradient]",
        "saliency_base.yaml::efficient_randomization[gradient]",
        "saliency_base.yaml::output_sensitivity[input_x_gradient]",
        "saliency_base.yaml::efficient_randomization[input_x_gradient]",
        "test_fix.py::test_two_calls::output_sensitivity[gradient]",
        "test_fix.py::test_two_calls::output_sensitivity[gradient]#2",
    ]
    entry = doc["audits"]["saliency_base.yaml::efficient_randomization[gradient]"]
    assert entry["threshold_key"] == "min_rise" and entry["verdict"] == "pass"
    result = project.runpytest("--saliency-baseline=base.json", "--saliency-report=r.json")
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(
        ["saliency baseline *base.json: 6 compared, 0 worse (0 by more than 0.05), 0 new, 0 gone"]
    )
    for r in json.loads((project.path / "r.json").read_text())["records"]:
        assert r["baseline"]["worse_by"] == pytest.approx(0.0, abs=1e-12)
        assert r["baseline"]["regressed"] is False and r["verdict"] == "pass"


def test_worse_than_the_tolerance_fails_in_the_checks_own_direction(project):
    project.runpytest("--saliency-baseline-save=base.json").assert_outcomes(passed=5)
    # a similarity that was 0.2 lower (now 0.2 worse), a rise that was 0.2 higher (same),
    # and one within the tolerance (0.01 worse: shown, passing)
    shift(project, {"output_sensitivity[gradient]": -0.2,
                    "efficient_randomization[input_x_gradient]": 0.2,
                    "output_sensitivity[input_x_gradient]": -0.01,
                    "test_two_calls::output_sensitivity[gradient]": -0.2})  # fmt: skip
    result = project.runpytest(
        "--saliency-baseline=base.json", "--saliency-report=r.json", "--saliency-report=s.md"
    )
    # the assert_ helper fails on a regression; a plain call records it only
    result.assert_outcomes(passed=2, failed=3)
    out = result.stdout.str()
    assert "gradient got worse under output_sensitivity: worse than the baseline by 0.200" in out
    # the test's second call never ran (its assert_ failed first): gone from this run
    assert "5 compared, 4 worse (3 by more than 0.05), 0 new, 1 gone" in out
    assert "  gone: test_fix.py::test_two_calls::output_sensitivity[gradient]#2" in out
    rows = {r["nodeid"]: r for r in json.loads((project.path / "r.json").read_text())["records"]}
    fine = rows["saliency_base.yaml::output_sensitivity[input_x_gradient]"]
    assert fine["verdict"] == "pass" and fine["baseline"]["worse_by"] == pytest.approx(0.01)
    worse = rows["saliency_base.yaml::efficient_randomization[input_x_gradient]"]
    assert worse["verdict"] == "fail" and worse["passed"] is True and worse["regressed"] is True
    assert "baseline (change)" in out and "(+0.200)" in out
    summary = (project.path / "s.md").read_text()
    assert "### Compared with the baseline" in summary and summary.count("**regressed**") == 3
    # a wider tolerance lets them pass
    wide = project.runpytest("--saliency-baseline=base.json", "--saliency-baseline-tolerance=0.5")
    wide.assert_outcomes(passed=5)


def test_new_and_gone_audits_are_named(project):
    project.runpytest("--saliency-baseline-save=base.json").assert_outcomes(passed=5)
    doc = saved(project)
    doc["audits"]["saliency_base.yaml::output_sensitivity[removed]"] = {"score": 0.1}
    del doc["audits"]["saliency_base.yaml::output_sensitivity[gradient]"]
    (project.path / "base.json").write_text(json.dumps(doc))
    result = project.runpytest("--saliency-baseline=base.json")
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(
        [
            "*: 5 compared, 0 worse (0 by more than 0.05), 1 new, 1 gone",
            "  new: saliency_base.yaml::output_sensitivity[[]gradient[]] (output_sensitivity)",
            "  gone: saliency_base.yaml::output_sensitivity[[]removed[]]",
        ]
    )


def test_the_baseline_keys_of_an_xdist_run_are_the_serial_ones(project):
    pytest.importorskip("xdist")
    project.runpytest("--saliency-baseline-save=serial.json").assert_outcomes(passed=5)
    project.runpytest("-n", "2", "--saliency-baseline-save=xdist.json").assert_outcomes(passed=5)
    assert saved(project, "xdist.json")["audits"] == saved(project, "serial.json")["audits"]
    result = project.runpytest("-n", "2", "--saliency-baseline=serial.json")
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(["*: 6 compared, 0 worse (0 by more than 0.05), 0 new, 0 gone"])


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (None, ["--saliency-baseline=nope.json"],
         "*--saliency-baseline *nope.json: no such file; write one with "
         "--saliency-baseline-save *nope.json"),
        ("{", ["--saliency-baseline=b.json"], "*b.json: not a readable JSON file*"),
        ('{"schema": "pytest-saliency/1", "records": []}', ["--saliency-baseline=b.json"],
         "*b.json: not a pytest-saliency baseline (schema 'pytest-saliency/1', expected "
         "'pytest-saliency-baseline/1')*"),
        ('{"schema": "pytest-saliency-baseline/1", "audits": []}',
         ["--saliency-baseline=b.json"], "*'audits' must map keys to entries"),
        (None, ["--saliency-baseline-tolerance=-1"],
         "*--saliency-baseline-tolerance = '-1': expected a number >= 0"),
    ],
)  # fmt: skip
def test_a_bad_baseline_is_a_usage_error(pytester, setup, args, message):
    if setup is not None:
        (pytester.path / "b.json").write_text(setup)
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_the_baseline_and_tolerance_can_live_in_the_ini(project):
    project.runpytest("--saliency-baseline-save=ci/base.json").assert_outcomes(passed=5)
    shift(project, {"output_sensitivity[gradient]": -0.2}, "ci/base.json")
    project.makeini(
        textwrap.dedent(
            """\
            [pytest]
            saliency_baseline = ci/base.json
            saliency_baseline_tolerance = 0.3
            """
        )
    )
    project.runpytest().assert_outcomes(passed=5)  # 0.2 worse is within 0.3


def test_keys_number_a_tests_repeated_check():
    rows = [
        {"nodeid": "t.py::a", "check": "c", "method_id": "g"},
        {"nodeid": "t.py::a", "check": "c", "method_id": "g"},
        {"nodeid": "t.py::a", "check": "c", "method_id": "ig"},
        {"nodeid": "t.py::a", "check": "d", "method_id": "g"},
        {"nodeid": "s.yaml::c[g]", "check": "c", "method_id": "g", "source": "suite"},
    ]
    # fmt: skip
    assert keys(rows) == ["t.py::a::c[g]", "t.py::a::c[g]#2", "t.py::a::c[ig]", "t.py::a::d[g]",
                          "s.yaml::c[g]"]  # fmt: skip


def test_two_methods_in_one_test_keep_their_own_baselines(project):
    """Keys name the method: swapping two calls compares each with its own score."""
    call = '    saliency.output_sensitivity(model, x, "{}", max_similarity=1.0, against="second")'
    head = "import tinynet\n\ndef test_two(saliency):\n    model, x = tinynet.make_model(), " \
           "tinynet.make_inputs()\n"  # fmt: skip
    order = ["gradient", "input_x_gradient"]
    project.makepyfile(test_fix=head + "\n".join(call.format(m) for m in order) + "\n")
    project.runpytest("--saliency-baseline-save=base.json").assert_outcomes(passed=5)
    project.makepyfile(test_fix=head + "\n".join(call.format(m) for m in order[::-1]) + "\n")
    result = project.runpytest("--saliency-baseline=base.json", "-k", "test_two")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*: 2 compared, 0 worse (0 by more than 0.05), 0 new, 4 gone"])


def test_a_caught_error_takes_no_baseline_key_and_no_junit_property(project):
    """A test that catches an audit's error, then audits the same method and check: the
    baseline entry is the audit's own, compared every run; the caught error leaves no trace."""
    import xml.etree.ElementTree as ET

    project.makepyfile(
        test_fix=textwrap.dedent(
            """\
            import pytest
            import tinynet
            from pytest_saliency import SaliencyError

            def test_caught(saliency):
                model, x = tinynet.make_model(), tinynet.make_inputs()
                with pytest.raises(SaliencyError):
                    saliency.output_sensitivity(model, x, "gradient", bins=3)
                saliency.output_sensitivity(model, x, "gradient", max_similarity=1.0)
            """
        )
    )
    args = ["-k", "test_caught", "--junitxml=j.xml"]
    project.runpytest("--saliency-baseline-save=base.json", *args).assert_outcomes(passed=1)
    assert list(saved(project)["audits"]) == [
        "test_fix.py::test_caught::output_sensitivity[gradient]"
    ]
    result = project.runpytest("--saliency-baseline=base.json", *args)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*: 1 compared, 0 worse (0 by more than 0.05), 0 new, 0 gone"])
    verdicts = [p.get("value") for p in ET.parse(project.path / "j.xml").iter("property")
                if p.get("name") == "saliency_verdict"]  # fmt: skip
    assert verdicts == ["pass"]
