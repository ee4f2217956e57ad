"""A small fully convolutional network that segments pairs of digits (1 x 32 x 32).

The task is made from scikit-learn's digits, so nothing is downloaded: each image holds two
held-apart digits side by side, each 16 x 16 (rows 8 to 24, columns 0 to 16 and 16 to 32). Every
pixel is labelled background (class 0) or, where the digit's ink is, the digit's class plus 1
(classes 1 to 10). The network has to recognise each digit to label its pixels: a pixel of ink
looks the same in a 3 and in an 8.

Layer names: ``features.0`` ... ``features.9`` (convs, ReLUs and two max pools, 8 x 8 at the end)
and ``classifier`` (a 1 x 1 conv to the 11 class scores), upsampled bilinearly to 32 x 32.
The model returns ``{"out": scores}``, as torchvision's segmentation models do; audits select
the scores with ``output: out``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from digits.data import digits_data
from digits.training import load_or_train
from torch import nn

NUM_CLASSES = 11  # background, then digit d as class d + 1
INK = 0.35  # a pixel of a digit (in [0, 1] before normalising) at or above this is ink
CONFIG = {
    "arch": "PairSegNet-v1",
    "pairs": 2000,
    "epochs": 3,
    "lr": 6e-3,
    "batch_size": 32,
    "background_weight": 0.1,  # the loss weight of background pixels (most of each canvas)
    "seed": 0,
    "threads": 1,  # CPU threads while training: the weights depend on it
}


class PairSegNet(nn.Module):
    """conv16-conv16-pool-conv32-conv32-pool-conv64 (8 x 8), a 1 x 1 classifier, upsampled."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16 x 16
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8 x 8
            nn.Conv2d(32, 64, 3, padding=2, dilation=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=2, dilation=2),
            nn.ReLU(),
        )
        self.classifier = nn.Conv2d(64, NUM_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        scores = self.classifier(self.features(x))
        return {"out": F.interpolate(scores, size=x.shape[-2:], mode="bilinear",
                                     align_corners=False)}  # fmt: skip


def _pairs(images: torch.Tensor, labels: torch.Tensor, n: int, seed: int | None):
    """``n`` two-digit canvases and their pixel labels. ``seed=None`` pairs image i with image
    i + 1 (deterministic, for the held-out audit batch); a seed draws the pairs."""
    if seed is None:
        first = torch.arange(n) % len(labels)
        second = (first + 1) % len(labels)
    else:
        gen = torch.Generator().manual_seed(seed)
        first = torch.randint(0, len(labels), (n,), generator=gen)
        second = torch.randint(0, len(labels), (n,), generator=gen)
    small = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    canvas = torch.zeros(n, 1, 32, 32)
    target = torch.zeros(n, 32, 32, dtype=torch.long)
    for side, idx in enumerate((first, second)):
        digit = small[idx]
        canvas[:, :, 8:24, 16 * side : 16 * side + 16] = digit
        ink = digit[:, 0] >= INK
        region = target[:, 8:24, 16 * side : 16 * side + 16]
        region[ink] = (labels[idx][:, None, None] + 1).expand_as(region)[ink]
    return canvas, target


def _raw_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits of one split in [0, 1] (undoing the shared normalisation)."""
    data = digits_data(8, 1)  # the 8 x 8 originals
    x, y = (data.train_x, data.train_y) if split == "train" else (data.test_x, data.test_y)
    return x * data.std + data.mean, y


def normalise(canvas: torch.Tensor) -> torch.Tensor:
    return (canvas - 0.1) / 0.3


def train(seed: int = CONFIG["seed"]) -> nn.Module:
    """Train a fresh `PairSegNet` on pairs of training digits with Adam and a one-cycle
    schedule; deterministic for a seed (local generators, the global RNG left as found, one
    CPU thread)."""
    x, y = _raw_digits("train")
    canvas, target = _pairs(x, y, CONFIG["pairs"], seed)
    canvas = normalise(canvas)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PairSegNet()
    weight = torch.ones(NUM_CLASSES)
    weight[0] = CONFIG["background_weight"]
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    batch, epochs = CONFIG["batch_size"], CONFIG["epochs"]
    opt = torch.optim.Adam(model.parameters(), lr=CONFIG["lr"])
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=CONFIG["lr"], total_steps=epochs * -(-len(target) // batch)
    )
    gen = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(CONFIG["threads"])
    try:
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(target), generator=gen)
            for start in range(0, len(order), batch):
                idx = order[start : start + batch]
                opt.zero_grad()
                loss_fn(model(canvas[idx])["out"], target[idx]).backward()
                opt.step()
                sched.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def trained_model(cache_dir: str | os.PathLike[str] | None = None) -> nn.Module:
    """The default-config model, loaded from the checkpoint cache or trained and cached."""
    return load_or_train("pairsegnet", CONFIG, PairSegNet, train, cache_dir)


def audit_pairs(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` held-out canvases ``[n, 1, 32, 32]`` (held-out digit i beside digit i + 1; the
    held-out split is ordered 0, 1, ..., 9, 0, ..., so the two digits always differ) and
    their pixel labels ``[n, 32, 32]``."""
    x, y = _raw_digits("test")
    canvas, target = _pairs(x, y, n, None)
    return normalise(canvas), target


def audit_batch(n: int = 8) -> torch.Tensor:
    """The first ``n`` held-out pairs, ``[n, 1, 32, 32]``."""
    return audit_pairs(n)[0]


def left_digit_class(n: int = 8) -> torch.Tensor:
    """The segmentation class of each canvas's left digit (its digit + 1), ``[n]``."""
    _, y = _raw_digits("test")
    return y[torch.arange(n) % len(y)] + 1


@torch.no_grad()
def pixel_accuracy(model: nn.Module, n: int = 200) -> tuple[float, float]:
    """(pixel accuracy, accuracy on ink pixels) on ``n`` held-out canvases."""
    x, target = audit_pairs(n)
    predicted = model(x)["out"].argmax(dim=1)
    ink = target > 0
    return float((predicted == target).float().mean()), float(
        (predicted[ink] == target[ink]).float().mean()
    )
