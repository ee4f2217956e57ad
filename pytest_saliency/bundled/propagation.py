"""Modified backward passes through ReLUs: guided backprop, deconvnet, RectGrad."""

from __future__ import annotations

import torch

from ..engine.accounting import ELEMENTWISE, GATES, LINEAR
from ..engine.rules import ActivationRule, RuleSet
from ..errors import SaliencyError
from .registry import Method, check_bool, check_number, input_map, register


class Guided(ActivationRule):
    """grad_in = ReLU(grad_out) * 1[x > 0] (Springenberg et al. 2015)."""

    name = "guided"

    def backward(self, grad_out, out):
        # threshold_backward masks by out > 0 in one kernel (autograd's own ReLU backward).
        return torch.ops.aten.threshold_backward(grad_out.clamp(min=0), out, 0)


class Deconv(ActivationRule):
    """grad_in = ReLU(grad_out) (Zeiler & Fergus 2014)."""

    name = "deconvnet"

    def backward(self, grad_out, out):
        return grad_out.clamp(min=0)


def per_sample_percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-th percentile of each sample over all non-batch axes, linear interpolation
    (numpy's default), shaped to broadcast against ``values``."""
    flat = values.reshape(values.shape[0], -1)
    n = flat.shape[1]
    position = (n - 1) * (q / 100.0)
    low = int(position)
    high = min(low + 1, n - 1)
    frac = position - low
    # Only the order statistics of rank low and high are needed: select the shorter tail that
    # holds both with topk (linear time) instead of sorting every value of the layer.
    if n - low <= high + 1:
        tail = flat.topk(n - low, dim=1, sorted=False).values  # ranks low .. n-1
        ends = tail.topk(min(2, n - low), dim=1, largest=False).values  # ranks low, low+1
        lower, upper = ends[:, 0], ends[:, high - low]
    else:
        tail = flat.topk(high + 1, dim=1, largest=False, sorted=False).values  # ranks 0 .. high
        ends = tail.topk(min(2, high + 1), dim=1).values  # ranks high, high-1
        upper, lower = ends[:, 0], ends[:, high - low]
    result = lower + (upper - lower) * frac
    return result.reshape((-1,) + (1,) * (values.dim() - 1))


class Rectified(ActivationRule):
    """grad_in = grad_out * 1[a * grad_out > tau], tau the per-sample percentile of a * grad_out
    (Kim et al. 2019); a is the ReLU's output. ``positive=False`` thresholds |a * grad_out|."""

    name = "rectified"

    def __init__(self, percentile: float, positive: bool):
        self.percentile = percentile
        self.positive = positive

    def backward(self, grad_out, out):
        importance = out * grad_out
        if not self.positive:
            importance = importance.abs_()
        tau = per_sample_percentile(importance, self.percentile)
        # grad_out * 1[importance > tau] with the comparison written as 1.0 / 0.0 straight
        # into ``importance`` (ours to overwrite): no bool mask and no conversion pass.
        return torch.gt(importance, tau, out=importance).mul_(grad_out)


OTHERS = ("raise", "gradient")


def _rules(name: str, activation: ActivationRule, opts: dict) -> RuleSet:
    """The ReLU rule; with ``other_activations="gradient"`` the plain gradient passes through
    every other elementwise activation and through gates: products of the signal with a
    sigmoid-like, SiLU, GELU or tanh activation of it (other products of two signals raise)."""
    if opts["other_activations"] == "gradient":
        allowed = LINEAR | ELEMENTWISE | {GATES}
        return RuleSet(f"{name}+gradient", activation=activation, allowed=allowed,
                       others="gradient")  # fmt: skip
    return RuleSet(name, activation=activation)


def _check_others(opts: dict) -> None:
    value = opts["other_activations"]
    if value not in OTHERS:
        raise SaliencyError(
            f"option 'other_activations' must be one of {', '.join(repr(o) for o in OTHERS)}, "
            f"got {value!r}: 'raise' refuses activations other than ReLU, 'gradient' passes the "
            "plain gradient through them and through gates"
        )


_GUIDED = {o: _rules("guided", Guided(), {"other_activations": o}) for o in OTHERS}
_DECONV = {o: _rules("deconvnet", Deconv(), {"other_activations": o}) for o in OTHERS}

register(Method(
    name="guided_backprop",
    family="propagation",
    positive=True,
    defaults={"other_activations": "raise"},
    reference="Springenberg et al. 2015",
    rules=lambda opts: _GUIDED[opts["other_activations"]],
    readout=lambda rec, ctx, opts: input_map(rec.input_grad),
    validate=_check_others,
))  # fmt: skip

register(Method(
    name="deconvnet",
    family="propagation",
    positive=True,
    defaults={"other_activations": "raise"},
    reference="Zeiler & Fergus 2014",
    rules=lambda opts: _DECONV[opts["other_activations"]],
    readout=lambda rec, ctx, opts: input_map(rec.input_grad),
    validate=_check_others,
))  # fmt: skip


def _validate_rectgrad(opts):
    check_number(opts, "percentile", 0.0, 100.0)
    check_bool(opts, "positive")
    _check_others(opts)


register(Method(
    name="rectgrad",
    family="propagation",
    positive=True,
    defaults={"percentile": 98.0, "positive": True, "other_activations": "raise"},
    reference="Kim et al. 2019",
    rules=lambda opts: _rules(
        f"rectified-{opts['percentile']}-{opts['positive']}",
        Rectified(float(opts["percentile"]), bool(opts["positive"])),
        opts,
    ),
    readout=lambda rec, ctx, opts: input_map(rec.inputs * rec.input_grad),
    validate=_validate_rectgrad,
))  # fmt: skip
