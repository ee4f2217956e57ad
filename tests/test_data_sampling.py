"""Inputs drawn from a Dataset or DataLoader: seeded, class-balanced, and the RNGs untouched."""

from __future__ import annotations

import random
import textwrap
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import pytest_saliency as ps
from pytest_saliency.errors import SaliencyError
from tests._models import randn


def digits() -> TensorDataset:
    """scikit-learn's digits (real data shipped with the package), 1 x 8 x 8 floats."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return TensorDataset(x, torch.tensor(data.target))


class Pairs(Dataset):
    """Items (tensor, int label) and no .targets: the labels are read from the items."""

    def __init__(self, n: int = 60, classes: int = 3) -> None:
        self.x = randn(n, 1, 4, 4, seed=3)
        self.y = [i % classes if i < n - 10 else 0 for i in range(n)]  # class 0 more common

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class Jittered(Pairs):
    """A random transform: draws from the global torch RNG on every read."""

    def __getitem__(self, i: int):
        return self.x[i] + 0.1 * torch.randn(self.x[i].shape), self.y[i]


def test_the_same_seed_gives_the_same_balanced_batch():
    data = digits()
    x, labels = ps.sample(data, 30, seed=4)
    again, same = ps.sample(data, 30, seed=4)
    torch.testing.assert_close(x, again)
    torch.testing.assert_close(labels, same)
    assert x.shape == (30, 1, 8, 8) and Counter(labels.tolist()) == dict.fromkeys(range(10), 3)
    other, _ = ps.sample(data, 30, seed=5)
    assert not torch.equal(x, other)
    # each item is the dataset's own, with its label
    for row, label in zip(x, labels):
        match = (data.tensors[0] == row).flatten(1).all(1).nonzero().flatten()
        assert any(int(data.tensors[1][i]) == int(label) for i in match)


def test_per_class_and_labels_read_from_the_items():
    x, labels = ps.sample(Pairs(), None, per_class=4)
    assert Counter(labels.tolist()) == {0: 4, 1: 4, 2: 4}
    x, labels = ps.sample(Pairs(), 7)
    counts = Counter(labels.tolist())
    assert sum(counts.values()) == 7 and max(counts.values()) - min(counts.values()) <= 1
    loader = DataLoader(Pairs(), batch_size=5, shuffle=True)  # its sampler does not apply
    torch.testing.assert_close(ps.sample(loader, 7)[0], x)


def test_unlabelled_items_and_small_datasets():
    data = TensorDataset(randn(5, 3, seed=1))
    x, labels = ps.sample(data, 32)  # fewer items than asked: all of them, in seeded order
    assert labels is None and x.shape == (5, 3)
    assert sorted(x[:, 0].tolist()) == sorted(data.tensors[0][:, 0].tolist())
    with pytest.raises(SaliencyError, match="per_class needs labels"):
        ps.sample(data, 4, per_class=2)


def test_a_random_transform_is_seeded_and_the_users_rngs_are_kept():
    torch.manual_seed(123), np.random.seed(7), random.seed(9)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    first, _ = ps.sample(Jittered(), 6, seed=2)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert (np.random.get_state()[1] == states[1]).all() and random.getstate() == states[2]
    torch.manual_seed(999)  # another global state: the same batch
    torch.testing.assert_close(ps.sample(Jittered(), 6, seed=2)[0], first)


class Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(3)


class Images(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.zeros(1, 4, 4, dtype=torch.uint8), 0


class Dicts(Images):
    def __getitem__(self, i):
        return {"pixel_values": torch.zeros(1, 4, 4), "label": 0}


class Ragged(Images):
    def __getitem__(self, i):
        return torch.zeros(1, 4 + i, 4), 0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (Stream(), "Stream is an IterableDataset: it has no indices"),
        (Images(), "Images's items are torch.uint8 tensors; the model takes floats"),
        (Dicts(), r"Dicts\[\d\] is a dict with keys \['label', 'pixel_values'\]"),
        (Ragged(), "Ragged's items have different shapes"),
        (TensorDataset(torch.zeros(0, 3)), "TensorDataset is empty"),
    ],
)
def test_data_that_cannot_be_one_batch_is_refused(data, message):
    with pytest.raises(SaliencyError, match=message):
        ps.sample(data, 4)


def test_the_checks_take_a_dataset_as_their_inputs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 64, 10),
    ).eval()  # fmt: skip
    data = digits()
    batch, _ = ps.sample(data, ps.data.DEFAULT_SAMPLES, seed=3)
    direct = ps.output_sensitivity(model, data, "gradient", seed=3)
    assert direct.score == ps.output_sensitivity(model, batch, "gradient", seed=3).score
    assert len(direct.scores) == 32


def test_a_suite_draws_its_inputs_from_a_dataset(pytester: pytest.Pytester):
    pytester.makepyfile(
        helpers=textwrap.dedent(
            """\
            import torch
            from torch.utils.data import TensorDataset

            def model():
                torch.manual_seed(0)
                return torch.nn.Sequential(
                    torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                    torch.nn.Linear(4 * 64, 3),
                ).eval()

            def data():
                g = torch.Generator().manual_seed(0)
                return TensorDataset(torch.randn(30, 1, 8, 8, generator=g),
                                     torch.arange(30) % 3)

            def tensor():
                return torch.randn(4, 1, 8, 8)
            """
        )
    )
    suite = "inputs: {inputs}\nmodel: helpers:model\nmax_similarity: 1.0\nmethods: [gradient]\n"
    pytester.makefile(".yaml", saliency_ds=suite.format(
        inputs="{data: helpers:data, samples: 6, per_class: 2}"))  # fmt: skip
    result = pytester.runpytest("--saliency-report=r.json")
    result.assert_outcomes(passed=2)
    import json

    records = json.loads((pytester.path / "r.json").read_text())["records"]
    assert all(len(r["targets"]) == 6 for r in records)
    pytester.makefile(".yaml", saliency_ds=suite.format(
        inputs="{data: helpers:tensor, samples: 6}"))  # fmt: skip
    result = pytester.runpytest()
    result.stdout.fnmatch_lines(
        [
            "saliency_ds.yaml:1: inputs: helpers:tensor: samples and per_class draw from a "
            "Dataset or DataLoader, and this is a Tensor*"
        ]  # fmt: skip
    )
    pytester.makefile(".yaml", saliency_ds=suite.format(
        inputs="{data: helpers:data, sample: 6}"))  # fmt: skip
    result = pytester.runpytest()
    result.stdout.fnmatch_lines(
        [
            "saliency_ds.yaml:1: inputs.sample: unknown key of inputs 'sample'; did you mean "
            "'samples'*"
        ]  # fmt: skip
    )


def test_sampling_seeds_no_cuda_generator(monkeypatch):
    """Only the CPU generator is seeded for an item's transform: torch.manual_seed would also
    queue a lazy CUDA seed that outlives the call (the user's CUDA stream would change)."""

    def refuse(seed):
        raise AssertionError("torch.manual_seed seeds CUDA too")

    monkeypatch.setattr(torch, "manual_seed", refuse)
    monkeypatch.setattr(torch.random, "manual_seed", refuse)
    first, _ = ps.sample(Jittered(), 4, seed=1)
    torch.testing.assert_close(ps.sample(Jittered(), 4, seed=1)[0], first)


def test_a_dataset_that_raises_is_a_located_error_once(pytester: pytest.Pytester):
    pytester.makepyfile(
        broken=textwrap.dedent(
            """\
            import torch
            from torch.utils.data import Dataset

            CALLS = []

            class Missing(Dataset):
                def __len__(self):
                    return 10

                def __getitem__(self, i):
                    CALLS.append(i)
                    raise FileNotFoundError(f"images/{i}.png")

            def model():
                return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3)).eval()

            def data():
                return Missing()
            """
        )
    )
    pytester.makefile(".yaml", saliency_broken="model: broken:model\ninputs: broken:data\n"
                                               "methods: [gradient]\n")  # fmt: skip
    result = pytester.runpytest()
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        [
            "saliency_broken.yaml:2: inputs: broken:data: reading its items raised "
            "FileNotFoundError: images/*.png (at *broken.py:*)"
        ]  # fmt: skip
    )
    assert "Traceback" not in result.stdout.str()
    assert result.stdout.str().count(", above)") == 1  # loaded once, pointed at after
