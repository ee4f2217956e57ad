"""Canonical forms for LRP, built during the forward pass instead of by editing the model.

LRP rules are defined on affine layers followed by activations. A BatchNorm in eval mode that
directly consumes a Conv/Linear output is itself affine, so the pair is treated as one layer
with folded weights (what zennit's ``SequentialMergeBatchNorm`` does by overwriting the model's
parameters; here the folded weights are computed on the side and the model is never touched).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch


def fold_batch_norm(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``batch_norm(layer(x))`` as one affine layer (eval-mode statistics).

    ``weight`` has its output channels on axis 0 (Conv and Linear layouts).
    """
    scale = (running_var + eps).rsqrt()
    if gamma is not None:
        scale = scale * gamma
    shift = -running_mean if bias is None else bias - running_mean
    folded_bias = shift * scale
    if beta is not None:
        folded_bias = folded_bias + beta
    folded_weight = weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1))
    return folded_weight, folded_bias


@dataclass
class Produced:
    """A tensor made by one layer call: the layer's input and its description (``op``)."""

    output: weakref.ref
    output_version: int
    input: torch.Tensor
    input_version: int
    op: Any


class Producers:
    """Which layer call made which tensor, for the length of one pass.

    A later op asks :meth:`source` whether its input is, unchanged, the output of a recorded
    layer: same tensor object and no in-place change to it or to the layer's input since. The
    table sits in a hook-handle list, so ``remove()`` (called when the pass ends) empties it.
    """

    def __init__(self) -> None:
        self._table: dict[int, Produced] = {}

    def add(self, output: torch.Tensor, layer_input: torch.Tensor, op: Any) -> None:
        self._table[id(output)] = Produced(
            weakref.ref(output), output._version, layer_input, layer_input._version, op
        )

    def source(self, tensor: torch.Tensor) -> Produced | None:
        entry = self._table.get(id(tensor))
        if entry is None or entry.output() is not tensor:
            return None  # unknown, or a new tensor reusing a freed one's id
        if tensor._version != entry.output_version:
            return None
        if entry.input._version != entry.input_version:
            return None
        return entry

    def remove(self) -> None:
        self._table.clear()
