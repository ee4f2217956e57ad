"""YAML suites audit all selected methods of a check in one shared call, with per-item results."""

from __future__ import annotations

import json

import pytest

import pytest_saliency.checks.base as base
import pytest_saliency.suite  # noqa: F401  (loaded once, before pytester's inner runs)
from pytest_saliency.suite import SuiteFile

from .conftest import write_tinynet

SUITE = """\
model: tinynet:make_model
inputs: tinynet:make_inputs
max_similarity: 1.0
similarity: spearman
methods:
  - gradient
  - input_x_gradient
  - {name: gradcam, layer: "2"}
  - {name: gradcam++, layer: "2", positive: false}
  - fullgrad
  - guided_backprop
  - {name: smoothgrad, samples: 2}
checks:
  output_sensitivity: {against: second}
  parameter_randomization: {mode: cascading}
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    write_tinynet(pytester)
    pytester.makefile(".yaml", saliency_shared=SUITE)
    return pytester


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, object]]:
    """Every audit call made by the inner runs: (check, method argument)."""
    seen: list[tuple[str, object]] = []
    original = base.execute

    def spy(check, models, inputs, method, kwargs):
        seen.append((check.name, method))
        return original(check, models, inputs, method, kwargs)

    monkeypatch.setattr(base, "execute", spy)
    return seen


def records(project: pytest.Pytester, name: str) -> list[dict]:
    return json.loads((project.path / name).read_text())["records"]


def test_shared_run_equals_per_item_audits(project, calls, monkeypatch):
    project.runpytest("--saliency-report=shared.json").assert_outcomes(passed=14)
    # One call per check, with every method of the suite.
    assert [(check, len(method)) for check, method in calls] == [
        ("output_sensitivity", 7),
        ("parameter_randomization", 7),
    ]
    calls.clear()
    monkeypatch.setattr(
        SuiteFile, "audit", lambda self, item, device, settings: item.own_audit(device, settings)
    )
    project.runpytest("--saliency-report=alone.json").assert_outcomes(passed=14)
    # each item alone: its method as a one-item list (its options stay the method's)
    assert len(calls) == 14 and all(len(method) == 1 for _, method in calls)
    shared, alone = records(project, "shared.json"), records(project, "alone.json")
    assert [r["nodeid"] for r in shared] == [r["nodeid"] for r in alone]
    assert shared == alone


def test_only_selected_methods_are_audited(project, calls):
    result = project.runpytest("-k", "parameter_randomization and (gradcam or fullgrad)")
    result.assert_outcomes(passed=3)
    assert calls == [
        (
            "parameter_randomization",
            [
                {"name": "gradcam", "layer": "2"},
                {"name": "gradcam++", "layer": "2", "positive": False},
                {"name": "fullgrad", "layer": None},
            ],
        )
    ]


def test_one_selected_item_runs_its_own_audit(project, calls):
    project.runpytest("-k", "output_sensitivity and fullgrad").assert_outcomes(passed=1)
    assert calls == [("output_sensitivity", [{"name": "fullgrad", "layer": None}])]


def test_a_failing_shared_call_is_split_until_the_error_is_one_items(project, calls):
    # Layer "4" is the Flatten: Grad-CAM fails there, and only its own item may fail for it.
    project.makefile(
        ".yaml",
        saliency_shared="""\
        model: tinynet:make_model
        inputs: tinynet:make_inputs
        max_similarity: 1.0
        methods: [gradient, {name: gradcam, layer: "4"}, fullgrad]
        checks: {parameter_randomization: {}}
        """,
    )
    result = project.runpytest()
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*FAILED*parameter_randomization?gradcam?*"])
    assert calls[0][1] == [
        {"name": "gradient", "layer": None},
        {"name": "gradcam", "layer": "4"},
        {"name": "fullgrad", "layer": None},
    ]
    gradient, gradcam, fullgrad = calls[0][1]
    check = "parameter_randomization"  # halves: [gradient] runs, [gradcam, fullgrad] raises
    assert calls[1:] == [
        (check, [gradient]), (check, [gradcam, fullgrad]), (check, [gradcam]), (check, [fullgrad])
    ]  # fmt: skip


def test_each_item_reports_its_share_of_the_shared_audit(project, monkeypatch):
    """--durations and junit charge a shared audit to its items equally, not to the first."""
    import time
    import xml.etree.ElementTree as ET

    original = base.execute

    def slow(*args, **kwargs):  # the shared audit dominates each item's own overhead, even
        time.sleep(1.4)  # on a loaded machine, so the shares are what the times show
        return original(*args, **kwargs)

    monkeypatch.setattr(base, "execute", slow)
    project.runpytest("--junitxml=j.xml", "-k", "parameter_randomization").assert_outcomes(passed=7)
    times = [float(case.get("time")) for case in ET.parse(project.path / "j.xml").iter("testcase")]
    assert len(times) == 7 and sum(times) > 0
    assert max(times) < 0.5 * sum(times)  # before: the first item had nearly all of it
    assert max(times) - min(times) < 0.25 * sum(times)


def test_a_long_audit_prints_its_progress(project):
    """To the terminal, past pytest's capture of the test's output (a real run: the lines
    must not land in "Captured stdout")."""
    project.makeconftest(
        "import pytest_saliency.plugin as plugin\n"
        "plugin.PROGRESS_AFTER = plugin.PROGRESS_EVERY = 0.0\n"
    )
    result = project.runpytest_subprocess("-p", "no:cacheprovider", "-k", "parameter_random")
    result.assert_outcomes(passed=7)
    result.stdout.fnmatch_lines(
        ["saliency: saliency_shared.yaml :: parameter_randomization: step 1/3 (*), * s",
         "saliency: saliency_shared.yaml :: parameter_randomization: step 3/3 (*), * s"]
    )  # fmt: skip
    assert "Captured stdout" not in result.stdout.str()
    quiet = project.runpytest_subprocess("-q", "-p", "no:cacheprovider", "-k", "parameter_random")
    assert "saliency: saliency_shared.yaml" not in quiet.stdout.str()
    project.makeconftest("import pytest_saliency.plugin as plugin\nplugin.PROGRESS_AFTER = 3600\n")
    short = project.runpytest_subprocess("-p", "no:cacheprovider", "-k", "parameter_random")
    assert "step 1/3" not in short.stdout.str()  # an audit shorter than that prints nothing
