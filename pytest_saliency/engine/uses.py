"""Where a forward uses each parameter tensor: the first torch call that takes it as an argument."""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .state import eval_mode
from .targets import call_model


class _UseRecorder(TorchFunctionMode):
    def __init__(self, ids: set[int]) -> None:
        super().__init__()
        self.ids = ids
        self.first: dict[int, tuple[int, int]] = {}
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.ids:
            leaves, _ = tree_flatten((args, kwargs))
            for position, leaf in enumerate(leaves):
                key = id(leaf)
                if key in self.ids and key not in self.first:
                    self.first[key] = (self.calls, position)
        self.calls += 1
        return func(*args, **kwargs)


def parameter_uses(model: nn.Module, x: torch.Tensor) -> dict[int, tuple[int, int]]:
    """``id(parameter) -> (call, argument)`` of its first use in a dry forward on one sample."""
    ids = {id(p) for p in model.parameters()}
    recorder = _UseRecorder(ids)
    with eval_mode(model), torch.no_grad(), recorder:
        call_model(model, x[:1])
    return recorder.first
