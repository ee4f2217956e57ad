"""Device names: the one parser and resolver the options, the ini keys and the suites share."""

from __future__ import annotations

import re
from typing import Any

from .errors import SaliencyError

PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
CHOICES = "auto, cpu, cuda, cuda:N or mps"


def valid(name: object) -> bool:
    return isinstance(name, str) and PATTERN.fullmatch(name) is not None


def resolve_device(name: str, *, worker: int | None = None) -> Any:
    """The torch device ``name`` means here: ``auto`` is CUDA when available (xdist worker
    ``gwN`` on ``cuda:N % devices``, so the workers spread over the GPUs), else the CPU.
    A device this machine does not have is a SaliencyError saying what it has (no audit
    starts, rather than one traceback per item); its message starts with ``'name':``, for
    the caller to say where the name came from."""
    import torch

    if not valid(name):
        raise SaliencyError(f"{name!r}: expected {CHOICES}")
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        if worker is None:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cuda", worker % torch.cuda.device_count())  # workers spread
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SaliencyError(
                f"{name!r}: CUDA is not available on this machine (torch "
                f"{torch.__version__}); use cpu or auto"
            )
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= count:
            raise SaliencyError(
                f"{name!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
        return torch.device("cuda", index)  # an index, so it equals the tensors' devices
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            why = "this torch was not built with MPS" if mps is None or not mps.is_built() else (
                "no MPS device here (MPS is Apple silicon's GPU)")  # fmt: skip
            raise SaliencyError(f"{name!r}: {why}; use cpu or auto")
    return device
