"""torchvision ResNet-18 trained on the scikit-learn digits as 3 x 32 x 32 images.

The network is ``torchvision.models.resnet18(weights=None, num_classes=10)`` with BatchNorm,
residual blocks and in-place ReLUs untouched; only the stem is adapted to small inputs:
``conv1`` becomes a 3 x 3 stride-1 convolution (the 7 x 7 stride-2 one would leave 1 x 1 maps
by ``layer4``), and the stride-2 ``maxpool`` is kept. Spatial sizes are then 16 x 16 for
``layer1``, 8 x 8 for ``layer2``, 4 x 4 for ``layer3`` (the CAM layer) and 2 x 2 for ``layer4``.
"""

from __future__ import annotations

import os

import torch
from digits.data import digits_data, held_out
from digits.training import accuracy, fit, load_or_train, training_labels
from torch import nn
from torchvision.models import resnet18

CAM_LAYER = "layer3"
INPUT_SIZE = 32
CONFIG = {
    "arch": "resnet18-conv3x3s1-maxpool-v1",
    "size": INPUT_SIZE,
    "epochs": 1,
    "lr": 1e-3,
    "batch_size": 32,
    "weight_decay": 0.0,
    "seed": 0,
    "threads": 1,  # CPU threads while training: the weights depend on it (see `fit`)
}


def digits_resnet18() -> nn.Module:
    """An untrained ResNet-18 for 3 x 32 x 32 inputs and 10 classes (see module docstring)."""
    model = resnet18(weights=None, num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    # Same initialisation torchvision gives its own convolutions.
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def train(
    seed: int = CONFIG["seed"],
    epochs: int = CONFIG["epochs"],
    lr: float = CONFIG["lr"],
    batch_size: int = CONFIG["batch_size"],
    labels: str = "true",
) -> nn.Module:
    """Train a fresh ResNet-18 on the training split; deterministic for a given seed.

    ``labels="permuted"`` trains the same way on shuffled labels (the permuted-label twin).

    Returns:
        The trained model in eval mode (global RNG state untouched).
    """
    data = digits_data(INPUT_SIZE, 3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # weight init
        model = digits_resnet18()
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
    return load_or_train("resnet18-digits", CONFIG, digits_resnet18, train, cache_dir)


def held_out_accuracy(model: nn.Module) -> float:
    """Accuracy of ``model`` on the whole held-out split."""
    data = digits_data(INPUT_SIZE, 3)
    return accuracy(model, data.test_x, data.test_y)


def audit_batch(n: int = 16) -> torch.Tensor:
    """The first ``n`` held-out images, ``[n, 3, 32, 32]``, class-balanced and deterministic."""
    return held_out(n, INPUT_SIZE, 3)[0]


def audit_labels(n: int = 16) -> torch.Tensor:
    """Labels of `audit_batch` (``[n]`` LongTensor)."""
    return held_out(n, INPUT_SIZE, 3)[1]
