"""The Markdown summary, and the hooks a project implements: its own report format, record."""

from __future__ import annotations

import json
import textwrap

import pytest

import pytest_saliency.markdown  # noqa: F401  (loaded once, before pytester's inner runs)
import pytest_saliency.suite  # noqa: F401
from pytest_saliency.markdown import format_markdown

from .conftest import REFUSED_MODEL, write_tinynet

MODELS = REFUSED_MODEL

SUITE = """\
model: models:refused
inputs: tinynet:make_inputs
methods:
  - gradient
  - {name: input_x_gradient, id: "ixg|pipe"}
  - deconvnet
checks:
  output_sensitivity: {max_similarity: 1.0}
  parameter_randomization: {max_similarity: -1.0}
expect:
  deconvnet: error
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    write_tinynet(pytester)
    pytester.makepyfile(models=MODELS)
    pytester.makefile(".yaml", saliency_md=SUITE)
    return pytester


def test_markdown_summary_puts_what_needs_attention_first(project):
    result = project.runpytest("--saliency-report=out/summary.md")
    result.assert_outcomes(passed=2, failed=2, xfailed=2)
    text = (project.path / "out" / "summary.md").read_text()
    lines = text.splitlines()
    assert lines[0] == "## pytest-saliency: 6 audits: 2 pass, 2 fail, 2 refused"
    attention = text.index("### Needs attention (2)")
    assert attention < text.index("<details><summary>All 6 audits</summary>")
    needs = text[attention : text.index("<details>")]
    assert needs.count("**FAIL**") == 2 and "score " in needs
    assert "\\> max\\_similarity -1.000" in needs  # escaped: renders as > max_similarity
    assert "parameter_randomization" in needs and "output_sensitivity" not in needs
    # every audit in the collapsed part, grouped by suite and check, in the suite's order
    assert text.index("#### `saliency_md.yaml :: output_sensitivity`") < text.index(
        "#### `saliency_md.yaml :: parameter_randomization`"
    )
    assert "| ixg\\|pipe |" in text  # a pipe in an id does not split the row
    assert text.count("| refused |") == 2 and text.rstrip().endswith("</details>")


def test_markdown_of_no_audit_and_of_errors_only():
    assert format_markdown([]).startswith("## pytest-saliency: 0 audits")
    row = {
        "nodeid": "t.py::t", "check": "output_sensitivity", "method": "gradient",
        "method_id": "gradient", "similarity": "ssim", "score": None, "ci": None,
        "threshold": 0.5, "threshold_key": "max_similarity", "verdict": "error",
        "error": {"type": "ModelError", "message": "model Net failed\nmore"},
    }  # fmt: skip
    text = format_markdown([row], {"version": "0.1.0", "device": "cpu"})
    assert "### Needs attention (1)" in text and "ModelError: model Net failed |" in text
    assert "pytest-saliency version 0.1.0, device cpu" in text


def test_a_projects_own_report_format_and_record_fields(project):
    project.makeconftest(
        textwrap.dedent(
            """\
            import json

            def _csv(records, path, meta):
                lines = ["nodeid,score,verdict,team"]
                lines += [f"{r['nodeid']},{r['score']},{r['verdict']},{r['team']}"
                          for r in records]
                path.write_text("\\n".join(lines) + "\\n")

            def pytest_saliency_report_formats(config):
                return {".csv": _csv}

            def pytest_saliency_record(record, config):
                record["team"] = "vision"
            """
        )
    )
    result = project.runpytest("--saliency-report=r.csv", "--saliency-report=r.json")
    result.assert_outcomes(passed=2, failed=2, xfailed=2)
    rows = (project.path / "r.csv").read_text().splitlines()
    assert rows[0] == "nodeid,score,verdict,team" and len(rows) == 7
    assert all(row.endswith(",vision") for row in rows[1:])
    records = json.loads((project.path / "r.json").read_text())["records"]
    assert {r["team"] for r in records} == {"vision"}


@pytest.mark.parametrize(
    ("hook", "message"),
    [
        ("return {'.json': lambda r, p, m: None}", "'.json' is a built-in report format"),
        ("return {'csv': lambda r, p, m: None}", "is not a '.suffix': callable"),
        ("return ['.csv']", "must return a dict"),
    ],
)
def test_a_bad_report_format_hook_is_a_usage_error(pytester, hook, message):
    pytester.makeconftest(f"def pytest_saliency_report_formats(config):\n    {hook}\n")
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest("--saliency-report=r.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])


def test_a_writer_that_raises_is_named_not_an_internal_error(project):
    project.makeconftest(
        "def _boom(records, path, meta):\n    raise ValueError('no disk quota')\n\n"
        "def pytest_saliency_report_formats(config):\n    return {'.boom': _boom}\n"
    )
    result = project.runpytest("--saliency-report=r.boom", "-k", "gradient and output")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["ERROR: the .boom writer failed on *r.boom: ValueError('no disk*"])
    assert "INTERNALERROR" not in result.stdout.str()


def test_markdown_escapes_what_it_does_not_mean():
    from pytest_saliency.markdown import _code, _md

    assert _code("t.py::test[a`b]") == "``t.py::test[a`b]``"
    assert _code("a|b") == "`a\\|b`"
    assert _md("<lambda> *x* [y](z) a|b") == "\\<lambda\\> \\*x\\* \\[y\\](z) a\\|b"
    row = {
        "nodeid": "t.py::t[`x`]", "check": "output_sensitivity", "method": "gradient",
        "method_id": "gradient", "similarity": "ssim", "score": None, "ci": None,
        "threshold": 0.5, "threshold_key": "max_similarity", "verdict": "error",
        "error": {"type": "ModelError", "message": "<lambda> failed"},
    }  # fmt: skip
    text = format_markdown([row])
    assert "| ``t.py::t[`x`]`` output\\_sensitivity | - | <= 0.500 | **ERROR** |" in text
    assert "ModelError: \\<lambda\\> failed" in text
