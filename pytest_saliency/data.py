"""Audit inputs drawn from a ``torch.utils.data.Dataset`` or ``DataLoader``.

:func:`sample` draws ``samples`` items by index, with its own seeded generator: the same
``seed`` gives the same batch, whatever the global RNGs hold, and the global RNGs are as they
were afterwards (an item's random transform draws from RNGs seeded by ``seed`` too). When the
labels can be read (``dataset.targets`` / ``.labels`` as torchvision keeps them, a
``TensorDataset``'s second tensor, or each item's second element: then from the first
10 x ``samples`` items of the seeded order), the batch is class-balanced: classes take
turns, each in the seeded order; ``per_class=K`` takes at most K of each class. A DataLoader
is read through its ``dataset`` (its batch size, sampler and collate function do not apply).
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import SaliencyError

DEFAULT_SAMPLES = 32


def is_data(obj: object) -> bool:
    """Whether ``obj`` is a Dataset or DataLoader (a map-style one: indexable, sized)."""
    from torch.utils.data import DataLoader, Dataset

    return isinstance(obj, (Dataset, DataLoader))


def _dataset(data: Any) -> Any:
    from torch.utils.data import DataLoader, IterableDataset

    dataset = data.dataset if isinstance(data, DataLoader) else data
    if isinstance(dataset, IterableDataset):
        raise SaliencyError(
            f"{type(dataset).__name__} is an IterableDataset: it has no indices to draw a "
            "seeded sample from; give a map-style Dataset (with __getitem__ and __len__) or a "
            "tensor of inputs"
        )
    try:
        size = len(dataset)
    except TypeError:
        raise SaliencyError(
            f"{type(dataset).__name__} has no len(); a Dataset to sample from needs "
            "__getitem__ and __len__"
        ) from None
    if size == 0:
        raise SaliencyError(f"{type(dataset).__name__} is empty")
    return dataset


def _label(value: Any) -> int | None:
    if isinstance(value, torch.Tensor):
        return int(value) if value.numel() == 1 and not value.is_floating_point() else None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        import numpy as np

        if isinstance(value, np.integer):
            return int(value)
    except ImportError:  # pragma: no cover
        pass
    return None


def _known_labels(dataset: Any) -> list[int] | None:
    """The labels a dataset keeps without reading its items, or None."""
    from torch.utils.data import TensorDataset

    raw = None
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) > 1:
        raw = dataset.tensors[1]
    else:
        for name in ("targets", "labels"):
            raw = getattr(dataset, name, None)
            if raw is not None:
                break
    if raw is None:
        return None
    try:
        labels = [_label(v) for v in (raw.tolist() if hasattr(raw, "tolist") else list(raw))]
    except (TypeError, ValueError):
        return None
    if len(labels) != len(dataset) or any(not isinstance(v, int) for v in labels):
        return None
    return labels


def _split(item: Any, index: int, name: str) -> tuple[torch.Tensor, int | None]:
    """An item's input tensor and its label (None when it has none)."""
    if isinstance(item, torch.Tensor):
        return item, None
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        return item[0], _label(item[1]) if len(item) > 1 else None
    kind = type(item).__name__
    keys = f" with keys {sorted(item)}" if isinstance(item, dict) else ""
    raise SaliencyError(
        f"{name}[{index}] is a {kind}{keys}; an item to audit must be a tensor or a "
        "(tensor, label) pair. Wrap the dataset so that it returns the model's input tensor "
        "first (e.g. a transform to tensors), or give a tensor of inputs"
    )


def _check_count(value: object, what: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SaliencyError(f"{what} must be an int >= {low}, got {value!r}")
    return value


def sample(
    data: Any, samples: int | None = DEFAULT_SAMPLES, *, per_class: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """``(inputs [N, ...], labels [N] or None)``: ``samples`` items of ``data`` (a Dataset or
    DataLoader), drawn by ``seed``, class-balanced when the labels can be read. ``samples``
    None takes ``per_class`` of every class (or everything)."""
    from .engine.state import rng_preserved

    name = type(data).__name__
    dataset = _dataset(data)
    size = len(dataset)
    if samples is not None:
        _check_count(samples, "samples")
    if per_class is not None:
        _check_count(per_class, "per_class")
    seed = _check_count(seed, "seed", 0)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    labels = _known_labels(dataset)
    cache: dict[int, Any] = {}

    def read(i: int) -> Any:
        if i not in cache:
            with rng_preserved():
                # a random transform: the same draw every run (the CPU generator only: seeding
                # CUDA here would queue a lazy seed that outlives the block)
                torch.default_generator.manual_seed(seed + i)
                import random

                import numpy as np

                random.seed(seed + i)
                np.random.seed((seed + i) % 2**32)
                cache[i] = dataset[i]
        return cache[i]

    def label_of(i: int) -> int | None:
        if labels is not None:
            return labels[i]
        return _split(read(i), i, name)[1]

    wanted = size if samples is None else min(samples, size)
    first = label_of(order[0])
    if first is None and per_class is not None:
        raise SaliencyError(
            f"per_class needs labels, and {name}'s items have none that can be read (an int "
            "or a 0-d integer tensor second in each item, or a .targets attribute)"
        )
    if first is None:
        chosen = order[:wanted]
    else:
        # labels read from the items: from the first 10 x samples of the seeded order only
        pool = order if labels is not None else order[: min(size, 10 * wanted)]
        by_class: dict[int, list[int]] = {}
        for i in pool:
            label = label_of(i)
            if label is None:
                raise SaliencyError(f"{name}[{i}] has no label, but {name}[{order[0]}] has one")
            queue = by_class.setdefault(label, [])
            if per_class is None or len(queue) < per_class:
                queue.append(i)
        chosen = []
        classes = sorted(by_class)
        while len(chosen) < wanted and any(by_class[c] for c in classes):
            for c in classes:  # classes take turns: balanced
                if by_class[c] and len(chosen) < wanted:
                    chosen.append(by_class[c].pop(0))
    tensors, found = [], []
    for i in chosen:
        x, label = _split(read(i), i, name)
        tensors.append(x)
        found.append(label)
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise SaliencyError(
            f"{name}'s items have different shapes ({', '.join(map(str, sorted(shapes)))}); "
            "resize them to one shape (a transform) to audit them as one batch"
        )
    inputs = torch.stack(tensors)
    if not inputs.is_floating_point():
        raise SaliencyError(
            f"{name}'s items are {inputs.dtype} tensors; the model takes floats, scaled as it "
            "was trained: add the dataset's transform (e.g. ToTensor, or ToDtype(float32, "
            "scale=True) and the normalisation) rather than have them cast here"
        )
    have_labels = all(v is not None for v in found)
    return inputs, torch.tensor(found, dtype=torch.long) if have_labels else None
