"""No silent wrong map: opaque models, non-finite values, the user's state, clear errors."""

from __future__ import annotations

import random
import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import pytest_saliency as ps
from pytest_saliency.errors import NonFiniteError, SaliencyError
from tests._models import assert_unchanged, randn, snapshot

ALL = ps.methods()
RULES = ["guided_backprop", "deconvnet", "rectgrad", "lrp_epsilon", "lrp_zplus", "lrp_alpha_beta"]
PLAIN = ["gradient", "input_x_gradient", "integrated_gradients", "smoothgrad"]
HOOKED = [m for m in ALL if m not in RULES + PLAIN]  # the CAMs and FullGrad


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()  # fmt: skip


def scripted(module: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(module)


# Scripted once, when the module is imported (at collection, before any test has run
# torch.compile). TorchScript looks builtins up by ``id()`` in a table that keeps the ids of
# ops torch.compile later frees and replaces; a new list that reuses such an id (Conv2d's
# padding) is then taken for a builtin and scripting fails at random ("builtin cannot be used
# as a value"). None of our code scripts anything; only these tests do.
SCRIPTED_NET = scripted(net())
SCRIPTED_CONV = scripted(net()[3])
SCRIPTED_HEAD = scripted(net()[7])


# --- compiled and scripted models --------------------------------------------------------------


@pytest.mark.parametrize("method", ALL)
def test_compiled_model_gives_the_eager_maps(method):
    model = net()
    compiled = torch.compile(model)
    x = randn(2, 3, 8, 8, seed=1)
    torch.testing.assert_close(ps.explain(compiled, x, method), ps.explain(model, x, method))
    # Twice: an earlier call must not change a later one.
    torch.testing.assert_close(ps.explain(compiled, x, method), ps.explain(model, x, method))


def test_compiled_model_layer_names_with_or_without_prefix():
    model = net()
    compiled = torch.compile(model)
    x = randn(2, 3, 8, 8, seed=1)
    expected = ps.explain(model, x, "gradcam", layer="3")
    for name in ("3", "_orig_mod.3"):
        torch.testing.assert_close(ps.explain(compiled, x, "gradcam", layer=name), expected)
    result = ps.parameter_randomization(compiled, x, "gradient", layers=["_orig_mod.3"])
    eager = ps.parameter_randomization(model, x, "gradient", layers=["3"])
    assert result.score == pytest.approx(eager.score)


@pytest.mark.parametrize("method", RULES + HOOKED)
def test_scripted_model_is_refused_before_any_work(method):
    model = SCRIPTED_NET
    with pytest.raises(SaliencyError, match="TorchScript") as info:
        ps.explain(model, randn(2, 3, 8, 8), method)
    assert method in str(info.value) and "eager model" in str(info.value)


def test_scripted_submodule_is_named():
    model = net()
    model[3] = SCRIPTED_CONV
    with pytest.raises(SaliencyError, match=r"'3' is a TorchScript module"):
        ps.explain(model, randn(2, 3, 8, 8), "guided_backprop")


@pytest.mark.parametrize("method", PLAIN)
def test_plain_methods_run_on_scripted_models(method):
    model = net()
    x = randn(2, 3, 8, 8, seed=1)
    torch.testing.assert_close(ps.explain(SCRIPTED_NET, x, method), ps.explain(model, x, method))


def test_randomization_refuses_scripted_model():
    with pytest.raises(SaliencyError, match="reset_parameters.*TorchScript module"):
        ps.parameter_randomization(SCRIPTED_NET, randn(2, 3, 8, 8), "gradient")


def test_nested_compiled_module_is_refused_by_rule_methods():
    model = net()
    model[3] = torch.compile(model[3])
    with pytest.raises(SaliencyError, match="'3' is a torch.compile'd submodule"):
        ps.explain(model, randn(2, 3, 8, 8), "lrp_epsilon")


# --- finite or refused -------------------------------------------------------------------------


def test_non_finite_inputs_are_refused_naming_samples():
    x = randn(4, 3, 8, 8)
    x[3, 0, 1, 1] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"samples 1, 3") as info:
        ps.explain(net(), x, "gradient")
    assert info.value.samples == [1, 3]
    with pytest.raises(NonFiniteError):
        ps.output_sensitivity(net(), x, "gradient")


class Overflow(nn.Module):
    """Scores that overflow to inf for the samples whose first pixel is large."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(x.flatten(1)) * torch.exp(x[:, :1, 0, 0] * 100)


@pytest.mark.parametrize("batch_size", [None, 1])
def test_non_finite_scores_are_refused_naming_samples(batch_size):
    torch.manual_seed(0)
    x = randn(3, 3, 2, 2)
    x[:, 0, 0, 0] = torch.tensor([0.1, 9.0, 0.2])
    with pytest.raises(NonFiniteError, match=r"NaN or inf scores for sample 1\b") as info:
        ps.explain(Overflow(), x, "gradient", batch_size=batch_size)
    assert info.value.samples == [1]


class Normalised(nn.Module):
    """Adds sqrt(sum x^2): finite everywhere, but its gradient is NaN at the all-zero input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) + torch.sqrt((x * x).sum(dim=1, keepdim=True))


def test_integrated_gradients_nan_at_the_baseline_is_refused_with_cause():
    x = randn(3, 4, seed=2)
    with pytest.raises(NonFiniteError, match="integrated_gradients.*baseline") as info:
        ps.explain(Normalised(), x, "integrated_gradients", target=0)
    assert info.value.samples == [0, 1, 2]
    # Another baseline avoids the point: a finite map.
    maps = ps.explain(Normalised(), x, "integrated_gradients", target=0, baseline=0.5)
    assert bool(torch.isfinite(maps).all())


def test_non_finite_map_is_refused_naming_method_and_sample():
    x = randn(3, 4, seed=2)
    x[2] = 0
    with pytest.raises(NonFiniteError, match=r"'gradient' gave a map with NaN or inf for sample 2"):
        ps.explain(Normalised(), x, "gradient", target=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_passed_rejects_non_finite_thresholds(bad):
    result = ps.output_sensitivity(net(), randn(2, 3, 8, 8), "gradient")
    with pytest.raises(SaliencyError, match="finite number"):
        result.passed(bad)


@pytest.mark.parametrize(
    "method, options, match",
    [
        ("rectgrad", {"percentile": float("nan")}, "percentile"),
        ("smoothgrad", {"noise": float("nan")}, "noise"),
        ("smoothgrad", {"noise": float("inf")}, "noise"),
        ("smoothgrad", {"seed": 2**64}, "seed"),
        ("integrated_gradients", {"baseline": float("nan")}, "baseline"),
        ("integrated_gradients", {"baseline": torch.full((3, 8, 8), float("inf"))}, "baseline"),
    ],
)
def test_non_finite_and_overflowing_options_are_refused(method, options, match):
    with pytest.raises(SaliencyError, match=match):
        ps.explain(net(), randn(2, 3, 8, 8), method, **options)


@pytest.mark.parametrize("target", [2**70, -1, 4, 2**63])
def test_targets_beyond_the_classes_are_refused(target):
    with pytest.raises(SaliencyError, match="out of range"):
        ps.explain(net(), randn(2, 3, 8, 8), "gradient", target=target)


@pytest.mark.parametrize("seed", [2**64, 2**63, -1])
def test_overflowing_seeds_are_refused(seed):
    with pytest.raises(SaliencyError, match="seed"):
        ps.parameter_randomization(net(), randn(2, 3, 8, 8), "gradient", seed=seed)


# --- the user's state --------------------------------------------------------------------------


class Stateful(nn.Module):
    """A forward that counts its calls in a buffer, replaces another, and draws noise from the
    torch, numpy and Python generators."""

    def __init__(self):
        super().__init__()
        self.body = net()
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("last", torch.zeros(4))

    def forward(self, x):
        self.calls += 1
        out = self.body(x)
        self.last = out.detach().mean(0)  # a new tensor assigned to a buffer
        noise = torch.rand(()) * 0 + np.random.rand() * 0 + random.random() * 0
        return out + noise


def _rng_states():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x: ps.explain(m, x, "gradient"),
        lambda m, x: ps.explain(m, x, "guided_backprop"),
        lambda m, x: ps.explain(m, x, "gradcam"),
        lambda m, x: ps.output_sensitivity(m, x, ["gradient", "lrp_epsilon"]),
        lambda m, x: ps.parameter_randomization(m, x, "gradient", layers="blocks"),
    ],
    ids=["explain", "explain-rules", "explain-cam", "sensitivity", "randomization"],
)
def test_state_and_rng_are_restored(call):
    model = Stateful()
    x = randn(2, 3, 8, 8)
    before, calls = snapshot(model), model.calls
    torch_rng, np_rng, py_rng = _rng_states()
    call(model, x)
    assert_unchanged(before, snapshot(model))
    assert model.calls is calls and float(model.calls) == 0.0
    after = _rng_states()
    assert torch.equal(after[0], torch_rng) and np.array_equal(after[1], np_rng)
    assert after[2] == py_rng


class NumpyInit(nn.Linear):
    """A layer whose reset_parameters draws from numpy's global generator."""

    def reset_parameters(self):
        with torch.no_grad():
            self.weight.copy_(torch.from_numpy(np.random.randn(*self.weight.shape)))
            if self.bias is not None:
                self.bias.zero_()


def test_numpy_drawing_reset_is_seeded_and_left_alone():
    np.random.seed(0)  # the layers draw their init from numpy's global generator
    model = nn.Sequential(NumpyInit(6, 8), nn.ReLU(), NumpyInit(8, 3))
    x = randn(4, 6, seed=1)
    np.random.seed(1)
    first = ps.parameter_randomization(model, x, "gradient", seed=3, similarity="spearman")
    state = np.random.get_state()[1].copy()
    np.random.seed(2)  # another global state: the same seed gives the same scores
    second = ps.parameter_randomization(model, x, "gradient", seed=3, similarity="spearman")
    assert torch.allclose(first.scores, second.scores, rtol=0, atol=0, equal_nan=True)
    np.random.seed(1)
    ps.parameter_randomization(model, x, "gradient", seed=3, similarity="spearman")
    assert np.array_equal(np.random.get_state()[1], state)


def test_batch_statistics_give_per_sample_maps():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).eval()  # fmt: skip
    x = randn(4, 3, 6, 6, seed=2)
    # The reference: autograd on each sample alone (its statistics are its own).
    alone = []
    for i in range(4):
        xi = x[i : i + 1].clone().requires_grad_(True)
        alone.append(torch.autograd.grad(model(xi)[:, 0].sum(), xi)[0].sum(1))
    whole = ps.explain(model, x, "gradient", target=0)
    torch.testing.assert_close(whole, torch.cat(alone))
    torch.testing.assert_close(ps.explain(model, x, "gradient", target=0, batch_size=3), whole)
    xg = x.clone().requires_grad_(True)  # the batch-dependent map that must not come out
    batched = torch.autograd.grad(model(xg)[:, 0].sum(), xg)[0].sum(1)
    assert not torch.allclose(batched, whole)


def test_batch_statistics_without_spatial_axes_are_refused():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=False),
                          nn.Linear(5, 2)).eval()  # fmt: skip
    with pytest.raises(SaliencyError, match="'1' normalises with batch statistics"):
        ps.explain(model, randn(3, 4), "gradient")


def test_uncopyable_model_names_the_attribute():
    model = net()
    model[3].lock = threading.Lock()
    with pytest.raises(SaliencyError, match=r"module '3' holds attribute 'lock' of type lock"):
        ps.parameter_randomization(model, randn(2, 3, 8, 8), "gradient")


# --- clear errors ------------------------------------------------------------------------------


class Detached(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if self.how == "no_grad":
            with torch.no_grad():
                return self.fc(x)
        if self.how == "numpy":
            return torch.from_numpy(self.fc(x).detach().numpy())
        return self.fc(x.detach())


@pytest.mark.parametrize("how", ["no_grad", "numpy", "detach-input"])
@pytest.mark.parametrize("method", ["gradient", "guided_backprop", "lrp_epsilon"])
def test_output_without_a_graph_to_the_inputs_is_refused(how, method):
    with pytest.raises(SaliencyError, match="autograd graph|out of torch"):
        ps.explain(Detached(how), randn(2, 4), method)


def test_meta_model_and_inputs_are_refused():
    with torch.device("meta"):
        meta = nn.Linear(4, 3)
    with pytest.raises(SaliencyError, match="meta device.*to_empty"):
        ps.explain(meta, randn(2, 4), "gradient")
    with pytest.raises(SaliencyError, match="inputs are on the meta device"):
        ps.explain(nn.Linear(4, 3), torch.empty(2, 4, device="meta"), "gradient")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_model_on_several_devices_is_refused():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2).cuda())
    with pytest.raises(SaliencyError, match="several devices"):
        ps.explain(model, randn(2, 4), "gradient")


def test_state_is_restored_when_the_call_fails():
    model = Stateful()
    model.body.insert(3, nn.Hardtanh())  # refused by guided backprop, after the forward began
    before = snapshot(model)
    torch_rng = torch.get_rng_state()
    with pytest.raises(SaliencyError):
        ps.explain(model, randn(2, 3, 8, 8), "guided_backprop")
    assert_unchanged(before, snapshot(model))
    assert torch.equal(torch.get_rng_state(), torch_rng)


class Registers(nn.Module):
    """A forward that registers a buffer, and a buffer that is an inference tensor."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        with torch.inference_mode():
            self.register_buffer("scale", torch.ones(3))

    def forward(self, x):
        self.register_buffer("seen", x.detach().mean(0))
        self.scale = self.scale  # reassigned with itself: an inference tensor stays
        return self.fc(x) + self.scale.sum()  # read, not saved for backward


def test_buffers_registered_in_forward_are_removed_and_inference_buffers_kept():
    model = Registers()
    ps.explain(model, randn(2, 4), "gradient")
    assert "seen" not in dict(model.named_buffers())
    assert model.scale.is_inference()


def test_huge_integer_options_are_range_errors():
    for method, options in [
        ("smoothgrad", {"noise": 10**400}),
        ("lrp_epsilon", {"epsilon": 10**400}),
    ]:
        with pytest.raises(SaliencyError, match="option"):
            ps.explain(net(), randn(2, 3, 8, 8), method, **options)


def test_identity_model_gives_the_one_hot_gradient():
    maps = ps.explain(nn.Identity(), randn(2, 4), "gradient", target=1)
    assert torch.equal(maps, torch.tensor([[0.0, 1, 0, 0], [0, 1, 0, 0]]))


@pytest.mark.parametrize("method", ["gradient", "guided_backprop", "lrp_epsilon", "gradcam"])
def test_model_compiled_in_place_gives_the_eager_maps(method):
    model = net()
    x = randn(2, 3, 8, 8, seed=1)
    expected = ps.explain(model, x, method)
    model.compile()
    try:
        torch.testing.assert_close(ps.explain(model, x, method), expected)
        assert model._compiled_call_impl is not None  # left compiled
    finally:
        model._compiled_call_impl = None


def test_cam_on_an_eager_layer_of_a_partly_scripted_model():
    model = net()
    eager = ps.explain(model, randn(2, 3, 8, 8, seed=1), "gradcam", layer="3")
    model[7] = SCRIPTED_HEAD  # the head, away from the CAM layer
    torch.testing.assert_close(
        ps.explain(model, randn(2, 3, 8, 8, seed=1), "gradcam", layer="3"), eager
    )
    with pytest.raises(SaliencyError, match="'7' is a TorchScript module"):
        ps.explain(model, randn(2, 3, 8, 8), "gradcam")  # the default layer needs every hook


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = net()

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.body, x, use_reentrant=False)


def test_activation_checkpointing_is_refused_clearly_under_lrp():
    model, x = Checkpointed(), randn(2, 3, 8, 8, seed=1)
    with pytest.raises(SaliencyError, match="activation checkpointing"):
        ps.explain(model, x, "lrp_epsilon")
    # Plain autograd is unaffected by checkpointing.
    torch.testing.assert_close(
        ps.explain(model, x, "gradient"), ps.explain(model.body, x, "gradient")
    )


def test_sensitivity_names_the_inputs_own_samples():
    torch.manual_seed(0)
    x = randn(3, 3, 2, 2)
    x[:, 0, 0, 0] = torch.tensor([0.1, 0.2, 9.0])
    for against in ("second", "all"):
        with pytest.raises(NonFiniteError) as info:
            ps.output_sensitivity(Overflow(), x, "gradient", against=against, similarity="spearman")
        assert info.value.samples == [2]


def test_non_finite_error_is_exported_and_picklable():
    import pickle

    error = ps.NonFiniteError([1, 4], "bad values in {which}")
    again = pickle.loads(pickle.dumps(error))
    assert isinstance(again, SaliencyError) and again.samples == [1, 4]
    assert str(again) == "bad values in samples 1, 4"


def test_largest_signed_64_bit_seed_is_accepted():
    a = ps.explain(net(), randn(2, 3, 8, 8), "smoothgrad", seed=2**63 - 1, samples=2)
    assert bool(torch.isfinite(a).all())
    result = ps.parameter_randomization(net(), randn(2, 3, 8, 8), "gradient", seed=2**63 - 1)
    assert result.scores.numel() > 0
