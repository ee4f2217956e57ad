"""CAM layers on any feature layout: channels-first, channels-last, tokens; module inputs and
the global pooling's input; the default layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pytest_saliency as ps
from pytest_saliency.engine.layers import resolve_cam_layer
from pytest_saliency.errors import SaliencyError
from tests._models import Lambda, assert_unchanged, randn, snapshot


def gradcam_reference(activation: torch.Tensor, gradient: torch.Tensor, size) -> torch.Tensor:
    """Grad-CAM from a channels-first activation and gradient [N, C, h, w], upsampled."""
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = (weights * activation).sum(dim=1, keepdim=True).clamp(min=0)
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]


def activation_and_gradient(model, x, target, module, point="output", transform=None):
    """The tensor at a module's output (or input) and the target score's gradient there,
    computed with a plain hook, independently of the engine."""
    kept = []

    def keep(t):
        t.retain_grad()
        kept.append(t)

    # The module (or the rest of the forward) gets a copy, so that an in-place op after it
    # leaves the kept tensor as it was.
    if point == "output":
        handle = module.register_forward_hook(lambda m, a, out: keep(out) or out.clone())
    else:
        handle = module.register_forward_pre_hook(
            lambda m, args: keep(args[0]) or (args[0].clone(), *args[1:])
        )
    try:
        out = model(x)
        out.gather(1, target[:, None]).sum().backward()
    finally:
        handle.remove()
    a, g = kept[0].detach(), kept[0].grad
    return (transform(a), transform(g)) if transform else (a, g)


def output_gradients(model, x, target, modules):
    """The target score's gradient at the inputs, then at each module's output (plain
    autograd, hooks removed)."""
    outs: dict[int, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda mod, a, o: outs.__setitem__(id(mod), o)) for m in modules
    ]
    xg = x.clone().requires_grad_(True)
    try:
        score = model(xg).gather(1, target[:, None]).sum()
    finally:
        for h in handles:
            h.remove()
    return list(torch.autograd.grad(score, [xg, *(outs[id(m)] for m in modules)]))


class Stem(nn.Module):
    def __init__(self, channels=6):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


class ChannelsLast(nn.Module):
    """A conv stem, then a block that works channels-last (as ConvNeXt and Swin do), and a
    mean over the grid axes (1, 2) before the head."""

    def __init__(self):
        super().__init__()
        self.stem = Stem()
        self.norm = nn.LayerNorm(6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        t = self.stem(x).permute(0, 2, 3, 1)
        t = t + torch.nn.functional.gelu(self.mix(self.norm(t)))
        return self.head(t.mean(dim=(1, 2)))


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Linear(width, width)

    def forward(self, t):
        h = self.norm1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        return t + self.mlp(self.norm2(t))


class TinyViT(nn.Module):
    """Patch 4 on 8x8 inputs (a 2x2 grid), a class token, two blocks, a class-token head."""

    def __init__(self, width=8, pool="token"):
        super().__init__()
        self.embed = nn.Conv2d(3, width, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, 5, width) * 0.5)
        self.blocks = nn.Sequential(Block(width), Block(width))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 3)
        self.pool = pool

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(len(t), -1, -1), t], dim=1) + self.pos
        t = self.norm(self.blocks(t))
        return self.head(t[:, 0] if self.pool == "token" else t[:, 1:].mean(dim=1))


def tokens_to_grid(prefix, grid):
    def transform(t):
        return t[:, prefix:].transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)

    return transform


def built(factory, seed=0):
    torch.manual_seed(seed)
    return factory().eval()


def test_channels_last_layer_is_read_through_its_layout():
    model, x = built(ChannelsLast), randn(2, 3, 6, 6, seed=1)
    target = torch.tensor([1, 2])
    layer = resolve_cam_layer(model, x, "gradcam", "mix", None)
    assert str(layer.layout) == "channels_last(6x6)"
    a, g = activation_and_gradient(model, x, target, model.mix,
                                   transform=lambda t: t.permute(0, 3, 1, 2))  # fmt: skip
    got = ps.explain(model, x, "gradcam", layer="mix", target=target)
    torch.testing.assert_close(got, gradcam_reference(a, g, (6, 6)), rtol=1e-5, atol=1e-6)
    # Read as if channels-first, the same tensor gives another map: the layout matters.
    wrong = ps.explain(model, x, "gradcam", layer="mix", target=target, layout="channels_first")
    assert not torch.allclose(wrong, got)


def test_default_of_a_grid_mean_is_the_pooled_channels_last_map():
    model, x = built(ChannelsLast), randn(2, 3, 6, 6, seed=2)
    layer = resolve_cam_layer(model, x, "gradcam", None, None)
    # The pooled tensor is the residual sum, which no module outputs or reads.
    assert (layer.name, layer.point, layer.default) == ("<global_pool>", "pool", True)
    assert str(layer.layout) == "channels_last(6x6)"
    target = torch.tensor([0, 3])
    got = ps.explain(model, x, "gradcam", target=target)
    assert torch.equal(got, ps.explain(model, x, "gradcam", target=target, layer="<global_pool>"))
    # Reference: the residual sum, recomputed by hand.
    t = model.stem(x).permute(0, 2, 3, 1).detach().requires_grad_(True)
    pooled = t + F.gelu(model.mix(model.norm(t)))
    pooled.retain_grad()
    model.head(pooled.mean(dim=(1, 2))).gather(1, target[:, None]).sum().backward()
    a, g = pooled.detach().permute(0, 3, 1, 2), pooled.grad.permute(0, 3, 1, 2)
    torch.testing.assert_close(got, gradcam_reference(a, g, (6, 6)), rtol=1e-5, atol=1e-6)


def test_token_layer_drops_the_class_token_and_reads_the_grid():
    model, x = built(TinyViT), randn(2, 3, 8, 8, seed=3)
    target = torch.tensor([2, 0])
    layer = resolve_cam_layer(model, x, "gradcam", "blocks.1.norm1", None)
    assert str(layer.layout) == "tokens(prefix=1, grid=2x2)"
    a, g = activation_and_gradient(model, x, target, model.blocks[1].norm1,
                                   transform=tokens_to_grid(1, (2, 2)))  # fmt: skip
    got = ps.explain(model, x, "gradcam", layer="blocks.1.norm1", target=target)
    torch.testing.assert_close(got, gradcam_reference(a, g, (8, 8)), rtol=1e-5, atol=1e-6)


def test_class_token_default_is_the_last_blocks_first_norm():
    """After the last attention the patch tokens no longer reach the class token: the last
    block's norm2, mlp and output, and the final norm, would give blank maps."""
    model, x = built(TinyViT), randn(2, 3, 8, 8, seed=4)
    layer = resolve_cam_layer(model, x, "gradcam", None, None)
    assert (layer.name, str(layer.layout)) == ("blocks.1.norm1", "tokens(prefix=1, grid=2x2)")
    blank = ps.explain(model, x, "gradcam", layer="blocks.1.norm2")
    assert torch.equal(blank, torch.zeros_like(blank))


def test_mean_pooled_tokens_default_is_the_final_norm():
    model, x = built(lambda: TinyViT(pool="mean")), randn(2, 3, 8, 8, seed=5)
    layer = resolve_cam_layer(model, x, "gradcam", None, None)
    assert (layer.name, str(layer.layout)) == ("norm", "tokens(prefix=1, grid=2x2)")


class FunctionalRelu(nn.Module):
    """DenseNet's head: the last module's output is not rectified; a functional ReLU (in
    place) and a functional pooling follow."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5))
        self.classifier = nn.Linear(5, 3)

    def forward(self, x):
        out = F.relu(self.features(x), inplace=True)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1))


def test_functional_relu_before_pooling_defaults_to_the_pooled_map():
    model, x = built(FunctionalRelu), randn(2, 3, 6, 6, seed=6)
    with torch.no_grad():
        model.features[1].running_mean.fill_(0.3)
    target = torch.tensor([1, 1])
    layer = resolve_cam_layer(model, x, "gradcam++", None, None)
    assert (layer.name, layer.point) == ("<global_pool>", "pool")
    a, _ = activation_and_gradient(model, x, target, model.features)
    assert bool((a < 0).any())  # the module's own output is not rectified
    pooled = a.clamp(min=0).requires_grad_(True)
    model.classifier(pooled.mean(dim=(2, 3))).gather(1, target[:, None]).sum().backward()
    got = ps.explain(model, x, "gradcam", target=target)
    reference = gradcam_reference(pooled.detach(), pooled.grad, (6, 6))
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)
    features = ps.explain(model, x, "gradcam", target=target, layer="features")
    assert not torch.allclose(features, got)


def test_module_input_layer():
    model, x = built(ChannelsLast), randn(2, 3, 6, 6, seed=7)
    target = torch.tensor([0, 1])
    a, g = activation_and_gradient(model, x, target, model.mix, point="input",
                                   transform=lambda t: t.permute(0, 3, 1, 2))  # fmt: skip
    got = ps.explain(model, x, "gradcam", layer="mix:input", target=target)
    torch.testing.assert_close(got, gradcam_reference(a, g, (6, 6)), rtol=1e-5, atol=1e-6)
    # mix reads what norm outputs: the same tensor by either name.
    torch.testing.assert_close(got, ps.explain(model, x, "gradcam", layer="norm", target=target))


class Opaque(nn.Module):
    """A map made by an op the tagger does not know (an einsum over the grid)."""

    def __init__(self):
        super().__init__()
        self.stem = Stem(4)
        self.mix = Lambda(lambda t: torch.einsum("nchw,hk->nckw", t, torch.eye(t.shape[2])))
        self.head = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        return self.head(self.mix(self.stem(x)).flatten(1))


def test_unknown_layout_is_refused_and_can_be_given():
    model, x = built(Opaque), randn(2, 3, 6, 6, seed=8)
    with pytest.raises(SaliencyError, match=r"layer 'mix' \(Lambda\).*layout='channels_first'"):
        ps.explain(model, x, "gradcam", layer="mix")
    given = ps.explain(model, x, "gradcam", layer="mix", layout="channels_first")
    torch.testing.assert_close(given, ps.explain(model, x, "gradcam", layer="stem"))


def test_attention_internals_are_not_a_cam_layout():
    model, x = built(TinyViT), randn(2, 3, 8, 8, seed=9)
    # The MultiheadAttention output is a tuple; its out_proj never runs as a module.
    with pytest.raises(SaliencyError, match="did not return a tensor"):
        ps.explain(model, x, "gradcam", layer="blocks.0.attn.out_proj")


def test_layout_option_errors():
    model, x = built(TinyViT), randn(2, 3, 8, 8, seed=10)
    with pytest.raises(SaliencyError, match=r"layout='nhwc' is not a feature layout; choose"):
        ps.explain(model, x, "gradcam", layout="nhwc")
    with pytest.raises(SaliencyError, match=r"layout='channels_last' needs 4 axes"):
        ps.explain(model, x, "gradcam", layer="norm", layout="channels_last")
    with pytest.raises(SaliencyError, match=r"'name:output' for a module's output"):
        ps.explain(model, x, "gradcam", layer="norm:outputs")
    with pytest.raises(SaliencyError, match=r"Closest names: 'norm'"):
        ps.explain(model, x, "gradcam", layer="nrom:input")


def test_given_token_prefix_and_solved_grid():
    model, x = built(TinyViT), randn(2, 3, 8, 8, seed=11)
    inferred = ps.explain(model, x, "gradcam", layer="blocks.1.norm1")
    for layout in ("tokens", "tokens:1"):
        given = ps.explain(model, x, "gradcam", layer="blocks.1.norm1", layout=layout)
        torch.testing.assert_close(given, inferred)


class Changing(nn.Module):
    """A forward whose control flow changes between calls: the chosen layer runs once in the
    dry forward and twice afterwards."""

    def __init__(self):
        super().__init__()
        self.stem = Stem(3)
        self.head = nn.Linear(3, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        t = self.stem(x)
        if self.calls > 1:
            t = self.stem(t)
        return self.head(t.mean(dim=(2, 3)))


def test_an_error_about_the_default_layer_says_it_was_chosen():
    model, x = built(Changing), randn(1, 3, 6, 6, seed=12)
    with pytest.raises(SaliencyError, match=r"layer 'stem' \(chosen by default\) was recorded 2"):
        ps.explain(model, x, "gradcam")


def test_audit_results_carry_the_layer_and_layout():
    model, x = built(TinyViT), randn(3, 3, 8, 8, seed=13)
    before = snapshot(model)
    result = ps.output_sensitivity(model, x, "gradcam")
    assert_unchanged(before, snapshot(model))
    assert result.settings["layer"] == "blocks.1.norm1"
    assert result.settings["layout"] == "tokens(prefix=1, grid=2x2)"
    assert "layer='blocks.1.norm1' (tokens(prefix=1, grid=2x2))" in repr(result)
    assert result.to_dict()["settings"]["layout"] == "tokens(prefix=1, grid=2x2)"
    rand = ps.parameter_randomization(model, x, "gradcam++", layers="blocks")
    assert rand.settings["layout"] == "tokens(prefix=1, grid=2x2)"


def test_fullgrad_reads_token_and_channels_last_biases_through_their_layouts():
    from tests.bundled.test_cam import ref_fullgrad

    model, x = built(TinyViT).double(), randn(2, 3, 8, 8, seed=14).double()
    target = torch.tensor([1, 2])
    with pytest.warns(ps.SaliencyWarning, match=r"out_proj' \(not called as a module") as seen:
        got = ps.explain(model, x, "fullgrad", target=target)
    assert "'blocks.0.attn.in_proj_bias' (a bias parameter that no Conv" in str(seen[0].message)
    # Reference: every biased module called on the token grid, its output gradient as a grid.
    names = ["embed", "blocks.0.norm1", "blocks.0.norm2", "blocks.0.mlp", "blocks.1.norm1",
             "blocks.1.norm2", "blocks.1.mlp", "norm"]  # fmt: skip
    modules = dict(model.named_modules())
    gx, *grads = output_gradients(model, x, target, [modules[n] for n in names])
    grads = [gx, *grads]
    grid = {n: (lambda t: t) if n == "embed" else tokens_to_grid(1, (2, 2)) for n in names}
    biased = [(modules[n].bias.detach(), grid[n](g)) for n, g in zip(names, grads[1:])]
    want = ref_fullgrad(x, grads[0], biased, True)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)
    rand = ps.output_sensitivity(model, x, "fullgrad")
    assert rand.settings["terms"].startswith("8 of 12 biased grid layers (1 without a grid")


def test_fullgrad_on_a_channels_last_block():
    from tests.bundled.test_cam import ref_fullgrad

    model, x = built(ChannelsLast).double(), randn(2, 3, 6, 6, seed=15).double()
    target = torch.tensor([0, 3])
    got = ps.explain(model, x, "fullgrad", target=target)
    grads = output_gradients(model, x, target, [model.stem.conv, model.norm, model.mix])
    biased = [
        (model.stem.conv.bias.detach(), grads[1]),
        (model.norm.bias.detach(), grads[2].permute(0, 3, 1, 2)),
        (model.mix.bias.detach(), grads[3].permute(0, 3, 1, 2)),
    ]
    np.testing.assert_allclose(got.numpy(), ref_fullgrad(x, grads[0], biased, True),
                               rtol=1e-9, atol=1e-12)  # fmt: skip


class Swapped(nn.Module):
    """A square conv map whose channel and width axes are swapped: the same shape, another
    layout. Pooled over what are now the grid axes (1, 2)."""

    def __init__(self, op):
        super().__init__()
        self.stem = Stem(8)
        self.swap = Lambda(op)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.swap(self.stem(x)).mean(dim=(1, 2)))


@pytest.mark.parametrize(
    "op",
    [lambda t: torch.swapdims(t, 1, 3), lambda t: torch.rot90(t, 1, (2, 3)), lambda t: t.mT],
    ids=["swapdims", "rot90", "mT"],
)
def test_same_shape_ops_that_move_the_grid_drop_the_tag(op):
    model, x = built(lambda: Swapped(op)), randn(2, 3, 8, 8, seed=16)
    with pytest.raises(SaliencyError, match=r"layer 'swap' \(Lambda\).*cannot be told"):
        ps.explain(model, x, "gradcam", layer="swap")


class TransposedConv(nn.Module):
    """A convolution of the transposed input: its grid is not the input's."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x.transpose(2, 3))).flatten(1))


def test_a_producer_on_a_moved_grid_has_no_layout():
    model, x = built(TransposedConv), randn(2, 3, 6, 6, seed=17)
    with pytest.raises(SaliencyError, match=r"layer 'conv' \(Conv2d\).*cannot be told"):
        ps.explain(model, x, "gradcam", layer="conv")


class InPlaceAfter(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = Stem(4)
        self.block = Lambda(lambda t: 2 * t)  # saves nothing for backward: h may change
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.stem(x) * 1.0  # no module outputs h
        h += self.block(h)  # changes the block's input in place
        return self.head(h.mean(dim=(2, 3)))


def test_a_tapped_input_changed_in_place_later_is_refused():
    model, x = built(InPlaceAfter), randn(2, 3, 6, 6, seed=18)
    with pytest.raises(SaliencyError, match=r"layer 'block:input' was changed in place later"):
        ps.explain(model, x, "gradcam", layer="block:input")


class SelfAttention(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.proj = nn.Linear(width, width)

    def forward(self, t):
        weights = (self.q(t) @ self.k(t).transpose(1, 2)).softmax(dim=-1)
        return self.proj(weights @ self.v(t))


class AttnBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Linear(width, width)

    def forward(self, t):
        t = t + self.attn(self.norm1(t))
        return t + self.mlp(self.norm2(t))


def test_the_default_is_never_inside_an_attention_module():
    """The values v(t) have the class token's width and are read after norm1: without the
    attention rule the default would be 'blocks.1.attn.v'."""
    model = built(TinyViT)
    model.blocks = nn.Sequential(AttnBlock(8), AttnBlock(8)).eval()
    layer = resolve_cam_layer(model, randn(2, 3, 8, 8, seed=19), "gradcam", None, None)
    assert layer.name == "blocks.1.norm1"


def test_a_given_token_prefix_is_honoured_by_the_default():
    model, x = built(TinyViT), randn(2, 3, 8, 8, seed=20)
    assert resolve_cam_layer(model, x, "gradcam", None, "tokens:1").name == "blocks.1.norm1"
    with pytest.raises(SaliencyError, match="no module of TinyViT gives a usable one"):
        resolve_cam_layer(model, x, "gradcam", None, "tokens:0")
    with pytest.raises(SaliencyError, match=r"with 3 prefix tokens the other 2 form no grid"):
        ps.explain(model, x, "gradcam", layer="norm", layout="tokens:3")


def test_a_given_layout_with_a_mean_pooled_slice():
    model, x = built(lambda: TinyViT(pool="mean")), randn(2, 3, 8, 8, seed=21)
    layer = resolve_cam_layer(model, x, "gradcam", None, "tokens")
    assert (layer.name, str(layer.layout)) == ("norm", "tokens(prefix=1, grid=2x2)")
    torch.testing.assert_close(
        ps.explain(model, x, "gradcam", layout="tokens"), ps.explain(model, x, "gradcam")
    )


class ChannelSliced(nn.Module):
    """GoogLeNet's transform_input: channel slices, scaled, concatenated, then convolved; a
    flatten head (so no pooling declares the layout)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        x = torch.cat([x[:, :1] * 0.5, x[:, [2, 1]]], dim=1)
        return self.head(self.features(x).flatten(1))


def test_a_convolution_tags_an_untagged_map_again_after_a_channel_shuffle():
    model, x = built(ChannelSliced), randn(2, 3, 6, 6, seed=22)
    layer = resolve_cam_layer(model, x, "gradcam", None, None)
    assert (layer.name, str(layer.layout)) == ("features", "channels_first(6x6)")


def test_fullgrad_reads_a_one_channel_map_on_the_grid():
    from pytest_saliency.bundled.cam import bias_terms

    class SpatialGate(nn.Module):  # CBAM-style: h * sigmoid(conv(h) -> 1 channel)
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.sa = nn.Conv2d(8, 1, 7, padding=3)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            h = self.conv(x)
            return self.head((h * torch.sigmoid(self.sa(h))).mean(dim=(2, 3)))

    terms = bias_terms(built(SpatialGate), randn(1, 3, 8, 8, seed=23))
    assert sorted(terms.read) == ["conv", "sa"] and terms.no_grid == ["head"]


def test_global_pool_layer_needs_a_global_pooling():
    from tests._models import small_cnn

    with pytest.raises(SaliencyError, match=r"'<global_pool>'.*pools no feature map"):
        ps.explain(small_cnn(), randn(2, 3, 8, 8, seed=24), "gradcam", layer="<global_pool>")
    model, x = built(FunctionalRelu), randn(2, 3, 6, 6, seed=25)
    layer = resolve_cam_layer(model, x, "gradcam", "<global_pool>", None)
    assert (layer.name, layer.point, layer.default) == ("<global_pool>", "pool", False)
