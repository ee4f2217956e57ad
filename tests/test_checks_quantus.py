"""The randomization-family checks against quantus 0.6 and reference formulas.

Quantus computes the same scores as smooth and efficient randomization when it is handed the
same maps: its explanation calls are replaced by our checks' maps (quantus draws its own
randomized weights, so only the scoring is compared, not the explanations). The noise, the
edge control and the controls' semantics are pinned against formulas written here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

import pytest_saliency as ps
from pytest_saliency.checks.controls import edge_map
from pytest_saliency.checks.randomization import NOISE_SALT, noisy_batch

from ._models import conv1d_net, mlp, randn, small_cnn

SEQUENTIAL_STEPS = ["0", "2", "5"]


def sequential_net(seed: int = 0) -> nn.Sequential:
    """Conv-ReLU-Conv-ReLU-Flatten-Linear on 3x8x8 inputs: its modules with reset_parameters
    are exactly the layers the forward uses, in named_modules order (quantus' order)."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 5),
    )  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model.eval()


def same_weights(model: nn.Module, reference: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return state.keys() == reference.keys() and all(
        torch.equal(state[k], v) for k, v in reference.items()
    )


# -- 1. efficient MPRT against quantus EfficientMPRT -----------------------------------------


@pytest.mark.parametrize(
    "net, shape, methods, bins",
    [
        ("cnn", (5, 3, 16, 16), ["gradient", "gradcam"], 100),
        ("cnn", (4, 3, 12, 12), ["input_x_gradient"], 30),
        ("conv1d", (4, 2, 20), ["gradient"], 100),
    ],
)
def test_efficient_randomization_matches_quantus(net, shape, methods, bins):
    quantus = pytest.importorskip("quantus")
    model = small_cnn() if net == "cnn" else conv1d_net()
    x = randn(*shape, seed=1)
    results = ps.efficient_randomization(model, x, methods, bins=bins, seed=0)
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    worst = 0.0
    for result in results:
        states = []

        def explain(model, inputs, targets, states=states, result=result, **kwargs):
            original = same_weights(model, reference)
            states.append(original)
            return result.maps["original" if original else "randomized"].numpy()

        metric = quantus.EfficientMPRT(
            disable_warnings=True,
            **({} if bins == 100 else {"complexity_func_kwargs": {"n_bins": bins}}),
        )
        # quantus reseeds the global torch generator per layer; keep ours as it was.
        with torch.random.fork_rng(devices=[]):
            scores = metric(
                model=model,
                x_batch=x.numpy(),
                y_batch=result.targets.numpy(),
                a_batch=None,
                channel_first=True,
                # quantus takes the entropy of the model's outputs too, which must be
                # non-negative: softmax (it does not touch the explanations).
                softmax=True,
                explain_func=explain,
            )
        # The original model's maps feed quantus' entropies of the trained state; only the
        # fully randomized (last) state is explained on changed weights.
        assert states[-1] is False and all(states[:-1]), states
        assert metric.complexity_func_kwargs["n_bins"] == bins
        ours = result.scores.double().numpy()
        np.testing.assert_allclose(np.asarray(scores, dtype=np.float64), ours, rtol=0, atol=1e-5)
        worst = max(worst, float(np.abs(np.asarray(scores) - ours).max()))
        # quantus' per-state entropies are ours too (float64: to rounding).
        by_state = list(metric.explanation_scores_by_layer.values())
        np.testing.assert_allclose(by_state[0], result.entropies["original"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(by_state[-1], result.entropies["randomized"], rtol=0, atol=1e-12)
        # and both are scipy's entropy (natural log) of numpy's histogram of each map.
        for state in ("original", "randomized"):
            maps = result.maps[state].reshape(x.shape[0], -1).numpy()
            expected = [scipy.stats.entropy(np.histogram(m, bins=bins)[0]) for m in maps]
            np.testing.assert_allclose(
                result.entropies[state].numpy(), expected, rtol=0, atol=1e-12
            )
        h0, h1 = result.entropies["original"], result.entropies["randomized"]
        rise = (h1 - h0) / h0
        np.testing.assert_allclose(result.scores.numpy(), rise.numpy(), rtol=1e-6, atol=1e-7)
    assert worst < 1e-5


def test_efficient_randomization_changes_the_maps():
    """The randomized state really is another model: its maps differ from the trained ones."""
    x = randn(4, 3, 12, 12, seed=1)
    result = ps.efficient_randomization(small_cnn(), x, "gradient")
    gradient = ps.explain(small_cnn(), x, "gradient")
    torch.testing.assert_close(result.maps["original"], gradient, rtol=1e-5, atol=1e-6)
    assert (result.maps["original"] - result.maps["randomized"]).abs().max() > 1e-3
    assert result.maps["randomized"].dtype == torch.float32
    assert result.maps["randomized"].shape == (4, 12, 12)


# -- 2. smooth MPRT against quantus SmoothMPRT -----------------------------------------------


@pytest.mark.parametrize(
    "order, mode, layer_order",
    [
        ("bottom_up", "cascading", "bottom_up"),
        ("top_down", "cascading", "top_down"),
        ("bottom_up", "independent", "independent"),
    ],
)
def test_smooth_randomization_matches_quantus(monkeypatch, order, mode, layer_order):
    quantus = pytest.importorskip("quantus")
    model = sequential_net()
    x = randn(4, 3, 8, 8, seed=2)
    samples, magnitude, seed = 4, 0.1, 3
    result = ps.smooth_randomization(
        model, x, "gradient", noise_samples=samples, noise_magnitude=magnitude, order=order,
        mode=mode, seed=seed,
    )  # fmt: skip
    expected_steps = SEQUENTIAL_STEPS[::-1] if order == "top_down" else SEQUENTIAL_STEPS
    assert result.layers == expected_steps
    assert quantus_layers(model, layer_order) == expected_steps
    assert result.scores.shape == (len(expected_steps), 4)
    states = [result.maps["original"]] + [result.maps[name] for name in result.layers]

    # SmoothMPRT explains each noisy copy with quantus.explain (not explain_func): every
    # state is explained `samples` times in a row (the original model first, then after each
    # layer); each call returns our mean map of that state, so quantus' mean is ours.
    calls: list[np.ndarray] = []

    def explain(model, inputs, targets, **kwargs):
        calls.append(np.array(inputs))
        return states[(len(calls) - 1) // samples].numpy()

    # Its noise comes from np.random.randn: hand it our draws, to compare its noisy inputs.
    generator = torch.Generator().manual_seed((seed ^ NOISE_SALT) % 2**63)
    draws = torch.randn((samples - 1, *x.shape), generator=generator, dtype=torch.float64)
    drawn = [0]

    def randn_(*shape):
        assert shape == tuple(x.shape)
        k = drawn[0] % (samples - 1)
        drawn[0] += 1
        return draws[k].numpy().copy()

    monkeypatch.setattr(quantus, "explain", explain)
    monkeypatch.setattr(np.random, "randn", randn_)
    metric = quantus.SmoothMPRT(
        disable_warnings=True,
        nr_samples=samples,
        noise_magnitude=magnitude,
        layer_order=layer_order,
        return_last_correlation=False,
    )
    assert metric.abs and metric.normalise
    with torch.random.fork_rng(devices=[]):
        scores = metric(
            model=model,
            x_batch=x.numpy(),
            y_batch=result.targets.numpy(),
            # given, so quantus' "original" entry is the self-similarity of our original map
            a_batch=result.maps["original"].numpy(),
            channel_first=True,
            softmax=False,
            explain_func=explain,
        )
    assert len(calls) == samples * (1 + len(expected_steps))
    assert list(scores) == ["original", *expected_steps]
    np.testing.assert_allclose(scores["original"], np.ones(4), rtol=0, atol=1e-6)
    worst = 0.0
    for k, name in enumerate(expected_steps):
        ours = result.scores[k].double().numpy()
        np.testing.assert_allclose(scores[name], ours, rtol=0, atol=1e-5)
        worst = max(worst, float(np.abs(np.asarray(scores[name]) - ours).max()))
    assert worst < 1e-5
    # Quantus' noisy inputs (its std formula, our draws) are our noisy batch, state after state.
    ours = noisy_batch(x, samples, magnitude, seed).reshape(samples, *x.shape).numpy()
    for i, inputs in enumerate(calls):
        np.testing.assert_allclose(inputs, ours[i % samples], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(calls[samples - 1], x.numpy())  # the last copy is clean


def quantus_layers(model: nn.Module, layer_order: str) -> list[str]:
    from quantus.helpers.model.pytorch_model import PyTorchModel

    wrapped = PyTorchModel(model, channel_first=True, softmax=False)
    with torch.random.fork_rng(devices=[]):
        return [name for name, _ in wrapped.get_random_layer_generator(order=layer_order)]


def test_smooth_randomization_maps_are_means_over_the_noisy_batch():
    model, x = sequential_net(), randn(3, 3, 8, 8, seed=4)
    samples, magnitude, seed = 5, 0.2, 7
    result = ps.smooth_randomization(
        model, x, "gradient", noise_samples=samples, noise_magnitude=magnitude, seed=seed
    )
    batch = noisy_batch(x, samples, magnitude, seed)
    targets = result.targets.repeat(samples)
    maps = ps.explain(model, batch, "gradient", target=targets)
    expected = maps.reshape(samples, 3, 8, 8).mean(dim=0)
    torch.testing.assert_close(result.maps["original"], expected, rtol=1e-5, atol=1e-6)
    # one clean sample is a plain gradient (quantus: SmoothGrad with n=1 is the gradient)
    single = ps.smooth_randomization(model, x, "gradient", noise_samples=1, seed=seed)
    torch.testing.assert_close(
        single.maps["original"], ps.explain(model, x, "gradient"), rtol=1e-5, atol=1e-6
    )
    # the targets are the trained model's predictions
    assert torch.equal(result.targets, model(x).argmax(dim=1))


# -- 3. the noise of smooth MPRT -------------------------------------------------------------


def reference_noisy(x: torch.Tensor, samples: int, magnitude: float, seed: int) -> torch.Tensor:
    # salted, so that the noise does not replay the bits step 0's re-initialisation draws
    generator = torch.Generator().manual_seed((seed ^ NOISE_SALT) % 2**63)
    draws = torch.randn((samples - 1, *x.shape), generator=generator, dtype=torch.float64)
    x64 = x.double()
    copies = []
    for s in range(samples - 1):
        for i in range(x.shape[0]):
            spread = float(x64[i].max() - x64[i].min())
            copies.append(x64[i] + draws[s, i] * (magnitude * spread))
    copies += list(x64)  # the last copy of every sample is clean
    return torch.stack(copies)


@pytest.mark.parametrize("shape", [(3, 2, 5, 6), (4, 3, 7), (5, 6)])
@pytest.mark.parametrize("samples, magnitude, seed", [(4, 0.1, 0), (3, 0.5, 11), (1, 0.1, 2)])
def test_noisy_batch_matches_reference(shape, samples, magnitude, seed):
    x = (
        randn(*shape, seed=5, dtype=torch.float64)
        * torch.linspace(0.5, 3.0, shape[0]).reshape(-1, *[1] * (len(shape) - 1)).double()
    )
    out = noisy_batch(x, samples, magnitude, seed)
    expected = reference_noisy(x, samples, magnitude, seed)
    assert out.shape == (samples * shape[0], *shape[1:]) and out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    # float32 inputs: the same noise, returned in float32
    out32 = noisy_batch(x.float(), samples, magnitude, seed)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), expected, rtol=0, atol=1e-5)
    # the same seed draws the same noise; another seed other noise
    assert torch.equal(noisy_batch(x, samples, magnitude, seed), out)
    if samples > 1:
        assert not torch.equal(noisy_batch(x, samples, magnitude, seed + 1), out)


def test_noise_std_is_quantus_formula():
    """Each sample's noise is a unit draw times quantus' std
    ``noise_magnitude * (x.max(axis=dims) - x.min(axis=dims))``."""
    x = randn(4, 3, 6, 6, seed=6, dtype=torch.float64) * torch.tensor(
        [0.2, 1.0, 3.0, 10.0], dtype=torch.float64
    ).reshape(4, 1, 1, 1)
    samples, magnitude, seed = 5, 0.15, 9
    x_np = x.numpy()
    dims = tuple(range(1, x_np.ndim))
    std = magnitude * (x_np.max(axis=dims, keepdims=True) - x_np.min(axis=dims, keepdims=True))
    out = noisy_batch(x, samples, magnitude, seed).reshape(samples, *x.shape).numpy()
    generator = torch.Generator().manual_seed((seed ^ NOISE_SALT) % 2**63)
    draws = torch.randn((samples - 1, *x.shape), generator=generator, dtype=torch.float64).numpy()
    np.testing.assert_allclose(out[:-1], x_np + draws * std, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(out[-1], x_np)
    # the scale really is per sample: the noise grows with each sample's range
    noise_sd = (out[:-1] - x_np).std(axis=(0, 2, 3, 4))
    ratio = noise_sd / std.reshape(-1)
    assert np.all((ratio > 0.8) & (ratio < 1.2)), ratio
    assert np.all(np.diff(noise_sd) > 0)


# -- 4. the edge control ---------------------------------------------------------------------


def sobel_mean(x: torch.Tensor) -> np.ndarray:
    """skimage.filters.sobel of each channel, averaged over channels, per sample."""
    from skimage.filters import sobel

    return np.stack(
        [np.mean([sobel(channel) for channel in sample], axis=0) for sample in x.double().numpy()]
    )


EDGE_SHAPES = [(3, 1, 9, 7), (2, 3, 12, 12), (4, 2, 5, 16)]


@pytest.mark.parametrize("shape", EDGE_SHAPES)
def test_edge_map_is_skimage_sobel_mean_over_channels(shape):
    """The edge control is skimage's Sobel magnitude of each channel, averaged over channels."""
    x = randn(*shape, seed=7) * 2 + 0.5
    out = edge_map(x)
    assert out.shape == (shape[0], *shape[2:]) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), sobel_mean(x), rtol=0, atol=1e-5)
    # it reads the input only: a constant image has no edges, a step has them on its border
    step = torch.zeros(1, 1, 6, 6)
    step[..., 3:] = 1.0
    edges = edge_map(step)[0]
    assert edges[:, :2].abs().max() == 0 and edges[:, 4:].abs().max() == 0
    assert torch.all(edges[:, 2:4] > 0)
    assert edge_map(torch.full((2, 3, 5, 5), 4.0)).abs().max() == 0


@pytest.mark.parametrize("shape", [(3, 1, 10), (2, 4, 17)])
def test_edge_map_1d_is_the_central_difference_with_edge_replication(shape):
    x = randn(*shape, seed=8) * 3
    padded = np.pad(x.double().numpy(), [(0, 0), (0, 0), (1, 1)], mode="edge")
    expected = np.abs(padded[..., 2:] - padded[..., :-2]).mean(axis=1)
    out = edge_map(x)
    assert out.shape == (shape[0], shape[2]) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-6)
    # the ends use the replicated neighbour: |x[1] - x[0]|, as skimage's sobel of a 1-D signal
    first = (x[:, :, 1] - x[:, :, 0]).abs().mean(dim=1)
    from skimage.filters import sobel

    row = x[0, 0].double().numpy()
    np.testing.assert_allclose(edge_map(x[:1, :1]).numpy()[0], np.abs(sobel(row)), atol=1e-5)
    torch.testing.assert_close(out[:, 0], first, rtol=1e-6, atol=1e-6)


# -- 5. the controls' semantics --------------------------------------------------------------


def run_check(name: str, model, x, method, **kwargs):
    if name == "output_sensitivity":
        return ps.output_sensitivity(model, x, method, **kwargs)
    if name == "parameter_randomization":
        return ps.parameter_randomization(model, x, method, **kwargs)
    if name == "data_randomization":
        twin = mlp(seed=5) if isinstance(model, nn.Sequential) else small_cnn(seed=5)
        return ps.data_randomization(model, twin, x, method, **kwargs)
    if name == "smooth_randomization":
        return ps.smooth_randomization(model, x, method, noise_samples=3, **kwargs)
    if name == "efficient_randomization":
        kwargs.pop("similarity", None)
        return ps.efficient_randomization(model, x, method, **kwargs)
    raise KeyError(name)


SIMILARITY_CHECKS = (
    "output_sensitivity",
    "parameter_randomization",
    "data_randomization",
    "smooth_randomization",
)
ALL_CHECKS = (*SIMILARITY_CHECKS, "efficient_randomization")


@pytest.fixture(scope="module")
def images():
    return small_cnn(), randn(4, 3, 16, 16, seed=9)


@pytest.mark.parametrize("check", SIMILARITY_CHECKS)
@pytest.mark.parametrize("similarity", ["ssim", "pearson"])
def test_edge_control_is_the_same_map_in_every_state(images, check, similarity):
    model, x = images
    result = run_check(check, model, x, "gradient", similarity=similarity)
    assert set(result.controls) == {"noise", "edge"}
    assert result.controls["edge"] == pytest.approx(1.0, abs=1e-12)
    # the method itself is not a constant 1 (the control is scored by the same check)
    assert result.score < 0.999
    if similarity == "pearson":
        # fresh noise in every state: uncorrelated (the worst step for randomization)
        assert abs(result.controls["noise"]) < 0.3
    else:
        assert -0.3 < result.controls["noise"] < 0.3


def test_efficient_controls(images):
    model, x = images
    result = ps.efficient_randomization(model, x, "gradient")
    assert set(result.controls) == {"noise", "edge"}
    assert result.controls["edge"] == 0.0  # the same map twice: the same entropy
    # two fresh uniform maps of 256 pixels: nearly the same entropy of 100 bins
    assert abs(result.controls["noise"]) < 0.1
    assert result.controls["noise"] != 0.0


@pytest.mark.parametrize("check", ALL_CHECKS)
def test_controls_do_not_depend_on_the_methods(images, check):
    model, x = images
    single = run_check(check, model, x, "gradient", similarity="pearson")
    several = run_check(
        check, model, x, ["gradient", "gradcam", "input_x_gradient"], similarity="pearson"
    )
    assert [r.method for r in several] == ["gradient", "gradcam", "input_x_gradient"]
    for result in several:
        assert result.controls == single.controls
    # ... while the methods' own scores differ from one another
    assert len({r.score for r in several}) == 3


@pytest.mark.parametrize("check", ALL_CHECKS)
def test_vector_inputs_have_only_the_noise_control(check):
    model, x = mlp(), randn(5, 6, seed=10)
    result = run_check(check, model, x, "gradient", similarity="pearson")
    assert list(result.controls) == ["noise"]
    noise = result.controls["noise"]
    assert math.isfinite(noise)
    assert abs(noise) < (0.3 if check == "efficient_randomization" else 0.95)


# -- 6. determinism --------------------------------------------------------------------------


NEW_CHECKS = ("data_randomization", "smooth_randomization", "efficient_randomization")


@pytest.mark.parametrize("check", NEW_CHECKS)
def test_checks_repeat_bit_for_bit(images, check):
    model, x = images
    first = run_check(check, model, x, "gradient", similarity="pearson", seed=4)
    second = run_check(check, model, x, "gradient", similarity="pearson", seed=4)
    assert torch.equal(first.scores, second.scores)
    assert first.controls == second.controls
    for name in first.maps:
        assert torch.equal(first.maps[name], second.maps[name])
    other = run_check(check, model, x, "gradient", similarity="pearson", seed=5)
    assert other.controls["noise"] != first.controls["noise"]
    assert other.controls["edge"] == first.controls["edge"]  # the edges depend on x only
