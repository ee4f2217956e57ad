"""Smoke tests: the cached example models load and classify the held-out digits."""

from __future__ import annotations

import pytest
import torch
from digits import model as digits_model
from digits.training import checkpoint_path, load_or_train
from resnet import model as resnet_model
from segmentation import model as segmentation_model
from torch import nn
from vit import model as vit_model

CASES = [
    pytest.param(digits_model, 0.95, (1, 32, 32), id="digitsnet"),
    pytest.param(resnet_model, 0.90, (3, 32, 32), id="resnet18"),
    pytest.param(vit_model, 0.95, (1, 32, 32), id="digitsvit"),
]


@pytest.mark.parametrize(("module", "threshold", "shape"), CASES)
def test_held_out_accuracy(module, threshold: float, shape: tuple[int, ...]) -> None:
    model = module.trained_model()
    assert not model.training
    assert module.held_out_accuracy(model) >= threshold


@pytest.mark.parametrize(("module", "threshold", "shape"), CASES)
def test_audit_batch_is_balanced_and_deterministic(module, threshold, shape) -> None:
    x, y = module.audit_batch(20), module.audit_labels(20)
    assert x.shape == (20, *shape)
    assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), 2))
    assert torch.equal(x, module.audit_batch(20))


def test_the_segmentation_model_labels_the_digits_pixels() -> None:
    model = segmentation_model.trained_model()
    overall, ink = segmentation_model.pixel_accuracy(model)
    assert overall >= 0.85 and ink >= 0.85
    x, target = segmentation_model.audit_pairs(8)
    assert x.shape == (8, 1, 32, 32) and target.shape == (8, 32, 32)
    left = segmentation_model.left_digit_class(8)
    assert torch.equal(target[:, 8:24, :16].amax(dim=(1, 2)), left)  # the left digit's class
    assert bool((target[:, 8:24, 16:].amax(dim=(1, 2)) != left).all())  # two different digits


def test_training_is_seeded_and_leaves_global_rng_alone() -> None:
    state, threads = torch.random.get_rng_state(), torch.get_num_threads()
    first = digits_model.train(epochs=1).state_dict()
    second = digits_model.train(epochs=1).state_dict()
    assert torch.equal(state, torch.random.get_rng_state())
    assert torch.get_num_threads() == threads
    for key, value in first.items():
        assert torch.equal(value, second[key]), key


def test_checkpoint_cache_trains_once_and_round_trips(tmp_path) -> None:
    calls = []

    def train() -> nn.Module:
        calls.append(1)
        return nn.Linear(3, 2).eval()

    config = {"arch": "tiny", "seed": 0}
    trained = load_or_train("tiny", config, lambda: nn.Linear(3, 2), train, tmp_path)
    loaded = load_or_train("tiny", config, lambda: nn.Linear(3, 2), train, tmp_path)
    assert len(calls) == 1
    assert torch.equal(trained.weight, loaded.weight)
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint_path("tiny", config, tmp_path).name]
    # A different configuration must not reuse the old weights.
    load_or_train("tiny", {**config, "seed": 1}, lambda: nn.Linear(3, 2), train, tmp_path)
    assert len(calls) == 2


@pytest.mark.parametrize("module", [digits_model, vit_model], ids=["digitsnet", "digitsvit"])
def test_permuted_label_twin_is_the_same_recipe_on_shuffled_labels(module) -> None:
    from digits.data import digits_data
    from digits.training import training_labels

    twin, model = module.permuted_model(), module.trained_model()
    assert not twin.training
    assert [(k, v.shape) for k, v in twin.state_dict().items()] == [
        (k, v.shape) for k, v in model.state_dict().items()
    ]
    # the shuffle is a fixed permutation of the true labels: same class counts, other order
    y = digits_data(32, 1).train_y
    permuted = training_labels(y, "permuted")
    assert torch.equal(permuted, training_labels(y, "permuted"))
    assert torch.equal(torch.bincount(permuted), torch.bincount(y))
    assert (permuted == y).float().mean() < 0.2
    # measured: the recipe's 4 epochs do not fit shuffled labels; the twin is at chance
    assert module.held_out_accuracy(twin) < 0.2
