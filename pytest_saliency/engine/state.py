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


@contextlib.contextmanager
def exact_kernels() -> Iterator[None]:
    """Reproducible, full-float32 GPU kernels for the block; the user's settings after.

    cuDNN may pick a different (and non-deterministic) algorithm per call when
    ``benchmark`` is on, and by default runs float32 convolutions in TF32 (10-bit mantissa) on
    Ampere and later GPUs. Maps must not depend on either: the same seed gives the same maps,
    and GPU maps agree with CPU maps to float32 rounding. Nothing changes on CPU.
    """
    cudnn = torch.backends.cudnn
    saved_flags = (cudnn.deterministic, cudnn.benchmark)
    precision = _tf32_settings()
    saved_precision = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in precision]
    try:
        cudnn.deterministic, cudnn.benchmark = True, False
        for owner, attr, exact in precision:
            setattr(owner, attr, exact)
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved_flags
        for owner, attr, value in saved_precision:
            setattr(owner, attr, value)


def _tf32_settings() -> list[tuple[object, str, object]]:
    """(owner, attribute, exact value) of the switches that let float32 math run in TF32.

    torch >= 2.9 has per-backend ``fp32_precision``; mixing it with the older ``allow_tf32``
    flags is an error there, so only one family is touched.
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return [
            (conv, "fp32_precision", "ieee"),
            (torch.backends.cuda.matmul, "fp32_precision", "ieee"),
        ]
    return [
        (torch.backends.cudnn, "allow_tf32", False),
        (torch.backends.cuda.matmul, "allow_tf32", False),
    ]
