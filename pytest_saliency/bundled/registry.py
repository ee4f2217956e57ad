"""The method registry: each method is a rule set, the recorders it needs, and a readout."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..engine.layers import CamLayer
from ..engine.passes import Record, chunked, forward_backward
from ..engine.rules import RuleSet
from ..engine.targets import DEFAULT, Objective, call_model
from ..errors import SaliencyError, unknown

PLAIN = RuleSet("autograd")


@dataclass
class Context:
    """What a method needs to know about the call besides its own options."""

    model: nn.Module
    method: str
    layer: CamLayer | None
    batch_size: int | None
    input_shape: tuple[int, ...]
    sample: torch.Tensor | None = None  # one input sample, for what a method plans per model
    objective: Objective = DEFAULT  # the scored output and the target kind
    cache: dict = field(default_factory=dict, repr=False, compare=False)
    _modules: dict[str, nn.Module] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def module(self, name: str) -> nn.Module:
        """The model's submodule called ``name``; the table of names is built once per context
        (an audit reads it at every step)."""
        if self._modules is None:
            self._modules = dict(self.model.named_modules())
        return self._modules[name]

    def run(self, rules: RuleSet, inputs, target, readout, taps=None, input_grad=True):
        """One forward+backward per chunk under ``rules``; ``readout(record)`` per chunk."""

        def one(x, t):
            record = forward_backward(
                self.model,
                x,
                target if t is None else t,
                rules,
                taps=taps,
                method=self.method,
                input_grad=input_grad,
                objective=self.objective,
            )
            with torch.no_grad():
                return readout(record)

        targets = target if isinstance(target, torch.Tensor) else None
        return chunked(one, inputs, targets, self.batch_size)

    def predict(self, inputs: torch.Tensor, target=None) -> torch.Tensor:
        """Each sample's selection on ``inputs`` (a no-grad forward, chunked): the predicted
        class for class logits and None, once, so that a method's many passes share it."""

        def one(x, t):
            with torch.no_grad():
                output = call_model(self.model, x)
            scores = self.objective.scores(output, type(self.model).__name__, x.shape[0])
            return self.objective.target.resolve(scores, target if t is None else t)

        targets = target if isinstance(target, torch.Tensor) else None
        return chunked(one, inputs, targets, self.batch_size)


Readout = Callable[[Record, Context, dict], torch.Tensor]
Compute = Callable[[Context, torch.Tensor, Any, dict], torch.Tensor]


@dataclass(frozen=True)
class Method:
    """A registered saliency method.

    Single-pass methods give ``rules`` (options -> RuleSet), ``taps`` (which module outputs to
    record) and ``readout`` (record -> map); methods that need several passes (integrated
    gradients, smoothgrad) give ``compute`` instead. ``input_grad=False`` says the readout never
    reads ``record.input_grad`` (CAM methods), so a pass made for this method alone stops its
    backward at the tapped layers.
    """

    name: str
    family: str
    positive: bool
    defaults: Mapping[str, Any]
    reference: str
    rules: Callable[[dict], RuleSet] = lambda opts: PLAIN
    readout: Readout | None = None
    compute: Compute | None = None
    needs_layer: bool = False
    taps: Callable[[Context, dict], dict] = field(default=lambda ctx, opts: {})
    validate: Callable[[dict], None] = field(default=lambda opts: None)
    input_grad: bool = True
    # What the method reads on a model, in words, for the audits' settings["terms"].
    describe: Callable[[nn.Module, torch.Tensor], str] | None = None

    def bind(self, options: Mapping[str, Any]) -> dict:
        """Defaults overridden by ``options``; an unknown option is an error naming valid ones."""
        for key in options:
            if key not in self.defaults:
                valid = ", ".join(sorted(self.defaults)) or "none"
                raise SaliencyError(
                    f"method {self.name!r} has no option {key!r}; its options are: {valid}"
                )
        opts = {**self.defaults, **options}
        self.validate(opts)
        return opts

    def __call__(self, ctx: Context, inputs: torch.Tensor, target, opts: dict) -> torch.Tensor:
        if self.compute is not None:
            return self.compute(ctx, inputs, target, opts)
        return ctx.run(
            self.rules(opts),
            inputs,
            target,
            lambda record: self.readout(record, ctx, opts),
            taps=self.taps(ctx, opts),
            input_grad=self.input_grad,
        )


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise SaliencyError(f"a method named {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def get_method(name: object) -> Method:
    _load_builtin()
    if not isinstance(name, str):
        raise SaliencyError(f"method must be a name (str), got {type(name).__name__}")
    if name not in _REGISTRY:
        raise unknown("method", name, sorted(_REGISTRY))
    return _REGISTRY[name]


def methods() -> list[str]:
    """The names of every registered method, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    from . import cam, gradients, lrp, propagation  # noqa: F401  (they register themselves)


def input_map(attribution: torch.Tensor) -> torch.Tensor:
    """An input-space attribution as a map: summed over channels (sign kept) for [N, C, ...]."""
    if attribution.dim() <= 2:
        return attribution
    return attribution.sum(dim=1)


def check_number(opts: dict, key: str, low: float, high: float, *, integer: bool = False,
                 low_open: bool = False) -> None:  # fmt: skip
    value = opts[key]
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise SaliencyError(f"option {key!r} must be {kind}, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        left = "(" if low_open else "["
        raise SaliencyError(f"option {key!r} must be in {left}{low}, {high}], got {value!r}")


def check_bool(opts: dict, key: str) -> None:
    if not isinstance(opts[key], bool):
        raise SaliencyError(f"option {key!r} must be true or false, got {opts[key]!r}")
