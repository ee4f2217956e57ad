"""Several models in one suite (``models:``), and suites that load nothing until an item runs."""

from __future__ import annotations

import json
import textwrap

import pytest

import pytest_saliency.checks.base as base
import pytest_saliency.suite  # noqa: F401  (loaded once, before pytester's inner runs)

from .conftest import write_tinynet

HELPERS = '''
import torch
from torch import nn

import tinynet


def _log(name):
    with open("factory_calls.txt", "a") as log:
        log.write(name + "\\n")


def model_a():
    _log("a")
    return tinynet.make_model()


def model_b():
    """Another architecture: 6 channels, so a twin of model_a does not fit it."""
    _log("b")
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(),
            nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(6 * 8 * 8, 3),
        )
    return model.eval()


def permuted_b():
    model = model_b()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1)
    return model


def batch():
    _log("inputs")
    return tinynet.make_inputs(4)


def six():
    return tinynet.make_inputs(6)
'''

SUITE = """\
inputs: helpers:batch
max_similarity: 1.0
methods:
  - gradient
  - gradcam
models:
  small: helpers:model_a
  wide:
    model: helpers:model_b
    inputs: helpers:six
    layer: "2"
    checks:
      output_sensitivity: {max_similarity: -1.0}
    expect:
      gradient: {output_sensitivity: fail}
      gradcam: {output_sensitivity: fail}
checks:
  output_sensitivity: {against: random}
  parameter_randomization: {mode: cascading}
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    write_tinynet(pytester)
    pytester.makepyfile(helpers=HELPERS)
    return pytester


def calls(project: pytest.Pytester) -> list[str]:
    log = project.path / "factory_calls.txt"
    return log.read_text().split() if log.exists() else []


def records(project: pytest.Pytester, name: str = "run.json") -> list[dict]:
    return json.loads((project.path / name).read_text())["records"]


def test_one_list_of_methods_audits_every_model_with_its_own_settings(project, monkeypatch):
    seen: list[tuple[str, int, list]] = []
    original = base.execute

    def spy(check, models, inputs, method, kwargs):
        seen.append((check.name, int(inputs.shape[0]), [m.get("layer") for m in method]))
        return original(check, models, inputs, method, kwargs)

    monkeypatch.setattr(base, "execute", spy)
    project.makefile(".yaml", saliency_models=SUITE)
    result = project.runpytest("-v", "--saliency-report=run.json")
    result.assert_outcomes(passed=6, xfailed=2)
    result.stdout.fnmatch_lines(
        [
            "saliency_models.yaml::small::output_sensitivity[[]gradient[]] PASSED*",
            "saliency_models.yaml::wide::output_sensitivity[[]gradcam[]] XFAIL*",
            "saliency_models.yaml::wide::parameter_randomization[[]gradcam[]] PASSED*",
        ]
    )
    # each model loaded once; the suite's inputs once; the wide model's own inputs used
    assert sorted(calls(project)) == ["a", "b", "inputs"]
    # one shared call per model and check, each with the model's inputs and CAM layer
    assert sorted(seen) == sorted(
        [
            ("output_sensitivity", 4, [None, None]),
            ("parameter_randomization", 4, [None, None]),
            ("output_sensitivity", 6, [None, "2"]),
            ("parameter_randomization", 6, [None, "2"]),
        ]
    )
    rows = {(r["model"], r["check"], r["method_id"]): r for r in records(project)}
    assert len(rows) == 8
    wide = rows[("wide", "output_sensitivity", "gradcam")]
    assert wide["threshold"] == -1.0 and wide["verdict"] == "xfail"
    assert rows[("small", "output_sensitivity", "gradcam")]["threshold"] == 1.0
    assert rows[("wide", "parameter_randomization", "gradcam")]["expected"] == "pass"
    assert rows[("wide", "output_sensitivity", "gradcam")]["nodeid"] == (
        "saliency_models.yaml::wide::output_sensitivity[gradcam]"
    )


def test_collection_loads_nothing_and_k_loads_only_what_it_selects(project):
    project.makefile(".yaml", saliency_models=SUITE)
    result = project.runpytest("--co", "-q")
    assert result.ret == 0 and len(result.stdout.lines) > 8
    assert calls(project) == []
    project.runpytest("-k", "small and output_sensitivity").assert_outcomes(passed=2)
    assert calls(project) == ["a", "inputs"]


def test_a_model_that_cannot_load_fails_its_own_items_only(project):
    broken = SUITE.replace("small: helpers:model_a", "small: helpers:no_such_model")
    project.makefile(".yaml", saliency_models=broken)
    result = project.runpytest()
    result.assert_outcomes(errors=4, passed=2, xfailed=2)
    out = result.stdout.str()
    assert out.count("saliency_models.yaml:7: models.small: 'helpers' has no attribute") == 4
    assert out.count(", above)") == 3  # in full once, then pointed at
    assert "Traceback" not in out


def test_a_twin_per_model(project):
    project.makefile(
        ".yaml",
        saliency_twins=textwrap.dedent(
            """\
            inputs: helpers:batch
            methods: [gradient]
            checks:
              data_randomization: {max_similarity: 1.0}
            models:
              wide:
                model: helpers:model_b
                checks: {data_randomization: {model: helpers:permuted_b}}
              small:
                model: helpers:model_a
                checks: {data_randomization: {model: helpers:permuted_b}}
            """
        ),
    )
    result = project.runpytest()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        ["saliency_twins.yaml:11: models.small.checks.data_randomization.model: *"]
    )


BAD = {
    "both": (
        "model: helpers:model_a\ninputs: helpers:batch\nmethods: [gradient]\n"
        "models: {a: helpers:model_a}\n",
        "saliency_both.yaml:4: models: give either 'model:' (one model) or 'models:' "
        "(several), not both",
    ),
    "none": (
        "inputs: helpers:batch\nmethods: [gradient]\n",
        "saliency_none.yaml:1: (top level): missing required key 'model' (or 'models:' for "
        "several)",
    ),
    "id": (
        "inputs: helpers:batch\nmethods: [gradient]\nmodels: {'a::b': helpers:model_a}\n",
        "saliency_id.yaml:3: models.a::b: a model id is letters, digits*got 'a::b'",
    ),
    "key": (
        "inputs: helpers:batch\nmethods: [gradient]\nmodels:\n  a: {model: helpers:model_a, "
        "layers: '2'}\n",
        "saliency_key.yaml:4: models.a.layers: unknown key of a model 'layers'; did you mean "
        "'layer'*",
    ),
    "inputs": (
        "methods: [gradient]\nmodels:\n  a: {model: helpers:model_a}\n",
        "saliency_inputs.yaml:3: models.a: missing 'inputs:' (give it here, or once at the top "
        "level for every model)",
    ),
    "check": (
        "inputs: helpers:batch\nmethods: [gradient]\nchecks: {output_sensitivity: {}}\n"
        "models:\n  a:\n    model: helpers:model_a\n    checks: {efficient_randomization: {}}\n",
        "saliency_check.yaml:7: models.a.checks.efficient_randomization: this suite does not "
        "run 'efficient_randomization' (its checks: output_sensitivity)*",
    ),
    "methods": (
        "inputs: helpers:batch\nmethods: [gradient]\nmodels:\n  a:\n    model: helpers:model_a\n"
        "    checks: {output_sensitivity: {methods: [gradient]}}\n",
        "saliency_methods.yaml:6: models.a.checks.output_sensitivity.methods: which methods a "
        "check runs is the suite's*",
    ),
    "twin": (
        "inputs: helpers:batch\nmethods: [gradient]\nchecks: {data_randomization: {}}\n"
        "models: {a: helpers:model_a}\n",
        "saliency_twin.yaml:4: models.a: data_randomization needs 'model:' naming * (in "
        "checks.data_randomization or models.a.checks.data_randomization; *",
    ),
    "expect": (
        "inputs: helpers:batch\nmethods: [gradient]\nmodels:\n  a:\n    model: helpers:model_a\n"
        "    expect: {gradcam: fail}\n",
        "saliency_expect.yaml:6: models.a.expect.gradcam: unknown method id 'gradcam'*",
    ),
    "empty": (
        "inputs: helpers:batch\nmethods: [gradient]\nmodels: {}\n",
        "saliency_empty.yaml:3: models: expected a mapping of model id -> *",
    ),
}


def test_models_mistakes_are_located_collection_errors(project):
    for name, (text, _) in BAD.items():
        project.makefile(".yaml", **{f"saliency_{name}": text})
    result = project.runpytest("--continue-on-collection-errors")
    result.assert_outcomes(errors=len(BAD))
    for _, line in BAD.values():
        result.stdout.fnmatch_lines([line])
    assert "Traceback" not in result.stdout.str() and calls(project) == []


def test_a_models_null_inputs_are_the_suites(project):
    project.makefile(
        ".yaml",
        saliency_null=(
            "inputs: helpers:batch\nmax_similarity: 1.0\nmethods: [gradient]\n"
            "checks: {output_sensitivity: {}}\n"
            "models:\n  a: {model: helpers:model_a, inputs: null, targets: null}\n"
        ),
    )
    result = project.runpytest("-v")
    result.assert_outcomes(passed=1)
    assert "Traceback" not in result.stdout.str()
