"""Layer lookup for CAM methods: by name, by module, or the last spatial one."""

from __future__ import annotations

import pytest
from torch import nn

from pytest_saliency.engine.layers import layer_name, resolve_cam_layer, resolve_layer
from pytest_saliency.errors import SaliencyError
from tests._models import assert_unchanged, conv1d_net, randn, small_cnn, snapshot


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


def default(model, x, method="gradcam"):
    layer = resolve_cam_layer(model, x, method, None, None)
    return layer.name, layer.module


def test_default_layer_of_a_flatten_head_is_the_last_readable_output():
    model = small_cnn()
    before = snapshot(model)
    assert default(model, randn(2, 3, 8, 8)) == ("acts.2", model.acts[2])
    assert_unchanged(before, snapshot(model))


def test_default_layer_is_what_the_global_pooling_reads():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 2),
    )  # fmt: skip
    layer = resolve_cam_layer(model, randn(1, 3, 6, 6), "gradcam", None, None)
    assert (layer.name, layer.module, layer.point) == ("1", model[1], "output")
    assert layer.default and str(layer.layout) == "channels_first(6x6)"


def test_default_layer_for_sequences():
    model = conv1d_net()
    assert default(model, randn(2, 2, 10)) == ("3", model[3])


def test_default_layer_errors():
    pooled = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    with pytest.raises(SaliencyError, match="no module of Sequential gives a usable one"):
        default(pooled, randn(1, 3, 4, 4))


def test_dry_forward_is_single_sample():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(x.shape[0])
            return x

    model = nn.Sequential(nn.Conv2d(3, 2, 1), Probe(), nn.Flatten(), nn.Linear(2 * 16, 2))
    default(model, randn(5, 3, 4, 4))
    assert seen == [1]
