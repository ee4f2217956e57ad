"""The fixture / marker style of pytest-saliency, on the same DigitsNet as saliency_digits.yaml.

``@pytest.mark.saliency(methods=[...])`` parametrizes the ``saliency_method`` fixture (one test
per method, ids like ``test_maps_follow_the_class[gradcam]``); the ``saliency`` fixture runs the
audits with the marker's settings, records every result for the verdict table and the reports,
and its ``assert_*`` helpers fail the test with a table of scores.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from digits import model as digits_model

SIGNED = ["gradient", "input_x_gradient", {"name": "gradcam", "layer": digits_model.CAM_LAYER}]
# Positive-only propagation: these maps barely depend on the class or on the weights
# (Khakzar et al. 2020), so the audits are expected to fail.
POSITIVE_ONLY = ["guided_backprop", "lrp_zplus"]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return digits_model.trained_model()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return digits_model.audit_batch(16)


def expect_failure_for(request: pytest.FixtureRequest, method: str | dict) -> None:
    """Mark this parametrized case as a strict expected failure if ``method`` is positive-only."""
    name = method if isinstance(method, str) else method["name"]
    if name in POSITIVE_ONLY:
        reason = f"{name} propagates only positive gradients (Khakzar et al. 2020)"
        request.applymarker(pytest.mark.xfail(reason=reason, strict=True, raises=AssertionError))


# confidence=True: the upper end of the 95% bootstrap interval must be <= 0.5 too, so the
# verdict does not hinge on which 16 digits happen to be in the batch.
@pytest.mark.saliency(methods=SIGNED + POSITIVE_ONLY, max_similarity=0.5, confidence=True)
def test_maps_follow_the_class(saliency, saliency_method, request, model, batch) -> None:
    expect_failure_for(request, saliency_method)
    saliency.assert_output_sensitive(model, batch, saliency_method, against="random")


@pytest.mark.saliency(methods=SIGNED + POSITIVE_ONLY, max_similarity=0.5, confidence=True)
def test_maps_follow_the_weights(saliency, saliency_method, request, model, batch) -> None:
    expect_failure_for(request, saliency_method)
    saliency.assert_randomization_sensitive(model, batch, saliency_method, mode="cascading")


def test_maps_follow_what_the_model_learned(saliency, model, batch) -> None:
    """Data randomization (Adebayo et al. 2018, section 5): the signed gradient and Grad-CAM
    differ from their permuted-label twin's maps far more than guided backprop does."""
    twin = digits_model.permuted_model()
    methods = ["gradient", {"name": "gradcam", "layer": digits_model.CAM_LAYER}, "guided_backprop"]
    gradient, gradcam, guided = (
        saliency.data_randomization(model, twin, batch, m) for m in methods
    )
    assert max(gradient.score, gradcam.score) < guided.score - 0.15
    # the controls: the input's edges are the same map for both models, fresh noise is not
    assert guided.controls["edge"] == pytest.approx(1.0)
    assert abs(guided.controls["noise"]) < 0.05
