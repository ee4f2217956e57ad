"""The randomization family's options and errors: aggregate, keyword typos, missing models."""

from __future__ import annotations

import math

import pytest
import torch

import pytest_saliency as ps
from pytest_saliency import report
from pytest_saliency.errors import SaliencyError
from tests._models import randn, small_cnn


@pytest.fixture(scope="module")
def case():
    return small_cnn(seed=3), randn(8, 3, 8, 8, seed=1)


def test_aggregate_reads_the_steps_as_documented(case):
    model, x = case
    found = {
        a: ps.parameter_randomization(model, x, "gradient", similarity="pearson", aggregate=a)
        for a in ("worst", "mean", "last")
    }
    steps = found["worst"].step_scores
    for result in found.values():  # the aggregate reads the same scores
        assert torch.equal(result.scores, found["worst"].scores)
    assert found["worst"].score == pytest.approx(max(steps))
    assert found["mean"].score == pytest.approx(sum(steps) / len(steps), abs=1e-6)
    assert found["last"].score == pytest.approx(steps[-1])
    # the interval is the bootstrap of the per-sample scores the verdict reads
    per_sample = found["mean"].scores.double().mean(dim=0)
    assert found["mean"].ci == ps.checks.results.bootstrap_ci(per_sample.float(), 0)
    # the failure report ranks samples by the same per-sample scores
    rec = report.make_record("t", found["last"], threshold=-1.0)
    ranked = dict(report.most_similar(rec, limit=10))
    for i, value in ranked.items():
        assert value == pytest.approx(float(found["last"].scores[-1, i]), abs=1e-6)
    assert "aggregate='mean'" in repr(found["mean"]) and "aggregate" not in repr(found["worst"])


def test_smooth_randomization_scores_the_mean_over_steps_by_default(case):
    model, x = case
    result = ps.smooth_randomization(model, x, "gradient", noise_samples=2)
    assert result.aggregate == "mean" and result.order == "bottom_up"
    assert result.similarity == "spearman_abs"
    assert result.score == pytest.approx(sum(result.step_scores) / len(result.step_scores))
    assert result.settings["noise_samples"] == 2 and result.settings["aggregate"] == "mean"


def test_unknown_aggregate_lists_the_choices(case):
    model, x = case
    with pytest.raises(SaliencyError, match="worst.*mean.*last"):
        ps.parameter_randomization(model, x, "gradient", aggregate="median")


def test_a_typo_of_a_check_option_names_both_option_lists(case):
    model, x = case
    with pytest.raises(SaliencyError, match=r"unknown keyword 'bin'; did you mean 'bins'\?"):
        ps.efficient_randomization(model, x, "gradient", bin=50)
    with pytest.raises(SaliencyError, match=r"unknown keyword 'batchsize'; did you mean "
                       r"'batch_size'\?"):  # fmt: skip
        ps.parameter_randomization(model, x, "gradient", batchsize=2)
    with pytest.raises(SaliencyError, match=r"unknown keyword 'zzz'\. The check's options"):
        ps.output_sensitivity(model, x, "gradient", zzz=1)
    with pytest.raises(SaliencyError, match="check's options: bins.*'smoothgrad''s options: "):
        ps.efficient_randomization(model, x, "smoothgrad", mode="cascading")
    with pytest.raises(SaliencyError, match="not its options .*inside its mapping"):
        ps.smooth_randomization(model, x, ["gradient"], noise_sample=3)


def test_a_missing_model_argument_is_named(case):
    model, x = case
    with pytest.raises(SaliencyError, match=r"takes 4 positional arguments \(model, "
                       r"randomized_model, inputs, method\)"):  # fmt: skip
        ps.data_randomization(model, x, "gradient")


def test_a_collapsed_twin_is_said(case):
    model, x = case
    twin = small_cnn(seed=4)
    with torch.no_grad():
        twin.fc3.weight.zero_()
        twin.fc3.bias.copy_(torch.arange(5.0))  # the same logits for every input: class 4
    result = ps.data_randomization(model, twin, x, "gradient")
    assert result.collapsed and result.twin_predictions.tolist() == [4] * 8
    assert "predicts class 4 for all 8 inputs" in result.summary()
    assert result.to_dict()["collapsed"] is True
    # fewer than 8 inputs can share a class by chance: no claim
    assert not ps.data_randomization(model, twin, x[:7], "gradient").collapsed


def test_efficient_randomization_scores_blank_and_constant_maps():
    from pytest_saliency.checks.efficient import discrete_entropy, rises

    structured = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(0))
    before = structured.clone()
    before[2] = 5.0  # a constant trained map: degenerate
    after = structured.flip(-1) * 2
    after[0] = 1.0 + 1e-7 * torch.rand(6, 6)  # blank up to float jitter
    scores, h0, h1, blank = rises(before, after, 100)
    assert blank.tolist() == [True, False, False]
    assert float(h1[0]) == 0.0 and float(scores[0]) == -1.0
    expected = (discrete_entropy(after[1:2], 100) - h0[1]) / h0[1]
    assert float(scores[1]) == pytest.approx(float(expected[0]), abs=1e-6)
    assert math.isnan(float(scores[2]))


def test_efficient_randomization_reads_the_predicted_classes_from_its_first_pass(case):
    model, x = case
    implicit = ps.efficient_randomization(model, x, ["gradient", "input_x_gradient"])
    with torch.no_grad():
        predicted = model(x).argmax(dim=1)
    explicit = ps.efficient_randomization(model, x, ["gradient", "input_x_gradient"],
                                          target=predicted)  # fmt: skip
    for a, b in zip(implicit, explicit):
        assert torch.equal(a.targets, predicted)
        assert torch.equal(a.scores, b.scores)
        assert torch.equal(a.maps["randomized"], b.maps["randomized"])
    # a method that computes its own passes (no shared pass) takes the classes from a forward
    (smooth,) = ps.efficient_randomization(model, x, [{"name": "smoothgrad", "samples": 2}])
    assert torch.equal(smooth.targets, predicted)


def _rng_states():
    import random

    import numpy as np

    return torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def _same_rng(a, b) -> bool:
    return torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


CALLS = {
    "smooth": lambda m, t, x: ps.smooth_randomization(m, x, ["gradient", "gradcam"],
                                                      noise_samples=2),
    "efficient": lambda m, t, x: ps.efficient_randomization(m, x, ["gradient", "smoothgrad"]),
    "data": lambda m, t, x: ps.data_randomization(m, t, x, ["gradient", "guided_backprop"]),
    "data-mismatch": lambda m, t, x: ps.data_randomization(m, t, x, "gradient"),
    "efficient-bad-bins": lambda m, t, x: ps.efficient_randomization(m, x, "gradient", bins=1),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CALLS))
def test_the_new_checks_leave_models_and_rngs_as_they_were(case, name):
    from tests._models import assert_unchanged, snapshot

    model, x = case
    # built before the snapshot: making a model draws from the global generator
    twin = small_cnn(seed=1, classes=4) if name == "data-mismatch" else small_cnn(seed=4)
    model.train()  # a mode the checks must restore
    twin.fc1.weight.grad = torch.ones_like(twin.fc1.weight)
    before, twin_before, rng = snapshot(model), snapshot(twin), _rng_states()
    try:
        CALLS[name](model, twin, x)
    except SaliencyError:
        assert name.endswith(("mismatch", "bins"))
    else:
        assert not name.endswith(("mismatch", "bins"))
    assert_unchanged(before, snapshot(model))
    assert_unchanged(twin_before, snapshot(twin))
    assert _same_rng(rng, _rng_states())
    model.eval()
