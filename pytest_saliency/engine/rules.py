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
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import UnsupportedActivationError
from .state import removable_hooks


class ActivationRule:
    """How the gradient passes back through a ReLU: ``grad_in = backward(grad_out, out)``.

    ``out`` is the ReLU's output (so ``out > 0`` is exactly where its input was positive).
    """

    name = "relu"

    def backward(self, grad_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # autograd's own ReLU backward: grad_out where out > 0, else 0, in one kernel.
        return torch.ops.aten.threshold_backward(grad_out, out, 0)


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
    ``install``: installs module hooks for the pass, ``install(model, handles)``; every handle
    appended is removed when the pass ends.
    ``watch``: called as ``watch(func, args, kwargs)`` before every torch function of the
    forward pass runs (e.g. to act on a tensor before an op can change it in place).
    """

    name: str
    activation: ActivationRule | None = None
    functions: Mapping[Callable, Handler] = field(default_factory=dict)
    install: Callable[[nn.Module, list], None] | None = None
    watch: Callable[[Callable, tuple, dict], None] | None = None

    @property
    def is_plain(self) -> bool:
        return (
            self.activation is None
            and not self.functions
            and self.install is None
            and self.watch is None
        )

    @contextlib.contextmanager
    def applied(self, model: nn.Module, method: str) -> Iterator[None]:
        """Install the rules for the forward pass inside the block; uninstall on exit."""
        if self.is_plain:
            yield
            return
        with removable_hooks() as handles:
            if self.activation is not None:
                _reject_unknown_activation_modules(model, method)
            if self.install is not None:
                self.install(model, handles)
            with _RuleMode(self, method, model):
                yield


def _reject_unknown_activation_modules(model: nn.Module, method: str) -> None:
    for name, module in model.named_modules():
        if isinstance(module, _OTHER_ACTIVATION_MODULES):
            raise UnsupportedActivationError(
                f"method {method!r} propagates through ReLUs only, but module {name!r} is "
                f"{type(module).__name__}; its rule cannot be applied faithfully there. Use a "
                "plain-gradient method (gradient, input_x_gradient, integrated_gradients, "
                "smoothgrad, gradcam) or a ReLU model"
            )


def _running_module(model: nn.Module) -> str | None:
    """The name of the innermost module of ``model`` whose code is on the call stack.

    Only an error message needs it, so it is looked up from the Python frames when the error
    is raised instead of tracking every module call with hooks on every pass.
    """
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name or type(model).__name__)
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            return names[id(owner)]
        frame = frame.f_back
    return None


class _RuleMode(TorchFunctionMode):
    def __init__(self, rules: RuleSet, method: str, model: nn.Module):
        super().__init__()
        self.rules = rules
        self.method = method
        self.model = model

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.rules.watch is not None:
            self.rules.watch(func, args, kwargs)
        handler = self.rules.functions.get(func)
        if handler is not None:
            return handler(func, args, kwargs)
        activation = self.rules.activation
        if activation is not None:
            if func in _RELU_FUNCTIONS:
                inplace = _RELU_FUNCTIONS[func] or bool(kwargs.get("inplace", False))
                if func is F.relu and len(args) > 1:
                    inplace = bool(args[1])
                x = args[0] if args else kwargs["input"]
                return _relu_with_rule(activation, x, inplace)
            if func in _OTHER_ACTIVATIONS:
                running = _running_module(self.model)
                where = f" in module {running!r}" if running else ""
                raise UnsupportedActivationError(
                    f"method {self.method!r} propagates through ReLUs only, but the model calls "
                    f"{_OTHER_ACTIVATIONS[func]}{where}; its rule cannot be applied faithfully "
                    "there. Use a plain-gradient method (gradient, input_x_gradient, "
                    "integrated_gradients, smoothgrad, gradcam) or a ReLU model"
                )
        return func(*args, **kwargs)
