"""Op accounting: every op on the signal path of a rule-set pass is vouched for, or it raises.

A rule set (guided backprop, deconvnet, RectGrad, the LRP rules) replaces the backward of some
ops and relies on autograd's own backward for the rest. That is only right for ops whose plain
gradient the rule leaves correct. After the forward pass and before the backward, the autograd
graph between the explained output and the inputs is walked, and every node on it must be:

- a node of one of the engine's own rule functions (the op was handled by the rule set), or
- on the rule set's allow-list of plain ops (:data:`ROUTING` for LRP, :data:`LINEAR` for the
  ReLU-rule methods), with the signal entering it the way that keeps it correct (a product
  with one signal operand is linear; with two, it is a gate, and not allowed);

anything else raises :class:`~pytest_saliency.errors.UnsupportedActivationError`. The walk sees
what backward will really run, however the forward was written: ops inside TorchScript
functions, custom ``autograd.Function``s, compiled regions and C++ extensions included. Nodes
off the signal path (computations on parameters or constants alone) are not judged.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from ..errors import UnsupportedActivationError

# The engine's own autograd functions (registered by the modules that define them).
RULE_FUNCTIONS: set[type] = set()


def rule_function(cls: type) -> type:
    """Class decorator: mark an ``autograd.Function`` as one of the engine's rule functions."""
    RULE_FUNCTIONS.add(cls)
    return cls


# Backward nodes whose gradient only moves, copies, selects or sums copies of values: correct
# under every rule set, LRP included (relevance is routed, not rescaled). Names are autograd's
# node class names without the ``Backward<n>`` suffix.
ROUTING = frozenset(
    {
        "View", "UnsafeView", "Reshape", "ReshapeAlias", "Permute", "Transpose", "T",
        "Squeeze", "Unsqueeze", "Expand", "Cat", "Stack", "Split", "SplitWithSizes",
        "Unbind", "Select", "Slice", "Index", "IndexSelect", "Gather", "Clone", "ToCopy",
        "Alias", "Flip", "Roll", "ConstantPadNd", "ReflectionPad1D", "ReflectionPad2D",
        "ReflectionPad3D", "ReplicationPad1D", "ReplicationPad2D", "ReplicationPad3D",
        "MaxPool2DWithIndices", "MaxPool3DWithIndices", "AdaptiveMaxPool2D",
        "AdaptiveMaxPool3D", "PixelShuffle", "PixelUnshuffle", "ChannelShuffle", "Repeat",
        "Narrow", "Diagonal", "Unfold", "Im2Col", "AsStrided", "Max", "Min", "Movedim",
        "ExpandAs",
    }
)  # fmt: skip

# Linear maps of the signal: their plain gradient is exact, so a rule that changes only the
# ReLUs' backward (guided backprop, deconvnet, RectGrad) leaves them correct. Not under LRP,
# where a plain gradient through a linear map rescales relevance instead of redistributing it.
LINEAR = ROUTING | frozenset(
    {
        "Add", "Sub", "Rsub", "Neg", "Sum", "Mean", "Convolution", "Addmm", "Mm", "Bmm", "Mv",
        "Addmv", "Baddbmm", "Addbmm", "Dot", "Mul", "Div", "AvgPool2D", "AvgPool3D",
        "AdaptiveAvgPool2D", "AdaptiveAvgPool3D", "UpsampleNearest1D", "UpsampleNearest2D",
        "UpsampleNearest3D", "UpsampleNearestExact1D", "UpsampleNearestExact2D",
        "UpsampleNearestExact3D", "UpsampleLinear1D", "UpsampleBilinear2D",
        "UpsampleBicubic2D", "UpsampleTrilinear3D", "Cumsum", "Col2Im", "NativeBatchNorm",
        "CudnnBatchNorm", "MiopenBatchNorm", "GridSampler2D", "Trace",
    }
)  # fmt: skip

# Elementwise activations other than ReLU: their plain gradient is what a rule set that lets
# "the gradient through other activations" (``other_activations="gradient"``) means.
ELEMENTWISE = frozenset(
    {
        "Gelu", "Silu", "Sigmoid", "Tanh", "Hardswish", "Hardsigmoid", "Elu", "Celu",
        "LeakyRelu", "Softplus", "Mish", "Hardtanh", "LogSigmoid", "PreluKernel",
        "RreluWithNoise", "Glu", "Softshrink", "Hardshrink", "Threshold",
    }
)  # fmt: skip
# In an allow-list: products of the signal with a gate of it (x * sigmoid(g(x)), SwiGLU's
# x * silu(g)) keep their plain gradient too; other products of two signals (x * x) do not.
GATES = "<gates>"

# Products: linear only while the signal enters through at most one of these operand
# positions (a second one makes it a gate or an attention product). Division is linear in its
# numerator only.
_PRODUCT_OPERANDS: dict[str, tuple[int, ...]] = {
    "Mul": (0, 1), "Div": (0, 1), "Mm": (0, 1), "Bmm": (0, 1), "Mv": (0, 1), "Dot": (0, 1),
    "Addmm": (1, 2), "Addmv": (1, 2), "Baddbmm": (1, 2), "Addbmm": (1, 2),
    "Convolution": (0, 1), "GridSampler2D": (0, 1),
}  # fmt: skip
_NUMERATOR_ONLY = frozenset({"Div", "GridSampler2D"})
_BATCH_NORMS = frozenset({"NativeBatchNorm", "CudnnBatchNorm", "MiopenBatchNorm"})
# Under LRP a plain sum or difference is a shift by a constant only with one signal operand,
# and for a difference only as its first operand (``x - c``; ``c - x`` flips the sign).
_SHIFTS = frozenset({"Add", "Sub"})

_SUFFIX = re.compile(r"Backward\d*$")


def node_kind(node: object) -> str:
    """Autograd's node class name without its ``Backward<n>`` suffix (``MulBackward0`` -> Mul)."""
    return _SUFFIX.sub("", type(node).__name__)


@dataclass(frozen=True)
class Finding:
    """One op on the signal path that the rule set cannot vouch for."""

    node: str  # autograd's name for it, e.g. "MulBackward0"
    why: str  # what about it is not allowed
    op: str | None  # the op as the forward called it, when the rule mode saw it
    module: str | None  # where it ran


def _is_input(node: object, sinks: tuple[torch.Tensor, ...]) -> bool:
    variable = getattr(node, "variable", None)
    return variable is not None and any(variable is s for s in sinks)


def signal_nodes(root: object, sinks: tuple[torch.Tensor, ...]):
    """Every node between ``root`` and the leaf tensors ``sinks`` (the signal path), each with
    the flags of which of its inputs carry signal."""
    reaches: dict[object, bool] = {}
    order: list[object] = []
    stack: list[tuple[object, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            reaches[node] = _is_input(node, sinks) or any(
                reaches.get(child, False) for child, _ in node.next_functions if child is not None
            )
            order.append(node)
            continue
        if node in reaches:
            continue
        reaches[node] = False  # in progress (the graph is acyclic; this only marks it seen)
        stack.append((node, True))
        for child, _ in node.next_functions:
            if child is not None and child not in reaches:
                stack.append((child, False))
    for node in order:
        if reaches[node] and getattr(node, "variable", None) is None:
            flags = tuple(
                child is not None and reaches.get(child, False) for child, _ in node.next_functions
            )
            yield node, flags


# Gates: sigmoid-like activations, and the GLU family's SiLU, GELU and tanh (SwiGLU, GEGLU);
# ``relu6(x + 3) / 6`` is a hand-written hard sigmoid (its Hardtanh under a division).
_GATE_KINDS = frozenset({"Sigmoid", "Hardsigmoid", "Silu", "Gelu", "Tanh", "Hardtanh"})
_PASSING = frozenset({"Expand", "View", "UnsafeView", "Reshape", "ReshapeAlias", "Unsqueeze",
                      "Squeeze", "Clone", "ToCopy", "Alias", "Permute", "Transpose", "Repeat",
                      "ExpandAs", "Mul", "Div", "Add", "Sub"})  # fmt: skip


def _gated(node: object, carrying: list[int]) -> bool:
    """A product of two signal tensors in which one of them is a gate: the output of a gating
    activation, possibly reshaped, broadcast, shifted or scaled by constants on the way (only
    the first operand of those is followed, so ``x * h`` with two signals is not a gate)."""
    for i in carrying:
        child = node.next_functions[i][0]
        for _ in range(8):
            if child is None:
                break
            kind = node_kind(child)
            if kind in _GATE_KINDS:
                return True
            if kind not in _PASSING or not child.next_functions:
                break
            child = child.next_functions[0][0]
    return False


def judge(node: object, flags: tuple[bool, ...], allowed: frozenset[str]) -> str | None:
    """None when ``node`` is accounted for under a rule set allowing ``allowed``; else why not."""
    forward_cls = getattr(type(node), "_forward_cls", None)
    if forward_cls is not None:
        if forward_cls in RULE_FUNCTIONS:
            return None
        return f"a custom autograd.Function ({forward_cls.__qualname__}) whose backward is unknown"
    kind = node_kind(node)
    if kind in _SHIFTS and kind not in allowed:
        # Under LRP a shift by a constant leaves relevance where it is (as zennit and captum).
        if sum(flags) > 1:
            return "a sum of signal tensors that the rule set did not split"
        if kind == "Sub" and len(flags) > 1 and flags[1]:
            return "a difference with the signal as its second operand"
        return None
    if kind not in allowed:
        if kind == "CopySlices":
            return "an in-place op on a slice or view of the signal (x[...] op= y)"
        operands = _PRODUCT_OPERANDS.get(kind, ())
        if sum(1 for i in operands if i < len(flags) and flags[i]) > 1:
            return "a product of two signal tensors (a gate or an attention product)"
        if kind in LINEAR:
            return "a linear op whose plain gradient does not redistribute relevance"
        return "an op that is neither handled by the rule set nor left correct by it"
    operands = _PRODUCT_OPERANDS.get(kind)
    if operands is not None:
        carrying = [i for i in operands if i < len(flags) and flags[i]]
        gate = kind == "Mul" and GATES in allowed and _gated(node, carrying)
        if len(carrying) > 1 and not gate:
            return "a product of two signal tensors (a gate or an attention product)"
        if kind in _NUMERATOR_ONLY and carrying and carrying[0] != 0:
            return "a division by a signal tensor" if kind == "Div" else "a signal-driven grid"
    if kind in _BATCH_NORMS and getattr(node, "_saved_training", False):
        return (
            "a normalisation by statistics of the signal itself (a BatchNorm without running "
            "statistics, an InstanceNorm): not linear in the signal"
        )
    return None


def account(
    root: object,
    sinks: tuple[torch.Tensor, ...],
    allowed: frozenset[str],
    labels: Mapping[object, tuple[str, str | None]],
    vouched: Iterable[object] = (),
    gates: Iterable[object] = (),
) -> list[Finding]:
    """The ops on the signal path from ``root`` to ``sinks`` that are not accounted for;
    ``vouched`` nodes are the rule set's own (e.g. a rule run in place on a view), ``gates``
    are products of the signal with a value computed from it without its gradient."""
    findings = []
    vouched, gates = set(vouched), set(gates)
    for node, flags in signal_nodes(root, sinks):
        if node in vouched:
            continue
        if node in gates:
            why = (
                "an op reading a mask or gate computed from the signal without its gradient "
                "(x * (x > 1), x * g.detach(), x + (round(x) - x).detach()): a nonlinearity "
                "the rules cannot see"
            )
        else:
            why = judge(node, flags, allowed)
        if why is not None:
            op, module = labels.get(node, (None, None))
            findings.append(Finding(type(node).__name__, why, op, module))
    return findings


def raise_findings(findings: list[Finding], method: str, advice: str) -> None:
    """Raise one error listing what the method cannot vouch for (the first few ops)."""
    if not findings:
        return
    lines = []
    for f in findings[:5]:
        called = f"{f.op} (autograd {f.node})" if f.op else f"autograd {f.node}"
        where = f" in module {f.module!r}" if f.module else ""
        lines.append(f"  - {called}{where}: {f.why}")
    more = f"\n  ... and {len(findings) - 5} more" if len(findings) > 5 else ""
    raise UnsupportedActivationError(
        f"method {method!r} cannot vouch for its map: {len(findings)} op(s) on the path from "
        f"the inputs to the explained output are neither handled by its rules nor ones its "
        f"rules leave correct:\n" + "\n".join(lines) + more + f"\n{advice}"
    )


def op_label(func: Callable) -> str:
    """A torch function as a user would write it: ``torch.erf``, ``F.softmax``, ``Tensor.mul``."""
    name = getattr(func, "__name__", None) or repr(func)
    owner = getattr(func, "__objclass__", None)
    if owner is not None or "Tensor" in getattr(func, "__qualname__", ""):
        return f"Tensor.{name}"
    module = getattr(func, "__module__", None) or ""
    if module.startswith(("torch.nn.functional", "torch._C._nn")):
        return f"F.{name}"
    if module.startswith("torch._C._special"):
        return f"torch.special.{name.removeprefix('special_')}"
    if module.startswith("torch._tensor"):
        return f"Tensor.{name}"
    return f"torch.{name}"
