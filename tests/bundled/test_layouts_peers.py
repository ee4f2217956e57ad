"""Grad-CAM and Grad-CAM++ on modern architectures agree with pytorch-grad-cam given the
matching ``reshape_transform`` on the same layer (random init, small inputs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import pytest_saliency as ps
from pytest_saliency.engine.layers import resolve_cam_layer

timm = pytest.importorskip("timm")
pytest.importorskip("pytorch_grad_cam")


class Scaled(nn.Module):
    def __init__(self, model: nn.Module, k: float = 1e4):
        super().__init__()
        self.m, self.k = model, k

    def forward(self, x):
        return self.m(x) * self.k


def channels_last(t):
    return t.permute(0, 3, 1, 2)


def tokens(prefix):
    def transform(t):
        n, count, c = t.shape
        side = int(round((count - prefix) ** 0.5))
        return t[:, prefix:].reshape(n, side, side, c).permute(0, 3, 1, 2)

    return transform


def with_live_head(model: nn.Module, head: nn.Linear) -> nn.Module:
    """torchvision's ViT starts with a zero head: every gradient would be zero."""
    with torch.no_grad():
        head.weight.normal_(0, 0.02)
    return model


def tv(name, **kw):
    return lambda: getattr(torchvision.models, name)(weights=None, **kw)


def tm(name, **kw):
    return lambda: timm.create_model(name, pretrained=False, **kw)


# name: (factory, input size, layer, reshape_transform, expected layout, default layer)
CASES = {
    "vit_b_16": (
        lambda: (lambda m: with_live_head(m, m.heads.head))(tv("vit_b_16", image_size=64)()),
        64, "encoder.layers.encoder_layer_11.ln_1", tokens(1), "tokens(prefix=1, grid=4x4)",
        "encoder.layers.encoder_layer_11.ln_1",
    ),
    "swin_t": (tv("swin_t"), 64, "norm", channels_last, "channels_last(2x2)", "permute"),
    "convnext_tiny": (tv("convnext_tiny"), 64, "features.7", None, "channels_first(2x2)",
                      "features"),
    "efficientnet_b0": (tv("efficientnet_b0"), 96, "features.8", None, "channels_first(3x3)",
                        "features"),
    "timm_vit_tiny": (tm("vit_tiny_patch16_224", img_size=64), 64, "blocks.11.norm1", tokens(1),
                      "tokens(prefix=1, grid=4x4)", "blocks.11.norm1"),
    "timm_deit_tiny": (tm("deit_tiny_patch16_224", img_size=64), 64, "blocks.11.norm1",
                       tokens(1), "tokens(prefix=1, grid=4x4)", "blocks.11.norm1"),
    "timm_convnext_atto": (tm("convnext_atto"), 64, "stages.3", None, "channels_first(2x2)",
                           "norm_pre"),
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    factory, size, layer, transform, layout, default = CASES[request.param]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = factory().eval()
        x = torch.randn(2, 3, size, size)
    return model, x, layer, transform, layout, default


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(axis=1, keepdims=True)
    b = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(axis=1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_agrees_with_pytorch_grad_cam(case, method):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, x, layer, transform, layout, _ = case
    target = torch.tensor([3, 7])
    # Logits scaled up: pytorch-grad-cam's Grad-CAM++ adds eps=1e-7 to a denominator of
    # squared gradients, which would otherwise dominate the small gradients of these models.
    scaled = Scaled(model)
    peer_class = GradCAM if method == "gradcam" else GradCAMPlusPlus
    module = dict(scaled.named_modules())["m." + layer]
    with peer_class(scaled, [module], reshape_transform=transform) as peer:
        want = peer(x, [ClassifierOutputTarget(int(t)) for t in target])
    got = ps.explain(scaled, x, method, layer="m." + layer, target=target).numpy()
    assert got.shape == want.shape and np.ptp(want.reshape(2, -1), axis=1).min() > 0
    assert pearson(got, want).min() >= 0.999
    assert str(resolve_cam_layer(model, x, method, layer, None).layout) == layout


def test_default_layer(case):
    model, x, _, _, _, default = case
    assert resolve_cam_layer(model, x, "gradcam", None, None).name == default


@pytest.mark.parametrize("name", ["vit_b_16", "swin_t", "timm_vit_tiny", "timm_deit_tiny"])
def test_randomization_covers_every_parameter_of_transformers(name):
    from pytest_saliency.checks.steps import plan_steps

    factory, size, *_ = CASES[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = factory().eval()
    plan = plan_steps(model, torch.randn(1, 3, size, size), None)
    assert plan.coverage == 1.0 and plan.skipped == [] and plan.unused == []
    names = [s.name for s in plan.steps]
    # Attention weights sit where the attention runs: after the block's first norm, before
    # its second (bottom-up order).
    if name == "vit_b_16":
        block = "encoder.layers.encoder_layer_3."
        at = [names.index(block + part) for part in
              ("ln_1", "self_attention", "self_attention.out_proj", "ln_2")]  # fmt: skip
    else:
        block = "blocks.3." if name.startswith("timm") else "features.5.1."
        parts = ("norm1", "attn.qkv", "attn.proj", "norm2")
        at = [names.index(block + part) for part in parts]
    assert at == sorted(at)
