"""Randomization steps: every parameter the forward uses, in the order it uses them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pytest_saliency.checks.randomization as randomization_module
from pytest_saliency import parameter_randomization
from pytest_saliency.checks.steps import ZERO_SCALE, plan_steps
from pytest_saliency.errors import SaliencyError

from ._models import assert_unchanged, randn, snapshot


class TokenNet(nn.Module):
    """A one-block ViT: bare class token and position embedding, nn.MultiheadAttention (whose
    out_proj is used inside the attention function), and an auxiliary head that only the
    training forward uses. Registered out of forward order."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.embed = nn.Conv2d(1, 8, 4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos = nn.Parameter(torch.randn(1, 5, 8) * 0.1)
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.aux = nn.Linear(8, 3)
        with torch.no_grad():
            # as trained: not the zeros of their init
            self.attn.out_proj.bias.normal_()
            self.attn.in_proj_bias.normal_()

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(len(t), -1, -1), t], 1) + self.pos
        h = self.norm(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        out = self.head(t[:, 0])
        return out + self.aux(t[:, 0]) if self.training else out


def token_net() -> TokenNet:
    torch.manual_seed(100)  # not an audit seed: a reset under it would redraw the init
    return TokenNet().eval()


class Copies:
    """Stands in for ``explain_step`` and keeps the randomized copy's state at every step."""

    def __init__(self):
        self.states: list[dict[str, torch.Tensor]] = []

    def __call__(self, plan, x, targets):
        self.states.append({k: v.clone() for k, v in plan.model.state_dict().items()})
        return plan(x, targets)


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_steps_follow_first_parameter_use_and_cover_everything_used():
    model, x = token_net(), randn(2, 1, 8, 8, seed=1)
    before = snapshot(model)
    result = parameter_randomization(model, x, "gradient")
    assert result.layers == [
        "head", "attn.out_proj", "attn", "norm", "pos", "cls_token", "embed",
    ]  # fmt: skip
    assert result.coverage == 1.0 and result.skipped == []
    assert result.unused == ["aux"] and "aux" not in result.layers
    assert result.fallback == ["pos", "cls_token"]
    assert "unused by the forward (not steps): [aux]" in result.summary()
    assert "coverage=1.000" in repr(result)
    assert_unchanged(before, snapshot(model))


def test_each_step_changes_exactly_its_parameters(monkeypatch):
    model, x = token_net(), randn(2, 1, 8, 8, seed=2)
    copies = Copies()
    monkeypatch.setattr(randomization_module, "explain_step", copies)
    result = parameter_randomization(model, x, "gradient", mode="independent")
    original = copies.states[0]
    expected = {
        "head": {"head.weight", "head.bias"},
        "attn.out_proj": {"attn.out_proj.weight", "attn.out_proj.bias"},
        # MultiheadAttention._reset_parameters also zeroes out_proj.bias: put back, it is
        # the next step's tensor.
        "attn": {"attn.in_proj_weight", "attn.in_proj_bias"},
        "norm": {"norm.weight", "norm.bias"},
        "pos": {"pos"},
        "cls_token": {"cls_token"},
        "embed": {"embed.weight", "embed.bias"},
    }
    for name, state in zip(result.layers, copies.states[1:]):
        if name == "norm":
            # LayerNorm resets to ones and zeros, which this untrained norm already holds:
            # nothing changes, and nothing outside the norm may either.
            assert changed(original, state) <= expected[name]
            assert torch.equal(state["norm.weight"], torch.ones(8))
            continue
        assert changed(original, state) == expected[name], name


def test_fallback_draws_normal_with_the_tensors_rms(monkeypatch):
    model, x = token_net(), randn(2, 1, 8, 8, seed=3)
    copies = Copies()
    monkeypatch.setattr(randomization_module, "explain_step", copies)
    result = parameter_randomization(model, x, "gradient", mode="independent", seed=7)
    for name, rms in (
        ("pos", float(model.pos.detach().double().pow(2).mean().sqrt())),
        ("cls_token", 0),
    ):
        k = result.layers.index(name)
        draw = torch.randn(
            getattr(model, name).shape,
            dtype=torch.float64,
            generator=torch.Generator().manual_seed(7 + k),
        )
        expected = (draw * (rms or ZERO_SCALE)).float()
        assert torch.allclose(copies.states[k + 1][name], expected, atol=1e-7), name


def test_named_layers_report_coverage_and_what_was_skipped():
    model, x = token_net(), randn(2, 1, 8, 8, seed=4)
    result = parameter_randomization(model, x, "gradient", layers=["head"])
    used = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("aux"))
    assert result.coverage == pytest.approx((8 * 3 + 3) / used)
    assert result.skipped == ["embed", "norm", "attn", "cls_token", "pos"]
    assert "skipped=[embed, norm, attn, cls_token, ... (1 more)]" in repr(result)
    text = result.summary()
    assert f"coverage {result.coverage:.3f}: not re-initialised" in text and "pos" in text
    data = result.to_dict()
    assert data["skipped"] == result.skipped and data["unused"] == ["aux"]


def test_a_named_layer_the_forward_never_uses_is_refused():
    model, x = token_net(), randn(2, 1, 8, 8, seed=5)
    with pytest.raises(SaliencyError, match=r"layer 'aux' is never used by TokenNet's forward"):
        parameter_randomization(model, x, "gradient", layers=["head", "aux"])


def test_blocks_leave_unused_children_out():
    model, x = token_net(), randn(2, 1, 8, 8, seed=6)
    result = parameter_randomization(model, x, "gradient", layers="blocks", order="bottom_up")
    assert result.layers == ["embed", "cls_token", "pos", "norm", "attn", "head"]
    assert result.unused == ["aux"] and result.coverage == 1.0


class SmallVGG(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        return self.classifier(self.features(x))


def test_blocks_open_the_child_that_holds_most_layers():
    torch.manual_seed(0)
    model, x = SmallVGG().eval(), randn(2, 1, 8, 8, seed=7)
    result = parameter_randomization(model, x, "gradient", layers="blocks", order="bottom_up")
    assert result.layers == ["features.0", "features.3", "features.5", "features.7", "classifier"]


def small_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16,
        num_classes=3,
    ).eval()  # fmt: skip


def test_torchvision_vit_order_and_coverage():
    model, x = small_vit(), randn(2, 3, 16, 16, seed=8)
    plan = plan_steps(model, x, None)
    names = [s.name for s in plan.steps]
    layer = "encoder.layers.encoder_layer_{}.{}"
    block = ["ln_1", "self_attention", "self_attention.out_proj", "ln_2", "mlp.0", "mlp.3"]
    assert names == [
        "conv_proj", "class_token", "encoder.pos_embedding",
        *(layer.format(i, part) for i in range(2) for part in block),
        "encoder.ln", "heads.head",
    ]  # fmt: skip
    assert plan.coverage == 1.0 and plan.skipped == [] and plan.unused == []
    blocks = [s.name for s in plan_steps(model, x, "blocks").steps]
    assert blocks == [
        "conv_proj", "class_token", "encoder.pos_embedding",
        "encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1", "encoder.ln", "heads",
    ]  # fmt: skip


def test_torchvision_swin_coverage():
    from torchvision.models import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=[2, 2],
        num_classes=3,
    ).eval()  # fmt: skip
    x = randn(2, 3, 16, 16, seed=9)
    plan = plan_steps(model, x, None)
    assert plan.coverage == 1.0 and plan.skipped == [] and plan.unused == []
    tables = [s.name for s in plan.steps if s.name.endswith("relative_position_bias_table")]
    assert tables == [
        "features.1.0.attn.relative_position_bias_table",
        "features.3.0.attn.relative_position_bias_table",
    ]
    result = parameter_randomization(model, x, "gradient")
    assert set(tables) <= set(result.fallback) and result.coverage == 1.0


def test_reports_carry_the_coverage():
    from pytest_saliency import report
    from pytest_saliency.html import render_html

    model, x = token_net(), randn(2, 1, 8, 8, seed=10)
    result = parameter_randomization(model, x, "gradient", layers=["head", "embed"])
    record = report.make_record("t.py::test", result, threshold=0.5)
    assert record["coverage"] == pytest.approx(result.coverage) and record["unused"] == ["aux"]
    page = render_html([record])
    assert f"coverage {result.coverage:.3f} of the parameters the forward uses" in page
    assert "not re-initialised: norm, attn, cls_token, pos" in page
    assert "unused by the forward: aux" in page
