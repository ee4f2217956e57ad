"""Several methods on one model state, sharing passes.

Methods whose rule set is the same (``gradient``, ``input_x_gradient``, ``gradcam``, ``gradcam++``
and ``fullgrad`` all use plain autograd) are computed from one forward and one backward pass: the
pass records the union of what their readouts need. Methods with their own rule set, or that need
several passes (integrated gradients, smoothgrad), run on their own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .bundled.registry import Context, Method
from .engine.passes import Record, Tap, chunked, forward_backward
from .engine.rules import RuleSet
from .engine.state import eval_mode, model_device_dtype
from .engine.targets import DEFAULT, ClassLogit, Objective
from .errors import SaliencyError
from .explainer import allow_grad, cam_layer_of, check_maps, check_target, prepare
from .specs import parse_method


@dataclass
class Request:
    """One method to explain with, its options and its CAM layer (None = default)."""

    method: str
    options: Mapping[str, Any]
    layer: str | nn.Module | None = None


def as_request(spec: str | Mapping[str, Any] | Request) -> Request:
    """A method name, a ``{"name": ..., **options}`` mapping, or a Request."""
    if isinstance(spec, Request):
        return spec
    parsed = parse_method(spec)
    return Request(parsed.name, parsed.options, parsed.layer)


@dataclass
class _Bound:
    spec: Method
    opts: dict
    ctx: Context


class _SharedPass:
    """Methods sharing one rule set: the union of what their readouts need, worked out once;
    each call is one forward+backward per chunk and one map per method."""

    def __init__(self, rules: RuleSet, bound: Sequence[_Bound], objective: Objective) -> None:
        self.rules, self.bound, self.objective = rules, list(bound), objective
        self.union: dict[str, Tap] = {}
        self.renames: list[dict[str, str]] = []
        by_point: dict[tuple, str] = {}
        for b in self.bound:
            mapping = {}
            for key, tap in b.spec.taps(b.ctx, b.opts).items():
                point = (id(tap.module), tap.point, tap.pool)
                shared = by_point.setdefault(point, f"tap{len(by_point)}")
                old = self.union.get(shared)
                keep = tap.keep_activation or (old.keep_activation if old else False)
                self.union[shared] = tap._replace(keep_activation=keep)
                mapping[key] = shared
            self.renames.append(mapping)
        self.input_grad = any(b.spec.input_grad for b in self.bound)

    def __call__(self, model, inputs, target, batch_size) -> tuple[torch.Tensor, ...]:
        seen: list[torch.Tensor] = []

        def one(x, t):
            record = forward_backward(
                model,
                x,
                target if t is None else t,
                self.rules,
                taps=self.union,
                method=self.bound[0].spec.name,
                input_grad=self.input_grad,
                objective=self.objective,
            )
            seen.append(record.targets)
            with torch.no_grad():  # readouts are functions of the record: no graph for them
                return tuple(self._readouts(record))

        targets = target if isinstance(target, torch.Tensor) else None
        found = chunked(one, inputs, targets, batch_size)
        self.last_targets = torch.cat(seen)  # the selections explained (predicted for None)
        return found

    def _readouts(self, record: Record) -> list[torch.Tensor]:
        """Each method's map, read from its share of the pass's record."""
        maps = []
        for b, mapping in zip(self.bound, self.renames):
            view = Record(
                record.inputs,
                record.targets,
                record.logits,
                record.input_grad,
                {key: record.taps.get(shared, []) for key, shared in mapping.items()},
            )
            maps.append(b.spec.readout(view, b.ctx, b.opts))
        return maps


class Plan:
    """Methods validated and bound to one model once; each call explains one model state.

    An audit explains the same model object many times while only its weights change; the
    checks, the default CAM layer and the grouping into shared passes are done here once.
    Calls must pass inputs of the shape the plan was made with.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        methods: Sequence[str | Mapping[str, Any] | Request],
        *,
        batch_size: int | None = None,
        objective: Objective = DEFAULT,
    ) -> None:
        requests = [as_request(m) for m in methods]
        self.objective = objective
        bound_specs = []
        for req in requests:
            model, _, batch_size, spec, opts, resolved = prepare(
                model, inputs, req.method, req.layer, batch_size, req.options
            )
            bound_specs.append((spec, opts, resolved))
        self.model, self.batch_size, self.shape = model, batch_size, tuple(inputs.shape)
        self.computed: list[tuple[int, _Bound]] = []
        with eval_mode(model):
            device, dtype = model_device_dtype(model, inputs)
            x = inputs.detach().to(device=device, dtype=dtype)
            defaults: dict[object, object] = {}
            # Plain autograd is one pass for all. Any other rule set is its own group, keyed by
            # the object, which the group keeps alive: its id() cannot come back for the next
            # method's freshly built rule set (which would merge two methods into one pass).
            groups: dict[object, tuple[RuleSet, list[tuple[int, _Bound]]]] = {}
            for i, (spec, opts, resolved) in enumerate(bound_specs):
                if spec.needs_layer:
                    # One probe per distinct (layer, layout) the methods ask for.
                    key = (id(resolved) if isinstance(resolved, nn.Module) else resolved,
                           opts.get("layout"))  # fmt: skip
                    if key not in defaults:
                        defaults[key] = cam_layer_of(model, x, spec, opts, resolved,
                                                     objective.output)  # fmt: skip
                    resolved = defaults[key]
                ctx = Context(model, spec.name, resolved, batch_size, tuple(x.shape), x[:1],
                              objective=objective)  # fmt: skip
                b = _Bound(spec, opts, ctx)
                if spec.compute is not None:
                    self.computed.append((i, b))
                    continue
                rules = spec.rules(opts)
                key = rules.name if rules.is_plain else id(rules)
                groups.setdefault(key, (rules, []))[1].append((i, b))
            self.passes = [
                ([i for i, _ in members], _SharedPass(rules, [b for _, b in members], objective))
                for rules, members in groups.values()
            ]
        self.count = len(requests)
        self.names = [spec.name for spec, _, _ in bound_specs]
        self.last_targets: torch.Tensor | None = None  # the last call's selections

    @allow_grad
    def __call__(
        self, inputs: torch.Tensor, target: int | torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """One map per method, in the order given, on the inputs' device and dtype.

        ``target``: a selection of the plan's target kind, one row per sample (for class
        logits: None = predicted, an int, a LongTensor [N]); None = the kind's own choice."""
        if tuple(inputs.shape) != self.shape:
            raise SaliencyError(
                f"this plan was made for inputs of shape {self.shape}, got {tuple(inputs.shape)}"
            )
        if isinstance(self.objective.target, ClassLogit):
            target = check_target(target, inputs.shape[0])
        model, batch_size = self.model, self.batch_size
        results: list[torch.Tensor | None] = [None] * self.count
        with eval_mode(model):
            device, dtype = model_device_dtype(model, inputs)
            x = inputs.detach().to(device=device, dtype=dtype)
            if isinstance(target, torch.Tensor):
                target = target.to(device)
            for i, b in self.computed:
                results[i] = b.spec(b.ctx, x, target, b.opts)
            self.last_targets = None
            for indices, shared in self.passes:
                for i, m in zip(indices, shared(model, x, target, batch_size)):
                    results[i] = m
                self.last_targets = shared.last_targets
        return [
            check_maps(m, name).detach().to(device=inputs.device, dtype=inputs.dtype)
            for m, name in zip(results, self.names)
        ]


@allow_grad
def explain_many(
    model: nn.Module,
    inputs: torch.Tensor,
    methods: Sequence[str | Mapping[str, Any] | Request],
    *,
    target: Any = None,
    output: Any = None,
    batch_size: int | None = None,
) -> list[torch.Tensor]:
    """Maps for several methods on the same model and inputs, sharing passes where rules agree.

    Each map equals ``explain(model, inputs, method, target=..., output=..., layer=...,
    **options)``.
    """
    from .engine.targets import objective

    goal = objective(output, target, inputs.shape[0] if isinstance(inputs, torch.Tensor) else 1)
    plan = Plan(model, inputs, methods, batch_size=batch_size, objective=goal)
    return plan(inputs, goal.target.per_sample())
