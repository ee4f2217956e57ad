"""Leave the user's model exactly as it was found."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode for the block; restore each module's own flag after.

    Flags are saved per module because users sometimes switch submodules individually
    (e.g. a frozen, eval-mode backbone inside a model in train mode).
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def removable_hooks() -> Iterator[list]:
    """Collect hook handles; every one is removed when the block ends, even on error."""
    handles: list = []
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


def model_device_dtype(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    """The device and dtype the model computes in: its first floating-point parameter or buffer,
    else the inputs'."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return inputs.device, inputs.dtype
