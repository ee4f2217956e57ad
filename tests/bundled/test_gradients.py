"""Gradient, input x gradient, integrated gradients and smoothgrad: closed forms and captum."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import InputXGradient, IntegratedGradients, Saliency
from torch import nn

import pytest_saliency as ps
from tests._models import mlp, randn, small_cnn, torchvision_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:captum.*")


def two_layer_gradient(model: nn.Sequential, x: torch.Tensor, targets) -> np.ndarray:
    """d logit_t / d x of Linear-ReLU-Linear: W1^T diag(1[z > 0]) W2[t], per sample."""
    w1, b1 = model[0].weight.detach().double().numpy(), model[0].bias.detach().double().numpy()
    w2 = model[2].weight.detach().double().numpy()
    z = x.double().numpy() @ w1.T + b1
    return (w2[np.asarray(targets)] * (z > 0)) @ w1


class ExpModel(nn.Module):
    """logit_c = sum_i exp(w_ci x_i): d logit_c / d x_i = w_ci exp(w_ci x_i), in closed form."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w)  # [classes, D]

    def forward(self, x):
        return torch.exp(x[:, None, :] * self.w).sum(-1)


def test_gradient_and_input_x_gradient_closed_form():
    model = mlp(seed=3, dims=(5, 9, 4)).double()
    x = randn(6, 5, seed=1, dtype=torch.float64)
    targets = [0, 1, 2, 3, 0, 1]
    expected = two_layer_gradient(model, x, targets)
    grad = ps.explain(model, x, "gradient", target=targets)
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-12, atol=1e-12)
    ixg = ps.explain(model, x, "input_x_gradient", target=targets)
    np.testing.assert_allclose(ixg.numpy(), expected * x.numpy(), rtol=1e-12, atol=1e-12)


def test_channel_sum_keeps_sign():
    model = small_cnn()
    x = randn(2, 3, 8, 8, seed=2)
    grad = Saliency(model).attribute(x.clone(), target=1, abs=False)
    got = ps.explain(model, x, "gradient", target=1)
    torch.testing.assert_close(got, grad.sum(1))
    assert (got < 0).any() and (got > 0).any()


@pytest.mark.parametrize("steps", [2, 5, 32])
@pytest.mark.parametrize("baseline", [0.0, -0.5])
def test_integrated_gradients_closed_form(steps, baseline):
    w = randn(3, 7, seed=4, dtype=torch.float64)
    model = ExpModel(w)
    x = randn(4, 7, seed=5, dtype=torch.float64)
    targets = np.array([0, 2, 1, 2])
    alphas = np.linspace(0, 1, steps)
    xs, ws, b = x.numpy(), w.numpy()[targets], baseline
    points = b + alphas[:, None, None] * (xs - b)  # [steps, N, D]
    grads = ws * np.exp(ws * points)
    expected = (xs - b) * np.trapezoid(grads, alphas, axis=0)  # trapezoid mean over [0, 1]
    got = ps.explain(
        model, x, "integrated_gradients", target=torch.as_tensor(targets), steps=steps,
        baseline=baseline,
    )  # fmt: skip
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


def test_integrated_gradients_tensor_baseline():
    model = ExpModel(randn(3, 7, seed=4, dtype=torch.float64))
    x = randn(4, 7, seed=5, dtype=torch.float64)
    baseline = randn(7, seed=6, dtype=torch.float64)
    expected = IntegratedGradients(model).attribute(
        x, baselines=baseline.expand_as(x), target=1, n_steps=9, method="riemann_trapezoid"
    )
    got = ps.explain(model, x, "integrated_gradients", target=1, steps=9, baseline=baseline)
    torch.testing.assert_close(got * 8 / 9, expected)


def test_integrated_gradients_baseline_of_wrong_shape():
    with pytest.raises(ps.SaliencyError, match=r"baseline.*\(2, 2\)"):
        ps.explain(
            small_cnn(), randn(1, 3, 8, 8), "integrated_gradients", baseline=torch.ones(2, 2)
        )


def test_integrated_gradients_completeness():
    model = small_cnn()
    x = randn(3, 3, 8, 8, seed=7)
    target = torch.tensor([0, 1, 4])
    maps = ps.explain(model, x, "integrated_gradients", target=target, steps=256)
    with torch.no_grad():
        rows = torch.arange(3)
        gap = model(x)[rows, target] - model(torch.zeros_like(x))[rows, target]
    assert gap.abs().min() > 0.2  # a gap worth checking
    torch.testing.assert_close(maps.sum(dim=(1, 2)), gap, rtol=0.02, atol=0.0)


def test_integrated_gradients_default_target_is_prediction_at_input():
    model = small_cnn()
    x = randn(3, 3, 8, 8, seed=8)
    predicted = model(x).argmax(1)
    default = ps.explain(model, x, "integrated_gradients", steps=6)
    torch.testing.assert_close(
        default, ps.explain(model, x, "integrated_gradients", steps=6, target=predicted)
    )


def smoothgrad_reference(model, x, target, samples, noise, seed):
    """A plain loop over noisy copies, drawing noise the documented way."""
    generator = torch.Generator().manual_seed(seed)
    spread = noise * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))
    total = torch.zeros_like(x)
    for _ in range(samples):
        draw = torch.randn(x.shape, generator=generator, dtype=torch.float32)
        noisy = (x + spread[:, None, None, None] * draw).requires_grad_(True)
        logits = model(noisy)
        (grad,) = torch.autograd.grad(logits[torch.arange(len(x)), target].sum(), noisy)
        total += grad
    return (total / samples).sum(1)


@pytest.mark.parametrize(("samples", "noise", "seed"), [(16, 0.15, 0), (5, 0.4, 123)])
def test_smoothgrad_matches_reference_loop(samples, noise, seed):
    model = small_cnn()
    x = randn(3, 3, 8, 8, seed=9)
    target = torch.tensor([2, 0, 1])
    expected = smoothgrad_reference(model, x, target, samples, noise, seed)
    opts = {} if seed == 0 else {"samples": samples, "noise": noise, "seed": seed}
    got = ps.explain(model, x, "smoothgrad", target=target, **opts)
    torch.testing.assert_close(got, expected)
    other = ps.explain(model, x, "smoothgrad", target=target, **{**opts, "seed": seed + 1})
    assert (other - got).abs().max() > 1e-4


def test_smoothgrad_without_noise_is_the_gradient():
    model = small_cnn()
    x = randn(2, 3, 8, 8, seed=10)
    got = ps.explain(model, x, "smoothgrad", target=3, noise=0.0, samples=3)
    torch.testing.assert_close(got, ps.explain(model, x, "gradient", target=3))


@pytest.mark.parametrize("method", ["integrated_gradients", "smoothgrad"])
def test_chunking_does_not_change_maps(method):
    model = small_cnn()
    x = randn(5, 3, 8, 8, seed=11)
    opts = {"steps": 5} if method == "integrated_gradients" else {"samples": 4}
    whole = ps.explain(model, x, method, **opts)
    for batch_size in (1, 2, 4, 5, 9):
        chunked = ps.explain(model, x, method, batch_size=batch_size, **opts)
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("opts", "bad"), [
    ({"steps": 1}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"steps": True}, "steps"),
    ({"baseline": "zeros"}, "baseline"),
    ({"baseline": None}, "baseline"),
    ({"step": 4}, "step"),
])  # fmt: skip
def test_integrated_gradients_bad_options(opts, bad):
    with pytest.raises(ps.SaliencyError, match=bad):
        ps.explain(small_cnn(), randn(1, 3, 8, 8), "integrated_gradients", **opts)


@pytest.mark.parametrize(("opts", "bad"), [
    ({"samples": 0}, "samples"),
    ({"noise": -0.1}, "noise"),
    ({"noise": "high"}, "noise"),
    ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"sigma": 0.1}, "sigma"),
])  # fmt: skip
def test_smoothgrad_bad_options(opts, bad):
    with pytest.raises(ps.SaliencyError, match=bad):
        ps.explain(small_cnn(), randn(1, 3, 8, 8), "smoothgrad", **opts)


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18", "vgg11_bn"])
def test_matches_captum(arch):
    model = small_cnn("inplace") if arch == "small_cnn" else torchvision_model(arch)
    size = 8 if arch == "small_cnn" else 32
    x = randn(2, 3, size, size, seed=12)
    target = torch.tensor([4, 0])

    def close(got, expected):
        scale = float(expected.detach().abs().max())
        assert scale > 0
        torch.testing.assert_close(got, expected.sum(1), rtol=1e-4, atol=1e-5 * scale)

    close(
        ps.explain(model, x, "gradient", target=target),
        Saliency(model).attribute(x.clone(), target=target, abs=False),
    )
    close(
        ps.explain(model, x, "input_x_gradient", target=target),
        InputXGradient(model).attribute(x.clone(), target=target),
    )
    steps = 4
    ig = IntegratedGradients(model).attribute(
        x, target=target, n_steps=steps, method="riemann_trapezoid"
    )
    # captum's trapezoid weights are 1/n (halved at the ends) and sum to (n-1)/n, not 1; ours
    # are the trapezoid rule on [0, 1], so they differ by exactly that factor.
    close(
        ps.explain(model, x, "integrated_gradients", target=target, steps=steps),
        ig * steps / (steps - 1),
    )
