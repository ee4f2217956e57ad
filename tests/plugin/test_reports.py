"""Records, the verdict table, the failure message and the JSON report."""

from __future__ import annotations

import json
import math

import pytest

from pytest_saliency import report

REQUIRED = {
    "nodeid",
    "method",
    "check",
    "similarity",
    "score",
    "ci",
    "threshold",
    "passed",
    "scores",
}

TWO_AUDITS = """
import pytest
import tinynet

@pytest.mark.saliency(methods=["gradient", {"name": "gradcam", "layer": "2"}], max_similarity=0.6)
def test_audit(saliency, saliency_method):
    model, x = tinynet.make_model(), tinynet.make_inputs(5)
    saliency.output_sensitivity(model, x, saliency_method)
    saliency.parameter_randomization(model, x, saliency_method)
"""


class FakeResult:
    """Stands in for an audit result: a fixed score, the verdict rule of the checks."""

    def __init__(self, score: float, scores: list) -> None:
        self.method, self.score, self._scores = "gradient", score, scores

    def passed(self, max_similarity: float, *, confidence: bool = False) -> bool:
        return not math.isnan(self.score) and self.score <= max_similarity

    def to_dict(self) -> dict:
        return {"check": "output_sensitivity", "method": self.method, "similarity": "ssim",
                "score": self.score, "ci": (self.score, math.nan), "scores": self._scores,
                "targets": [0, 1, 2], "others": [1, 2, 0]}  # fmt: skip


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_json_report_records_and_meta(tiny_project: pytest.Pytester) -> None:
    tiny_project.makepyfile(TWO_AUDITS)
    result = tiny_project.runpytest("--saliency-report=out/run.json", "--saliency-seed=2")
    result.assert_outcomes(passed=2)
    path = tiny_project.path / "out" / "run.json"
    result.stdout.fnmatch_lines([f"saliency report: {path}"])
    doc = json.loads(path.read_text())
    assert doc["schema"] == report.SCHEMA
    meta = doc["meta"]
    torch = __import__("torch")
    auto = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    assert meta["seed"] == 2 and meta["device"] == auto and meta["settings"]["seed"] == 2
    assert meta["torch"] == torch.__version__
    records = doc["records"]
    keys = [(r["nodeid"].split("::")[1], r["check"]) for r in records]
    assert keys == [  # collection order (the marker lists gradient first)
        ("test_audit[gradient]", "output_sensitivity"),
        ("test_audit[gradient]", "parameter_randomization"),
        ("test_audit[gradcam]", "output_sensitivity"),
        ("test_audit[gradcam]", "parameter_randomization"),
    ]
    for r in records:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert "figures" not in r
        assert r["threshold"] == 0.6 and r["seed"] == 2 and r["device"] == auto
        assert r["passed"] == (r["score"] <= 0.6)
        assert r["verdict"] == ("pass" if r["passed"] else "fail")
        assert r["ci"][0] <= r["score"] <= r["ci"][1]
        if r["check"] == "output_sensitivity":
            assert len(r["scores"]) == 5 and len(r["others"]) == 5
            assert r["score"] == pytest.approx(mean(r["scores"]))
        else:  # the worst step's mean, one row of scores per randomized layer
            assert len(r["scores"]) == len(r["layers"]) == len(r["step_scores"]) >= 2
            assert all(len(row) == 5 for row in r["scores"])
            steps = [mean(row) for row in r["scores"]]
            assert r["step_scores"] == pytest.approx(steps)
            assert r["score"] == pytest.approx(max(steps))


def test_json_and_html_reports_together(tiny_project: pytest.Pytester) -> None:
    tiny_project.makepyfile(TWO_AUDITS)
    result = tiny_project.runpytest(
        "-k", "gradient", "--saliency-report=run.json", "--saliency-report=run.html"
    )
    result.assert_outcomes(passed=1, deselected=1)
    records = json.loads((tiny_project.path / "run.json").read_text())["records"]
    assert [r["check"] for r in records] == ["output_sensitivity", "parameter_randomization"]
    page = (tiny_project.path / "run.html").read_text()
    assert page.lstrip().lower().startswith("<!doctype html") and "data:image/png;base64," in page


def test_report_paths_are_relative_to_the_invocation_dir(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    sub = pytester.mkdir("sub")
    pytester.chdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(sub)
        pytester.runpytest("..", "--saliency-report=r.json").assert_outcomes(passed=1)
    doc = json.loads((sub / "r.json").read_text())
    assert doc["records"] == [] and not (pytester.path / "r.json").exists()


def test_ini_report_path_is_relative_to_the_ini_file(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nsaliency_report = reports/run.json\n")
    pytester.makepyfile("def test_nothing(): pass")
    pytester.runpytest().assert_outcomes(passed=1)
    assert json.loads((pytester.path / "reports" / "run.json").read_text())["records"] == []


@pytest.mark.parametrize(
    ("score", "expected", "verdict"),
    [(0.2, "pass", "pass"), (0.8, "pass", "fail"), (0.8, "fail", "xfail"), (0.2, "fail", "xpass")],
)
def test_make_record_verdicts(score: float, expected: str, verdict: str) -> None:
    rec = report.make_record(
        "t.py::t", FakeResult(score, [score] * 3), threshold=0.5, expected=expected
    )
    assert rec["verdict"] == verdict and rec["passed"] == (score <= 0.5)
    assert rec["method_id"] == "gradient" and rec["source"] == "python"
    assert rec["ci"] == [score, None]  # NaN is not JSON: it becomes null
    json.dumps(rec, allow_nan=False)


def test_make_record_rejects_a_bad_expectation() -> None:
    with pytest.raises(
        ValueError, match=r"expected must be one of \('pass', 'fail', 'error'.*got 'xfail'"
    ):
        report.make_record("t", FakeResult(0.2, [0.2]), threshold=0.5, expected="xfail")


def test_degenerate_record_and_failure_message() -> None:
    rec = report.make_record(
        "t.py::t", FakeResult(math.nan, [0.9, None, 0.95]), threshold=0.5, method_id="g-x=1"
    )
    assert rec["score"] is None and rec["verdict"] == "fail"
    # most similar first, with the degenerate (no score) sample on top
    assert report.most_similar(rec) == [(1, None), (2, 0.95), (0, 0.9)]
    text = report.format_failure(rec)
    assert "saliency audit failed: t.py::t" in text
    assert "FAIL: degenerate maps" in text
    lines = text.splitlines()
    rows = lines[lines.index("  most similar samples:") + 3 :]
    assert [row.split() for row in rows] == [["1", "1", "2", "nan"], ["2", "2", "0", "0.950"],
                                             ["0", "0", "1", "0.900"]]  # fmt: skip


def test_format_table_rows_and_tally() -> None:
    records = [
        report.make_record("a.py::t", FakeResult(0.3, [0.3]), threshold=0.5),
        report.make_record("b.py::t", FakeResult(0.7, [0.7]), threshold=0.5, confidence=True),
    ]
    lines = report.format_table(records).splitlines()
    assert lines[0].split() == ["method", "metric", "score", "95%", "CI", "noise/edge",
                                "threshold", "verdict"]  # fmt: skip
    assert lines[2] == "a.py::t :: output_sensitivity"  # a heading per test (or model) and check
    assert lines[3].split() == ["gradient", "ssim", "0.300", "[0.300,", "nan]", "-", "<=",
                                "0.500", "pass"]  # fmt: skip
    assert lines[4] == "b.py::t :: output_sensitivity"
    assert lines[5].split()[-3:] == ["0.500", "CI", "FAIL"]
    assert lines[-1] == "2 audits: 1 pass, 1 fail"


def test_the_table_fits_120_columns_in_collection_order_grouped() -> None:
    """Long ids are shortened in the middle; the suite's order, not the alphabet's."""
    method = "gradcam++-positive=false-layout=tokens:1-" + "x" * 60
    rows = [
        dict(report.make_record(f"suite.yaml::{check}[{m}]", FakeResult(0.3, [0.3]),
                                threshold=0.5, method_id=m, source="suite"), check=check)
        for m in ("zeta", method, "alpha") for check in ("output_sensitivity", "smooth_x")
    ]  # fmt: skip
    deep = report.make_record("tests/" + "very_deep/" * 20 + "test_x.py::test_y[z]",
                              FakeResult(0.3, [0.3]), threshold=0.5)  # fmt: skip
    lines = report.format_table([*rows, deep]).splitlines()
    assert max(len(line) for line in lines) <= report.TABLE_WIDTH
    headings = [line for line in lines if not line.startswith(" ")][:-1]
    assert headings[:2] == ["suite.yaml :: output_sensitivity", "suite.yaml :: smooth_x"]
    assert headings[2].startswith("tests/very_deep/") and "..." in headings[2]
    first = [line.split()[0] for line in lines[3:6]]
    assert first[0] == "zeta" and first[1].startswith("gradcam++-positive") and "..." in first[1]
    assert first[2] == "alpha"  # the suite's order, not sorted
