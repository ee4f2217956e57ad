"""A small VGG-style CNN trained on the scikit-learn digits (1 x 32 x 32).

Layer names to audit: ``features.0`` ... ``features.11`` and ``classifier.1`` / ``classifier.3``.
The CAM layer is ``features.11``, the ReLU after the last conv (8 x 8 positions): Grad-CAM is
defined on rectified feature maps, and on the raw conv output ``features.10`` the weighted sum is
negative everywhere for about half of the digits, so ReLU leaves a blank (degenerate) map.
All activations are ``nn.ReLU`` modules so every propagation rule applies.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from digits.data import digits_data, held_out
from digits.training import accuracy, fit, load_or_train, training_labels

CAM_LAYER = "features.11"
INPUT_SIZE = 32
CONFIG = {
    "arch": "DigitsNet-flat-v1",
    "size": INPUT_SIZE,
    "epochs": 4,
    "lr": 3e-3,
    "batch_size": 32,
    "weight_decay": 0.0,
    "seed": 0,
    "threads": 1,  # CPU threads while training: the weights depend on it (see `fit`)
}


class DigitsNet(nn.Module):
    """conv16-conv16-pool-conv32-conv32-pool-conv64 (8 x 8), flatten, two-layer MLP head.

    A flattened head rather than global average pooling: it trains to ~99% in four epochs,
    where the pooled head needed several times longer on CPU.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16 x 16
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8 x 8
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 8 * 8, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def train(
    seed: int = CONFIG["seed"],
    epochs: int = CONFIG["epochs"],
    lr: float = CONFIG["lr"],
    batch_size: int = CONFIG["batch_size"],
    labels: str = "true",
) -> nn.Module:
    """Train a fresh `DigitsNet` on the training split; deterministic for a given seed.

    ``labels="permuted"`` trains the same way on shuffled labels (the permuted-label twin).

    Returns:
        The trained model in eval mode (global RNG state untouched).
    """
    data = digits_data(INPUT_SIZE, 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # weight init
        model = DigitsNet()
    return fit(
        model,
        data.train_x,
        training_labels(data.train_y, labels),
        seed=seed,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        weight_decay=CONFIG["weight_decay"],
        threads=CONFIG["threads"],
    )


def trained_model(cache_dir: str | os.PathLike[str] | None = None) -> nn.Module:
    """The default-config model, loaded from the checkpoint cache or trained and cached."""
    return load_or_train("digitsnet", CONFIG, DigitsNet, train, cache_dir)


def permuted_model(cache_dir: str | os.PathLike[str] | None = None) -> nn.Module:
    """The permuted-label twin: `DigitsNet` trained the same way on shuffled labels, cached."""
    config = {**CONFIG, "labels": "permuted"}
    return load_or_train("digitsnet", config, DigitsNet, lambda: train(labels="permuted"),
                         cache_dir)  # fmt: skip


def held_out_accuracy(model: nn.Module) -> float:
    """Accuracy of ``model`` on the whole held-out split."""
    data = digits_data(INPUT_SIZE, 1)
    return accuracy(model, data.test_x, data.test_y)


def audit_batch(n: int = 16) -> torch.Tensor:
    """The first ``n`` held-out images, ``[n, 1, 32, 32]``, class-balanced and deterministic."""
    return held_out(n, INPUT_SIZE, 1)[0]


def audit_labels(n: int = 16) -> torch.Tensor:
    """Labels of `audit_batch` (``[n]`` LongTensor)."""
    return held_out(n, INPUT_SIZE, 1)[1]
