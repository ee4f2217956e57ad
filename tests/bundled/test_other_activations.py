"""Non-ReLU activations and gates: opt-in plain gradient for the ReLU-rule methods, Pass and
gate-as-constant for LRP."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pytest_saliency as ps
from pytest_saliency.errors import SaliencyError, UnsupportedActivationError
from pytest_saliency.plugin import method_id
from tests._models import assert_unchanged, randn, snapshot

GRADIENT = {"other_activations": "gradient"}


class SE(nn.Module):
    """Squeeze-and-excitation: x * sigmoid(fc2(relu(fc1(mean(x)))))."""

    def __init__(self, channels, hidden):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        return x * self.gate(self.fc2(self.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True)))))


class SENet(nn.Module):
    """conv, ReLU, conv, SiLU, SE gate, global average pooling, linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.act = nn.SiLU()
        self.se = SE(6, 3)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = self.se(self.act(self.conv2(self.relu(self.conv1(x)))))
        return self.head(h.mean(dim=(2, 3)))


def senet(seed=0):
    torch.manual_seed(seed)
    return SENet().eval()


@pytest.mark.parametrize(("ours", "peer"), [("guided_backprop", "GuidedBackprop"),
                                            ("deconvnet", "Deconvolution")])  # fmt: skip
def test_gradient_through_other_activations_matches_captum(ours, peer):
    """captum overrides the backward of nn.ReLU modules only and lets autograd's gradient
    through the SiLU and the SE gate: what other_activations='gradient' says it does."""
    import captum.attr

    model, x = senet(1), randn(3, 3, 8, 8, seed=2)
    target = torch.tensor([0, 3, 1])
    want = getattr(captum.attr, peer)(copy.deepcopy(model)).attribute(x, target=target).sum(1)
    before = snapshot(model)
    got = ps.explain(model, x, ours, target=target, **GRADIENT)
    assert_unchanged(before, snapshot(model))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_without_the_option_the_call_raises_and_says_how():
    model, x = senet(), randn(2, 3, 8, 8)
    for method in ("guided_backprop", "deconvnet", "rectgrad"):
        with pytest.raises(UnsupportedActivationError, match=r"module 'act' is SiLU.*"
                           r"other_activations='gradient'.*gradcam"):  # fmt: skip
            ps.explain(model, x, method)


def test_the_option_is_part_of_the_method_id_and_checked():
    assert method_id({"name": "guided_backprop", **GRADIENT}) == (
        "guided_backprop-other_activations=gradient"
    )
    assert method_id({"name": "rectgrad", "other_activations": "raise"}) == "rectgrad"
    with pytest.raises(SaliencyError, match=r"'other_activations' must be one of 'raise', 'grad"):
        ps.explain(senet(), randn(2, 3, 8, 8), "deconvnet", other_activations="pass")


def test_rectgrad_with_gradient_passthrough_thresholds_only_the_relus():
    model, x = senet(3), randn(2, 3, 8, 8, seed=4)
    target = torch.tensor([2, 2])
    got = ps.explain(model, x, "rectgrad", target=target, percentile=50.0, **GRADIENT)
    # Reference: RectGrad's rule on the one ReLU of the signal path (the SE's inner ReLU is
    # on the gate's path), plain autograd everywhere else.

    class Rect(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            out = t.clamp(min=0)
            ctx.save_for_backward(out)
            return out

        @staticmethod
        def backward(ctx, g):
            (out,) = ctx.saved_tensors
            importance = out * g
            flat = importance.reshape(len(g), -1).double().numpy()
            tau = torch.tensor(np.percentile(flat, 50.0, axis=1)).to(g).reshape(-1, 1, 1, 1)
            return g * (importance > tau)

    xg = x.clone().requires_grad_(True)
    se = model.se
    h = model.act(model.conv2(Rect.apply(model.conv1(xg))))
    s = se.fc1(h.mean(dim=(2, 3), keepdim=True))
    h = h * se.gate(se.fc2(Rect.apply(s)))
    score = model.head(h.mean(dim=(2, 3))).gather(1, target[:, None]).sum()
    (grad,) = torch.autograd.grad(score, xg)
    torch.testing.assert_close(got, (x * grad).sum(1), rtol=1e-5, atol=1e-7)


# --- LRP ------------------------------------------------------------------------------------


def test_lrp_passes_relevance_through_elementwise_activations_as_zennit():
    from tests.bundled.test_lrp import zennit_lrp

    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.GELU(), nn.Conv2d(5, 5, 3, padding=1), nn.SiLU(),
        nn.Conv2d(5, 4, 3, padding=1), nn.Hardswish(), nn.Conv2d(4, 4, 3), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    ).eval()  # fmt: skip
    x, target = randn(3, 3, 6, 6, seed=6), torch.tensor([0, 2, 1])
    for method in ("lrp_epsilon", "lrp_zplus", "lrp_alpha_beta"):
        want = zennit_lrp(model, x, target, method, [])
        got = ps.explain(model, x, method, target=target)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def stab(z, eps=1e-6):
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z)


def test_lrp_treats_a_sigmoid_gate_as_a_constant_multiplier():
    """Closed form, LRP-epsilon, on the SE net (float64). With the gate g held constant,
    y = h * g is a diagonal map: R_h = R_y * y / stab(y); no relevance enters the gate."""
    model, x = senet(7).double(), randn(2, 3, 6, 6, seed=8).double()
    target = torch.tensor([1, 3])
    eps = 1e-6
    with torch.no_grad():
        a1 = model.conv1(x)
        h1 = a1.clamp(min=0)
        a2 = model.conv2(h1)
        h2 = F.silu(a2)
        se = model.se
        g = torch.sigmoid(se.fc2(torch.relu(se.fc1(h2.mean(dim=(2, 3), keepdim=True)))))
        y = h2 * g
        p = y.mean(dim=(2, 3))
        z = model.head(p)
    r = F.one_hot(target, 4).double()
    r_p = p * ((r / stab(z, eps)) @ model.head.weight)  # epsilon rule at the head
    # mean pooling: proportional to the inputs (zennit's Norm, stabiliser 1e-6)
    r_y = y * (r_p / stab(p, 1e-6))[:, :, None, None] / 36
    r_h2 = r_y * y / stab(y, 1e-6)  # the gate: a constant multiplier
    r_a2 = r_h2  # SiLU: Pass

    def conv_rule(conv, inp, out, rel):
        s = rel / stab(out, eps)
        return inp * torch.nn.grad.conv2d_input(inp.shape, conv.weight, s, padding=1)

    r_h1 = conv_rule(model.conv2, h1, a2, r_a2)
    r_x = conv_rule(model.conv1, x, a1, r_h1)  # ReLU: Pass
    got = ps.explain(model, x, "lrp_epsilon", target=target, epsilon=eps)
    torch.testing.assert_close(got, r_x.sum(1), rtol=1e-9, atol=1e-12)


class Product(nn.Module):
    """conv, then ``h * f(h)`` for ``f`` given, a global mean and a head."""

    def __init__(self, f):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.head = nn.Linear(2, 2)
        self.f = f

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.head((h * self.f(h)).mean(dim=(2, 3)))


def test_a_product_of_two_signals_that_is_not_a_gate_still_raises_under_lrp():
    torch.manual_seed(9)
    with pytest.raises(UnsupportedActivationError, match=r"Tensor.mul \(autograd MulBackward0\)"):
        ps.explain(Product(torch.tanh).eval(), randn(2, 3, 5, 5), "lrp_epsilon")


def test_gradient_passthrough_lets_gates_through_but_not_other_products():
    torch.manual_seed(10)
    with pytest.raises(UnsupportedActivationError, match="a product of two signal tensors"):
        ps.explain(Product(lambda h: h).eval(), randn(2, 3, 5, 5), "guided_backprop", **GRADIENT)


def test_fullgrad_leaves_the_se_squeeze_out_without_a_warning():
    import warnings

    from pytest_saliency.bundled.cam import bias_terms

    model, x = senet(11), randn(2, 3, 8, 8, seed=12)
    terms = bias_terms(model, x[:1])
    assert sorted(terms.read) == ["conv1", "conv2"] and terms.not_read == {}
    assert terms.no_grid == ["se.fc1", "se.fc2", "head"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ps.SaliencyWarning)
        maps = ps.explain(model, x, "fullgrad")
    assert bool(torch.isfinite(maps).all())


def test_a_hand_written_hard_sigmoid_gate_counts_as_a_gate():
    class HardSE(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.relu = nn.ReLU()  # a module: captum only overrides ReLU modules
            self.fc = nn.Conv2d(4, 4, 1)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            h = self.relu(self.conv(x))
            gate = F.relu6(self.fc(h.mean(dim=(2, 3), keepdim=True)) + 3.0) / 6.0
            return self.head((h * gate).mean(dim=(2, 3)))

    torch.manual_seed(13)
    model, x = HardSE().eval(), randn(2, 3, 5, 5)
    import captum.attr

    want = captum.attr.GuidedBackprop(copy.deepcopy(model)).attribute(x, target=1).sum(1)
    got = ps.explain(model, x, "guided_backprop", target=1, **GRADIENT)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
