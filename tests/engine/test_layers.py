"""Layer lookup for CAM methods: by name, by module, or the last spatial one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pytest_saliency.engine.layers import default_layer, layer_name, resolve_layer, spatial_layers
from pytest_saliency.errors import SaliencyError
from tests._models import assert_unchanged, conv1d_net, mlp, randn, small_cnn, snapshot


def test_resolve_by_name_and_by_module():
    model = small_cnn()
    assert resolve_layer(model, "conv2") == ("conv2", model.conv2)
    assert resolve_layer(model, model.conv3) == ("conv3", model.conv3)
    assert resolve_layer(model, "acts.1") == ("acts.1", model.acts[1])
    assert layer_name(model, model.acts[4]) == "acts.4"


def test_unknown_name_suggests_close_names():
    with pytest.raises(SaliencyError) as info:
        resolve_layer(small_cnn(), "conv_2")
    message = str(info.value)
    assert "'conv_2'" in message and "Closest names: 'conv2'" in message and "'fc1'" in message


def test_root_name_and_foreign_module_and_wrong_type():
    model = small_cnn()
    with pytest.raises(SaliencyError, match="named_modules"):
        resolve_layer(model, "")
    with pytest.raises(SaliencyError, match="not a submodule"):
        resolve_layer(model, nn.Conv2d(3, 4, 3))
    with pytest.raises(SaliencyError, match="got int"):
        resolve_layer(model, 3)


def test_long_name_lists_are_shortened():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(30)])
    with pytest.raises(SaliencyError, match=r"\(10 more\)"):
        resolve_layer(model, "nope")


def test_spatial_layers_in_forward_order_and_model_untouched():
    model = small_cnn()
    before = snapshot(model)
    found = spatial_layers(model, randn(2, 3, 8, 8))
    assert_unchanged(before, snapshot(model))
    assert found == [
        ("conv1", (4, 8, 8)),
        ("acts.0", (4, 8, 8)),
        ("conv2", (6, 8, 8)),
        ("acts.1", (6, 8, 8)),
        ("pool", (6, 4, 4)),
        ("conv3", (6, 4, 4)),
        ("acts.2", (6, 4, 4)),
    ]
    assert default_layer(model, randn(2, 3, 8, 8), "gradcam") == ("acts.2", model.acts[2])


def test_default_layer_skips_single_position_outputs():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 2),
    )  # fmt: skip
    assert default_layer(model, randn(1, 3, 6, 6), "gradcam") == ("1", model[1])


def test_default_layer_for_sequences():
    model = conv1d_net()
    assert default_layer(model, randn(2, 2, 10), "gradcam") == ("3", model[3])


def test_default_layer_errors():
    with pytest.raises(SaliencyError, match="'gradcam'.*no spatial axes"):
        default_layer(mlp(), randn(2, 6), "gradcam")
    pooled = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    with pytest.raises(SaliencyError, match="no module of Sequential"):
        default_layer(pooled, randn(1, 3, 4, 4), "gradcam")


def test_dry_forward_is_single_sample_and_no_grad():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append((x.shape[0], torch.is_grad_enabled()))
            return x

    model = nn.Sequential(nn.Conv2d(3, 2, 1), Probe(), nn.Flatten(), nn.Linear(2 * 16, 2))
    spatial_layers(model, randn(5, 3, 4, 4))
    assert seen == [(1, False)]
