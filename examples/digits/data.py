"""The scikit-learn handwritten digits, upsampled to CNN-sized tensors.

`load_digits` ships inside scikit-learn, so nothing is downloaded. Both example models
(`digits.model` and `resnet.model`) read their data from here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

NUM_CLASSES = 10
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0


@dataclass(frozen=True)
class DigitsData:
    """A fixed train / held-out split of the digits as normalised float tensors.

    Attributes:
        train_x: ``[N_train, C, size, size]`` training images.
        train_y: ``[N_train]`` labels.
        test_x: ``[N_test, C, size, size]`` held-out images, ordered round-robin over the
            classes (0, 1, ..., 9, 0, 1, ...) so any prefix is class-balanced.
        test_y: ``[N_test]`` labels.
        mean: pixel mean of the training images in [0, 1] scale, before normalising.
        std: pixel standard deviation of the training images, before normalising.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: float
    std: float


def _split(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified, seeded split; held-out indices interleaved class by class."""
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    train_parts, held_out_per_class = [], []
    for c in range(NUM_CLASSES):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_held = round(len(idx) * HELD_OUT_FRACTION)
        held_out_per_class.append(idx[:n_held])
        train_parts.append(idx[n_held:])
    # Round-robin so that the first n held-out samples cover the classes evenly.
    depth = max(len(p) for p in held_out_per_class)
    held_out = [p[i] for i in range(depth) for p in held_out_per_class if i < len(p)]
    return torch.cat(train_parts), torch.stack(held_out)


@functools.lru_cache(maxsize=4)
def digits_data(size: int = 32, channels: int = 1) -> DigitsData:
    """Load the digits split, resized to ``size`` x ``size`` with ``channels`` channels.

    Args:
        size: output side length; the 8x8 originals are upsampled bilinearly.
        channels: 1 for grey images, 3 to repeat the grey channel (for RGB models).

    Returns:
        The cached `DigitsData`; treat its tensors as read-only.
    """
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    train_idx, test_idx = _split(labels)
    mean = images[train_idx].mean().item()
    std = images[train_idx].std().item()
    images = ((images - mean) / std).expand(-1, channels, -1, -1).contiguous()
    return DigitsData(
        train_x=images[train_idx],
        train_y=labels[train_idx],
        test_x=images[test_idx],
        test_y=labels[test_idx],
        mean=mean,
        std=std,
    )


def held_out(n: int, size: int = 32, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` held-out images and labels (class-balanced, deterministic)."""
    data = digits_data(size, channels)
    if not 0 < n <= len(data.test_y):
        raise ValueError(f"n must be in 1..{len(data.test_y)}, got {n}")
    return data.test_x[:n].clone(), data.test_y[:n].clone()


def test_set(size: int = 32, channels: int = 1) -> torch.utils.data.TensorDataset:
    """The held-out split as a ``torch.utils.data.Dataset`` of (image, label) pairs."""
    data = digits_data(size, channels)
    return torch.utils.data.TensorDataset(data.test_x, data.test_y)
