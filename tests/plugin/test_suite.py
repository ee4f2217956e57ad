"""YAML audit suites in real pytest runs: items, verdicts, precedence and every collection error."""

from __future__ import annotations

import json
import textwrap
import xml.etree.ElementTree as ET

import pytest
import torch

import pytest_saliency.html  # noqa: F401  (loaded once, before pytester's inner runs)
import pytest_saliency.suite  # noqa: F401
from pytest_saliency.suite import fmt_path, load_yaml

from .conftest import write_tinynet

# Helpers the suites point at, next to tinynet (make_model(), make_inputs(n)).
HELPERS = '''
import torch
import tinynet


def counted_model():
    """The tiny model; appends a line to factory_calls.txt on every call."""
    with open("factory_calls.txt", "a") as log:
        log.write("call\\n")
    return tinynet.make_model()


TRAINED = tinynet.make_model()
BATCH = tinynet.make_inputs(4)
ONE = tinynet.make_inputs(1)
LIST = [1, 2, 3]


def batch():
    return tinynet.make_inputs(4)


def flat():
    return torch.randn(8)


def not_a_model():
    return [1, 2]


def broken():
    raise RuntimeError("checkpoint weights.ckpt is missing")
'''

SUITE = """\
model: helpers:counted_model
inputs: helpers:batch
max_similarity: {limit}
methods:
  - gradient
  - {{name: gradcam, layer: "2"}}
checks:
  output_sensitivity: {{against: random}}
  parameter_randomization: {{mode: cascading}}
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    write_tinynet(pytester)
    pytester.makepyfile(helpers=HELPERS)
    return pytester


def no_traceback(result: pytest.RunResult) -> None:
    text = result.stdout.str()
    assert "Traceback" not in text and "pytest_saliency/suite.py" not in text


def test_passing_suite_exits_0_loads_once_and_fills_junitxml(project: pytest.Pytester) -> None:
    project.makefile(".yaml", saliency_tiny=SUITE.format(limit=1.0))
    result = project.runpytest("-v", "--junitxml=junit.xml")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        [
            "saliency_tiny.yaml::output_sensitivity[[]gradient] PASSED*",
            "saliency_tiny.yaml::parameter_randomization[[]gradient] PASSED*",
            "saliency_tiny.yaml::output_sensitivity[[]gradcam] PASSED*",
            "saliency_tiny.yaml::parameter_randomization[[]gradcam] PASSED*",
        ]
    )
    # 4 items, one model: loaded once per file, at collection.
    assert (project.path / "factory_calls.txt").read_text().splitlines() == ["call"]
    cases = ET.parse(project.path / "junit.xml").getroot().iter("testcase")
    props = [{p.get("name"): p.get("value") for p in case.iter("property")} for case in cases]
    assert len(props) == 4
    for p in props:
        assert p["saliency_verdict"] == "pass" and p["saliency_threshold"] == "1.0"
        assert -1.0 <= float(p["saliency_score"]) <= 1.0


def test_failing_suite_exits_1_with_the_table_and_x_stops(project: pytest.Pytester) -> None:
    project.makefile(".yaml", saliency_tiny=SUITE.format(limit=-1.0))
    result = project.runpytest("-x")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(failed=1)  # -x: the first failing item stops the run
    result.stdout.fnmatch_lines(
        [
            "*_ output_sensitivity[[]gradient] _*",
            "saliency_tiny.yaml:5: methods[[]0]: gradient is not sensitive enough under "
            "output_sensitivity: * > max_similarity -1 (score *)",
            "output_sensitivity of 'gradient' (ssim, n=4)",
            "*sample*target*other*similarity",
            "*score *, 95% CI [[]*, *]",
            "most similar samples: #*",
        ]
    )
    no_traceback(result)


def test_expect_fail_is_a_strict_xfail_and_lf_reruns_the_failure(project: pytest.Pytester) -> None:
    project.makefile(
        ".yaml",
        saliency_expect="""\
        model: helpers:TRAINED
        inputs: helpers:BATCH
        max_similarity: -1.0      # output sensitivity fails...
        methods: [gradient]
        checks:
          output_sensitivity:
          parameter_randomization: {max_similarity: 1.0}   # ...randomization passes
        expect:
          gradient: fail
        """,
    )
    result = project.runpytest("-rfxX")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(xfailed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*expected to fail (expect: fail), but the audit passed*remove its 'expect' entry",
            "FAILED saliency_expect.yaml::parameter_randomization[[]gradient]*",
            "XFAIL saliency_expect.yaml::output_sensitivity[[]gradient]*",
        ]
    )
    rerun = project.runpytest("--lf", "-v")
    rerun.assert_outcomes(failed=1)  # the xfailed item is not collected again
    rerun.stdout.fnmatch_lines(["run-last-failure: rerun previous 1 failure*"])
    rerun.stdout.fnmatch_lines(
        ["saliency_expect.yaml::parameter_randomization[[]gradient] FAILED*"]
    )


def test_per_check_expect_mapping(project: pytest.Pytester) -> None:
    project.makefile(
        ".yaml",
        saliency_expect="""\
        model: helpers:TRAINED
        inputs: helpers:BATCH
        max_similarity: -1.0
        methods: [{name: gradient, id: plain}]
        checks: {output_sensitivity: {}}
        expect: {plain: {output_sensitivity: fail}}
        """,
    )
    project.runpytest().assert_outcomes(xfailed=1)


def test_an_audit_that_cannot_run_fails_with_a_located_message(project: pytest.Pytester) -> None:
    project.makefile(
        ".yaml",
        saliency_one="""\
        model: helpers:TRAINED
        inputs: helpers:ONE
        confidence: true
        methods: [gradient]
        checks: {output_sensitivity: {}}
        """,
    )
    result = project.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["saliency_one.yaml:4: methods[[]0]: passed(confidence=True) needs at least 2 samples*"]
    )
    no_traceback(result)


def test_ids_and_k_selection(project: pytest.Pytester) -> None:
    project.makefile(
        ".saliency.yaml",
        digits="""\
        model: helpers:TRAINED
        inputs: helpers:BATCH
        methods:
          - gradient
          - {name: rectgrad, positive: false}
          - {name: rectgrad, percentile: 90.0, id: rect90}
        checks: {output_sensitivity: {}}
        """,
    )
    listed = project.runpytest("--co", "-q")
    listed.stdout.fnmatch_lines(
        [
            "digits.saliency.yaml::output_sensitivity[[]gradient]",
            "digits.saliency.yaml::output_sensitivity[[]rectgrad-positive=false]",
            "digits.saliency.yaml::output_sensitivity[[]rect90]",
        ]
    )
    picked = project.runpytest("--co", "-q", "-k", "rect90")
    picked.stdout.fnmatch_lines(["digits.saliency.yaml::output_sensitivity[[]rect90]", "*1/3*"])


def test_pt_inputs_relative_to_the_suite_and_list_targets(project: pytest.Pytester) -> None:
    audits = project.mkdir("audits")
    (audits / "data").mkdir()
    torch.save(torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3)),
               audits / "data" / "batch.pt")  # fmt: skip
    (audits / "saliency_pt.yml").write_text(
        textwrap.dedent("""\
        model: helpers:TRAINED
        inputs: data/batch.pt
        targets: [0, 1, 2, 0]
        max_similarity: 1.0
        methods: [gradient]
        checks: {output_sensitivity: {against: second}}
        """)
    )
    result = project.runpytest("--saliency-report=run.json")
    result.assert_outcomes(passed=1)
    (record,) = json.loads((project.path / "run.json").read_text())["records"]
    assert record["targets"] == [0, 1, 2, 0]
    assert record["nodeid"] == "audits/saliency_pt.yml::output_sensitivity[gradient]"


def test_suite_keys_win_over_ini_and_cli_device_wins_over_suite(project: pytest.Pytester) -> None:
    project.makeini(
        "[pytest]\nsaliency_similarity = spearman\nsaliency_max_similarity = -1\n"
        "saliency_seed = 7\n"
    )
    project.makefile(
        ".yaml",
        saliency_keys="""\
        model: helpers:TRAINED
        inputs: helpers:BATCH
        device: cuda:0
        max_similarity: 1.0
        methods: [gradient]
        checks:
          output_sensitivity:
          parameter_randomization: {similarity: pearson, seed: 3}
        """,
    )
    result = project.runpytest("--saliency-device=cpu", "--saliency-report=run.json")
    result.assert_outcomes(passed=2)
    records = json.loads((project.path / "run.json").read_text())["records"]
    got = {r["check"]: (r["similarity"], r["seed"], r["threshold"], r["device"]) for r in records}
    assert got == {
        "output_sensitivity": ("spearman", 7, 1.0, "cpu"),
        "parameter_randomization": ("pearson", 3, 1.0, "cpu"),
    }
    if not torch.cuda.is_available():  # without the CLI option the suite's device applies
        failed = project.runpytest()  # one collection error, not one per item
        failed.assert_outcomes(errors=1)
        failed.stdout.fnmatch_lines(
            ["saliency_keys.yaml:3: device: device 'cuda:0': CUDA is not available*"
             "or run with --saliency-device cpu"]
        )  # fmt: skip


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without MPS")
def test_a_suite_on_mps_without_mps_is_one_located_error(project: pytest.Pytester) -> None:
    project.makefile(".yaml", saliency_mps="model: helpers:TRAINED\ninputs: helpers:BATCH\n"
                                           "device: mps\nmethods: [gradient]\n")  # fmt: skip
    result = project.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["saliency_mps.yaml:3: device: device 'mps': *MPS*"])
    no_traceback(result)
    assert project.runpytest("--saliency-device=cpu").ret == 0  # the remedy it names


# name -> (what differs from a valid suite, the lines its collection error must show)
BAD_SUITES: dict[str, tuple[dict[str, str], list[str]]] = {
    "topkey": (
        {"extra": "sed: 1"},
        ["saliency_topkey.yaml:5: sed: unknown key 'sed'; did you mean 'seed'*Valid choices: *"],
    ),
    "method": (
        {"methods": "methods: [gradient, guided_backprp]"},
        ["saliency_method.yaml:4: methods[[]1].name: unknown method 'guided_backprp'; did you "
         "mean 'guided_backprop'?*Valid choices: *gradient*"],
    ),
    "option": (
        {"methods": "methods: [{name: rectgrad, postive: false}]"},
        ["saliency_option.yaml:4: methods[[]0].postive: unknown option of method 'rectgrad' "
         "'postive'; did you mean 'positive'*"],
    ),
    "check": (
        {"extra": "checks: {parameter_randomisation: {}}"},
        ["saliency_check.yaml:5: checks.parameter_randomisation: unknown check*did you mean "
         "'parameter_randomization'?*"],
    ),
    "setting": (
        {"extra": "checks:\n  parameter_randomization:\n    mdoe: cascading"},
        ["saliency_setting.yaml:7: checks.parameter_randomization.mdoe: unknown setting*"
         "did you mean 'mode'*"],
    ),
    "choice": (
        {"extra": "checks: {output_sensitivity: {against: randm}}"},
        ["*checks.output_sensitivity.against: unknown against 'randm'; did you mean 'random'?*"],
    ),
    "threshold": (
        {"extra": "max_similarity: 1.5\nchecks: {output_sensitivity: {max_similarity: high}}"},
        ["saliency_threshold.yaml:5: max_similarity: expected a number in [[]-1, 1]*got 1.5",
         "saliency_threshold.yaml:6: checks.output_sensitivity.max_similarity: expected a "
         "number in [[]-1, 1]*got 'high'"],
    ),
    "dupid": (
        {"methods": "methods: [gradient, gradient]"},
        ["saliency_dupid.yaml:4: methods[[]1]: duplicate method id 'gradient' (also methods[[]0]"
         "*give one of them an 'id:'"],
    ),
    "expect": (
        {"extra": "expect: {gradeint: fail}"},
        ["saliency_expect.yaml:5: expect.gradeint: unknown method id*did you mean 'gradient'?*"],
    ),
    "yaml": (
        {"extra": "checks: [a, b"},
        ["saliency_yaml.yaml:5:14: malformed YAML*expected ',' or ']'*"],
    ),
    "importerr": (
        {"model": "no_such_pkg.models:net"},
        ["saliency_importerr.yaml:1: model: could not import 'no_such_pkg.models': "
         "ModuleNotFoundError: No module named 'no_such_pkg'"],
    ),
    "attr": (
        {"model": "helpers:conted_model"},
        ["saliency_attr.yaml:1: model: 'helpers' has no attribute 'conted_model'; did you mean "
         "'counted_model'*"],
    ),
    "raises": (
        {"model": "helpers:broken"},
        ["saliency_raises.yaml:1: model: calling helpers:broken() raised RuntimeError: "
         "checkpoint weights.ckpt is missing (at *helpers.py:*)"],
    ),
    "notmodule": (
        {"model": "helpers:not_a_model"},
        ["saliency_notmodule.yaml:1: model: helpers:not_a_model() returned a list; expected a "
         "torch.nn.Module"],
    ),
    "rank": (
        {"inputs": "helpers:flat"},
        ["saliency_rank.yaml:2: inputs: helpers:flat: inputs have shape (8,)*"],
    ),
    "type": (
        {"inputs": "helpers:LIST"},
        ["saliency_type.yaml:2: inputs: helpers:LIST: inputs must be a float tensor*got list"],
    ),
    "layer": (
        {"methods": 'methods: [{name: gradcam, layer: "9"}]'},
        ["saliency_layer.yaml:4: methods[[]0].layer: layer '9' is not a module of Sequential.*"
         "Names come from model.named_modules(): '0', '1'*"],
    ),
}  # fmt: skip


def bad_suite(model="helpers:TRAINED", inputs="helpers:BATCH", methods="methods: [gradient]",
              extra="") -> str:  # fmt: skip
    return f"model: {model}\ninputs: {inputs}\nseed: 0\n{methods}\n{extra}\n"


def test_every_mistake_is_a_located_error_and_none_hides_another(
    project: pytest.Pytester,
) -> None:
    for name, (changes, _) in BAD_SUITES.items():
        project.makefile(".yaml", **{f"saliency_{name}": bad_suite(**changes)})
    project.makefile(".yaml", saliency_zgood=SUITE.format(limit=1.0))
    result = project.runpytest("--continue-on-collection-errors")
    # Every bad suite is reported, and the good one still runs. A mistake in the file is a
    # collection error; one that needs the model loaded (imports, inputs, layers) is an error
    # of each of the suite's items (two here), shown in full once.
    at_run = {"importerr", "attr", "raises", "notmodule", "rank", "type", "layer"}
    result.assert_outcomes(passed=4, errors=len(BAD_SUITES) + len(at_run))
    assert result.stdout.str().count(", above)") == len(at_run)
    for _, patterns in BAD_SUITES.values():
        result.stdout.fnmatch_lines(patterns)
    result.stdout.fnmatch_lines(["*_ ERROR collecting saliency_topkey.yaml _*"])
    no_traceback(result)


def test_all_mistakes_of_one_suite_are_listed_together(project: pytest.Pytester) -> None:
    project.makefile(
        ".yaml",
        saliency_many="""\
        model: helpers:TRAINED
        inputs: helpers:BATCH
        similarity: ssimm
        methods: [gradient, {name: smoothgrad, samples: 0}]
        checks: {parameter_randomization: {layers: 3}}
        """,
    )
    result = project.runpytest("--co")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(
        [
            "saliency_many.yaml:3: similarity: unknown similarity 'ssimm'; did you mean 'ssim'*",
            "saliency_many.yaml:4: methods[[]1]: option 'samples' must be in*got 0",
            "saliency_many.yaml:5: checks.parameter_randomization.layers: layers must be*got 3",
        ]
    )


def test_layer_lists_are_checked_against_the_model(project: pytest.Pytester) -> None:
    project.makefile(
        ".yaml",
        saliency_layers="""\
        model: helpers:TRAINED
        inputs: helpers:BATCH
        methods: [gradient]
        checks:
          parameter_randomization:
            layers: ["0", "7"]
        """,
    )
    assert project.runpytest("--co").ret == 0  # the model is not loaded to collect
    result = project.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["saliency_layers.yaml:6: checks.parameter_randomization.layers[[]1]: layer '7' is not*"]
    )


def test_yaml_lines_and_key_paths() -> None:
    data, lines = load_yaml("a: 1\nmethods:\n  - x\n  - {name: y, layer: z}\n", "f.yaml")
    assert data == {"a": 1, "methods": ["x", {"name": "y", "layer": "z"}]}
    assert lines[("a",)] == 1 and lines[("methods",)] == 2
    assert lines[("methods", 0)] == 3 and lines[("methods", 1, "layer")] == 4
    assert fmt_path(("methods", 1, "layer")) == "methods[1].layer"
    assert fmt_path(("checks", "x", "layers", 0)) == "checks.x.layers[0]"


def test_xdist_gives_the_same_records_as_a_serial_run(project: pytest.Pytester) -> None:
    project.makefile(".yaml", saliency_tiny=SUITE.format(limit=1.0))
    project.runpytest("--saliency-report=serial.json").assert_outcomes(passed=4)
    parallel = project.runpytest_subprocess("-n", "2", "--saliency-report=xdist.json")
    parallel.assert_outcomes(passed=4)

    def records(name: str) -> list[dict]:
        return json.loads((project.path / name).read_text())["records"]

    assert records("xdist.json") == records("serial.json")
    # Each process (the serial run, two workers) loaded the model once.
    assert len((project.path / "factory_calls.txt").read_text().splitlines()) == 3


def test_cam_layer_points_and_layouts_in_a_suite(project: pytest.Pytester) -> None:
    suite = """\
        model: helpers:TRAINED
        inputs: helpers:BATCH
        max_similarity: 1.0
        methods:
          - {{name: gradcam, layer: "3:input", layout: channels_first}}
          - {{name: gradcam++, layer: "{layer}", layout: {layout}}}
        checks:
          output_sensitivity: {{against: random}}
        """
    project.makefile(".yaml", saliency_points=suite.format(layer="2:output", layout="null"))
    project.runpytest().assert_outcomes(passed=2)
    project.makefile(".yaml", saliency_points=suite.format(layer="2:inputs", layout="null"))
    result = project.runpytest()  # the layer is read on the model, when its items run
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        ["saliency_points.yaml:6: methods[[]1[]].layer: layer '2:inputs': 'inputs' is not a*"]
    )
    no_traceback(result)
    project.makefile(".yaml", saliency_points=suite.format(layer="2", layout="nhwc"))
    result = project.runpytest("--co")
    result.stdout.fnmatch_lines(["saliency_points.yaml:6: *layout='nhwc' is not a feature layout*"])
    no_traceback(result)
