"""What one rule-set pass saw, for the op accounting to judge before the backward.

- **labels**: the op (as the forward called it) and the running module of each autograd node,
  so an error names them;
- **cut values**: tensors computed from a differentiable tensor without its gradient (``x > 0``,
  ``x.detach()``, ``.data``, an integer cast, anything computed under ``no_grad``, and what is
  computed from those), with where they came from. A product of the signal with such a value
  is a gate that autograd treats as a constant: refused if the value came from the signal;
- **hidden operands**: weights and statistics that a rule treats as constants outside the
  graph (LRP layer rules); refused if computed from the signal;
- values read out of the signal (``.item()``, ``.tolist()``, ``.numpy()``) are refused at once:
  what the forward does with them is invisible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..errors import UnsupportedActivationError
from .accounting import Finding, account, op_label, raise_findings, signal_nodes

WORKING_METHODS = (
    "The methods that need only autograd work on any differentiable model: gradient, "
    "input_x_gradient, integrated_gradients and smoothgrad; gradcam, gradcam++ and fullgrad "
    "also run on it when it has an eager layer with a spatial output."
)
ADVICE = (
    "Write the op as one the rules know (nn.ReLU for a ReLU, nn.Conv*/nn.Linear for a layer), "
    f"or use another method. {WORKING_METHODS} See the README section 'What the engine "
    "refuses, and why'."
)

_MULTIPLY = frozenset(
    {
        torch.mul, torch.multiply, torch.Tensor.mul, torch.Tensor.multiply,
        torch.Tensor.__mul__, torch.Tensor.__rmul__,
    }
)  # fmt: skip
_MULTIPLY_INPLACE = frozenset({torch.Tensor.mul_, torch.Tensor.__imul__, torch.Tensor.multiply_})

# Ops whose result does not depend on the values of their tensor arguments (only on shapes,
# dtypes and devices): no cut value comes out of them.
_VALUE_FREE = frozenset(
    {
        torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
        torch.randn_like, torch.randint_like, torch.Tensor.new_zeros, torch.Tensor.new_ones,
        torch.Tensor.new_empty, torch.Tensor.new_full, torch.broadcast_tensors,
    }
)  # fmt: skip

# Ops that read the values of their first tensor argument only (the others give a shape, a
# dtype or a device).
_SHAPE_READERS = frozenset(
    {
        torch.Tensor.to, torch.Tensor.type_as, torch.Tensor.expand_as, torch.Tensor.reshape_as,
        torch.Tensor.view_as,
    }
)  # fmt: skip

# Reading values out of torch: what the forward then does with them cannot be seen.
_ESCAPES = frozenset(
    {
        torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__float__,
        torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.__array__,
    }
)  # fmt: skip


def tensors_in(args: tuple, kwargs: dict) -> Iterator[torch.Tensor]:
    """The tensor arguments of a call (one level into lists and tuples)."""
    for value in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, torch.Tensor):
                    yield item


def _is_inplace(func: Callable) -> bool:
    name = getattr(func, "__name__", "")
    return (
        name in ("__setitem__", "__set__")
        or (name.endswith("_") and not name.endswith("__"))
        or (name.startswith("__i") and name.endswith("__"))
    )


def masked_relu(func: Callable, args: tuple, kwargs: dict) -> tuple[torch.Tensor, bool] | None:
    """``(x, in_place)`` when the call is ``x * mask`` (either order; ``x *= mask`` in place)
    with mask exactly ``x > 0``."""
    inplace = func in _MULTIPLY_INPLACE
    if not (inplace or func in _MULTIPLY) or len(args) != 2 or kwargs:
        return None
    pairs = (args,) if inplace else (args, args[::-1])
    for x, mask in pairs:
        if not (isinstance(x, torch.Tensor) and isinstance(mask, torch.Tensor)):
            continue
        if not x.requires_grad or mask.requires_grad or mask.shape != x.shape:
            continue
        if mask.dtype not in (torch.bool, x.dtype) or not x.is_floating_point():
            continue
        for positive in (torch.gt(x, 0), torch.ge(x, 0)):
            if torch.equal(mask, positive.to(mask.dtype)):
                return x, inplace
    return None


class Trace:
    """The record of one rule-set pass over ``model`` from the leaf tensor ``inputs``.

    Module names come from pre/post hooks on the model's modules (a stack), appended to
    ``handles`` so that the pass removes them.
    """

    def __init__(self, method: str, model: nn.Module, inputs: torch.Tensor, allowed, handles):
        self.method, self.inputs, self.allowed = method, inputs, allowed
        self.labels: dict[object, tuple[str, str | None]] = {}
        self.stack: list[str] = []
        self.vouched: set[object] = set()
        # Cut values by id, each kept alive for the pass (ids stay unique), with whether it
        # was computed from the signal (else from parameters or constants only); the nodes of
        # ops that read one cut from the signal together with the signal.
        self.cut: dict[int, tuple[torch.Tensor, bool]] = {}
        self.gates: set[object] = set()
        self.hidden: list[tuple[str, str | None, torch.Tensor]] = []
        self._signal: dict[object, bool] = {}
        for name, module in model.named_modules():
            label = name or type(model).__name__
            handles.append(module.register_forward_pre_hook(self._enter(label)))
            handles.append(module.register_forward_hook(self._leave, always_call=True))

    def _enter(self, name: str):
        def hook(module, args):
            self.stack.append(name)

        return hook

    def _leave(self, module, args, output):
        if self.stack:
            self.stack.pop()

    @property
    def module(self) -> str | None:
        return self.stack[-1] if self.stack else None

    def from_signal(self, origin: object) -> bool:
        """Whether a tensor (or an autograd node) was computed from the pass's inputs."""
        if isinstance(origin, torch.Tensor):
            if origin is self.inputs:
                return True
            entry = self.cut.get(id(origin))
            if entry is not None:
                return entry[1]
            origin = origin.grad_fn
            if origin is None:
                return False
        known = self._signal.get(origin)
        if known is None:
            known = self._signal[origin] = any(True for _ in signal_nodes(origin, (self.inputs,)))
        return known

    # --- during the forward ------------------------------------------------------------------

    def _read(self, func: Callable, args: tuple, inputs: list[torch.Tensor]) -> list:
        """The tensor arguments whose values ``func`` reads."""
        if func in _VALUE_FREE:
            return []
        if func in _SHAPE_READERS:  # ``a.to(b)``, ``a.expand_as(b)``: b gives only a shape
            return [args[0]] if args and isinstance(args[0], torch.Tensor) else []
        return inputs

    def gated(self, func: Callable, args: tuple, inputs: list[torch.Tensor]) -> bool:
        """An op reading a value cut from the signal (a mask, a detached gate)."""
        if not self.cut:
            return False
        return any(self.cut.get(id(t), (None, False))[1] for t in self._read(func, args, inputs))

    def check_escape(self, func: Callable, inputs: list[torch.Tensor]) -> None:
        if func in _ESCAPES and inputs and self.from_signal(inputs[0]):
            raise UnsupportedActivationError(
                f"method {self.method!r} cannot vouch for its map: the model reads values of "
                f"the signal out of torch ({op_label(func)}"
                + (f" in module {self.module!r}" if self.module else "")
                + "), so what it does with them (a scale, a mask, a branch) is invisible to "
                "the rules. Keep the forward in tensor ops. " + ADVICE
            )

    def hidden_operands(self, func: Callable, inputs: list[torch.Tensor]) -> None:
        """Operands after the first that a rule will treat as constants."""
        for t in inputs[1:]:
            if (t.requires_grad and not isinstance(t, nn.Parameter)) or id(t) in self.cut:
                self.hidden.append((op_label(func), self.module, t))

    def after(self, func, args, inputs, needs_grad, result, gated: bool) -> None:
        """Track cut values through this call (see the module docstring). ``needs_grad`` holds
        the origin (autograd node, or the tensor for a leaf) of each differentiable input,
        read before the call; ``gated`` says the call read a value cut from the signal."""
        if not self.cut and (
            not needs_grad or (isinstance(result, torch.Tensor) and result.requires_grad)
        ):
            return  # the common case: nothing cut so far, and nothing cut here
        read = self._read(func, args, inputs)
        cut_in = [self.cut[id(t)][1] for t in read if id(t) in self.cut]
        if func in _SHAPE_READERS:
            needs_grad = [t.grad_fn or t for t in read if t.requires_grad]
        cutting = bool(needs_grad) and func not in _VALUE_FREE
        if not (cutting or cut_in):
            return
        outputs = [result] if isinstance(result, torch.Tensor) else list(tensors_in((result,), {}))
        if args and isinstance(args[0], torch.Tensor) and _is_inplace(func):
            outputs.append(args[0])  # written in place, and so is the tensor it views
            if args[0]._base is not None:
                outputs.append(args[0]._base)
        flag: bool | None = None  # from the signal? worked out when first needed
        for out in outputs:
            if out.requires_grad:
                if gated and out.grad_fn is not None:
                    self.gates.add(out.grad_fn)
                if cut_in and not any(self.from_signal(o) for o in needs_grad):
                    # Differentiable only through parameters, its values cut from elsewhere:
                    # ``(x > 0) * self.weight`` is a cut value too.
                    self.cut[id(out)] = (out, any(cut_in))
            else:
                if flag is None:
                    flag = any(cut_in) or (cutting and any(self.from_signal(o) for o in needs_grad))
                self.cut[id(out)] = (out, flag)

    def vouch_view(self, result: torch.Tensor) -> None:
        """A rule function ran in place on a view: its base's new node (autograd's
        ``CopySlices``, which wraps the rule's node) is the rule's own."""
        base = result._base
        if base is not None and base.grad_fn is not None:
            self.vouched.add(base.grad_fn)

    def record(self, func: Callable, result: object) -> None:
        """Label the autograd node(s) of ``result`` with the op and the running module."""
        if isinstance(result, torch.Tensor):
            node = result.grad_fn
            if node is not None and node not in self.labels:
                self.labels[node] = (op_label(func), self.module)
            base = result._base
            if base is not None and base.grad_fn is not None and base.grad_fn not in self.labels:
                # An in-place op on a view: the base's node (CopySlices) is this op.
                self.labels[base.grad_fn] = self.labels.get(node) or (op_label(func), None)
        elif isinstance(result, (tuple, list)):
            for item in result:
                if isinstance(item, torch.Tensor):
                    self.record(func, item)

    # --- before the backward -----------------------------------------------------------------

    def account(self, output: torch.Tensor) -> None:
        """Raise unless every op between the inputs and ``output`` is accounted for."""
        findings = []
        for op, module, t in self.hidden:
            if self.from_signal(t):
                findings.append(
                    Finding(
                        type(t.grad_fn).__name__ if t.grad_fn is not None else "(cut value)",
                        "a weight, bias or statistic computed from the signal, which the "
                        "layer's rule treats as a constant",
                        op,
                        module,
                    )
                )
        if output.grad_fn is not None:
            findings += account(
                output.grad_fn, (self.inputs,), self.allowed, self.labels, self.vouched, self.gates
            )
        raise_findings(findings, self.method, ADVICE)
