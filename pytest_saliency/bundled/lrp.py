"""Layer-wise relevance propagation (Bach et al. 2015): epsilon, z+ and alpha-beta rules.

Relevance starts as the one-hot vector of the target class (the engine's backward of the
selected logit) and is carried back by autograd with every op's backward replaced by its LRP
rule. All of it happens in the engine's torch-function mode; the model is never edited:

- ``F.linear`` / ``F.conv1d|2d|3d`` calls on a tensor that carries relevance get the method's
  rule (epsilon, z+ or alpha-beta), the input layer and the output layer included;
- a BatchNorm with eval statistics whose input is, unchanged, such a layer's output is folded
  into that layer (see :mod:`pytest_saliency.engine.canonize`); any other BatchNorm passes
  relevance through unchanged (zennit's ``Pass``);
- ReLUs and the other elementwise activations (GELU, SiLU, sigmoid, tanh, Hardswish, ...)
  pass relevance unchanged (``Pass``);
- a gate, a product of the signal with the output of a sigmoid-like activation of the signal
  (``x * sigmoid(g(x))``, squeeze-and-excitation), is a constant multiplier (Arras et al.
  2017): relevance stays on the signal path, ``x``, and none enters the gate's branch;
- a sum of two activations (``a + b``, ``a += b``, ``a.add_(b)``, ``torch.add``) splits
  relevance in proportion to the operands (zennit's ``Norm``). An operand pair counts as two
  activations when both are tensors that require grad, neither is an ``nn.Parameter``, and they
  have the same shape and dtype (so bias or broadcast additions keep their gradient);
- average pooling (``avg_pool*``, ``adaptive_avg_pool*`` and ``mean`` over spatial axes only)
  splits relevance in proportion to its inputs (``Norm``);
- max-pooling, reshapes and eval-mode dropout keep their gradient: max-pooling routes
  relevance to the winning input.

Normalisation layers that are not folded (LayerNorm, GroupNorm, InstanceNorm) and transposed
convolutions have no faithful rule here and raise instead of silently falling back to gradients.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.accounting import ROUTING, node_kind, rule_function
from ..engine.canonize import Producers, fold_batch_norm
from ..engine.rules import GATE_MARK, ActivationRule, RuleSet
from ..errors import SaliencyError, UnsupportedActivationError
from . import lrp_transformer as tr
from .registry import Method, input_map, register
from .stabilizer import NORM_STABILIZER, stabilize

_CONV_INPUT_GRAD = {
    F.conv1d: torch.nn.grad.conv1d_input,
    F.conv2d: torch.nn.grad.conv2d_input,
    F.conv3d: torch.nn.grad.conv3d_input,
}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_LINEAR_ARGS = ("input", "weight", "bias")
_BATCH_NORM_ARGS = (
    "input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps",
)  # fmt: skip


def _bind(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


@dataclass(frozen=True)
class Affine:
    """One call of a linear or convolutional layer: its function, weights and conv settings."""

    func: Callable
    weight: torch.Tensor
    bias: torch.Tensor | None
    params: dict = field(default_factory=dict)

    def __call__(self, x, weight, bias):
        return self.func(x, weight, bias, **self.params)

    def transpose(self, s: torch.Tensor, weight: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The vector-Jacobian product of ``x -> layer(x, weight, no bias)`` at ``s``."""
        if self.func is F.linear:
            return s @ weight
        if not isinstance(self.params.get("padding", 0), str):
            return _CONV_INPUT_GRAD[self.func](list(shape), weight, s, **self.params)
        # padding="same"/"valid": let autograd find the transposed convolution.
        with torch.enable_grad():
            probe = torch.zeros(shape, dtype=s.dtype, device=s.device, requires_grad=True)
            (grad,) = torch.autograd.grad(self(probe, weight, None), probe, s)
        return grad


class Deferred:
    """``stabilize(z, epsilon)`` of one layer output, computed when first needed.

    Most of the time that is the backward pass, or never: a conv whose BatchNorm is folded
    into it is not propagated through. An op that could change ``z`` in place (a ReLU, a
    residual ``+=``) is seen by :meth:`_Propagation.watch` before it runs, which settles the
    value first.
    """

    def __init__(self, z: torch.Tensor, epsilon: float):
        # A detached alias: the same values and version counter, but no link to z's autograd
        # node, whose context holds this object (that cycle would outlive the pass).
        self.z: torch.Tensor | None = z.detach()
        self.version = z._version
        self.epsilon = epsilon
        self.value: torch.Tensor | None = None

    def settle(self) -> torch.Tensor:
        if self.value is None:
            assert self.z is not None
            if self.z._version != self.version:  # a change no watched op announced
                raise SaliencyError(
                    "lrp_epsilon: a layer output was changed in place by code that torch "
                    "functions do not see (a TorchScript function, say) before its relevance "
                    "was computed; explain the model's plain Python version instead"
                )
            # Settled during the forward pass too, where grad mode is on: no graph for it.
            with torch.no_grad():
                self.value = stabilize(self.z, self.epsilon)
            self.z = None
        return self.value


class EpsilonRule:
    """R_in = x * W^T (R / stabilize(z, epsilon)), z = Wx + b (zennit's ``Epsilon``)."""

    def __init__(self, epsilon: float):
        self.epsilon = epsilon

    def prepare(self, x, layer: Affine, z):
        return Deferred(z, self.epsilon)

    def relevance(self, x, layer: Affine, r, prepared):
        # The stabilised z is this call's own tensor, used once: the quotient goes into it,
        # and the product with x into the transposed layer's fresh output.
        stabilized = prepared.settle()
        s = torch.div(r, stabilized, out=stabilized)
        return layer.transpose(s, layer.weight, x.shape).mul_(x)


class AlphaBetaRule:
    """zennit's ``AlphaBeta``; ``alpha=1, beta=0`` is its ``ZPlus``.

    Inputs and weights are split by sign. The positive part z+ = W+ x+ + W- x- + b+ and the
    negative part z- = W- x+ + W+ x- + b- are normalised separately:
    R_in = alpha (x+ W+^T s+ + x- W-^T s+) - beta (x+ W-^T s- + x- W+^T s-),
    s+ = R / stabilize(z+), s- = R / stabilize(z-).
    """

    def __init__(self, alpha: float, beta: float, stabilizer: float = NORM_STABILIZER):
        self.alpha = alpha
        self.beta = beta
        self.stabilizer = stabilizer

    def prepare(self, x, layer: Affine, z):
        # z+ and z- depend on x alone, so they are made in the backward pass: a layer whose
        # BatchNorm gets folded in is never propagated through and costs nothing extra.
        return None

    def relevance(self, x, layer: Affine, r, prepared):
        # After a ReLU the input has no negative part: every x- term is exactly zero, so its
        # convolutions are skipped (the sums are unchanged up to the sign of zero).
        signed = bool((x < 0).any())
        xp, xn = (x.clamp(min=0), x.clamp(max=0)) if signed else (x, None)
        wp, wn = layer.weight.clamp(min=0), layer.weight.clamp(max=0)
        b = layer.bias

        def part(w_x, w_xn, bias, scale):
            z = layer(xp, w_x, bias)
            if signed:
                z = z + layer(xn, w_xn, None)
            stabilized = stabilize(z, self.stabilizer)
            s = torch.div(r, stabilized, out=stabilized)
            out = layer.transpose(s, w_x, x.shape).mul_(xp)
            if signed:
                out = out.add_(layer.transpose(s, w_xn, x.shape).mul_(xn))
            return out if scale == 1 else out.mul_(scale)

        out = part(wp, wn, None if b is None else b.clamp(min=0), self.alpha)
        if self.beta:
            out = out.sub_(part(wn, wp, None if b is None else b.clamp(max=0), self.beta))
        return out


@rule_function
class _RuleLayer(torch.autograd.Function):
    """Forward: the layer's own output (``compute()``); backward: the LRP rule from ``x``."""

    @staticmethod
    def forward(ctx, x, rule, layer, compute, pending):
        out = compute()
        ctx.rule, ctx.layer = rule, layer
        ctx.prepared = rule.prepare(x, layer, out)
        if isinstance(ctx.prepared, Deferred):
            pending[id(out)] = (out, ctx.prepared)
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, r):
        (x,) = ctx.saved_tensors
        return ctx.rule.relevance(x, ctx.layer, r, ctx.prepared), None, None, None, None


@rule_function
class _PassThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, compute):
        return compute()

    @staticmethod
    def backward(ctx, r):
        return r, None


@rule_function
class _Proportional(torch.autograd.Function):
    """zennit's ``Norm`` for a linear map f without parameters: R_in = x * f^T(R / stab(f(x)))."""

    @staticmethod
    def forward(ctx, x, fn):
        y = fn(x)
        ctx.fn = fn
        ctx.denominator = stabilize(y, NORM_STABILIZER)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, r):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            probe = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(ctx.fn(probe), probe, r / ctx.denominator)
        return x * grad, None


@rule_function
class _SplitSum(torch.autograd.Function):
    """a + b (in place into ``a`` if asked); backward: R_a = R a / stab(a+b), R_b likewise."""

    @staticmethod
    def forward(ctx, a, b, inplace):
        total = a + b
        denominator = stabilize(total, NORM_STABILIZER)
        ctx.shares = (a / denominator, b / denominator)
        if inplace:
            a.add_(b)
            ctx.mark_dirty(a)
            return a
        return total

    @staticmethod
    def backward(ctx, r):
        share_a, share_b = ctx.shares
        return r * share_a, r * share_b, None


@rule_function
class _Scale(torch.autograd.Function):
    """``x * c`` or ``x / c`` for a constant c (in place if asked); backward: the ε rule of
    that diagonal map without bias, R_in = R * y / stab(y) (relevance passes unchanged
    wherever y is not zero)."""

    @staticmethod
    def forward(ctx, x, compute, inplace):
        out = compute()
        # Kept as a ratio, not as a saved tensor: a later in-place op on ``out`` is fine.
        ctx.share = out / stabilize(out, NORM_STABILIZER)
        if inplace:
            ctx.mark_dirty(x)
        return out

    @staticmethod
    def backward(ctx, r):
        return r * ctx.share, None, None


class PassReLU(ActivationRule):
    """ReLUs pass relevance through unchanged (zennit's ``Pass``)."""

    name = "pass"

    def backward(self, grad_out, out):
        return grad_out


def _carries(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.requires_grad


def _signal(x: object) -> bool:
    """A floating tensor that may carry relevance: requires grad and is not a parameter."""
    return _carries(x) and not isinstance(x, nn.Parameter) and x.is_floating_point()


def _constant(c: object) -> bool:
    """A number, a tensor without grad, or a parameter itself (constant under LRP)."""
    if isinstance(c, bool):
        return False
    if isinstance(c, (int, float)):
        return True
    return isinstance(c, torch.Tensor) and (not c.requires_grad or isinstance(c, nn.Parameter))


def _activation_pair(a: object, b: object) -> bool:
    """Both operands are activations: tensors requiring grad, no parameter, same shape/dtype."""
    return (
        _carries(a)
        and _carries(b)
        and not isinstance(a, nn.Parameter)
        and not isinstance(b, nn.Parameter)
        and a.shape == b.shape
        and a.dtype == b.dtype
        and a.is_floating_point()
    )


_SOFTMAX_KINDS = frozenset({"Softmax", "SoftmaxRule"})
# Ops between a softmax and the product that reads its weights: casts, views, eval dropout.
_WEIGHT_PASSING = frozenset({"ToCopy", "Clone", "Alias", "View", "UnsafeView", "Reshape",
                             "ReshapeAlias", "Expand", "Permute", "Transpose", "Unsqueeze",
                             "Squeeze", "Contiguous"})  # fmt: skip

ATTENTION = ("cp", "attnlrp")


_SCORE_PASSING = frozenset(
    {"Add", "Sub", "View", "UnsafeView", "Reshape", "ReshapeAlias", "ToCopy", "Clone", "Alias",
     "Expand", "_Scale", "Contiguous"}
)  # fmt: skip


def _made_by(t: torch.Tensor, kinds: frozenset, passing: frozenset) -> bool:
    """``t`` is the output of an op of ``kinds`` (an autograd node's kind, or one of the
    engine's rule functions by class name), maybe through ``passing`` ops (first operands
    followed, at most 8)."""
    node = t.grad_fn
    for _ in range(8):
        if node is None:
            return False
        forward_cls = getattr(type(node), "_forward_cls", None)
        kind = forward_cls.__name__ if forward_cls is not None else node_kind(node)
        if kind in kinds:
            return True
        if kind not in passing or not node.next_functions:
            return False
        node = node.next_functions[0][0]
    return False


def _from_scores(t: torch.Tensor) -> bool:
    """``t`` holds attention scores: a bilinear product ``q @ k^T`` under AttnLRP's rule,
    maybe scaled, shifted by a mask or bias, or reshaped."""
    return _made_by(t, frozenset({"BilinearRule"}), _SCORE_PASSING)


def _from_softmax(t: torch.Tensor) -> bool:
    """``t`` holds attention weights: the output of a softmax, maybe cast or reshaped."""
    return _made_by(t, _SOFTMAX_KINDS, _WEIGHT_PASSING)


_MHA_UNSUPPORTED = (
    ("bias_k", "a key/value bias (add_bias_kv=True)"),
    ("add_zero_attn", "add_zero_attn=True"),
    ("static_k", "static keys (static_k)"),
    ("static_v", "static values (static_v)"),
)


class _Propagation:
    """The handlers of one LRP rule set, and the per-pass table used to fold BatchNorms."""

    def __init__(self, method: str, rule, attention: str = "cp"):
        self.method = method
        self.rule = rule
        self.attention = attention
        self.trace = None  # the pass's Trace, while a pass runs
        self.producers = Producers()
        # Layer outputs whose stabilised value is deferred (ε rule), by id. Each entry keeps
        # its tensor alive, so no id is reused while it is listed; the table is emptied when
        # the pass ends (a Deferred itself holds only a detached alias).
        self.pending: dict[int, tuple[torch.Tensor, Deferred]] = {}

    def install(self, model: nn.Module, handles: list, trace) -> None:
        self.trace = trace
        handles.append(SimpleNamespace(remove=lambda: setattr(self, "trace", None)))
        self.producers.remove()
        self.pending.clear()
        handles.append(self.producers)  # emptied when the pass ends
        handles.append(SimpleNamespace(remove=self.pending.clear))  # emptied at the end too

    def watch(self, func, args, kwargs) -> None:
        """Settle a deferred layer output before any op but a known read-only one takes it:
        whatever that op does (change it in place, alias it), z's values are kept first."""
        if not self.pending or func in _READ_ONLY:
            return
        for value in (*args, *kwargs.values()):
            for t in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(t, torch.Tensor):
                    entry = self.pending.pop(id(t), None)
                    if entry is not None:
                        entry[1].settle()

    def functions(self) -> dict:
        table: dict = {func: self.affine for func in (F.linear, *_CONV_INPUT_GRAD)}
        table[F.batch_norm] = self.batch_norm
        for func in (torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__):
            table[func] = self.add
        for func in (torch.Tensor.add_, torch.Tensor.__iadd__):
            table[func] = self.add_inplace
        for func in (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__):
            table[func] = self.scale
        for func in (torch.div, torch.Tensor.div, torch.Tensor.__truediv__):
            table[func] = self.scale_numerator
        for func in (torch.Tensor.mul_, torch.Tensor.__imul__):
            table[func] = self.scale_inplace
        for func in (torch.Tensor.div_, torch.Tensor.__itruediv__):
            table[func] = self.scale_inplace
        for func in (
            F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
            F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
        ):  # fmt: skip
            table[func] = self.proportional
        table[torch.mean] = table[torch.Tensor.mean] = self.mean
        table[F.layer_norm] = self.layer_norm
        if hasattr(F, "rms_norm"):  # torch >= 2.4
            table[F.rms_norm] = self.rms_norm
        for func in (torch.softmax, F.softmax, torch.Tensor.softmax):
            table[func] = self.softmax
        for func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm,
                     torch.Tensor.bmm):  # fmt: skip
            table[func] = self.matmul
        table[F.scaled_dot_product_attention] = self.scaled_dot_product_attention
        table[F.multi_head_attention_forward] = self.multi_head_attention
        for func, label in (
            (F.group_norm, "F.group_norm (GroupNorm)"),
            (F.instance_norm, "F.instance_norm (InstanceNorm)"),
            (F.local_response_norm, "F.local_response_norm"),
            (F.conv_transpose1d, "F.conv_transpose1d"),
            (F.conv_transpose2d, "F.conv_transpose2d"),
            (F.conv_transpose3d, "F.conv_transpose3d"),
        ):
            table[func] = self._unsupported(label)
        return table

    def affine(self, func, args, kwargs):
        bound = _bind(_LINEAR_ARGS if func is F.linear else _CONV_ARGS, args, kwargs)
        x = bound["input"]
        if not _carries(x):
            return func(*args, **kwargs)
        bias = bound.get("bias")
        params = {k: bound[k] for k in _CONV_ARGS[3:] if k in bound}
        layer = Affine(
            func, bound["weight"].detach(), None if bias is None else bias.detach(), params
        )
        out = _RuleLayer.apply(x, self.rule, layer, lambda: func(*args, **kwargs), self.pending)
        self.producers.add(out, x, layer)
        return out

    def batch_norm(self, func, args, kwargs):
        bound = _bind(_BATCH_NORM_ARGS, args, kwargs)
        x = bound["input"]
        compute = lambda: func(*args, **kwargs)  # noqa: E731
        if not _carries(x):
            return compute()
        mean, var = bound.get("running_mean"), bound.get("running_var")
        if bound.get("training", False) or mean is None or var is None:
            raise UnsupportedActivationError(
                f"method {self.method!r} has no LRP rule for a BatchNorm that normalises with "
                "statistics of its own input (no running statistics): it is not an affine map "
                "of the signal. Give the BatchNorm running statistics "
                "(track_running_stats=True), or use a plain-gradient method (gradient, "
                "input_x_gradient, integrated_gradients, smoothgrad)"
            )
        source = self.producers.source(x)
        if source is None:
            return _PassThrough.apply(x, compute)
        gamma, beta = bound.get("weight"), bound.get("bias")
        weight, bias = fold_batch_norm(
            source.op.weight,
            source.op.bias,
            mean.detach(),
            var.detach(),
            None if gamma is None else gamma.detach(),
            None if beta is None else beta.detach(),
            bound.get("eps", 1e-5),
        )
        folded = replace(source.op, weight=weight, bias=bias)
        return _RuleLayer.apply(source.input, self.rule, folded, compute, self.pending)

    def _sum(self, func, args, kwargs, inplace):
        a = args[0] if args else kwargs.get("input")
        b = args[1] if len(args) > 1 else kwargs.get("other")
        plain = len(args) > 2 or set(kwargs) - {"input", "other", "alpha"}
        if plain or kwargs.get("alpha", 1) != 1 or not _activation_pair(a, b):
            return func(*args, **kwargs)
        if self._parameter_only(a) or self._parameter_only(b):
            # An embedding or bias view (``pe[:, :T]``): a shift by a constant, whatever the
            # batch size, never a second branch to split relevance with.
            return func(*args, **kwargs)
        return _SplitSum.apply(a, b, inplace)

    def add(self, func, args, kwargs):
        return self._sum(func, args, kwargs, inplace=False)

    def add_inplace(self, func, args, kwargs):
        return self._sum(func, args, kwargs, inplace=True)

    def _scale(self, func, args, kwargs, inplace, numerator_only):
        """A product (or quotient) of the signal with a constant: the ε rule of that diagonal
        map. Anything else (two signal operands, broadcasting the signal up) runs as written
        and the op accounting refuses it."""
        a = args[0] if args else kwargs.get("input")
        b = args[1] if len(args) > 1 else kwargs.get("other")
        if len(args) > 2 or set(kwargs) - {"input", "other"}:
            return func(*args, **kwargs)
        pairs = ((a, b),) if numerator_only else ((a, b), (b, a))
        for x, c in pairs:
            if _signal(x) and _signal(c) and getattr(c, GATE_MARK, False) and not numerator_only:
                # A gate x * sigmoid(g(x)) is a constant multiplier (Arras et al. 2017): the
                # relevance stays on the signal path and none enters the gate's branch.
                if torch.broadcast_shapes(x.shape, c.shape) == x.shape and c.dtype == x.dtype:
                    gate = c.detach()
                    operands = (x, gate) if x is a else (gate, x)
                    return _Scale.apply(x, lambda ops=operands: func(*ops), inplace)
            if _signal(x) and (_constant(c) or self._parameter_only(c)):
                tensor = isinstance(c, torch.Tensor)
                out_shape = torch.broadcast_shapes(x.shape, c.shape) if tensor else x.shape
                if out_shape == x.shape and (not tensor or c.dtype == x.dtype):
                    return _Scale.apply(x, lambda: func(*args, **kwargs), inplace)
        return func(*args, **kwargs)

    def scale(self, func, args, kwargs):
        return self._scale(func, args, kwargs, inplace=False, numerator_only=False)

    def scale_numerator(self, func, args, kwargs):
        return self._scale(func, args, kwargs, inplace=False, numerator_only=True)

    def scale_inplace(self, func, args, kwargs):  # ``x *= c``, ``x /= c``: x is the signal
        return self._scale(func, args, kwargs, inplace=True, numerator_only=True)

    def proportional(self, func, args, kwargs):
        if args:
            x, rest = args[0], args[1:]
            fn = lambda t: func(t, *rest, **kwargs)  # noqa: E731
        else:
            x, others = kwargs.get("input"), {k: v for k, v in kwargs.items() if k != "input"}
            fn = lambda t: func(input=t, **others)  # noqa: E731
        if not _carries(x):
            return func(*args, **kwargs)
        return _Proportional.apply(x, fn)

    def mean(self, func, args, kwargs):
        x = args[0] if args else kwargs.get("input")
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if _carries(x) and x.dim() >= 2 and _sample_axes(dim, x.dim()):
            return self.proportional(func, args, kwargs)
        return func(*args, **kwargs)

    # --- transformers ----------------------------------------------------------------------

    def layer_norm(self, func, args, kwargs):
        bound = _bind(("input", "normalized_shape", "weight", "bias", "eps"), args, kwargs)
        x = bound["input"]
        if not _carries(x):
            return func(*args, **kwargs)
        weight = bound.get("weight")
        return tr.NormRule.apply(
            x,
            lambda: func(*args, **kwargs),
            tr.norm_dims(x, bound["normalized_shape"]),
            None if weight is None else weight.detach(),
            True,
            float(bound.get("eps", 1e-5)),
        )

    def rms_norm(self, func, args, kwargs):
        bound = _bind(("input", "normalized_shape", "weight", "eps"), args, kwargs)
        x = bound["input"]
        if not _carries(x):
            return func(*args, **kwargs)
        weight, eps = bound.get("weight"), bound.get("eps")
        return tr.NormRule.apply(
            x,
            lambda: func(*args, **kwargs),
            tr.norm_dims(x, bound["normalized_shape"]),
            None if weight is None else weight.detach(),
            False,
            torch.finfo(x.dtype).eps if eps is None else float(eps),
        )

    def softmax(self, func, args, kwargs):
        """CP-LRP: the weights run as written and a product reading them holds them constant;
        AttnLRP: the softmax rule."""
        x = args[0] if args else kwargs.get("input")
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if self.attention != "attnlrp" or not _signal(x) or not isinstance(dim, int):
            return func(*args, **kwargs)
        if not _from_scores(x):
            # Not attention scores (a classifier's probabilities): as written, and refused.
            return func(*args, **kwargs)
        return tr.SoftmaxRule.apply(x, lambda: func(*args, **kwargs), dim)

    def matmul(self, func, args, kwargs):
        """A product of two signal tensors: attention weights times values (CP-LRP holds the
        weights constant), or, under AttnLRP, any bilinear product (the uniform rule)."""
        if len(args) != 2 or kwargs or not all(self._from_inputs(t) for t in args):
            return func(*args, **kwargs)
        a, b = args
        if self.attention == "attnlrp":
            return tr.BilinearRule.apply(a, b, lambda: func(a, b), func)
        for weights, x, first in ((a, b, True), (b, a, False)):
            if _from_softmax(weights):
                constant = weights.detach()
                product = func if first else (lambda w, t: func(t, w))
                # A linear map of x without parameters: the Norm rule, as average pooling.
                return _Proportional.apply(x, lambda t, p=product, c=constant: p(c, t))
        return func(*args, **kwargs)  # q @ k^T: off the relevance path, or refused

    def _parameter_only(self, c: object) -> bool:
        """A tensor computed from parameters and constants only (``gamma.reshape(1, -1, 1,
        1)``, ``W.T``): a constant under LRP, though it requires grad."""
        return (
            isinstance(c, torch.Tensor)
            and c.is_floating_point()
            and self.trace is not None
            and not self.trace.from_signal(c)
        )

    def _from_inputs(self, t: object) -> bool:
        """A signal tensor computed from the explained inputs (not a weight's view, ``W.T``)."""
        return _signal(t) and (self.trace is None or self.trace.from_signal(t))

    def attend(self, q, k, v, mask, scale, is_causal):
        """Attention of queries, keys and values [..., heads, tokens, dim] under the rule."""
        if mask is not None and self._from_inputs(mask):
            self._refuse_attention("an attention mask computed from the signal")
        if self.attention == "attnlrp":
            constant = [n for n, t in (("queries", q), ("keys", k), ("values", v))
                        if not self._from_inputs(t)]  # fmt: skip
            if constant:
                self._refuse_attention(
                    f"{' and '.join(constant)} that do not come from the inputs (a learned "
                    "query or memory); AttnLRP's uniform rule would give them half the relevance"
                )
        elif not self._from_inputs(v):
            self._refuse_attention(
                "values that do not come from the inputs (a learned memory); CP-LRP would "
                "drop all the relevance of the attention"
            )
        mask = None if mask is None else mask.detach()
        if self.attention == "attnlrp":
            return tr.AttentionLRP.apply(q, k, v, mask, scale, is_causal)
        with torch.no_grad():
            _, weights = tr.attention_weights(q.detach(), k.detach(), mask, scale, is_causal)
        return tr.AttentionCP.apply(v, weights)

    def _refuse_attention(self, what: str) -> None:
        raise UnsupportedActivationError(
            f"method {self.method!r} (attention={self.attention!r}) has no LRP rule for "
            f"attention with {what}. Use a plain-gradient method (gradient, input_x_gradient, "
            "integrated_gradients, smoothgrad), or the other attention rule where it applies"
        )

    def _attention_dropout(self, where: str) -> None:
        raise UnsupportedActivationError(
            f"method {self.method!r} cannot vouch for {where} with dropout on the attention "
            "weights (dropout_p > 0): the map would change from call to call. Pass "
            "dropout_p=0.0 when not training (as nn.MultiheadAttention, timm and transformers "
            "do in eval mode)"
        )

    def scaled_dot_product_attention(self, func, args, kwargs):
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                 "enable_gqa")  # fmt: skip
        bound = _bind(names, args, kwargs)
        q, k, v = bound["query"], bound["key"], bound["value"]
        if not any(_carries(t) for t in (q, k, v)):
            return func(*args, **kwargs)
        if bound.get("dropout_p", 0.0):
            self._attention_dropout("F.scaled_dot_product_attention")
        if bound.get("enable_gqa", False) and q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
            repeat = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(repeat, dim=-3), v.repeat_interleave(repeat, dim=-3)
        return self.attend(
            q, k, v, bound.get("attn_mask"), bound.get("scale"), bool(bound.get("is_causal"))
        )

    def multi_head_attention(self, func, args, kwargs):
        """nn.MultiheadAttention's functional form, with its projections under the layer rule
        and its attention under the attention rule."""
        try:
            bound = _signature(func).bind(*args, **kwargs)
        except TypeError:
            return func(*args, **kwargs)
        bound.apply_defaults()
        p = bound.arguments
        query, key, value = p["query"], p["key"], p["value"]
        if not any(_carries(t) for t in (query, key, value)):
            return func(*args, **kwargs)
        for name in ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight",
                     "v_proj_weight", "out_proj_weight", "out_proj_bias"):  # fmt: skip
            if p[name] is not None and self._from_inputs(p[name]):
                self._refuse_attention(f"a projection ({name}) computed from the signal")
        for name, label in _MHA_UNSUPPORTED:
            if p[name] is not None and p[name] is not False:
                raise UnsupportedActivationError(
                    f"method {self.method!r} has no LRP rule for nn.MultiheadAttention with "
                    f"{label}; it covers the default configuration (packed or separate "
                    "projections, attention and key-padding masks, is_causal). Use a "
                    "plain-gradient method (gradient, input_x_gradient, integrated_gradients, "
                    "smoothgrad) instead"
                )
        if p["training"] and p["dropout_p"] > 0:
            self._attention_dropout("nn.MultiheadAttention")
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        tgt, bsz, embed = query.shape
        src, heads = key.shape[0], p["num_heads"]

        def linear(x, weight, bias):
            return self.affine(F.linear, (x, weight, bias), {})

        if p["use_separate_proj_weight"]:
            weights = (p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"])
        else:
            weights = p["in_proj_weight"].chunk(3)
        biases = (None,) * 3 if p["in_proj_bias"] is None else p["in_proj_bias"].chunk(3)
        if query is key is value and not p["use_separate_proj_weight"]:
            packed = linear(query, p["in_proj_weight"], p["in_proj_bias"])
            q, k, v = packed.unflatten(-1, (3, embed)).unbind(-2)
        else:
            q, k, v = (linear(t, w, b) for t, w, b in zip((query, key, value), weights, biases))

        def split(t, length):  # [L, N, E] -> [N, heads, L, E / heads]
            return t.reshape(length, bsz, heads, t.shape[-1] // heads).permute(1, 2, 0, 3)

        q, k, v = split(q, tgt), split(k, src), split(v, src)
        mask = _mha_mask(p["attn_mask"], p["key_padding_mask"], bsz, heads, tgt, src, q.dtype)
        is_causal = bool(p["is_causal"])
        if is_causal and p["attn_mask"] is None:
            raise UnsupportedActivationError(
                "nn.MultiheadAttention was called with is_causal=True and no attn_mask, which "
                "torch refuses too; pass the causal mask as attn_mask"
            )
        if is_causal and p["key_padding_mask"] is None and not p["need_weights"]:
            mask = None  # as torch: the mask is only a hint, the causal one is used
        else:
            is_causal = False
        attended = self.attend(q, k, v, mask, None, is_causal)
        out = attended.permute(2, 0, 1, 3).reshape(tgt * bsz, v.shape[-1] * heads)
        out = linear(out, p["out_proj_weight"], p["out_proj_bias"]).view(tgt, bsz, -1)
        weights_out = None
        if p["need_weights"]:  # as written: if the model uses them, the accounting judges it
            _, weights_out = tr.attention_weights(q, k, mask, None, is_causal)
            if p["average_attn_weights"]:
                weights_out = weights_out.mean(dim=1)
            if not batched:
                weights_out = weights_out.squeeze(0)
        return (out if batched else out.squeeze(1)), weights_out

    def _unsupported(self, label: str):
        def handler(func, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            if not _carries(x):
                return func(*args, **kwargs)
            raise UnsupportedActivationError(
                f"method {self.method!r} has no LRP rule for {label}, which the model calls on "
                "the relevance path; LRP here covers Conv/Linear layers (with BatchNorm folded "
                "in), elementwise activations, sigmoid gates, sums of activations, average and "
                "max pooling. Use a plain-gradient "
                "method (gradient, input_x_gradient, integrated_gradients, smoothgrad) instead"
            )

        return handler


# Ops that only read their tensor arguments: a deferred output can go through them unsettled
# (BatchNorm reads a conv's output to be folded into it; size queries come before it).
_READ_ONLY = frozenset(
    {
        F.batch_norm,
        F.linear,
        *_CONV_INPUT_GRAD,
        torch.Tensor.dim,
        torch.Tensor.size,
        torch.Tensor.shape.__get__,
        torch.Tensor.ndim.__get__,
        torch.Tensor.dtype.__get__,
        torch.Tensor.device.__get__,
        torch.Tensor.requires_grad.__get__,
        torch.Tensor.is_floating_point,
    }
)


@functools.cache
def _signature(func) -> inspect.Signature:
    return inspect.signature(func)


def _mha_mask(attn_mask, key_padding_mask, bsz, heads, tgt, src, dtype):
    """nn.MultiheadAttention's masks (True or -inf: not attended) as one additive float mask
    [bsz, heads, tgt, src], or None."""
    mask = None
    for m, shape in ((attn_mask, None), (key_padding_mask, (bsz, 1, 1, src))):
        if m is None:
            continue
        m = m.detach()
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        m = m.to(dtype)
        if shape is None:
            shape = (1, 1, tgt, src) if m.dim() == 2 else (bsz, heads, tgt, src)
        m = m.reshape(shape)
        mask = m if mask is None else mask + m
    return mask


def _sample_axes(dim: object, ndim: int) -> bool:
    """``dim`` names axes of one sample only (not the batch axis): an average pool over
    space, over tokens or over features, which the Norm rule splits in proportion."""
    if isinstance(dim, int) and not isinstance(dim, bool):
        dim = (dim,)
    if not isinstance(dim, (tuple, list)) or not dim:
        return False
    return all(isinstance(d, int) and not isinstance(d, bool) and d % ndim >= 1 for d in dim)


def lrp_rules(method: str, rule, attention: str = "cp") -> RuleSet:
    """The rule set of one LRP call: ``rule`` on every layer, pass/norm rules elsewhere,
    ``attention`` (CP-LRP or AttnLRP) in attention."""
    propagation = _Propagation(method, rule, attention)
    return RuleSet(
        f"{method}:{vars(rule)}:{attention}",
        activation=PassReLU(),
        others="pass",
        functions=propagation.functions(),
        install=propagation.install,
        watch=propagation.watch,
        allowed=ROUTING,
        hides=frozenset({F.linear, F.batch_norm, F.layer_norm, *_NORMS, *_CONV_INPUT_GRAD}),
    )


_NORMS = (F.rms_norm,) if hasattr(F, "rms_norm") else ()


def _real(opts: dict, key: str) -> float:
    value = opts[key]
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not isinstance(value, (int, float)) or not math.isfinite(number):
        raise SaliencyError(f"option {key!r} must be a finite number, got {value!r}")
    return number


def _validate_attention(opts: dict) -> None:
    value = opts["attention"]
    if value not in ATTENTION:
        raise SaliencyError(
            f"option 'attention' must be one of {', '.join(repr(a) for a in ATTENTION)}, got "
            f"{value!r} ('cp': CP-LRP, attention weights held constant; 'attnlrp': AttnLRP's "
            "softmax and uniform matmul rules)"
        )


def _validate_epsilon(opts: dict) -> None:
    _validate_attention(opts)
    if _real(opts, "epsilon") <= 0:
        raise SaliencyError(
            f"option 'epsilon' must be > 0, got {opts['epsilon']!r} (it stabilises z + eps*sign(z)"
            "; for LRP-0 use a tiny value such as 1e-9)"
        )


def _validate_alpha_beta(opts: dict) -> None:
    _validate_attention(opts)
    alpha, beta = _real(opts, "alpha"), _real(opts, "beta")
    if alpha < 0 or beta < 0:
        raise SaliencyError(
            f"options 'alpha' and 'beta' must be >= 0, got alpha={alpha}, beta={beta}"
        )
    if abs(alpha - beta - 1) > 1e-9:
        raise SaliencyError(
            f"options 'alpha' and 'beta' must satisfy alpha - beta = 1 (relevance is conserved), "
            f"got alpha={alpha}, beta={beta}; e.g. alpha=2, beta=1 or alpha=1, beta=0"
        )


def _readout(record, ctx, opts):
    return input_map(record.input_grad)


register(Method(
    name="lrp_epsilon",
    family="lrp",
    positive=False,
    defaults={"epsilon": 1e-6, "attention": "cp"},
    reference="Bach et al. 2015",
    rules=lambda opts: lrp_rules(
        "lrp_epsilon", EpsilonRule(float(opts["epsilon"])), opts["attention"]
    ),
    readout=_readout,
    validate=_validate_epsilon,
))  # fmt: skip

register(Method(
    name="lrp_zplus",
    family="lrp",
    positive=True,
    defaults={"attention": "cp"},
    reference="Montavon et al. 2017",
    rules=lambda opts: lrp_rules("lrp_zplus", AlphaBetaRule(1.0, 0.0), opts["attention"]),
    readout=_readout,
    validate=_validate_attention,
))  # fmt: skip

register(Method(
    name="lrp_alpha_beta",
    family="lrp",
    positive=False,
    defaults={"alpha": 2.0, "beta": 1.0, "attention": "cp"},
    reference="Bach et al. 2015",
    rules=lambda opts: lrp_rules(
        "lrp_alpha_beta",
        AlphaBetaRule(float(opts["alpha"]), float(opts["beta"])),
        opts["attention"],
    ),
    readout=_readout,
    validate=_validate_alpha_beta,
))  # fmt: skip
