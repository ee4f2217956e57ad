"""Seeded training loop and checkpoint cache shared by the example models."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

CACHE_ENV = "PYTEST_SALIENCY_CACHE"


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float = 0.0,
    threads: int = 1,
) -> nn.Module:
    """Train ``model`` in place with Adam on minibatches; return it in eval mode.

    Shuffling uses a local generator; any randomness inside the model (none in the
    examples, but dropout would) runs under ``fork_rng`` so the caller's global RNG
    state is unchanged. Training runs on ``threads`` CPU threads (the caller's setting is
    restored): the summation order of a multi-threaded convolution depends on the thread
    count, and so, after a few hundred steps, do the weights and the audit verdicts
    (measured: trained on 2 threads, one Grad-CAM map of the audit batch turned blank).
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * -(-len(y) // batch_size)
    )
    loss_fn = nn.CrossEntropyLoss()
    callers_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.train()
            for _ in range(epochs):
                for idx in torch.randperm(len(y), generator=gen).split(batch_size):
                    opt.zero_grad(set_to_none=True)
                    loss_fn(model(x[idx]), y[idx]).backward()
                    opt.step()
                    sched.step()
    finally:
        torch.set_num_threads(callers_threads)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (assumed in eval mode) on ``x``, ``y``."""
    correct = sum(
        (model(xb).argmax(1) == yb).sum().item()
        for xb, yb in zip(x.split(batch_size), y.split(batch_size))
    )
    return correct / len(y)


# Labels of the permuted-label twins: a seeded shuffle of the training labels (Adebayo et al.
# 2018, section 5), fixed for every model so that the twins of all examples fit the same noise.
PERMUTATION_SEED = 1234


def training_labels(y: torch.Tensor, labels: str) -> torch.Tensor:
    """``y`` itself (``labels="true"``) or a seeded permutation of it (``"permuted"``)."""
    if labels == "true":
        return y
    if labels != "permuted":
        raise ValueError(f"labels must be 'true' or 'permuted', got {labels!r}")
    gen = torch.Generator().manual_seed(PERMUTATION_SEED)
    return y[torch.randperm(len(y), generator=gen)]


def cache_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where checkpoints live: ``explicit``, else ``$PYTEST_SALIENCY_CACHE``, else a temp dir."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / "pytest-saliency-cache"


def checkpoint_path(name: str, config: dict, directory: Path) -> Path:
    """File name keyed by ``config`` and torch major.minor, so stale weights are never reused."""
    torch_mm = ".".join(torch.__version__.split(".")[:2])
    blob = json.dumps({"config": config, "torch": torch_mm}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return directory / f"{name}-{digest}.pt"


def load_or_train(
    name: str,
    config: dict,
    build: Callable[[], nn.Module],
    train: Callable[[], nn.Module],
    cache: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Load the cached state dict for ``config`` or train, save atomically and return.

    Args:
        name: file name prefix of the checkpoint.
        config: every architecture / training setting that changes the weights (JSON-able).
        build: makes an untrained model of the right architecture.
        train: trains and returns a model in eval mode.
        cache: explicit cache directory (see `cache_dir`).
    """
    directory = cache_dir(cache)
    path = checkpoint_path(name, config, directory)
    if path.exists():
        model = build()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    model = train()
    directory.mkdir(parents=True, exist_ok=True)
    # Write to a private file then rename: parallel xdist workers may train at the same
    # time, and os.replace makes whichever finishes last win without a torn file.
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(model.state_dict(), f)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a cache can be world-readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return model
