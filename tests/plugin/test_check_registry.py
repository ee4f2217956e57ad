"""The check registry through every surface, in real pytest runs: the ``saliency`` fixture
(``saliency.<check>``, ``saliency.audit``, the ``assert_*`` helpers, the marker), YAML suites
(items, settings, errors, ``expect``), the terminal table, JSON, HTML and junit reports; for
the three newer checks (smooth, efficient and data randomization) next to the first two."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

import pytest_saliency.html  # noqa: F401  (loaded once, before pytester's inner runs)
import pytest_saliency.suite  # noqa: F401
from pytest_saliency.checks import checks, get_check

from .conftest import write_tinynet

CHECKS = [
    "output_sensitivity",
    "parameter_randomization",
    "smooth_randomization",
    "efficient_randomization",
    "data_randomization",
]
ASSERTS = [
    "assert_output_sensitive",
    "assert_randomization_sensitive",
    "assert_smooth_randomization_sensitive",
    "assert_efficient_randomization_sensitive",
    "assert_data_randomization_sensitive",
]

# Models and inputs next to tinynet: its architecture with other weights (the stand-in for a
# twin trained on permuted labels), and one with a wider first layer (another architecture).
TWINS = """
import torch
from torch import nn

import tinynet


def _net(seed, width=4):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 4, 3, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(4 * 8 * 8, 3),
        )
    return model.eval()


def trained():
    return tinynet.make_model()


def permuted():
    return _net(7)


def wide():
    return _net(7, width=6)


def batch():
    return tinynet.make_inputs(3)
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    write_tinynet(pytester)
    pytester.makepyfile(twins=TWINS)
    return pytester


def junit_properties(path) -> dict[str, list[tuple[str, str]]]:
    """testcase name -> its (property name, value) pairs, in order."""
    root = ET.parse(path).getroot()
    return {
        case.get("name"): [(p.get("name"), p.get("value")) for p in case.iter("property")]
        for case in root.iter("testcase")
    }


def records_of(path) -> list[dict]:
    return json.loads(path.read_text())["records"]


def controls_text(record: dict) -> str:
    """The table's ``noise/edge`` cell of ``record``."""
    return "/".join(f"{record['controls'][k]:.3f}" for k in ("noise", "edge"))


def shown(record: dict) -> str:
    """The table's verdict cell: failures upper-cased."""
    verdict = record["verdict"]
    return verdict.upper() if verdict in ("fail", "xpass") else verdict


def no_traceback(result: pytest.RunResult) -> None:
    text = result.stdout.str()
    assert "Traceback" not in text and "pytest_saliency/suite.py" not in text


def test_the_registry_lists_the_five_checks_with_their_helpers() -> None:
    assert checks() == CHECKS
    assert [get_check(name).assert_name for name in CHECKS] == ASSERTS
    assert get_check("efficient_randomization").threshold.key == "min_rise"
    assert get_check("efficient_randomization").threshold.symbol() == ">="
    assert {get_check(n).threshold.key for n in CHECKS if n != "efficient_randomization"} == {
        "max_similarity"
    }
    assert get_check("data_randomization").models == ("model", "randomized_model")
    # The YAML keys come from each check's schema: its own options, then the shared ones.
    smooth = get_check("smooth_randomization").suite_keys
    assert {"mode", "order", "layers", "noise_samples", "noise_magnitude"} <= set(smooth)
    assert {"similarity", "max_similarity"} <= set(smooth) and "min_rise" not in smooth
    efficient = get_check("efficient_randomization").suite_keys
    assert "bins" in efficient and "min_rise" in efficient
    assert "similarity" not in efficient and "max_similarity" not in efficient
    assert get_check("data_randomization").suite_keys[0] == "model"


# -- 1. the fixture API and every report it feeds ----------------------------------------------

FIXTURE_API = """
import tinynet
import twins


def test_smooth(saliency):
    model, x = tinynet.make_model(), tinynet.make_inputs(3)
    result = saliency.smooth_randomization(model, x, "gradient", noise_samples=3)
    assert result.check == "smooth_randomization" and result.similarity == "spearman_abs"
    assert result.settings["noise_samples"] == 3 and result.order == "bottom_up"


def test_efficient(saliency):
    model, x = tinynet.make_model(), tinynet.make_inputs(3)
    result = saliency.efficient_randomization(model, x, "gradient", min_rise=-1.0)
    assert result.check == "efficient_randomization" and result.passed(min_rise=-1.0)


def test_data(saliency):
    model, x = tinynet.make_model(), tinynet.make_inputs(3)
    result = saliency.data_randomization(model, twins.permuted(), x, "gradient")
    assert set(result.maps) == {"trained", "permuted"}


def test_audit(saliency):
    model, x = tinynet.make_model(), tinynet.make_inputs(3)
    result = saliency.audit("efficient_randomization", model, x, "gradient")
    assert type(result).__name__ == "ComplexityResult"
    assert set(dir(saliency)) >= {CHECKS} | {ASSERTS}
"""


def test_fixture_api_fills_the_json_junit_and_the_table(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_api=FIXTURE_API.replace("{CHECKS}", repr(set(CHECKS))).replace(
            "{ASSERTS}", repr(set(ASSERTS))
        )
    )
    result = project.runpytest("--saliency-report=r.json", "--junitxml=j.xml")
    result.assert_outcomes(passed=4)
    records = {r["nodeid"].split("::")[1]: r for r in records_of(project.path / "r.json")}
    assert sorted(records) == ["test_audit", "test_data", "test_efficient", "test_smooth"]
    expected = {
        "test_audit": ("efficient_randomization", "min_rise", 0.1, "entropy_rise"),
        "test_data": ("data_randomization", "max_similarity", 0.5, "ssim"),
        "test_efficient": ("efficient_randomization", "min_rise", -1.0, "entropy_rise"),
        "test_smooth": ("smooth_randomization", "max_similarity", 0.5, "spearman_abs"),
    }
    for test, (check, key, threshold, metric) in expected.items():
        r = records[test]
        assert (r["check"], r["threshold_key"], r["threshold"], r["similarity"]) == (
            check,
            key,
            threshold,
            metric,
        ), test
        assert set(r["controls"]) == {"noise", "edge"}, test
        assert all(isinstance(v, float) for v in r["controls"].values()), test
        assert r["passed"] == (
            r["score"] <= threshold if key == "max_similarity" else r["score"] >= threshold
        )
        assert r["verdict"] == ("pass" if r["passed"] else "fail")
        assert r["source"] == "python" and len(r["targets"]) == 3
    smooth, efficient = records["test_smooth"], records["test_efficient"]
    assert smooth["settings"]["noise_samples"] == 3
    assert smooth["settings"]["noise_magnitude"] == 0.1
    assert smooth["order"] == "bottom_up" and len(smooth["scores"]) == len(smooth["layers"])
    assert efficient["bins"] == 100 and efficient["settings"]["bins"] == 100
    assert set(efficient["entropies"]) == {"original", "randomized"}
    assert efficient["verdict"] == "pass"

    props = junit_properties(project.path / "j.xml")
    for test, r in records.items():
        got = dict(props[test])
        assert got["saliency_check"] == r["check"]
        assert float(got["saliency_score"]) == pytest.approx(r["score"])
        assert float(got["saliency_threshold"]) == r["threshold"]
        assert got["saliency_verdict"] == r["verdict"]
        assert float(got["saliency_control_noise"]) == pytest.approx(r["controls"]["noise"])
        assert float(got["saliency_control_edge"]) == pytest.approx(r["controls"]["edge"])

    result.stdout.fnmatch_lines(
        [
            "*= saliency audits =*",
            "  method*metric*score*95% CI*noise/edge*threshold*verdict",
            "test_api.py::test_smooth :: smooth_randomization",
            f"  gradient*spearman_abs*{controls_text(smooth)}*<= 0.500*{shown(smooth)}",
            "test_api.py::test_efficient :: efficient_randomization",
            f"  gradient*entropy_rise*{controls_text(efficient)}*>= -1.000*pass",
            "test_api.py::test_data :: data_randomization",
            f"  gradient*ssim*{controls_text(records['test_data'])}*<= 0.500*"
            f"{shown(records['test_data'])}",
            "test_api.py::test_audit :: efficient_randomization",
            f"  gradient*entropy_rise*{controls_text(records['test_audit'])}*>= 0.100*"
            f"{shown(records['test_audit'])}",
            "4 audits: *",
        ]
    )


# -- 2. failing helpers and wrong calls ----------------------------------------------------------

ERRORS = """
import tinynet
import twins


def test_assert_fails(saliency):
    model, x = tinynet.make_model(), tinynet.make_inputs(3)
    saliency.assert_efficient_randomization_sensitive(model, x, "gradient", min_rise=5.0)


def test_wrong_threshold(saliency):
    model, x = tinynet.make_model(), tinynet.make_inputs(3)
    saliency.efficient_randomization(model, x, "gradient", max_similarity=0.5)


def test_wrong_threshold_the_other_way(saliency):
    model, x = tinynet.make_model(), tinynet.make_inputs(3)
    saliency.smooth_randomization(model, x, "gradient", noise_samples=2, min_rise=0.5)


def test_no_similarity(saliency):
    model, x = tinynet.make_model(), tinynet.make_inputs(3)
    saliency.efficient_randomization(model, x, "gradient", similarity="ssim")


def test_bad_option(saliency):
    model, x = tinynet.make_model(), tinynet.make_inputs(3)
    saliency.efficient_randomization(model, x, "gradient", bins=1)


def test_no_such_check(saliency):
    saliency.no_such_check


def test_audit_nope(saliency):
    model, x = tinynet.make_model(), tinynet.make_inputs(3)
    saliency.audit("nope", model, x, "gradient")


def test_audit_without_the_twin(saliency):
    model, x = tinynet.make_model(), tinynet.make_inputs(3)
    saliency.audit("data_randomization", model, x, "gradient")


def test_twin_is_the_model(saliency):
    model, x = tinynet.make_model(), tinynet.make_inputs(3)
    saliency.assert_data_randomization_sensitive(model, model, x, "gradient")
"""


def test_helpers_fail_with_messages_that_name_the_threshold_and_the_checks(
    project: pytest.Pytester,
) -> None:
    project.makepyfile(test_errors=ERRORS)
    result = project.runpytest("--saliency-report=r.json")
    result.assert_outcomes(failed=9)
    (failed,) = [r for r in records_of(project.path / "r.json") if r["threshold"] == 5.0]
    assert failed["verdict"] == "fail" and failed["threshold_key"] == "min_rise"
    score = f"{failed['score']:.3f}"
    checks_listed = ", ".join(CHECKS)
    asserts_listed = ", ".join(ASSERTS)
    valid = ", ".join(repr(c) for c in CHECKS)
    for lines in (
        [
            "E*saliency audit failed: test_errors.py::test_assert_fails",
            "E*method*gradient",
            "E*check*efficient_randomization",
            "E*metric*entropy_rise",
            f"E*score*{score}  95% CI [[]*, *]",
            "E*threshold*min_rise 5.000",
            f"E*verdict*FAIL: score {score} < min_rise 5.000",
        ],
        [
            "E*SaliencyError: efficient_randomization passes by min_rise (the lowest mean "
            "relative rise in map entropy that passes; 0 means no change), not by "
            "max_similarity; give min_rise=..."
        ],
        [
            "E*SaliencyError: smooth_randomization passes by max_similarity (the highest mean "
            "similarity that passes; similarities lie in [[]-1, 1]), not by min_rise; give "
            "max_similarity=..."
        ],
        [
            "E*SaliencyError: efficient_randomization compares the complexity of maps, not "
            "their similarity: it takes no similarity= (its options: bins)"
        ],
        ["E*SaliencyError: bins must be an int >= 2, got 1"],
        [
            f"E*AttributeError: the saliency fixture has no 'no_such_check'; it has explain, "
            f"audit, the checks ({checks_listed}) and their assert_* helpers ({asserts_listed})"
        ],
        [f"E*SaliencyError: unknown check 'nope'*Valid checks: {valid}."],
        [
            "E*SaliencyError: saliency.data_randomization() takes 4 positional arguments "
            "(model, randomized_model, inputs, method), got 3"
        ],
        ["E*SaliencyError: randomized_model is the trained model itself; pass the copy*"],
    ):
        result.stdout.fnmatch_lines(lines)
    # A call the check itself refused is a row (ERROR, with its message under the table); a
    # call that never named a check, its threshold or its arguments right records nothing.
    result.stdout.fnmatch_lines(
        [
            "test_errors.py::test_assert_fails :: efficient_randomization",
            "  gradient*>= 5.000*FAIL",
            "test_errors.py::test_bad_option :: efficient_randomization",
            "  gradient*-*ERROR",
            "4 audits: 1 fail, 3 error",
            "raised:",
            "  test_errors.py::test_bad_option: SaliencyError: bins must be an int >= 2, got 1",
        ]
    )


# -- 3. the marker ---------------------------------------------------------------------------------

MARKED = """
import pytest
import tinynet


@pytest.mark.saliency(min_rise=-1.0, max_similarity=1.0, methods=["gradient", "input_x_gradient"])
def test_marked(saliency, saliency_method):
    model, x = tinynet.make_model(), tinynet.make_inputs(3)
    saliency.assert_efficient_randomization_sensitive(model, x, saliency_method)
    saliency.assert_smooth_randomization_sensitive(model, x, saliency_method, noise_samples=2)
    saliency.efficient_randomization(model, x, saliency_method, min_rise=0.5)  # the call wins


@pytest.mark.saliency(min_rise="x")
def test_bad_min_rise(saliency):
    pass


@pytest.mark.saliency(min_rise=-2.0)
def test_min_rise_below_bounds(saliency):
    pass
"""


def test_marker_min_rise_reaches_efficient_randomization(project: pytest.Pytester) -> None:
    project.makepyfile(test_marked=MARKED)
    result = project.runpytest("--saliency-report=r.json")
    result.assert_outcomes(passed=2, errors=2)
    records = records_of(project.path / "r.json")
    got = sorted((r["method_id"], r["check"], r["threshold_key"], r["threshold"]) for r in records)
    assert got == sorted(
        (method, check, key, threshold)
        for method in ("gradient", "input_x_gradient")
        for check, key, threshold in (
            ("efficient_randomization", "min_rise", -1.0),
            ("efficient_randomization", "min_rise", 0.5),
            ("smooth_randomization", "max_similarity", 1.0),
        )
    )
    for r in records:
        assert r["nodeid"] == f"test_marked.py::test_marked[{r['method_id']}]"
        if r["threshold"] in (-1.0, 1.0):
            assert r["verdict"] == "pass"
    bounds = (
        ": expected a number in [[]-1, 1e+06] (the lowest mean relative rise in map entropy "
        "that passes; 0 means no change), got"
    )
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_bad_min_rise*",
            f"*@pytest.mark.saliency(min_rise=...){bounds} 'x'",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_min_rise_below_bounds*",
            f"*@pytest.mark.saliency(min_rise=...){bounds} -2.0",
        ]
    )


# -- 4. a suite of all five checks -----------------------------------------------------------------

ALL_CHECKS = """\
model: twins:trained
inputs: twins:batch
seed: 0
max_similarity: 1.0
min_rise: -1.0
methods:
  - gradient
  - input_x_gradient
checks:
  output_sensitivity:
  parameter_randomization: {layers: blocks}
  smooth_randomization: {noise_samples: 3, noise_magnitude: 0.2, order: top_down}
  efficient_randomization: {bins: 10}
  data_randomization: {model: "twins:permuted"}
"""


class Sections(HTMLParser):
    """The ids and headings of the HTML report's audit sections."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.headings: list[str] = []
        self._in_h2 = False
        self._in_span = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "details" and "audit" in (attrs.get("class") or ""):
            self.sections.append(attrs["id"])
        if tag == "summary":
            self._in_h2 = True  # "<span>VERDICT</span> nodeid · check"
        self._in_span = tag == "span"

    def handle_data(self, data):
        if self._in_h2 and not self._in_span and data.strip():
            self.headings.append(data.strip().split(" · ")[0])

    def handle_endtag(self, tag):
        if tag == "summary":
            self._in_h2 = False
        self._in_span = False


def test_suite_runs_all_five_checks_into_every_report(project: pytest.Pytester) -> None:
    project.makefile(".yaml", saliency_all=ALL_CHECKS)
    ids = [f"saliency_all.yaml::{c}[{m}]" for m in ("gradient", "input_x_gradient") for c in CHECKS]
    listed = project.runpytest("--co", "-q")
    listed.stdout.fnmatch_lines([i.replace("[", "[[]") for i in ids])
    assert "10 tests collected" in listed.stdout.str()

    result = project.runpytest(
        "-v", "--saliency-report=r.json", "--saliency-report=r.html", "--junitxml=j.xml"
    )
    result.assert_outcomes(passed=10)
    result.stdout.fnmatch_lines([f"{i.replace('[', '[[]')} PASSED*" for i in ids])
    records = {r["nodeid"]: r for r in records_of(project.path / "r.json")}
    assert sorted(records) == sorted(ids)
    for nodeid, r in records.items():
        check = nodeid.split("::")[1].split("[")[0]
        assert r["check"] == check and r["source"] == "suite" and r["verdict"] == "pass"
        assert r["method_id"] == nodeid.split("[")[1].rstrip("]")
        assert set(r["controls"]) == {"noise", "edge"}
        key = "min_rise" if check == "efficient_randomization" else "max_similarity"
        assert (r["threshold_key"], r["threshold"]) == (key, -1.0 if key == "min_rise" else 1.0)
    smooth = records["saliency_all.yaml::smooth_randomization[gradient]"]
    assert smooth["similarity"] == "spearman_abs" and smooth["order"] == "top_down"
    assert (smooth["settings"]["noise_samples"], smooth["settings"]["noise_magnitude"]) == (3, 0.2)
    efficient = records["saliency_all.yaml::efficient_randomization[gradient]"]
    assert efficient["bins"] == 10 and efficient["similarity"] == "entropy_rise"
    data = records["saliency_all.yaml::data_randomization[gradient]"]
    assert data["similarity"] == "ssim" and len(data["scores"]) == 3
    parameter = records["saliency_all.yaml::parameter_randomization[gradient]"]
    assert parameter["settings"]["layers"] == "blocks"
    result.stdout.fnmatch_lines(
        [
            "saliency_all.yaml :: efficient_randomization",
            f"  gradient*entropy_rise*{controls_text(efficient)}*>= -1.000*pass",
            "10 audits: 10 pass",
        ]
    )

    text = (project.path / "r.html").read_text(encoding="utf-8")
    page = Sections()
    page.feed(text)
    assert len(page.sections) == 10
    assert sorted(page.headings) == sorted(ids)
    assert text.count("null controls (the same check on maps that cannot be faithful") == 10
    summary = text[text.index('<table class="summary">') :]
    summary = summary[: summary.index("</table>")]
    assert summary.count("&gt;= -1.00") == 2  # the efficient rows of the summary
    assert summary.count("&lt;= 1.00") == 8
    overview = text[text.index('<table class="overview">') : text.index("<h2>All audits")]
    assert overview.count('<td class="cell pass">') == 10  # one matrix: 2 methods x 5 checks
    assert text.count("min_rise -1.00") == 2  # the efficient sections' verdict lines

    props = junit_properties(project.path / "j.xml")
    assert len(props) == 10
    for nodeid, r in records.items():
        got = dict(props[nodeid.split("::")[1]])
        assert float(got["saliency_score"]) == pytest.approx(r["score"])
        assert float(got["saliency_threshold"]) == r["threshold"]
        assert got["saliency_verdict"] == "pass"


# -- 5. located suite errors -----------------------------------------------------------------------


def suite(extra: str, model: str = "twins:trained") -> str:
    return f"model: {model}\ninputs: twins:batch\nseed: 0\nmethods: [gradient]\n{extra}\n"


BOUNDS = (
    "[[]-1, 1e+06] (the lowest mean relative rise in map entropy that passes; 0 means no change)"
)
# name -> (the checks: block from line 5, the lines its error must show)
BAD_SUITES: dict[str, tuple[str, list[str]]] = {
    "check": (
        "checks: {smooth_randomisation: {}}",
        [
            "saliency_check.yaml:5: checks.smooth_randomisation: unknown check "
            "'smooth_randomisation'; did you mean 'smooth_randomization'*? Valid choices: "
            + ", ".join(CHECKS)
        ],
    ),
    "setting": (
        "checks:\n  smooth_randomization:\n    noise_sample: 3",
        [
            "saliency_setting.yaml:7: checks.smooth_randomization.noise_sample: unknown setting "
            "of smooth_randomization 'noise_sample'; did you mean 'noise_samples'*? Valid "
            "choices: " + ", ".join((*get_check("smooth_randomization").suite_keys, "methods"))
        ],
    ),
    "samples": (
        "checks: {smooth_randomization: {noise_samples: 0}}",
        [
            "saliency_samples.yaml:5: checks.smooth_randomization.noise_samples: noise_samples "
            "must be an int >= 1, got 0"
        ],
    ),
    "magnitude": (
        "checks: {smooth_randomization: {noise_magnitude: -0.5}}",
        [
            "saliency_magnitude.yaml:5: checks.smooth_randomization.noise_magnitude: "
            "noise_magnitude must be a number in [[]0, 10], got -0.5"
        ],
    ),
    "bins": (
        "checks:\n  efficient_randomization: {bins: 1}",
        [
            "saliency_bins.yaml:6: checks.efficient_randomization.bins: bins must be an int >= 2, "
            "got 1"
        ],
    ),  # fmt: skip
    "rise": (
        "checks:\n  efficient_randomization:\n    min_rise: high",
        [
            f"saliency_rise.yaml:7: checks.efficient_randomization.min_rise: expected a number "
            f"in {BOUNDS}, got 'high'"
        ],
    ),  # fmt: skip
    "toprise": (
        "min_rise: [1]\nchecks: {efficient_randomization: {}}",
        [f"saliency_toprise.yaml:5: min_rise: expected a number in {BOUNDS}, got [[]1]"],
    ),
    "similar": (
        "checks: {efficient_randomization: {max_similarity: 0.5}}",
        [
            "saliency_similar.yaml:5: checks.efficient_randomization.max_similarity: "
            "efficient_randomization passes by min_rise (*), not by max_similarity; write "
            "min_rise: X"
        ],
    ),
    "metric": (
        "checks: {efficient_randomization: {similarity: ssim}}",
        [
            "saliency_metric.yaml:5: checks.efficient_randomization.similarity: "
            "efficient_randomization compares the complexity of maps, not their similarity: no "
            "metric (its settings: "
            + ", ".join((*get_check("efficient_randomization").suite_keys, "methods"))
            + ")"
        ],
    ),
    "stray": (
        "min_rise: 0.2\nchecks: {output_sensitivity: {}}",
        [
            "saliency_stray.yaml:5: min_rise: min_rise applies to efficient_randomization, which "
            "this suite does not run (its checks: output_sensitivity); remove it or add such a "
            "check"
        ],
    ),
    "twinless": (
        "checks:\n  data_randomization: {}",
        [
            "saliency_twinless.yaml:6: checks.data_randomization: data_randomization needs "
            "'model:' naming the same architecture*(the forms of the top-level 'model:', e.g. "
            "'package.module:attribute')"
        ],
    ),
    "nulltwin": (
        "checks:\n  data_randomization:",
        ["saliency_nulltwin.yaml:6: checks.data_randomization: data_randomization needs 'model:'*"],
    ),
    "noattr": (
        'checks:\n  data_randomization: {model: "twins:nope"}',
        [
            "saliency_noattr.yaml:6: checks.data_randomization.model: 'twins' has no attribute "
            "'nope'*"
        ],
    ),  # fmt: skip
    "noform": (
        "checks:\n  data_randomization: {model: twins.permuted}",
        [
            "saliency_noform.yaml:6: checks.data_randomization.model: expected "
            "'package.module:attribute' (did you mean 'twins:permuted'?), got 'twins.permuted'"
        ],
    ),  # fmt: skip
}


def test_suite_mistakes_of_the_new_checks_are_located(project: pytest.Pytester) -> None:
    for name, (extra, _) in BAD_SUITES.items():
        project.makefile(".yaml", **{f"saliency_{name}": suite(extra)})
    # Another architecture as the twin: a collection error at its model: key, naming the
    # first difference.
    project.makefile(
        ".yaml", saliency_wide=suite('checks:\n  data_randomization: {model: "twins:wide"}')
    )
    result = project.runpytest("--continue-on-collection-errors")
    result.assert_outcomes(errors=len(BAD_SUITES) + 1)
    for _, patterns in BAD_SUITES.values():
        result.stdout.fnmatch_lines(patterns)
    result.stdout.fnmatch_lines(
        [
            "saliency_wide.yaml:*: checks.data_randomization.model: twins:wide is not the "
            "model's architecture: '0.weight' has shape [[]6, 1, 3, 3] (torch.float32) there "
            "and [[]4, 1, 3, 3] (torch.float32) in the model",
        ]
    )
    no_traceback(result)


# -- 6. expect: for the new checks -----------------------------------------------------------------

EXPECT = """\
model: twins:trained
inputs: twins:batch
methods: [gradient]
checks:
  efficient_randomization: {{min_rise: {rise}}}
  smooth_randomization: {{noise_samples: 2, max_similarity: -1.0}}
  data_randomization: {{model: "twins:permuted", max_similarity: 1.0}}
expect:
  gradient: {{efficient_randomization: fail, smooth_randomization: fail, data_randomization: fail}}
"""


def test_expect_fail_is_a_strict_xfail_for_the_new_checks(project: pytest.Pytester) -> None:
    project.makefile(".yaml", saliency_expect=EXPECT.format(rise=5.0))
    result = project.runpytest("-rxX", "--saliency-report=r.json")
    result.assert_outcomes(xfailed=2, failed=1)  # data randomization passes: a strict xpass
    records = {r["check"]: r for r in records_of(project.path / "r.json")}
    assert {c: r["verdict"] for c, r in records.items()} == {
        "efficient_randomization": "xfail",
        "smooth_randomization": "xfail",
        "data_randomization": "xpass",
    }
    assert all(r["expected"] == "fail" for r in records.values())
    data = records["data_randomization"]
    result.stdout.fnmatch_lines(
        [
            f"saliency_expect.yaml:3: methods[[]0]: expected to fail (expect: fail), but the "
            f"audit passed (score {data['score']:.3f} <= max_similarity 1); the method is "
            "sensitive now: remove its 'expect' entry",
        ]
    )
    for check in ("efficient_randomization", "smooth_randomization"):
        result.stdout.fnmatch_lines(
            [
                f"XFAIL saliency_expect.yaml::{check}[[]gradient]*expected failure: {check} of "
                "gradient is not sensitive"
            ]
        )
    result.stdout.fnmatch_lines(
        ["saliency_expect.yaml :: efficient_randomization", "  gradient*>= 5.000*xfail"]
    )

    # Once efficient randomization passes (min_rise -1), its expect entry fails the run.
    project.makefile(".yaml", saliency_expect=EXPECT.format(rise=-1.0))
    rerun = project.runpytest("--saliency-report=r.json")
    rerun.assert_outcomes(xfailed=1, failed=2)
    efficient = {r["check"]: r for r in records_of(project.path / "r.json")}[
        "efficient_randomization"
    ]
    assert efficient["verdict"] == "xpass"
    rerun.stdout.fnmatch_lines(
        [
            f"saliency_expect.yaml:3: methods[[]0]: expected to fail (expect: fail), but the "
            f"audit passed (score {efficient['score']:.3f} >= min_rise -1); the method is "
            "sensitive now: remove its 'expect' entry",
        ]
    )


# -- 7. a check's methods: key ----------------------------------------------------------------

SUBSET = """\
model: twins:trained
inputs: twins:batch
methods: [gradient, input_x_gradient, {name: gradcam, layer: "2"}]
checks:
  output_sensitivity: {}
  smooth_randomization: {noise_samples: 2, layers: blocks, methods: [gradient, gradcam]}
expect:
  gradcam: {output_sensitivity: pass}
"""


def test_a_check_runs_only_the_methods_it_names(project: pytest.Pytester) -> None:
    project.makefile(".yaml", saliency_subset=SUBSET)
    ids = [
        line.strip()
        for line in project.runpytest("--co", "-q").outlines
        if line.startswith("saliency_subset.yaml::")
    ]
    assert ids == [
        "saliency_subset.yaml::output_sensitivity[gradient]",
        "saliency_subset.yaml::smooth_randomization[gradient]",
        "saliency_subset.yaml::output_sensitivity[input_x_gradient]",
        "saliency_subset.yaml::output_sensitivity[gradcam]",
        "saliency_subset.yaml::smooth_randomization[gradcam]",
    ]
    result = project.runpytest("--saliency-report=r.json")
    records = json.loads((project.path / "r.json").read_text())["records"]
    smooth = [r for r in records if r["check"] == "smooth_randomization"]
    assert sorted(r["method_id"] for r in smooth) == ["gradcam", "gradient"]
    # "methods" chooses the items; it is not an audit setting
    assert all("methods" not in r["settings"] for r in records)
    assert len(records) == 5 and result.ret in (0, 1)


def test_a_check_methods_key_is_validated(project: pytest.Pytester) -> None:
    bad = SUBSET.replace("methods: [gradient, gradcam]", "methods: [gradient, gradcm]").replace(
        "gradcam: {output_sensitivity: pass}", "input_x_gradient: {smooth_randomization: fail}"
    )
    project.makefile(".yaml", saliency_bad=bad)
    result = project.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "saliency_bad.yaml:6: checks.smooth_randomization.methods[[]1]: unknown method id "
            "'gradcm'; did you mean 'gradcam'?*",
            "saliency_bad.yaml:8: expect.input_x_gradient.smooth_randomization: "
            "smooth_randomization does not run 'input_x_gradient' (its methods: gradient, gradcm)",
        ]
    )
    no_traceback(result)


# -- 8. a method's own seed is the method's -----------------------------------------------------

OWN_SEED = """\
import pytest_saliency as ps
import tinynet


def test_own_seed(saliency):
    model, x = tinynet.make_model(), tinynet.make_inputs(3)
    spec = {"name": "smoothgrad", "samples": 2, "seed": 5}
    result = saliency.output_sensitivity(model, x, spec, max_similarity=1.0)
    assert result.seed == 0 and result.options == {"samples": 2, "seed": 5}
    reference = ps.output_sensitivity(model, x, [spec])[0]
    assert (result.scores == reference.scores).all()


def test_fixture_typo(saliency):
    import pytest
    from pytest_saliency.errors import SaliencyError

    model, x = tinynet.make_model(), tinynet.make_inputs(3)
    with pytest.raises(SaliencyError, match="unknown keyword 'bin'; did you mean 'bins'"):
        saliency.efficient_randomization(model, x, "gradient", bin=50)
"""


def test_a_methods_own_seed_stays_the_methods(project: pytest.Pytester) -> None:
    project.makepyfile(test_own=OWN_SEED)
    project.makefile(
        ".yaml",
        saliency_seeded=(
            "model: tinynet:make_model\ninputs: tinynet:make_inputs\nmax_similarity: 1.0\n"
            "methods: [{name: smoothgrad, samples: 2, seed: 3}]\n"
            "checks: {output_sensitivity: {}}\n"
        ),
    )
    result = project.runpytest("--saliency-report=r.json")
    result.assert_outcomes(passed=3)
    records = json.loads((project.path / "r.json").read_text())["records"]
    suite = next(r for r in records if r["source"] == "suite")
    assert suite["options"] == {"samples": 2, "seed": 3} and suite["seed"] == 0
    assert suite["method_id"] == "smoothgrad-samples=2-seed=3"


def test_a_method_no_check_runs_and_a_twice_listed_id_are_errors(project: pytest.Pytester) -> None:
    project.makefile(
        ".yaml",
        saliency_orphan=(
            "model: twins:trained\ninputs: twins:batch\n"
            "methods: [gradient, input_x_gradient]\n"
            "checks: {output_sensitivity: {methods: [gradient, gradient]}}\n"
        ),
    )
    result = project.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "saliency_orphan.yaml:4: checks.output_sensitivity.methods[[]1]: 'gradient' is "
            "listed twice",
            "saliency_orphan.yaml:3: methods[[]1]: no check runs 'input_x_gradient': every "
            "check's 'methods:' leaves it out; add it to one or remove the entry",
        ]
    )
