"""Review fixes: numpy targets, a missing batch axis, inference mode, error punctuation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pytest_saliency as ps
from pytest_saliency.errors import SaliencyError, unknown


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    ).eval()


def _inputs() -> torch.Tensor:
    return torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_numpy_targets_equal_int_and_tensor_targets():
    model, x = _cnn(), _inputs()
    by_int = ps.explain(model, x, "gradient", target=2)
    assert torch.equal(ps.explain(model, x, "gradient", target=np.int64(2)), by_int)
    by_tensor = ps.explain(model, x, "gradient", target=torch.tensor([1, 2, 3]))
    assert torch.equal(ps.explain(model, x, "gradient", target=np.array([1, 2, 3])), by_tensor)
    result = ps.output_sensitivity(model, x, "gradient", target=np.int64(4), similarity="pearson")
    assert result.targets.tolist() == [4, 4, 4]


def test_numpy_target_out_of_range_is_still_checked():
    with pytest.raises(SaliencyError, match="out of range"):
        ps.explain(_cnn(), _inputs(), "gradient", target=np.int64(9))


def test_one_image_without_batch_axis_names_the_shape_and_the_fix():
    with pytest.raises(SaliencyError, match=r"\(3, 8, 8\).*unsqueeze\(0\)"):
        ps.explain(_cnn(), _inputs()[0], "gradient")
    with pytest.raises(SaliencyError, match="unsqueeze"):
        ps.output_sensitivity(_cnn(), _inputs()[0], "gradient")


def test_three_d_inputs_stay_valid_for_models_that_add_the_channel_axis():
    class Grey(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.fc = nn.Linear(2, 3)

        def forward(self, x):
            return self.fc(self.conv(x.unsqueeze(1)).mean((2, 3)))

    x = torch.randn(2, 8, 8)
    assert ps.explain(Grey(), x, "gradient").shape == (2, 8)  # read as [N, C, L]


def test_methods_and_audits_work_inside_inference_mode():
    model, x = _cnn(), _inputs()
    expected = ps.explain(model, x, "gradcam")
    with torch.inference_mode():
        xi = x.clone()  # an inference tensor, as users' data in an inference block
        assert torch.equal(ps.explain(model, xi, "gradcam"), expected)
        result = ps.parameter_randomization(model, xi, "gradient", similarity="pearson")
        assert result.scores.shape == (2, 3)
        sens = ps.output_sensitivity(model, xi, "gradient", similarity="pearson")
        assert sens.scores.shape == (3,)


def test_unknown_choice_without_close_match_ends_its_sentence():
    message = str(unknown("layer", "zzz", ["conv", "fc"]))
    assert "'zzz'. Valid layers: 'conv', 'fc'." in message
