"""Rule sets: how gradient flows back through activations (and, for LRP, through layers).

A rule set is installed for one forward pass. Activations are intercepted wherever they are:
``nn.ReLU`` modules (in-place or not, reused or not) call ``F.relu``, and functional calls
(``torch.relu``, ``F.relu``, ``Tensor.relu`` and their in-place forms) are caught by a
torch-function mode, so a model written either way gets the same map. An activation the rule
does not know raises :class:`UnsupportedActivationError` instead of silently falling back to the
plain gradient.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import UnsupportedActivationError
from .accounting import LINEAR, rule_function
from .state import removable_hooks
from .trace import WORKING_METHODS, Trace, masked_relu, tensors_in


class ActivationRule:
    """How the gradient passes back through a ReLU: ``grad_in = backward(grad_out, out)``.

    ``out`` is the ReLU's output (so ``out > 0`` is exactly where its input was positive).
    """

    name = "relu"

    def backward(self, grad_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # autograd's own ReLU backward: grad_out where out > 0, else 0, in one kernel.
        return torch.ops.aten.threshold_backward(grad_out, out, 0)


@rule_function
class _RuleReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rule):
        out = x.clamp(min=0)
        ctx.save_for_backward(out)
        ctx.rule = rule
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (out,) = ctx.saved_tensors
        return ctx.rule.backward(grad_out, out), None


@rule_function
class _RuleReLUInplace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rule):
        x.clamp_(min=0)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        ctx.rule = rule
        return x

    @staticmethod
    def backward(ctx, grad_out):
        (out,) = ctx.saved_tensors
        return ctx.rule.backward(grad_out, out), None


def _relu_with_rule(rule: ActivationRule, x: torch.Tensor, inplace: bool) -> torch.Tensor:
    if not x.requires_grad:
        # No gradient flows here, so no rule applies; keep the op's in-place side effect.
        return x.clamp_(min=0) if inplace else x.clamp(min=0)
    if inplace and x.requires_grad and not x.is_leaf:
        return _RuleReLUInplace.apply(x, rule)
    return _RuleReLU.apply(x, rule)


# Functions that compute a ReLU, and whether they work in place.
_RELU_FUNCTIONS: dict[Callable, bool] = {
    F.relu: False,  # its own ``inplace`` keyword is read at call time
    torch.relu: False,
    torch.Tensor.relu: False,
    torch.relu_: True,
    torch.Tensor.relu_: True,
}


def _is_zero(value: object, x: torch.Tensor) -> bool:
    """``value`` is a constant zero that broadcasts to ``x`` without changing its shape/dtype."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return value == 0
    if not isinstance(value, torch.Tensor) or value.requires_grad or value.dtype != x.dtype:
        return False
    try:
        if torch.broadcast_shapes(value.shape, x.shape) != x.shape:
            return False
    except RuntimeError:
        return False
    return value.numel() > 0 and not bool(value.any())


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: object = None) -> object:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _clamp(args, kwargs):
    x = _arg(args, kwargs, 0, "input")
    if _is_zero(_arg(args, kwargs, 1, "min"), x) and _arg(args, kwargs, 2, "max") is None:
        return x
    return None


def _clamp_min(args, kwargs):
    x = _arg(args, kwargs, 0, "input")
    return x if _is_zero(_arg(args, kwargs, 1, "min"), x) else None


def _threshold(args, kwargs):
    x = _arg(args, kwargs, 0, "input")
    threshold, value = _arg(args, kwargs, 1, "threshold"), _arg(args, kwargs, 2, "value")
    return x if _is_zero(threshold, x) and _is_zero(value, x) else None


def _leaky(args, kwargs):
    x = _arg(args, kwargs, 0, "input")
    return x if _is_zero(_arg(args, kwargs, 1, "negative_slope", 0.01), x) else None


def _maximum(args, kwargs):
    a, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "other")
    for x, other in ((a, b), (b, a)):
        if isinstance(x, torch.Tensor) and isinstance(other, torch.Tensor) and _is_zero(other, x):
            return x
    return None


def _where(args, kwargs):
    cond = _arg(args, kwargs, 0, "condition")
    a, b = _arg(args, kwargs, 1, "input"), _arg(args, kwargs, 2, "other")
    if not isinstance(cond, torch.Tensor) or cond.dtype != torch.bool:
        return None
    # where(x > 0, x, 0) or where(x <= 0, 0, x), checked on the values: exactly a ReLU.
    for x, zero, keep in ((a, b, (torch.gt, torch.ge)), (b, a, (torch.le, torch.lt))):
        if isinstance(x, torch.Tensor) and cond.shape == x.shape and _is_zero(zero, x):
            if any(torch.equal(cond, op(x, 0)) for op in keep):
                return x
    return None


def _tensor_where(args, kwargs):  # self.where(condition, other)
    x, cond = _arg(args, kwargs, 0, "self"), _arg(args, kwargs, 1, "condition")
    return _where((cond, x, _arg(args, kwargs, 2, "other")), {})


# Other spellings of a ReLU: ``func -> (recognise(args, kwargs) -> x or None, in place)``. A
# call is a ReLU only when it is exactly one (``clamp(min=0)``, ``threshold(0, 0)``, a maximum
# with a zero constant, ``where(x > 0, x, 0)``); any other call of these runs as written, and
# the op accounting then judges it.
_RELU_SPELLINGS: dict[Callable, tuple[Callable, bool]] = {
    torch.clamp: (_clamp, False),
    torch.Tensor.clamp: (_clamp, False),
    torch.clip: (_clamp, False),
    torch.Tensor.clip: (_clamp, False),
    torch.clamp_: (_clamp, True),
    torch.Tensor.clamp_: (_clamp, True),
    torch.Tensor.clip_: (_clamp, True),
    torch.clamp_min: (_clamp_min, False),
    torch.Tensor.clamp_min: (_clamp_min, False),
    torch.clamp_min_: (_clamp_min, True),
    torch.Tensor.clamp_min_: (_clamp_min, True),
    F.threshold: (_threshold, False),  # its ``inplace`` keyword is read at call time
    torch.threshold: (_threshold, False),
    F.threshold_: (_threshold, True),
    torch.threshold_: (_threshold, True),
    F.leaky_relu: (_leaky, False),
    torch.maximum: (_maximum, False),
    torch.Tensor.maximum: (_maximum, False),
    torch.max: (_maximum, False),
    torch.Tensor.max: (_maximum, False),
    torch.where: (_where, False),
    torch.Tensor.where: (_tensor_where, False),
}
_INPLACE_ARG = {F.threshold: 3, F.leaky_relu: 2}


def _as_relu(func: Callable, args: tuple, kwargs: dict) -> tuple[torch.Tensor, bool] | None:
    """``(x, in_place)`` when this call of ``func`` computes exactly ``relu(x)``."""
    if func in _RELU_FUNCTIONS:
        inplace = _RELU_FUNCTIONS[func] or bool(kwargs.get("inplace", False))
        if func is F.relu and len(args) > 1:
            inplace = bool(args[1])
        return (args[0] if args else kwargs["input"]), inplace
    recognise, inplace = _RELU_SPELLINGS[func]
    try:
        x = recognise(args, kwargs)
    except Exception:  # a call these ops reject: it runs as written and fails there
        return None
    if not isinstance(x, torch.Tensor) or not x.requires_grad or not x.is_floating_point():
        return None  # not a ReLU, or no gradient flows here: the call runs as written
    position = _INPLACE_ARG.get(func)
    if position is not None:
        inplace = bool(_arg(args, kwargs, position, "inplace", False))
    return x, inplace


# Nonlinearities a ReLU rule does not cover: meeting one is an error, not a silent plain gradient.
_OTHER_ACTIVATIONS: dict[Callable, str] = {
    F.gelu: "F.gelu",
    F.silu: "F.silu",
    F.elu: "F.elu",
    F.selu: "F.selu",
    F.celu: "F.celu",
    F.leaky_relu: "F.leaky_relu",
    F.relu6: "F.relu6",
    F.hardtanh: "F.hardtanh",
    F.softplus: "F.softplus",
    F.mish: "F.mish",
    F.hardswish: "F.hardswish",
    F.hardsigmoid: "F.hardsigmoid",
    F.prelu: "F.prelu",
    F.rrelu: "F.rrelu",
    F.glu: "F.glu",
    F.logsigmoid: "F.logsigmoid",
    F.softsign: "F.softsign",
    F.tanhshrink: "F.tanhshrink",
    torch.sigmoid: "torch.sigmoid",
    torch.Tensor.sigmoid: "Tensor.sigmoid",
    torch.tanh: "torch.tanh",
    torch.Tensor.tanh: "Tensor.tanh",
}
for _name in ("elu_", "leaky_relu_", "rrelu_", "hardtanh_", "celu_", "selu_"):
    if hasattr(F, _name):
        _OTHER_ACTIVATIONS[getattr(F, _name)] = f"F.{_name}"
for _fn, _label in (
    (getattr(torch.Tensor, "sigmoid_", None), "Tensor.sigmoid_"),
    (getattr(torch.Tensor, "tanh_", None), "Tensor.tanh_"),
    (getattr(torch, "sigmoid_", None), "torch.sigmoid_"),
    (getattr(torch, "tanh_", None), "torch.tanh_"),
):
    if _fn is not None:
        _OTHER_ACTIVATIONS[_fn] = _label

_OTHER_ACTIVATION_MODULES = (
    nn.GELU, nn.SiLU, nn.ELU, nn.SELU, nn.CELU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh, nn.Softplus,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.PReLU, nn.RReLU, nn.GLU, nn.LogSigmoid,
    nn.Softsign, nn.Tanhshrink, nn.Sigmoid, nn.Tanh,
)  # fmt: skip

Handler = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class RuleSet:
    """Everything that changes the backward pass of one method.

    ``activation``: None keeps autograd's own gradient everywhere (plain methods).
    ``functions``: extra functional overrides for the forward (e.g. LRP's residual sums), a map
    from a torch function to ``handler(func, args, kwargs) -> Tensor``.
    ``install``: installs module hooks for the pass, ``install(model, handles, trace)`` (the
    pass's :class:`Trace`, to ask which tensors come from the inputs); every handle
    appended is removed when the pass ends.
    ``watch``: called as ``watch(func, args, kwargs)`` before every torch function of the
    forward pass runs (e.g. to act on a tensor before an op can change it in place).
    ``allowed``: the autograd ops (see :mod:`.accounting`) whose plain gradient these rules
    leave correct; every other op on the signal path must be handled by the rules, or the pass
    raises before its backward.
    ``hides``: handled functions whose tensor operands after the first (weights, biases,
    statistics) the rules treat as constants, outside the autograd graph; the pass raises if
    one of them was computed from the signal.
    ``others``: what elementwise activations other than ReLU get: ``"raise"`` (an error),
    ``"gradient"`` (their plain gradient, and products of two signal tensors too: the
    caller's ``allowed`` must say so) or ``"pass"`` (LRP's Pass: relevance through unchanged;
    the outputs of sigmoid-like gates are marked so the rules can treat them as constants).
    """

    name: str
    activation: ActivationRule | None = None
    functions: Mapping[Callable, Handler] = field(default_factory=dict)
    install: Callable[[nn.Module, list, Trace], None] | None = None
    watch: Callable[[Callable, tuple, dict], None] | None = None
    allowed: frozenset[str] = LINEAR
    hides: frozenset[Callable] = frozenset()
    others: str = "raise"

    @property
    def is_plain(self) -> bool:
        return (
            self.activation is None
            and not self.functions
            and self.install is None
            and self.watch is None
        )

    @contextlib.contextmanager
    def applied(
        self, model: nn.Module, method: str, inputs: torch.Tensor
    ) -> Iterator[Trace | None]:
        """Install the rules for the forward pass inside the block; uninstall on exit.

        Yields None for plain autograd, else the pass's :class:`Trace`, whose
        :meth:`Trace.account` must be called on the output before the backward.
        """
        if self.is_plain:
            yield None
            return
        with removable_hooks() as handles:
            if self.activation is not None and self.others == "raise":
                _reject_unknown_activation_modules(model, method)
            trace = Trace(method, model, inputs, self.allowed, handles)
            if self.install is not None:
                self.install(model, handles, trace)
            with _RuleMode(self, method, trace):
                yield trace


OTHER_ACTIVATIONS_ADVICE = (
    "With other_activations='gradient' the plain gradient passes through such activations and "
    "through multiplicative gates (as captum does silently), and the method id says so."
)


def _reject_unknown_activation_modules(model: nn.Module, method: str) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.LeakyReLU) and module.negative_slope == 0:
            continue  # exactly a ReLU (its F.leaky_relu call gets the ReLU rule)
        if isinstance(module, _OTHER_ACTIVATION_MODULES):
            raise UnsupportedActivationError(
                f"method {method!r} has rules for ReLU activations only, but module {name!r} "
                f"is {type(module).__name__}; its rule cannot be applied faithfully there. "
                f"{OTHER_ACTIVATIONS_ADVICE} {WORKING_METHODS}"
            )


# Activations whose output is a gate in [0, 1] when it multiplies another signal tensor.
_GATE_FUNCTIONS = frozenset(
    f for f in (torch.sigmoid, torch.Tensor.sigmoid, F.hardsigmoid,
                getattr(torch.Tensor, "sigmoid_", None), getattr(torch, "sigmoid_", None))
    if f is not None
)  # fmt: skip
GATE_MARK = "_saliency_gate"


@rule_function
class _PassActivation(torch.autograd.Function):
    """An elementwise activation whose backward passes relevance unchanged (zennit's Pass)."""

    @staticmethod
    def forward(ctx, x, compute, inplace):
        out = compute()
        if inplace:
            ctx.mark_dirty(x)
        return out

    @staticmethod
    def backward(ctx, r):
        return r, None, None


@functools.cache
def _inplace_position(func) -> int | None:
    try:
        names = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("inplace") if "inplace" in names else None


def _inplace_flag(func, args, kwargs) -> bool:
    position = _inplace_position(func)
    if position is None:
        return False
    return bool(args[position]) if len(args) > position else bool(kwargs.get("inplace", False))


def _pass_activation(func, args, kwargs) -> torch.Tensor | None:
    """``func(*args, **kwargs)`` with Pass as its backward, or None when the call is not an
    elementwise activation of one signal tensor (it then runs as written and is judged)."""
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor) or not x.requires_grad or not x.is_floating_point():
        return None
    if func is F.glu:
        return None  # halves the channels: not elementwise
    inplace = _OTHER_ACTIVATIONS[func].endswith("_") or _inplace_flag(func, args, kwargs)
    result = _PassActivation.apply(x, lambda: func(*args, **kwargs), inplace and not x.is_leaf)
    if func in _GATE_FUNCTIONS:
        setattr(result, GATE_MARK, True)
    return result


class _RuleMode(TorchFunctionMode):
    def __init__(self, rules: RuleSet, method: str, trace: Trace):
        super().__init__()
        self.rules = rules
        self.method = method
        self.trace = trace

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.rules.watch is not None:
            self.rules.watch(func, args, kwargs)
        trace = self.trace
        inputs = list(tensors_in(args, kwargs))
        # Where each differentiable input came from, read before the call (detach_ and other
        # in-place ops change it).
        needs_grad = [t.grad_fn or t for t in inputs if t.requires_grad]
        trace.check_escape(func, inputs)
        gated = trace.gated(func, args, inputs)
        activation = self.rules.activation
        if gated and activation is not None:
            relu = masked_relu(func, args, kwargs)  # x * (x > 0): exactly a ReLU
            if relu is not None:
                return _relu_with_rule(activation, *relu)
        handler = None if gated else self.rules.functions.get(func)
        if handler is not None:
            if func in self.rules.hides:
                trace.hidden_operands(func, inputs)
            try:
                result = handler(func, args, kwargs)
            except UnsupportedActivationError as error:
                if trace.module is None or "in module" in str(error):
                    raise
                # A rule's refusal names the op; this says where the model called it.
                raise UnsupportedActivationError(
                    f"{error} (called in module {trace.module!r})"
                ) from error.__cause__
            trace.record(func, result)
            trace.after(func, args, inputs, needs_grad, result, False)
            return result
        if activation is not None:
            if func in _RELU_FUNCTIONS or func in _RELU_SPELLINGS:
                relu = _as_relu(func, args, kwargs)
                if relu is not None:
                    result = _relu_with_rule(activation, *relu)
                    trace.vouch_view(result)
                    return result
            if func in _OTHER_ACTIVATIONS and self.rules.others == "pass":
                result = _pass_activation(func, args, kwargs)
                if result is not None:
                    trace.vouch_view(result)
                    return result
            elif func in _OTHER_ACTIVATIONS and self.rules.others == "raise":
                where = f" in module {trace.module!r}" if trace.module else ""
                raise UnsupportedActivationError(
                    f"method {self.method!r} has rules for ReLU activations only, but the model "
                    f"calls {_OTHER_ACTIVATIONS[func]}{where}; its rule cannot be applied "
                    f"faithfully there. {OTHER_ACTIVATIONS_ADVICE} {WORKING_METHODS}"
                )
        result = func(*args, **kwargs)
        trace.record(func, result)
        trace.after(func, args, inputs, needs_grad, result, gated)
        return result
