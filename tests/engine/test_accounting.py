"""Op accounting: under a rule set, every op on the signal path is handled, allowed, or refused."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pytest_saliency as ps
from pytest_saliency.errors import UnsupportedActivationError
from tests._models import Lambda as Act
from tests._models import randn

RULE_METHODS = ["guided_backprop", "deconvnet", "rectgrad", "lrp_epsilon", "lrp_zplus",
                "lrp_alpha_beta"]  # fmt: skip
PLAIN_METHODS = ["gradient", "input_x_gradient", "smoothgrad", "integrated_gradients"]


def _zeros(x):
    return torch.zeros((), dtype=x.dtype)


# Every spelling of exactly a ReLU (in place or not) gets the method's ReLU rule.
RELU_SPELLINGS = {
    "clamp(min=0)": lambda x: x.clamp(min=0),
    "clamp(0)": lambda x: x.clamp(0),
    "torch.clamp(min=0.0)": lambda x: torch.clamp(x, min=0.0),
    "clip(min=0)": lambda x: x.clip(min=0),
    "clamp_(min=0)": lambda x: x.clamp_(min=0),
    "torch.clamp_min(0)": lambda x: torch.clamp_min(x, 0),
    "clamp_min_(0)": lambda x: x.clamp_min_(0),
    "maximum(x, zeros)": lambda x: torch.maximum(x, _zeros(x)),
    "maximum(zeros_like, x)": lambda x: torch.maximum(torch.zeros_like(x), x),
    "torch.max(x, zeros)": lambda x: torch.max(x, _zeros(x)),
    "nn.Threshold(0, 0)": nn.Threshold(0, 0),
    "nn.Threshold(0, 0, inplace)": nn.Threshold(0.0, 0.0, inplace=True),
    "F.threshold(x, 0, 0)": lambda x: F.threshold(x, 0, 0),
    "where(x > 0, x, 0)": lambda x: torch.where(x > 0, x, 0),
    "where(x > 0, x, zeros_like)": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "where(x <= 0, 0, x)": lambda x: torch.where(x <= 0, 0.0, x),
    "x.where(x > 0, 0)": lambda x: x.where(x > 0, 0),
    "nn.LeakyReLU(0)": nn.LeakyReLU(0.0),
    "x * (x > 0)": lambda x: x * (x > 0),
    "x.mul_(x > 0)": lambda x: x.mul_(x > 0),
    "torch.multiply(x, x >= 0)": lambda x: torch.multiply(x, x >= 0),
    "(x > 0).float() * x": lambda x: (x > 0).float() * x,
}


def conv_net(act: nn.Module | None = None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    act = act if act is not None else nn.ReLU()
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), act, nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 4),
    ).eval()  # fmt: skip


@pytest.mark.parametrize("method", RULE_METHODS)
@pytest.mark.parametrize("spelling", RELU_SPELLINGS)
def test_relu_spellings_match_nn_relu_bitwise(method, spelling):
    fn = RELU_SPELLINGS[spelling]
    act = fn if isinstance(fn, nn.Module) else Act(fn)
    reference = conv_net()
    model = conv_net(act)
    model.load_state_dict(reference.state_dict())
    x = randn(2, 3, 6, 6, seed=1)
    expected = ps.explain(reference, x, method, target=1)
    got = ps.explain(model, x, method, target=1)
    assert torch.equal(got, expected)
    # The rule did something: guided/deconv/rectgrad/LRP differ from the plain gradient.
    assert not torch.equal(got, ps.explain(model, x, "gradient", target=1))


def _copied_mask(x):
    mask = torch.ones_like(x)
    mask[0].copy_((x[0] > 0.1).to(x.dtype))
    return mask


def _gathered(x):
    flat = torch.cat([x.flatten(1), torch.zeros_like(x.flatten(1)[:, :1])], dim=1)
    positions = torch.arange(flat.shape[1] - 1).expand(x.shape[0], -1)
    index = torch.where(x.flatten(1) > 0.1, positions, flat.shape[1] - 1)
    return flat.gather(1, index).view_as(x)


def _setitem_mask(x):
    mask = torch.ones_like(x)
    mask[x < 0.1] = 0
    return mask


def _detached_in_place(x):
    gate = x.clone()
    gate.detach_()
    return gate


def _no_grad_gate(x):
    with torch.no_grad():
        return (x.mean(dim=1, keepdim=True) > 0).to(x.dtype)


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


# Scripted at import (collection), before any test runs torch.compile: see SCRIPTED_NET in
# tests/test_soundness.py for the TorchScript id-table flake this avoids.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    SCRIPTED_GELU = torch.jit.script(_gelu)


# Non-linear ops that are not a ReLU, in the spellings real model code uses: each raises under
# every rule method, naming the op (as called) and the module where it ran.
NOT_RELU = {
    "hand GELU": (_gelu, "torch.erf"),
    "special.expit": (torch.special.expit, "expit"),
    "softmax": (lambda x: x.softmax(dim=1), "softmax"),
    "SE gate": (lambda x: x * torch.sigmoid(x.mean((2, 3), keepdim=True)), "sigmoid"),
    "clamp(min=-1)": (lambda x: x.clamp(min=-1), "clamp"),
    "clamp(0, 6)": (lambda x: x.clamp(0, 6), "clamp"),
    "threshold(0, -1)": (lambda x: F.threshold(x, 0.0, -1.0), "threshold"),
    "where(x > 1, x, 0)": (lambda x: torch.where(x > 1, x, 0), "where"),
    "maximum(x, 0.1)": (lambda x: torch.maximum(x, torch.full((), 0.1)), "maximum"),
    "x * x": (lambda x: x * x, "Tensor.mul"),
    "x * (x > 1)": (lambda x: x * (x > 1), "Tensor.mul"),
    "x * x.abs().detach()": (lambda x: x * x.abs().detach(), "Tensor.mul"),
    "gate under no_grad": (lambda x: x * _no_grad_gate(x), "Tensor.mul"),
    "x / x.norm": (lambda x: x / x.norm(dim=1, keepdim=True), "Tensor.norm"),
    "x.mul_(x > 1)": (lambda x: x.mul_(x > 1), "Tensor.mul_"),
    "torch.multiply mask": (lambda x: torch.multiply(x, x > 0.1), "torch.multiply"),
    "setitem mask": (lambda x: x * _setitem_mask(x), "Tensor.mul"),
    "integer cast mask": (lambda x: x * ((x * 10).long() > 0), "Tensor.mul"),
    ".data mask": (lambda x: x * (x.data > 0.1), "Tensor.mul"),
    "detach_ gate": (lambda x: x * _detached_in_place(x), "Tensor.mul"),
    "gate through a parameter": (lambda x: x * ((x > 0.1) * torch.ones(())), "Tensor.mul"),
    "item scale": (lambda x: x / x.abs().max().item(), "Tensor.item"),
    "new_tensor copy": (lambda x: x * x.new_tensor(x), "Tensor.mul"),
    "mask copied into a view": (lambda x: x * _copied_mask(x), "Tensor.mul"),
    "straight-through": (lambda x: x + (torch.round(x) - x).detach(), "Tensor.add"),
    "relu of a shifted mask": (lambda x: torch.relu(x - 1e4 * (x < 1)), "Tensor.sub"),
    "gather by a mask": (lambda x: _gathered(x), "Tensor.gather"),
    "kron with a mask": (lambda x: torch.kron(x, (x[:1, :1, :1, :1] > 0).to(x.dtype)), "kron"),
    "numpy mask": (lambda x: x * torch.from_numpy((x > 0.1).numpy()), "Tensor.numpy"),
    "sin (mutation)": (torch.sin, "torch.sin"),
    "exp (mutation)": (lambda x: x.exp() - 1, "Tensor.exp"),
    "abs (mutation)": (torch.abs, "torch.abs"),
    "x ** 2 (mutation)": (lambda x: x**2, "Tensor.pow"),
    "sqrt (mutation)": (lambda x: (x * x + 1).sqrt(), "Tensor.sqrt"),
}


@pytest.mark.parametrize("method", RULE_METHODS)
@pytest.mark.parametrize("case", NOT_RELU)
def test_non_relu_ops_raise_naming_op_and_module(method, case):
    if case == "SE gate" and method.startswith("lrp"):
        # LRP treats a sigmoid gate as a constant multiplier (tests/bundled/
        # test_other_activations.py); the ReLU-rule methods still refuse it by default.
        maps = ps.explain(conv_net(Act(NOT_RELU[case][0])), randn(2, 3, 6, 6, seed=1), method)
        assert bool(torch.isfinite(maps).all()) and float(maps.abs().max()) > 0
        return
    fn, op = NOT_RELU[case]
    model = conv_net(Act(fn))
    x = randn(2, 3, 6, 6, seed=1)
    with pytest.raises(UnsupportedActivationError) as info:
        ps.explain(model, x, method, target=0)
    message = str(info.value)
    assert method in message and op in message and "'1'" in message, message
    assert "gradient, input_x_gradient, integrated_gradients" in message


@pytest.mark.parametrize("method", PLAIN_METHODS)
def test_plain_methods_are_unaffected(method):
    model = conv_net(Act(_gelu))
    x = randn(2, 3, 6, 6, seed=1)
    maps = ps.explain(model, x, method, target=0)
    assert maps.shape == (2, 6, 6) and bool(torch.isfinite(maps).all())


class Doubler(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


@pytest.mark.parametrize("method", RULE_METHODS)
def test_custom_autograd_function_raises(method):
    model = conv_net(Act(lambda x: Doubler.apply(x).relu()))
    with pytest.raises(UnsupportedActivationError, match="Doubler"):
        ps.explain(model, randn(2, 3, 6, 6), method, target=0)


@pytest.mark.parametrize("method", RULE_METHODS)
def test_scripted_function_is_seen_through(method):
    """A TorchScript function's ops are invisible to torch functions, not to the graph walk."""
    model = conv_net(Act(SCRIPTED_GELU))
    with pytest.raises(UnsupportedActivationError, match="cannot vouch"):
        ps.explain(model, randn(2, 3, 6, 6), method, target=0)


class AllowedOps(nn.Module):
    """One op of each kind the ReLU-rule methods leave correct: views and reshapes, slicing,
    concatenation, constant padding, sums with constants and of signals, scaling, max and
    average pooling, eval BatchNorm, upsampling, matrix products with a constant, reductions.
    ``relu`` is the one ReLU (swapped for a reference rule in the closed-form test)."""

    def __init__(self, relu=F.relu):
        super().__init__()
        torch.manual_seed(0)
        self.relu = relu
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(8).eval()
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
        self.proj = nn.Parameter(torch.randn(8, 8))
        self.fc = nn.Linear(8 * 2 * 2 + 8, 3)

    def forward(self, x):
        h = self.relu(self.conv(x))
        h = torch.cat([h, h.flip(1)], dim=1)  # cat, flip
        h = F.pad(h, (1, 1, 1, 1))[..., 1:-1, 1:-1]  # constant pad, slice
        h = self.bn(h * 0.5 + 1.0 - h / 4)  # mul / div by constants, add, sub, BN
        h = F.max_pool2d(F.interpolate(h, scale_factor=2), 2)  # upsample, max pool
        h = F.adaptive_avg_pool2d(h, 2).permute(0, 2, 3, 1).reshape(x.shape[0], -1, 8)
        h = (h @ self.proj).transpose(1, 2)  # matmul with a parameter, transpose
        return self.fc(torch.cat([h.flatten(1), h.sum(2)], dim=1))  # sum reduction


class _GuidedReLU(torch.autograd.Function):
    """The closed form of guided backprop's ReLU: grad_in = relu(grad_out) * 1[x > 0]."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g.clamp(min=0) * (x > 0).to(g.dtype)


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet", "rectgrad"])
def test_allow_list_model_runs_under_relu_rules(method):
    model = AllowedOps().eval()
    x = randn(2, 3, 6, 6, seed=3)
    maps = ps.explain(model, x, method, target=2)
    assert maps.shape == (2, 6, 6) and bool(maps.abs().sum() > 0)


def test_allow_list_guided_equals_closed_form():
    """Through every allowed op, guided backprop is autograd with only the ReLU's backward
    replaced: the same model with the closed-form rule gives the same map."""
    model = AllowedOps().eval()
    reference = AllowedOps(relu=_GuidedReLU.apply).eval()
    x = randn(2, 3, 6, 6, seed=3)
    xg = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(reference(xg)[:, 2].sum(), xg)
    torch.testing.assert_close(ps.explain(model, x, "guided_backprop", target=2), expected.sum(1))
    assert not torch.allclose(expected, torch.autograd.grad(model(xg)[:, 2].sum(), xg)[0])


class LrpAllowed(nn.Module):
    """Ops LRP routes unchanged (views, slices, cat, max pool, shift by a constant) or handles
    (layers, scaling by a constant, sums of activations, average pooling)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 2 * 2, 3)

    def forward(self, x):
        h = F.relu(self.conv((x - 0.5) / 2.0))
        h = torch.cat([h, h[:, :2], h[:, 2:]], dim=1)
        h = F.max_pool2d(self.conv2(h) * 0.5 + h, 2)
        return self.fc(F.adaptive_avg_pool2d(h, 2).flatten(1))


@pytest.mark.parametrize("method", ["lrp_epsilon", "lrp_zplus", "lrp_alpha_beta"])
def test_lrp_allowed_ops_run(method):
    maps = ps.explain(LrpAllowed().eval(), randn(2, 3, 6, 6, seed=2), method, target=0)
    assert bool(torch.isfinite(maps).all()) and bool(maps.abs().sum() > 0)


def test_lrp_scaling_by_a_constant_passes_relevance():
    """y = c * x: the ε rule of a diagonal map gives R_x = R_y * y / stab(y), i.e. R_y."""
    torch.manual_seed(0)
    fc = nn.Linear(4, 3)
    scaled = nn.Sequential(Act(lambda x: x * 3.0), fc)
    x = randn(5, 4, seed=1)
    expected = ps.explain(fc, 3.0 * x, "lrp_epsilon", target=1)
    torch.testing.assert_close(ps.explain(scaled, x, "lrp_epsilon", target=1), expected)


@pytest.mark.parametrize(
    "fn, op",
    [
        (lambda h: h.sum(dim=1, keepdim=True).expand_as(h), "sum"),  # plain sum under LRP
        (lambda h: h @ torch.eye(h.shape[1]), "matmul"),  # a layer written by hand
        (lambda h: 1.0 - h, "rsub"),  # a difference with the signal second
    ],
)
def test_lrp_refuses_linear_ops_without_a_rule(fn, op):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), Act(fn), nn.Linear(5, 2))
    with pytest.raises(UnsupportedActivationError, match="lrp_epsilon") as info:
        ps.explain(model, randn(3, 4), "lrp_epsilon", target=0)
    assert op in str(info.value)
    # The same ops are linear, so guided backprop (which changes only the ReLUs) accepts them.
    assert ps.explain(model, randn(3, 4), "guided_backprop", target=0).shape == (3, 4)


def test_batch_statistics_are_refused_under_rules():
    model = conv_net()
    model.insert(1, nn.BatchNorm2d(6, track_running_stats=False))
    with pytest.raises(UnsupportedActivationError, match="statistics of the signal itself"):
        ps.explain(model, randn(2, 3, 6, 6), "guided_backprop", target=0)


class ParameterGate(nn.Module):
    """A scale computed from a parameter without its gradient: a constant, not a gate."""

    def __init__(self, detach: bool):
        super().__init__()
        torch.manual_seed(0)
        self.detach = detach
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(4) + 0.5)
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        if self.detach:
            scale = (self.gamma.view(1, -1, 1, 1) > 0.7).to(x.dtype) + self.gamma.view(
                1, -1, 1, 1
            ).detach()
        else:
            with torch.no_grad():
                scale = (self.gamma > 0.7).to(x.dtype).view(1, -1, 1, 1) + 1.0
        return self.fc((F.relu(self.conv(x)) * scale).flatten(1))


@pytest.mark.parametrize("detach", [True, False])
def test_values_cut_from_parameters_are_constants(detach):
    model = ParameterGate(detach).eval()
    x = randn(2, 3, 6, 6, seed=5)
    maps = ps.explain(model, x, "guided_backprop", target=1)
    # The same model with the scale frozen into a plain tensor: the same map.
    with torch.no_grad():
        gamma = model.gamma.view(1, -1, 1, 1)
        scale = (gamma > 0.7).to(x.dtype) + (gamma if detach else 1.0)
    frozen = nn.Sequential(model.conv, nn.ReLU(), Act(lambda h: h * scale), nn.Flatten(), model.fc)
    torch.testing.assert_close(maps, ps.explain(frozen, x, "guided_backprop", target=1))


class Dynamic(nn.Module):
    """A layer whose weight, bias or BatchNorm scale is computed from the signal."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.fc0, self.fc = nn.Linear(4, 6), nn.Linear(6, 3)
        self.bn = nn.BatchNorm1d(6).eval()

    def forward(self, x):
        h = F.relu(self.fc0(x))
        if self.kind == "weight":
            return F.linear(h, self.fc.weight * h.mean(), self.fc.bias)
        if self.kind == "bias":
            return F.linear(h, self.fc.weight, h.sum(0)[:3])
        gamma = 1 + h.mean(0)
        h = F.batch_norm(h, self.bn.running_mean, self.bn.running_var, gamma, self.bn.bias)
        return self.fc(h)


@pytest.mark.parametrize("method", ["lrp_epsilon", "lrp_zplus", "lrp_alpha_beta"])
@pytest.mark.parametrize("kind", ["weight", "bias", "batch_norm scale"])
def test_lrp_refuses_layer_parameters_computed_from_the_signal(method, kind):
    with pytest.raises(UnsupportedActivationError, match="computed from the signal") as info:
        ps.explain(Dynamic(kind), randn(3, 4), method, target=0)
    assert ("F.batch_norm" if kind.startswith("batch") else "F.linear") in str(info.value)


@pytest.mark.parametrize("method", ["lrp_epsilon", "lrp_zplus"])
def test_lrp_refuses_batch_statistics(method):
    model = conv_net()
    model.insert(1, nn.BatchNorm2d(6, track_running_stats=False))
    with pytest.raises(UnsupportedActivationError, match="statistics of its own input"):
        ps.explain(model, randn(2, 3, 6, 6), method, target=0)


class ShapeOnly(nn.Module):
    """A buffer cast to the signal's dtype and shape: the signal gives no values to it."""

    def __init__(self, how: str):
        super().__init__()
        torch.manual_seed(0)
        self.how = how
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("scale", torch.rand(4, 1, 1) + 0.5)
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        h = F.relu(self.conv(x))
        scale = {
            "to": lambda: self.scale.to(h),
            "type_as": lambda: self.scale.type_as(h),
            "expand_as": lambda: self.scale.expand_as(h),
            "broadcast": lambda: torch.broadcast_tensors(h, self.scale)[1],
        }[self.how]()
        return self.fc((h * scale).flatten(1))


@pytest.mark.parametrize("how", ["to", "type_as", "expand_as", "broadcast"])
def test_values_shaped_like_the_signal_are_constants(how):
    model = ShapeOnly(how).eval()
    x = randn(2, 3, 6, 6, seed=5)
    frozen = nn.Sequential(
        model.conv, nn.ReLU(), Act(lambda h: h * model.scale), nn.Flatten(), model.fc
    )  # fmt: skip
    torch.testing.assert_close(
        ps.explain(model, x, "guided_backprop", target=1),
        ps.explain(frozen, x, "guided_backprop", target=1),
    )


def test_long_chains_of_cut_values_stay_cheap():
    """A power iteration under no_grad on a parameter, 60 steps: each step reads the last
    value twice (the bookkeeping must not double per step)."""

    class PowerNorm(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc0, self.fc = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            with torch.no_grad():
                v = self.fc.weight[0]
                for _ in range(60):
                    v = v / v.norm()
            return self.fc(F.relu(self.fc0(x))) + (v * v).sum()

    maps = ps.explain(PowerNorm(), randn(3, 4), "guided_backprop", target=0)
    assert maps.shape == (3, 4) and bool(torch.isfinite(maps).all())
