"""Leave the user's model exactly as it was found."""

from __future__ import annotations

import contextlib
import itertools
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
        # An audit enters this block once per pass: a model already in eval mode is left
        # alone (setting a module attribute goes through nn.Module.__setattr__).
        if any(flag for _, flag in flags):
            model.eval()
        yield model
    finally:
        for module, flag in flags:
            if module.training != flag:
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
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return inputs.device, inputs.dtype


@contextlib.contextmanager
def exact_kernels() -> Iterator[None]:
    """Reproducible, full-float32 cuDNN convolutions for the block; the user's settings after.

    cuDNN may pick a different (and non-deterministic) algorithm per call when ``benchmark``
    is on, and by default runs float32 convolutions in TF32 (10-bit mantissa) on Ampere and
    later GPUs. Maps must not depend on either: the same seed gives the same maps, and GPU
    maps agree with CPU maps to float32 rounding. Matrix products (``nn.Linear``) keep the
    user's float32 precision (torch's default is full float32). Nothing changes on CPU.
    """
    cudnn = torch.backends.cudnn
    saved_flags = (cudnn.deterministic, cudnn.benchmark)
    owner, attr, exact = _conv_precision_switch()
    saved = getattr(owner, attr)
    try:
        cudnn.deterministic, cudnn.benchmark = True, False
        setattr(owner, attr, exact)
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved_flags
        setattr(owner, attr, saved)


def _conv_precision_switch() -> tuple[object, str, object]:
    """(owner, attribute, exact value) of the switch that turns TF32 off for cuDNN convolutions.

    torch >= 2.9 keeps a legacy flag (``cudnn.allow_tf32``) and per-backend ``fp32_precision``
    settings, and refuses to read the legacy flags once the two disagree. The switch is taken
    from the family the user's current settings are in, so that every flag reads as before,
    inside the block and after it.
    """
    cudnn = torch.backends.cudnn
    conv = getattr(cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):
        return cudnn, "allow_tf32", False  # torch < 2.9: one flag
    generic = getattr(torch.backends, "fp32_precision", "none")
    if generic == "none" and getattr(cudnn, "fp32_precision", "none") == "none":
        try:
            cudnn.allow_tf32  # noqa: B018 (raises when legacy and new settings are mixed)
            return cudnn, "allow_tf32", False
        except RuntimeError:
            pass
    return conv, "fp32_precision", "ieee"
