"""The two audits on tiny seeded models: scores against closed forms, step semantics, errors."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import pytest_saliency.checks.randomization as randomization_module
from pytest_saliency import output_sensitivity, parameter_randomization
from pytest_saliency.checks import RandomizationResult, SensitivityResult
from pytest_saliency.checks.sensitivity import other_classes
from pytest_saliency.errors import SaliencyError, UnsupportedActivationError
from pytest_saliency.similarities import similarity

from ._models import assert_unchanged, randn, small_cnn, snapshot, torchvision_model


def seeded(model: nn.Module, seed: int = 0, scale: float = 0.5) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return model.eval()


def pearson_np(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().double().numpy(), b.flatten().double().numpy())[0, 1])


class SharedScore(nn.Module):
    """logit_k = a_k * s(x) + b_k with a_k > 0: every class has the same map up to a scale."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.score = nn.Linear(3 * 6 * 6, 1)
        self.head = nn.Linear(1, classes)

    def forward(self, x):
        s = self.score(torch.relu(self.conv(x)).flatten(1))
        return self.head(s)


@pytest.fixture
def shared_model():
    model = seeded(SharedScore())
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[1.0], [2.0], [0.5], [3.0]]))
    return model


@pytest.fixture
def linear_model():
    return seeded(nn.Sequential(nn.Flatten(), nn.Linear(16, 5)), seed=1)


def chain(seed: int = 0) -> nn.Sequential:
    return seeded(
        nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(3, 3, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(3 * 8 * 8, 4),
        ),  # fmt: skip
        seed,
    )


# --- output sensitivity ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gradient", "guided_backprop", "smoothgrad"])
def test_class_independent_maps_score_one(shared_model, method):
    x = randn(5, 1, 6, 6, seed=2)
    options = {"samples": 4} if method == "smoothgrad" else {}
    # smoothgrad: both classes see the same noise, so even its maps agree exactly.
    result = output_sensitivity(shared_model, x, method, similarity="pearson", **options)
    assert isinstance(result, SensitivityResult)
    assert result.scores.shape == (5,)
    assert result.scores.dtype == torch.float32
    assert torch.allclose(result.scores, torch.ones(5), atol=1e-4)
    assert result.score == pytest.approx(1.0, abs=1e-4)
    assert result.ci == pytest.approx((1.0, 1.0), abs=1e-4)
    assert not result.passed(0.5) and result.passed(1.0001)
    assert (result.others != result.targets).all()


def test_linear_model_scores_match_weight_correlation(linear_model):
    x = randn(6, 1, 4, 4, seed=3)
    result = output_sensitivity(linear_model, x, "gradient", similarity="pearson", against="second")
    weight = linear_model[1].weight.detach()
    logits = linear_model(x).detach()
    assert torch.equal(result.targets, logits.argmax(1))
    for i in range(6):
        t, o = int(result.targets[i]), int(result.others[i])
        assert float(result.scores[i]) == pytest.approx(pearson_np(weight[t], weight[o]), abs=1e-5)
        assert torch.allclose(result.maps["target"][i], weight[t].reshape(4, 4))
        assert torch.allclose(result.maps["other"][i], weight[o].reshape(4, 4))
    assert result.score == pytest.approx(float(result.scores.double().mean()), abs=1e-6)


def test_against_picks_the_right_classes(linear_model):
    x = randn(8, 1, 4, 4, seed=4)
    logits = linear_model(x).detach()
    ranked = logits.argsort(dim=1, descending=True)
    second = output_sensitivity(linear_model, x, "gradient", similarity="pearson", against="second")
    assert torch.equal(second.others, ranked[:, 1])
    least = output_sensitivity(
        linear_model, x, "gradient", similarity="pearson", against="least_likely"
    )
    assert torch.equal(least.others, ranked[:, -1])
    # A fixed target: "second" is then the best class other than that target.
    fixed = output_sensitivity(
        linear_model, x, "gradient", similarity="pearson", against="second", target=ranked[:, 0]
    )
    assert torch.equal(fixed.others, ranked[:, 1])
    given = output_sensitivity(
        linear_model, x, "gradient", similarity="pearson", against="second", target=2
    )
    masked = logits.clone()
    masked[:, 2] = -math.inf
    assert torch.equal(given.targets, torch.full((8,), 2)) and torch.equal(
        given.others, masked.argmax(1)
    )
    least_given = output_sensitivity(
        linear_model, x, "gradient", similarity="pearson", against="least_likely", target=2
    )
    masked[:, 2] = math.inf
    assert torch.equal(least_given.others, masked.argmin(1))


def test_random_other_is_uniform_over_other_classes_and_seeded():
    n, classes = 20000, 5
    logits = torch.zeros(n, classes)
    targets = torch.arange(n) % classes
    others = other_classes(logits, targets, "random", seed=3)
    assert (others != targets).all() and others.min() >= 0 and others.max() < classes
    for t in range(classes):
        counts = torch.bincount(others[targets == t], minlength=classes).double()
        assert counts[t] == 0
        share = counts / counts.sum()
        expected = torch.full((classes - 1,), 0.25, dtype=torch.float64)
        assert torch.allclose(share[torch.arange(classes) != t], expected, atol=0.03)
    assert torch.equal(others, other_classes(logits, targets, "random", seed=3))
    assert not torch.equal(others, other_classes(logits, targets, "random", seed=4))


def test_random_against_same_seed_same_numbers(linear_model):
    x = randn(12, 1, 4, 4, seed=5)
    a = output_sensitivity(linear_model, x, "gradient", similarity="pearson", seed=7)
    b = output_sensitivity(linear_model, x, "gradient", similarity="pearson", seed=7)
    c = output_sensitivity(linear_model, x, "gradient", similarity="pearson", seed=8)
    assert torch.equal(a.scores, b.scores) and a.ci == b.ci and torch.equal(a.others, b.others)
    assert not torch.equal(a.others, c.others)


def test_against_all_is_the_mean_over_other_classes(linear_model):
    x = randn(4, 1, 4, 4, seed=6)
    result = output_sensitivity(linear_model, x, "gradient", against="all", similarity="pearson")
    assert torch.equal(result.others, torch.full((4,), -1))
    weight = linear_model[1].weight.detach()
    for i in range(4):
        t = int(result.targets[i])
        expected = [pearson_np(weight[t], weight[c]) for c in range(5) if c != t]
        assert float(result.scores[i]) == pytest.approx(np.mean(expected), abs=1e-5)
        best = max((c for c in range(5) if c != t), key=lambda c: pearson_np(weight[t], weight[c]))
        assert torch.allclose(result.maps["other"][i], weight[best].reshape(4, 4))


def test_batch_size_does_not_change_sensitivity():
    model, x = small_cnn(), randn(5, 3, 8, 8, seed=7)
    full = output_sensitivity(model, x, "gradcam", similarity="pearson")
    chunked = output_sensitivity(model, x, "gradcam", similarity="pearson", batch_size=2)
    assert torch.allclose(full.scores, chunked.scores, atol=1e-5, equal_nan=True)


def test_blank_other_map_scores_zero_and_blank_reference_is_degenerate():
    # Post-ReLU activations are >= 0; class 0 weighs them up, class 1 down, so Grad-CAM's ReLU
    # leaves class 1's map all zero.
    model = seeded(
        nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(3, 2),
        )  # fmt: skip
    )
    with torch.no_grad():
        model[4].weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]))
    x = randn(3, 1, 6, 6, seed=8)
    good = output_sensitivity(
        model, x, "gradcam", target=0, against="second", layer="1", similarity="pearson"
    )
    assert torch.equal(good.scores, torch.zeros(3)) and good.degenerate == []
    assert good.blank == {0: ["other"], 1: ["other"], 2: ["other"]}
    assert good.passed(0.5) and "constant map" in good.summary()
    bad = output_sensitivity(
        model, x, "gradcam", target=1, against="second", layer="1", similarity="pearson"
    )
    assert torch.isnan(bad.scores).all() and bad.degenerate == [0, 1, 2]
    assert math.isnan(bad.score) and not bad.passed(0.5)


# --- result mechanics --------------------------------------------------------------------------


def make_result(scores: list[float], seed: int = 0) -> SensitivityResult:
    n = len(scores)
    return SensitivityResult(
        check="output_sensitivity", method="gradient", options={}, similarity="ssim",
        scores=torch.tensor(scores), maps={}, inputs=torch.zeros(n, 1, 2, 2),
        targets=torch.zeros(n, dtype=torch.long), seed=seed, settings={},
        others=torch.ones(n, dtype=torch.long),
    )  # fmt: skip


def test_confidence_needs_the_interval_below_the_threshold():
    result = make_result([0.35, 0.45, 0.5, 0.6])
    low, high = result.ci
    assert result.score == pytest.approx(0.475)
    assert 0.35 <= low < 0.475 < high <= 0.6
    assert result.passed(0.5) and not result.passed(0.5, confidence=True)
    assert result.passed(high, confidence=True)
    assert not result.passed(0.47)


def test_confidence_with_one_sample_is_an_error():
    result = make_result([0.1])
    assert result.passed(0.5) and result.ci == (pytest.approx(0.1), pytest.approx(0.1))
    with pytest.raises(SaliencyError, match="one sample has no spread"):
        result.passed(0.5, confidence=True)


def test_bootstrap_interval_matches_normal_theory_and_is_seeded():
    values = randn(400, seed=9) * 0.2 + 0.3
    result = make_result(values.tolist())
    half = 1.96 * float(values.double().std()) / math.sqrt(400)
    low, high = result.ci
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)
    assert (low + high) / 2 == pytest.approx(result.score, abs=0.01)
    assert make_result(values.tolist(), seed=0).ci == result.ci
    assert make_result(values.tolist(), seed=1).ci != result.ci


def test_to_dict_is_json_and_repr_one_line(linear_model):
    result = output_sensitivity(
        linear_model, randn(3, 1, 4, 4, seed=1), "gradient", similarity="pearson"
    )
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    for key in ("check", "method", "options", "similarity", "score", "ci", "scores",
                "degenerate", "targets", "seed", "settings", "against", "others"):  # fmt: skip
        assert key in data
    assert data["settings"]["against"] == "random" and "\n" not in repr(result)
    assert repr(result).startswith("SensitivityResult(method='gradient'")


# --- parameter randomization -------------------------------------------------------------------


def test_single_layer_score_matches_reinit_under_seed(linear_model):
    x = randn(4, 1, 4, 4, seed=10)
    result = parameter_randomization(linear_model, x, "gradient", similarity="pearson", seed=5)
    assert isinstance(result, RandomizationResult)
    assert result.layers == ["1"] and result.scores.shape == (1, 4)
    reference = copy.deepcopy(linear_model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)  # step 0 uses seed + 0
        reference[1].reset_parameters()
    old, new = linear_model[1].weight.detach(), reference[1].weight.detach()
    for i, t in enumerate(result.targets.tolist()):
        assert float(result.scores[0, i]) == pytest.approx(pearson_np(old[t], new[t]), abs=1e-5)
    assert result.score == pytest.approx(result.step_scores[0])


class DiffRecorder:
    """Stands in for ``explain_step`` in the audit and notes which layers of the copy differ."""

    def __init__(self, original: nn.Module):
        self.original = {k: v.clone() for k, v in original.state_dict().items()}
        self.calls: list[set[str]] = []

    def __call__(self, plan, x, targets):
        changed = {
            key.rsplit(".", 1)[0]
            for key, value in plan.model.state_dict().items()
            if not torch.equal(value, self.original[key])
        }
        self.calls.append(changed)
        return plan(x, targets)


@pytest.mark.parametrize(
    ("mode", "order", "expected"),
    [
        ("cascading", "top_down", [set(), {"5"}, {"5", "2"}, {"5", "2", "0"}]),
        ("cascading", "bottom_up", [set(), {"0"}, {"0", "2"}, {"0", "2", "5"}]),
        ("independent", "top_down", [set(), {"5"}, {"2"}, {"0"}]),
        ("independent", "bottom_up", [set(), {"0"}, {"2"}, {"5"}]),
    ],
)
def test_step_semantics(monkeypatch, mode, order, expected):
    model, x = chain(), randn(3, 1, 8, 8, seed=11)
    recorder = DiffRecorder(model)
    monkeypatch.setattr(randomization_module, "explain_step", recorder)
    result = parameter_randomization(model, x, "gradient", mode=mode, order=order)
    assert recorder.calls == expected
    assert result.layers == (["5", "2", "0"] if order == "top_down" else ["0", "2", "5"])
    assert list(result.maps) == ["original", *result.layers]
    for row, name in zip(result.scores, result.layers):
        reference = similarity(result.maps["original"], result.maps[name], "ssim")
        assert torch.allclose(row, reference.float(), atol=1e-6)
    assert result.step_scores == pytest.approx([float(r.double().mean()) for r in result.scores])
    assert result.score == pytest.approx(max(result.step_scores))
    worst = result.scores[int(np.argmax(result.step_scores))]
    assert result.ci == make_result(worst.tolist()).ci


def test_cascading_last_step_equals_independent_first():
    model, x = chain(), randn(3, 1, 8, 8, seed=12)
    cascading = parameter_randomization(model, x, "gradient", mode="cascading")
    independent = parameter_randomization(model, x, "gradient", mode="independent")
    assert torch.equal(cascading.scores[0], independent.scores[0])


def test_same_seed_same_numbers_other_seed_other_numbers():
    model, x = chain(), randn(4, 1, 8, 8, seed=13)
    a = parameter_randomization(model, x, "gradient", seed=3)
    b = parameter_randomization(model, x, "gradient", seed=3)
    c = parameter_randomization(model, x, "gradient", seed=4)
    assert torch.equal(a.scores, b.scores) and a.ci == b.ci
    assert not torch.allclose(a.scores, c.scores)


class Reordered(nn.Module):
    """Registered head, bn, conv; called conv, bn, head."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(2 * 8 * 8, 3)
        self.bn = nn.BatchNorm2d(2)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_layers_follow_forward_order_not_registration_order():
    model, x = seeded(Reordered()), randn(2, 1, 8, 8, seed=14)
    top = parameter_randomization(model, x, "gradient")
    bottom = parameter_randomization(model, x, "gradient", order="bottom_up")
    assert top.layers == ["head", "bn", "conv"]
    assert bottom.layers == ["conv", "bn", "head"]
    named = parameter_randomization(model, x, "gradient", layers=["head", "conv"])
    assert named.layers == ["head", "conv"] and named.settings["layers"] == ["head", "conv"]


def test_batchnorm_running_stats_are_reset(monkeypatch):
    model, x = seeded(Reordered()), randn(2, 1, 8, 8, seed=15)
    with torch.no_grad():
        model.bn.running_mean.fill_(3.0)
        model.bn.running_var.fill_(5.0)
    seen = []

    def spy(plan, x, targets):
        copy_model = plan.model
        seen.append((copy_model.bn.running_mean.clone(), copy_model.bn.running_var.clone()))
        return plan(x, targets)

    monkeypatch.setattr(randomization_module, "explain_step", spy)
    parameter_randomization(model, x, "gradient", layers=["bn"])
    assert torch.equal(seen[0][0], torch.full((2,), 3.0))
    assert torch.equal(seen[1][0], torch.zeros(2)) and torch.equal(seen[1][1], torch.ones(2))
    assert torch.equal(model.bn.running_mean, torch.full((2,), 3.0))


class Scale(nn.Module):
    """A parameter but no reset_parameters: re-initialised by the fallback, as its own step."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.weight


class Blocky(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3 * 4 * 4, 2)
        self.stem = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.body = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), Scale(), nn.ReLU())

    def forward(self, x):
        return self.head(self.body(self.pool(self.stem(x))).flatten(1))


def test_blocks_and_fallback(monkeypatch):
    model, x = seeded(Blocky()), randn(2, 1, 8, 8, seed=16)
    everything = parameter_randomization(model, x, "gradient")
    assert everything.layers == ["head", "body.1.weight", "body.0", "stem.1", "stem.0"]
    assert everything.skipped == [] and everything.coverage == 1.0
    assert everything.fallback == ["body.1.weight"]
    recorder = DiffRecorder(model)
    monkeypatch.setattr(randomization_module, "explain_step", recorder)
    blocks = parameter_randomization(model, x, "gradient", layers="blocks", mode="independent")
    assert blocks.layers == ["head", "body", "stem"] and blocks.skipped == []
    assert recorder.calls == [set(), {"head"}, {"body.0", "body.1"}, {"stem.0", "stem.1"}]


def test_cam_layer_given_as_module_is_found_on_the_copy():
    model, x = small_cnn(), randn(2, 3, 8, 8, seed=17)
    by_module = parameter_randomization(model, x, "gradcam", layer=model.conv2, layers=["fc3"])
    by_name = parameter_randomization(model, x, "gradcam", layer="conv2", layers=["fc3"])
    assert by_module.settings["layer"] == "conv2"
    assert torch.allclose(by_module.scores, by_name.scores, equal_nan=True)


def test_batch_size_does_not_change_randomization():
    model, x = chain(), randn(5, 1, 8, 8, seed=18)
    full = parameter_randomization(model, x, "gradient", mode="independent")
    chunked = parameter_randomization(model, x, "gradient", mode="independent", batch_size=2)
    assert torch.allclose(full.scores, chunked.scores, atol=1e-5)


def test_summary_and_dict_of_randomization():
    model, x = chain(), randn(3, 1, 8, 8, seed=19)
    result = parameter_randomization(model, x, "gradient", similarity="spearman")
    text = result.summary()
    assert all(name in text for name in result.layers) and "worst" in text
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["layers"] == ["5", "2", "0"] and data["skipped"] == []
    assert data["coverage"] == 1.0 and data["unused"] == [] and data["fallback"] == []
    assert len(data["scores"]) == 3 and len(data["step_scores"]) == 3
    assert "\n" not in repr(result)


# --- degenerate maps ---------------------------------------------------------------------------


def test_gradcam_on_a_1x1_layer_is_degenerate_not_an_error():
    model = torchvision_model("resnet18")
    x = randn(2, 3, 32, 32, seed=20)
    before = snapshot(model)
    sens = output_sensitivity(model, x, "gradcam", layer="layer4")
    rand = parameter_randomization(model, x, "gradcam", layer=model.layer4, layers=["fc"])
    assert_unchanged(before, snapshot(model))
    for result in (sens, rand):
        assert torch.isnan(result.scores).all() and math.isnan(result.score)
        assert result.degenerate == [0, 1] and not result.passed(0.99)
        assert "layer4" in result.summary() and "1x1" in result.summary()
        assert "1x1" in repr(result) and "\n" not in repr(result)
        data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
        assert data["score"] is None and data["degenerate"] == [0, 1]


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("against", ["random", "second", "least_likely", "all"])
def test_one_output_model_cannot_be_compared(against):
    model = seeded(nn.Sequential(nn.Flatten(), nn.Linear(4, 1)))
    with pytest.raises(SaliencyError, match="at least 2 classes"):
        output_sensitivity(model, randn(2, 1, 2, 2), "gradient", against=against)


@pytest.mark.parametrize(
    ("audit", "kwargs", "match"),
    [
        ("sens", {"against": "worst"}, "unknown against 'worst'.*'random'"),
        ("sens", {"similarity": "ssmi"}, "did you mean 'ssim'"),
        ("rand", {"similarity": "cosine"}, "unknown similarity metric.*'pearson'"),
        ("rand", {"mode": "cascade"}, "did you mean 'cascading'"),
        ("rand", {"order": "topdown"}, "did you mean 'top_down'"),
        ("rand", {"layers": ["conv9"]}, "unknown layer 'conv9'; did you mean .*'conv1'"),
        ("rand", {"layers": ["pool"]}, "has no parameters"),
        ("rand", {"layers": []}, "empty"),
        ("rand", {"layers": "conv1"}, "list of module names"),
        ("rand", {"layers": ["conv1", "conv1"]}, "twice"),
        ("rand", {"seed": -1}, "seed"),
        ("sens", {"method": "gradcam", "layer": "conv7"}, "Closest names: .*'conv1'"),
        ("rand", {"method": "gradient", "steps": 3}, "unknown keyword 'steps'"),
    ],
)
def test_bad_arguments_name_the_valid_choices(audit, kwargs, match):
    model, x = small_cnn(), randn(2, 3, 8, 8)
    method = kwargs.pop("method", "gradient")
    fn = output_sensitivity if audit == "sens" else parameter_randomization
    with pytest.raises(SaliencyError, match=match):
        fn(model, x, method, **kwargs)


# --- the user's model and the global RNG are left alone ----------------------------------------


def _rng_state():
    return torch.get_rng_state().clone()


@pytest.mark.parametrize("audit", [output_sensitivity, parameter_randomization])
def test_model_grads_and_rng_untouched(audit):
    model, x = small_cnn(), randn(3, 3, 8, 8, seed=21)
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    before, rng = snapshot(model), _rng_state()
    audit(model, x, "guided_backprop")
    assert_unchanged(before, snapshot(model))
    assert torch.equal(rng, _rng_state())


@pytest.mark.parametrize("audit", [output_sensitivity, parameter_randomization])
def test_untouched_after_an_error_mid_audit(audit):
    model, x = small_cnn("gelu_module"), randn(2, 3, 8, 8, seed=22)
    before, rng = snapshot(model), _rng_state()
    with pytest.raises(UnsupportedActivationError):
        audit(model, x, "guided_backprop")
    assert_unchanged(before, snapshot(model))
    assert torch.equal(rng, _rng_state())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_rng_untouched_and_numbers_match_cpu():
    model, x = chain(), randn(4, 1, 8, 8, seed=23)
    cpu = parameter_randomization(model, x, "gradient", seed=2)
    gpu_model = copy.deepcopy(model).cuda()
    cuda_rng, rng = torch.cuda.get_rng_state(), _rng_state()
    gpu = parameter_randomization(gpu_model, x.cuda(), "gradient", seed=2)
    sens = output_sensitivity(gpu_model, x.cuda(), "gradient")
    assert torch.equal(cuda_rng, torch.cuda.get_rng_state()) and torch.equal(rng, _rng_state())
    assert gpu.scores.device.type == "cpu" and sens.scores.device.type == "cpu"
    assert gpu.layers == cpu.layers and torch.isfinite(gpu.scores).all()
    assert torch.equal(gpu.targets, cpu.targets)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_same_seed_gives_the_same_numbers_and_memory_stays_flat(monkeypatch):
    """Twice the same audit on a GPU: bit-equal scores and maps; no growth across steps."""
    model = copy.deepcopy(torchvision_model("resnet18")).cuda()  # the shared one stays on CPU
    x = randn(4, 3, 64, 64, seed=24).cuda()
    methods = ["gradient", "gradcam", "fullgrad", "guided_backprop", "lrp_epsilon"]
    allocated = []

    def measured(plan, x, targets):
        maps = plan(x, targets)
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated())
        return maps

    torch.backends.cudnn.benchmark = True  # a user setting the audit must neither need nor keep
    try:
        first = parameter_randomization(model, x, methods, layers="blocks", seed=5)
        monkeypatch.setattr(randomization_module, "explain_step", measured)
        second = parameter_randomization(model, x, methods, layers="blocks", seed=5)
        assert torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = False
    for a, b in zip(first, second):
        assert torch.equal(a.scores.nan_to_num(7.0), b.scores.nan_to_num(7.0)), a.method
        assert all(torch.equal(a.maps[k], b.maps[k]) for k in a.maps), a.method
    sens = [output_sensitivity(model, x, methods, seed=5) for _ in range(2)]
    for a, b in zip(*sens):
        assert torch.equal(a.scores.nan_to_num(7.0), b.scores.nan_to_num(7.0)), a.method
    # One reading per model state: the trained model, then one per block.
    assert len(allocated) == len(first[0].layers) + 1
    assert max(allocated[1:]) - allocated[1] <= 1 << 20, allocated


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int64])
def test_is_constant_reads_each_map(dtype):
    """Constant, constant up to rounding, structured, non-finite; any dtype."""
    from pytest_saliency.checks.common import is_constant

    maps = torch.zeros(6, 5, 5, dtype=torch.float64)
    maps[1] = 3.0  # constant, not zero
    maps[2, 0, 0] = 1.0  # one pixel of structure
    maps[3] = 1.0
    maps[3, 2, 2] = 1.0 + 1e-9  # within rounding of a constant
    maps[4, 1, 1] = math.nan
    maps[5, 4, 4] = -math.inf
    want = [True, True, False, True, True, True]
    if dtype == torch.int64:
        maps[4:] = 7.0
        maps[5, 0, 0] = 8.0
        want[5] = False
    assert is_constant(maps.to(dtype)).tolist() == want
