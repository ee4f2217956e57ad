"""Leave the user's model exactly as it was found."""

from __future__ import annotations

import contextlib
import copy
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import SaliencyError


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block on the model as the engine needs it; leave the user's model as found.

    For the block: every module in eval mode, and modules compiled in place run eagerly.
    After it: each module's own training flag (users sometimes switch submodules
    individually, e.g. a frozen, eval-mode backbone inside a model in train mode), its
    compiled forward, and its buffers exactly as they were (see :class:`_Buffers`).
    """
    flags = [(m, m.training) for m in model.modules()]
    buffers = [_Buffers.of(m) for m in model.modules()]
    # Modules compiled in place (``module.compile()``) run their eager forward for the block:
    # compiled code hides its ops from the rules and its hooks.
    compiled = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    saved_impls = [m._compiled_call_impl for m in compiled]
    try:
        for m in compiled:
            m._compiled_call_impl = None
        # An audit enters this block once per pass: a model already in eval mode is left
        # alone (setting a module attribute goes through nn.Module.__setattr__).
        if any(flag for _, flag in flags):
            model.eval()
        yield model
    finally:
        for module, flag in flags:
            if module.training != flag:
                module.training = flag
        for m, impl in zip(compiled, saved_impls):
            m._compiled_call_impl = impl
        for kept in buffers:
            kept.restore()


@dataclass
class _Buffers:
    """One module's own buffers as a call found them: each tensor object, its version and a
    copy of its values (None for an inference tensor, which cannot change in place outside
    inference mode, where every call runs: only a reassignment is to undo)."""

    module: nn.Module
    names: set[str]
    saved: list[tuple[str, torch.Tensor | None, int | None, torch.Tensor | None]]

    @classmethod
    def of(cls, module: nn.Module) -> _Buffers:
        saved = []
        for name, buffer in module._buffers.items():
            if buffer is None or buffer.is_inference():
                saved.append((name, buffer, None, None))
            else:
                saved.append((name, buffer, buffer._version, buffer.detach().clone()))
        return cls(module, set(module._buffers.keys()), saved)

    def restore(self) -> None:
        """A forward may update a buffer in place (a call counter, an EMA), assign a new one
        or register one; the user's state_dict must read the same after every call."""
        buffers = self.module._buffers
        for extra in [n for n in buffers.keys() if n not in self.names]:
            del buffers[extra]
        for name, buffer, version, values in self.saved:
            if (buffers[name] if name in buffers else None) is not buffer:
                buffers[name] = buffer
            if version is not None and buffer._version != version:
                with torch.no_grad():
                    buffer.copy_(values)


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


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy to re-initialise; a model that cannot be copied gets an error naming the
    attribute that stops it, its type, and what to do."""
    try:
        return copy.deepcopy(model)
    except Exception as exc:
        where = _uncopyable(model)
        raise SaliencyError(
            f"parameter randomization works on a deep copy of the model (the user's model is "
            f"never re-initialised), but {type(model).__name__} cannot be deep-copied: "
            f"{where or f'{type(exc).__name__}: {exc}'}. Keep such objects (locks, open files, "
            "sessions, loggers) outside the module, or give the module a __deepcopy__ that "
            "skips them"
        ) from exc


def _uncopyable(model: nn.Module) -> str | None:
    """'module NAME attribute ATTR (TYPE)' for the first attribute deepcopy refuses."""
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr in ("_parameters", "_buffers", "_modules"):
                continue
            try:
                copy.deepcopy(value)
            except Exception:
                owner = f"module {name!r}" if name else f"the model ({type(model).__name__})"
                return f"{owner} holds attribute {attr!r} of type {type(value).__qualname__}"
    return None


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """The torch (CPU and initialised CUDA devices), numpy and Python RNG states are as they
    were after the block, whatever the user's model draws in its forward."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(np_state)
        random.setstate(py_state)
