"""Guided backprop, deconvnet and RectGrad against closed forms, numpy and captum."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import Deconvolution, GuidedBackprop, Saliency
from torch import nn

import pytest_saliency as ps
from pytest_saliency.bundled.propagation import per_sample_percentile
from pytest_saliency.errors import UnsupportedActivationError
from tests._models import RELU_STYLES, mlp, randn, small_cnn, torchvision_model

# captum warns that it sets input requires_grad and ReLU hooks on every call.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:captum.*")

# Backward rules through one ReLU, written in numpy: (grad_out, pre-activation) -> grad_in.


def plain_rule(g, z):
    return g * (z > 0)


def guided_rule(g, z):
    return np.maximum(g, 0) * (z > 0)


def deconv_rule(g, z):
    return np.maximum(g, 0)


def rect_rule(q, positive=True):
    def rule(g, z):
        importance = np.maximum(z, 0) * g
        if not positive:
            importance = np.abs(importance)
        flat = importance.reshape(importance.shape[0], -1)
        tau = np.percentile(flat, q, axis=1).reshape((-1,) + (1,) * (g.ndim - 1))
        return g * (importance > tau)

    return rule


def mlp_reference(model: nn.Sequential, x: torch.Tensor, targets, rule) -> np.ndarray:
    """Input gradient of an MLP with explicit weight matrices: g <- W^T rule(g, z) per layer."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    weights = [m.weight.detach().double().numpy() for m in linears]
    biases = [m.bias.detach().double().numpy() for m in linears]
    h = x.double().numpy()
    pre = []
    for w, b in zip(weights[:-1], biases[:-1]):
        z = h @ w.T + b
        pre.append(z)
        h = np.maximum(z, 0)
    g = weights[-1][np.asarray(targets)]  # [N, hidden]: d logit_t / d last hidden
    for w, z in zip(reversed(weights[:-1]), reversed(pre)):
        g = rule(g, z) @ w
    return g


def sequential_reference(model: nn.Sequential, x: torch.Tensor, targets, rule) -> np.ndarray:
    """Input gradient of a Sequential, layer by layer: exact vector-Jacobian products for every
    module but ReLU, where ``rule`` (numpy) replaces the ReLU's derivative."""
    h = x.double()
    trace = []
    for module in model:
        h_in = h.detach().requires_grad_(True)
        h = module(h_in)
        trace.append((module, h_in, h))
    g = torch.zeros_like(h)
    g[torch.arange(len(targets)), torch.as_tensor(targets)] = 1.0
    for module, h_in, h_out in reversed(trace):
        if isinstance(module, nn.ReLU):
            g = torch.from_numpy(rule(g.numpy(), h_in.detach().numpy()))
        else:
            (g,) = torch.autograd.grad(h_out, h_in, g)
    return g.numpy()


def seq_cnn(seed: int = 0) -> nn.Sequential:
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(24, 10), nn.ReLU(), nn.Linear(10, 4),
    )  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5)
    return model.double().eval()


CASES = [
    ("gradient", {}, plain_rule, False),
    ("guided_backprop", {}, guided_rule, False),
    ("deconvnet", {}, deconv_rule, False),
    ("rectgrad", {}, rect_rule(98), True),
    ("rectgrad", {"percentile": 50.0}, rect_rule(50), True),
    ("rectgrad", {"percentile": 80.0, "positive": False}, rect_rule(80, positive=False), True),
    ("rectgrad", {"percentile": 0.0}, rect_rule(0), True),
]
IDS = [f"{m}-{o}" for m, o, _, _ in CASES]


@pytest.mark.parametrize(("method", "opts", "rule", "times_input"), CASES, ids=IDS)
def test_mlp_matches_explicit_matrices(method, opts, rule, times_input):
    model = mlp(seed=1, dims=(6, 16, 12, 4)).double()
    x = randn(5, 6, seed=2, dtype=torch.float64)
    targets = [0, 1, 2, 3, 1]
    expected = mlp_reference(model, x, targets, rule)
    if times_input:
        expected = expected * x.numpy()
    got = ps.explain(model, x, method, target=torch.tensor(targets), **opts)
    assert got.shape == (5, 6)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("method", "opts", "rule", "times_input"), CASES, ids=IDS)
def test_cnn_matches_layerwise_reference(method, opts, rule, times_input):
    model = seq_cnn(seed=3)
    x = randn(3, 3, 8, 8, seed=4, dtype=torch.float64)
    targets = [2, 0, 3]
    expected = sequential_reference(model, x, targets, rule)
    if times_input:
        expected = expected * x.numpy()
    got = ps.explain(model, x, method, target=torch.tensor(targets), **opts)
    assert got.shape == (3, 8, 8)
    np.testing.assert_allclose(got.numpy(), expected.sum(axis=1), rtol=1e-9, atol=1e-12)


def test_rules_change_the_gradient():
    # The references above would agree with a plain gradient if the ReLUs were never reached.
    model = seq_cnn(seed=3)
    x = randn(3, 3, 8, 8, seed=4, dtype=torch.float64)
    plain = ps.explain(model, x, "gradient", target=0)
    for method in ("guided_backprop", "deconvnet"):
        assert (ps.explain(model, x, method, target=0) - plain).abs().max() > 1e-3
    rect = ps.explain(model, x, "rectgrad", target=0)
    assert (rect - ps.explain(model, x, "input_x_gradient", target=0)).abs().max() > 1e-3


@pytest.mark.parametrize("q", [0.0, 12.5, 50.0, 73.3, 98.0, 100.0])
@pytest.mark.parametrize("shape", [(3, 7), (2, 4, 5, 5), (1, 1)])
def test_per_sample_percentile_matches_numpy(q, shape):
    values = randn(*shape, seed=5)
    values[0].view(-1)[: values[0].numel() // 2] = 0.0  # ties, as after a ReLU
    expected = np.percentile(values.numpy().reshape(shape[0], -1), q, axis=1)
    got = per_sample_percentile(values, q)
    assert got.shape == (shape[0],) + (1,) * (len(shape) - 1)
    np.testing.assert_allclose(got.reshape(-1).numpy(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("method", "opts"),
    [("guided_backprop", {}), ("deconvnet", {}), ("rectgrad", {}),
     ("rectgrad", {"positive": False}), ("rectgrad", {"percentile": 60.0})],
)  # fmt: skip
@pytest.mark.parametrize("style", [s for s in RELU_STYLES if s != "module"])
def test_every_relu_spelling_gives_the_module_map(method, opts, style):
    x = randn(3, 3, 8, 8, seed=6)
    expected = ps.explain(small_cnn("module"), x, method, target=1, **opts)
    got = ps.explain(small_cnn(style), x, method, target=1, **opts)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert expected.abs().max() > 0


def test_functional_model_is_not_silently_plain():
    # captum's GuidedBackprop hooks nn.ReLU modules only, so on F.relu it returns the plain
    # gradient; ours must not.
    model = small_cnn("functional")
    x = randn(2, 3, 8, 8, seed=7)
    target = torch.tensor([0, 3])
    plain = Saliency(model).attribute(x.clone().requires_grad_(), target=target, abs=False)
    guided = ps.explain(model, x, "guided_backprop", target=target)
    assert (guided - plain.sum(1)).abs().max() > 1e-4
    expected = GuidedBackprop(small_cnn("module")).attribute(x.clone(), target=target).sum(1)
    torch.testing.assert_close(guided, expected, rtol=1e-5, atol=1e-7)


PEERS = [("guided_backprop", GuidedBackprop), ("deconvnet", Deconvolution)]


@pytest.mark.parametrize(("method", "peer"), PEERS, ids=[m for m, _ in PEERS])
@pytest.mark.parametrize("arch", ["small_cnn", "resnet18", "vgg11_bn"])
def test_matches_captum(arch, method, peer):
    model = small_cnn("inplace") if arch == "small_cnn" else torchvision_model(arch)
    size = 8 if arch == "small_cnn" else 32
    x = randn(2, 3, size, size, seed=8)
    target = torch.tensor([3, 1])
    expected = peer(model).attribute(x.clone(), target=target).sum(1)
    got = ps.explain(model, x, method, target=target)
    scale = expected.abs().max()
    assert scale > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(scale))


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet", "rectgrad"])
def test_gelu_module_is_refused(method):
    model = small_cnn("gelu_module")
    with pytest.raises(UnsupportedActivationError) as info:
        ps.explain(model, randn(1, 3, 8, 8), method)
    message = str(info.value)
    assert "GELU" in message and "'acts.1'" in message and repr(method) in message


class GeluBlock(nn.Module):
    def forward(self, x):
        return F.gelu(x)


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet", "rectgrad"])
def test_functional_gelu_is_refused(method):
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), GeluBlock(), nn.Linear(5, 2))
    with pytest.raises(UnsupportedActivationError) as info:
        ps.explain(model, randn(2, 4), method)
    message = str(info.value)
    assert "F.gelu" in message and "'3'" in message and repr(method) in message
    # Also from the model's own forward, where the module to name is the model itself.
    with pytest.raises(UnsupportedActivationError, match="F.gelu.*SmallCNN"):
        ps.explain(small_cnn("gelu_functional"), randn(1, 3, 8, 8), method)


@pytest.mark.parametrize("style", ["gelu_module", "gelu_functional"])
@pytest.mark.parametrize(
    "method", ["gradient", "input_x_gradient", "integrated_gradients", "smoothgrad"]
)
def test_plain_methods_work_on_gelu(style, method):
    model = small_cnn(style)
    x = randn(2, 3, 8, 8, seed=9)
    opts = {"steps": 4} if method == "integrated_gradients" else {}
    opts = {"samples": 2} if method == "smoothgrad" else opts
    got = ps.explain(model, x, method, target=0, **opts)
    assert got.shape == (2, 8, 8) and torch.isfinite(got).all() and got.abs().max() > 0
    if method == "gradient":
        expected = Saliency(model).attribute(x.clone(), target=0, abs=False).sum(1)
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(("method", "opts", "bad"), [
    ("rectgrad", {"percentile": 101}, "percentile"),
    ("rectgrad", {"percentile": -1.0}, "percentile"),
    ("rectgrad", {"percentile": "98"}, "percentile"),
    ("rectgrad", {"positive": "yes"}, "positive"),
    ("guided_backprop", {"positive": True}, "positive"),
    ("deconvnet", {"steps": 3}, "steps"),
])  # fmt: skip
def test_bad_options(method, opts, bad):
    with pytest.raises(ps.SaliencyError, match=bad):
        ps.explain(small_cnn(), randn(1, 3, 8, 8), method, **opts)


@pytest.mark.parametrize("positive", [True, False])
def test_rectgrad_mask_keeps_the_definition_on_non_finite_values(positive):
    """grad_in = grad_out * 1[importance > tau], also where importance, tau or the gradient
    is infinite or NaN (a NaN comparison masks; a masked infinite gradient is inf * 0)."""
    from pytest_saliency.bundled.propagation import Rectified

    inf, nan = float("inf"), float("nan")
    cases = [  # (grad_out, ReLU output)
        ([[inf, inf, inf, 1.0]], [[1.0, 1.0, 1.0, 1.0]]),  # tau is inf
        ([[1.0, 2.0, inf, 4.0]], [[1.0, 2.0, 0.0, 3.0]]),
        ([[1.0, nan, 3.0, -2.0]], [[nan, 2.0, 0.5, 4.0]]),  # NaN importance
        (
            [[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]],
            [[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 1.0, 3.0]],
        ),
    ]
    for percentile in (50.0, 100.0):
        rule = Rectified(percentile, positive)
        for grad, out in cases:
            grad, out = torch.tensor(grad), torch.tensor(out)
            importance = out * grad if positive else (out * grad).abs()
            want = grad * (importance > per_sample_percentile(importance, percentile))
            got = rule.backward(grad, out)
            torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
