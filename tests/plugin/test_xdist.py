"""Under pytest-xdist, workers send their records home: same table and report as a serial run."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("xdist")

AUDITS = """
import pytest
import tinynet

@pytest.mark.saliency(methods=["gradient", "guided_backprop"], max_similarity=0.6)
def test_audit(saliency, saliency_method):
    model, x = tinynet.make_model(), tinynet.make_inputs()
    saliency.assert_output_sensitive(model, x, saliency_method)
    saliency.parameter_randomization(model, x, saliency_method)

def test_plain():
    pass
"""


def test_xdist_report_matches_serial(tiny_project: pytest.Pytester) -> None:
    tiny_project.makepyfile(AUDITS)
    runs = {}
    for name, run in (
        ("serial", tiny_project.runpytest),
        ("xdist", tiny_project.runpytest_subprocess),
    ):
        extra = ["-n", "2"] if name == "xdist" else []
        result = run("-p", "no:cacheprovider", f"--saliency-report={name}.json", *extra)
        # guided backprop keeps its maps when the class changes (Adebayo et al. 2018)
        result.assert_outcomes(passed=2, failed=1)
        text = "\n".join(result.outlines)
        assert text.count("= saliency audits =") == 1  # once, on the controller
        assert "3 audits: 2 pass, 1 fail" in text
        runs[name] = json.loads((tiny_project.path / f"{name}.json").read_text())
    assert len(runs["serial"]["records"]) == 3  # the failed assert skips one
    assert runs["xdist"]["records"] == runs["serial"]["records"]
    assert runs["xdist"]["meta"] == runs["serial"]["meta"] | {
        "settings": runs["xdist"]["meta"]["settings"]
    }
