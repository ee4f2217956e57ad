"""The paper's finding on a real trained model (Adebayo et al. 2018; Khakzar et al. 2020).

On the small CNN trained on the scikit-learn digits, plain gradients and Grad-CAM change when
the explained class or the weights change; guided backprop and LRP z+ barely do: their maps
mostly reconstruct the input.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from pytest_saliency import output_sensitivity, parameter_randomization

from ._models import assert_unchanged, snapshot

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
THRESHOLD = 0.5


@pytest.fixture(scope="session")
def digits():
    """The trained digits model (cached on disk by the example) and 16 held-out images."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))  # the example imports itself as the package `digits`
    module = importlib.import_module("digits.model")
    return module.trained_model(), module.audit_batch(16)


@pytest.mark.parametrize(
    ("method", "faithful"),
    [("gradient", True), ("gradcam", True), ("guided_backprop", False), ("lrp_zplus", False)],
)
def test_paper_finding_on_trained_digits(digits, method, faithful):
    model, x = digits
    before, rng = snapshot(model), torch.get_rng_state().clone()
    sensitivity = output_sensitivity(model, x, method, against="random", similarity="ssim")
    randomization = parameter_randomization(
        model, x, method, mode="cascading", order="top_down", similarity="ssim"
    )
    assert_unchanged(before, snapshot(model))
    assert torch.equal(rng, torch.get_rng_state())
    for result in (sensitivity, randomization):
        assert result.degenerate == [], result.summary()
        assert result.passed(THRESHOLD) is faithful, result.summary()
        # Clear-cut verdicts: the whole 95% interval lies on the verdict's side.
        low, high = result.ci
        assert (high <= THRESHOLD) if faithful else (low > THRESHOLD), result.summary()
