"""The check abstraction: one definition per check, and the audit every check starts from.

A :class:`Check` is a name, an options schema, a threshold with its direction, the models it
takes, a result type and a ``run`` function. From that definition alone come the API function
(:func:`api`), the fixture's ``saliency.audit(check, ...)`` and ``assert_*`` helpers, the YAML
``checks:`` keys (validated by the same :class:`Option` s), the reports' threshold column and
``ps.checks()``.

``run(audit, **options)`` gets an :class:`Audit`: the validated model, inputs, methods and
targets, and an :class:`Explainer` per model state that returns the maps of every audited
method (shared passes) followed by the maps of the null controls (no model passes). It returns
one dict of result fields per method and per control, in that order; the audit builds the
results and puts each control's score in every method's ``result.controls``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import SaliencyError, unknown
from ..validate import MIN_RISE, SIMILARITY_THRESHOLD, Threshold  # noqa: F401  (re-exported)
from .common import (
    cam_layer,
    check_choice,
    check_metric,
    check_seed,
    method_requests,
    model_inputs,
    outputs_of,
    setup,
)
from .controls import CONTROLS, Controls


@dataclass(frozen=True)
class Option:
    """One option of a check: its default, a validator and a line of help.

    ``validate(value)`` returns the value to use or raises :class:`SaliencyError` with a
    message that says what was expected (callers add where the value came from).
    """

    name: str
    default: Any
    validate: Callable[[Any], Any]
    help: str


@dataclass(frozen=True)
class Check:
    """One audit of a saliency method (see the module docstring)."""

    name: str
    summary: str
    run: Callable[..., list[dict]]
    options: tuple[Option, ...]
    threshold: Threshold
    result: type
    assert_name: str
    # The positional model arguments: ("model",) or ("model", "randomized_model").
    models: tuple[str, ...] = ("model",)
    # The similarity metric's default; None for a check that compares no maps pairwise, which
    # names what it measures in ``measure`` instead (the reports' metric column).
    similarity: str | None = "ssim"
    measure: str = ""
    # What the check explains, for the docs: the model states and what is compared.
    states: str = ""
    model_help: Mapping[str, str] = field(default_factory=dict)
    # How a suite names each extra model under ``checks: {name: ...}`` (default: its name).
    model_keys: Mapping[str, str] = field(default_factory=dict)

    def option(self, name: str) -> Option:
        for opt in self.options:
            if opt.name == name:
                return opt
        raise KeyError(name)

    @property
    def suite_keys(self) -> tuple[str, ...]:
        """Every setting a suite may give under ``checks: {name: ...}``."""
        shared = ("similarity",) if self.similarity else ()
        models = tuple(self.model_keys.get(m, m) for m in self.models[1:])
        return (*models, *(o.name for o in self.options), *shared, "seed", "batch_size",
                self.threshold.key, "confidence")  # fmt: skip


_REGISTRY: dict[str, Check] = {}


def register(check: Check) -> Check:
    if check.name in _REGISTRY:
        raise ValueError(f"check {check.name!r} is registered twice")
    if getattr(check.result, "threshold", None) is not check.threshold:
        # the verdict reads the result's threshold: one source of truth for the direction
        raise ValueError(
            f"check {check.name!r}: its result type {check.result.__name__} must carry the "
            "check's threshold (set `threshold = ...` on the result class)"
        )
    _REGISTRY[check.name] = check
    return check


# The bundled checks in the order they are listed, run and reported; others follow.
BUNDLED = ("output_sensitivity", "parameter_randomization", "smooth_randomization",
           "efficient_randomization", "data_randomization")  # fmt: skip


def checks() -> list[str]:
    """The names of the registered checks: the bundled ones first, in :data:`BUNDLED` order."""
    _load()
    rank = {name: i for i, name in enumerate(BUNDLED)}
    return sorted(_REGISTRY, key=lambda name: rank.get(name, len(rank)))


def get_check(name: object) -> Check:
    """The check called ``name``; an error listing the valid ones otherwise."""
    _load()
    if isinstance(name, Check):
        return name
    if not isinstance(name, str) or name not in _REGISTRY:
        raise unknown("check", name, tuple(checks()))
    return _REGISTRY[name]


def _load() -> None:
    from . import data, efficient, randomization, sensitivity  # noqa: F401  (they register)


# -- choices shared by several checks -------------------------------------------------------


def choice(name: str, choices: tuple[str, ...]) -> Callable[[Any], str]:
    return lambda value: check_choice(name, value, choices)


def layers_value(value: object) -> str | list[str] | None:
    if value is None or value == "blocks":
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(n, str) for n in value):
        return list(value)  # an empty list is refused by the step planner, with the names
    raise SaliencyError(
        f"layers must be None/null (every layer), 'blocks' or a list of module names, got {value!r}"
    )


def int_at_least(name: str, low: int) -> Callable[[Any], int]:
    def validate(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SaliencyError(f"{name} must be an int >= {low}, got {value!r}")
        return value

    return validate


def number_in(name: str, low: float, high: float) -> Callable[[Any], float]:
    def validate(value: object) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or not low <= value <= high:
            raise SaliencyError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")
        return float(value)

    return validate


# -- the audit -------------------------------------------------------------------------------


class Explainer:
    """The maps of every audited method and null control on one model state.

    ``explainer(batch, targets, chosen)`` returns maps for the explainers numbered in
    ``chosen`` (default: all; methods first, then the controls), on the batch's device.
    Methods sharing a rule set share one forward+backward; controls cost no model pass.
    Plans are kept per batch shape, so a check that explains the same batch at every step
    validates and groups once.
    """

    def __init__(self, audit: Audit, model: nn.Module, labels: Sequence | None = None) -> None:
        self.audit, self.model = audit, model
        labels = audit.labels if labels is None else labels
        self.layers = [cam_layer(model, audit.x, spec, label, r.options, audit.objective.output)
                       for spec, label, r in zip(audit.specs, labels, audit.requests)]  # fmt: skip
        from ..multi import Request

        self.requests = [
            Request(spec.name, r.options, cam)
            for spec, r, cam in zip(audit.specs, audit.requests, self.layers)
        ]
        self._plans: dict[tuple, Any] = {}
        # The classes the last call explained (from its shared pass; None without one).
        self.last_targets: torch.Tensor | None = None

    def fields(self, i: int, scores: torch.Tensor, maps: dict, targets: torch.Tensor,
               terms: Sequence[Any], constant: dict, **extra: Any) -> dict[str, Any]:  # fmt: skip
        """The result fields every check gives explainer ``i``: its scores, its maps (none
        kept for a control), the targets, its own settings (the CAM layer and its layout,
        FullGrad's terms), and why some maps were constant; ``extra`` adds the check's own."""
        from .common import constant_cause

        kind = self.audit.objective.target
        targets = targets.cpu()
        extra = {"target_labels": kind.label(targets), "target_kind": kind.kind, **extra}
        # What the results keep: the unit each sample explains (a class index), or the
        # selection itself where it is not one unit (a multi-label mask).
        units = kind.units_of(targets)
        targets = targets if units is None else units
        if i >= len(self.audit.specs):
            return dict(scores=scores, maps={}, targets=targets, constant=constant, **extra)
        cam = self.layers[i]
        settings = {
            "layer": cam.name if cam else None,
            "layout": str(cam.layout) if cam else None,
            **({"terms": terms[i]} if terms[i] is not None else {}),
        }
        # The layer's grid does not depend on the weights, so any model state's layer serves.
        cause = constant_cause(self.audit.specs[i], cam, self.audit.x) if constant else ""
        return dict(scores=scores, maps=maps, targets=targets, settings=settings,
                    cause=cause, constant=constant, **extra)  # fmt: skip

    def __call__(self, batch: torch.Tensor, targets: torch.Tensor,
                 chosen: Sequence[int] | None = None, batch_size: int | None = None
                 ) -> list[torch.Tensor]:  # fmt: skip
        from ..multi import Plan

        audit = self.audit
        m = len(audit.specs)
        chosen = list(range(m + len(audit.controls.names))) if chosen is None else list(chosen)
        methods = [i for i in chosen if i < m]
        size = audit.batch_size if batch_size is None else batch_size
        found: dict[int, torch.Tensor] = {}
        if methods:
            key = (tuple(batch.shape), tuple(methods), size)
            if key not in self._plans:
                chosen_requests = [self.requests[i] for i in methods]
                self._plans[key] = Plan(self.model, batch, chosen_requests, batch_size=size,
                                        objective=audit.objective)  # fmt: skip
            plan = self._plans[key]
            maps = plan(batch, targets)
            self.last_targets = plan.last_targets
            for i, m_ in zip(methods, maps):
                found[i] = m_
        controls = [i - m for i in chosen if i >= m]
        if controls:
            shape = next(iter(found.values())).shape if found else None
            for k, maps in zip(controls, audit.controls(batch, controls, shape)):
                found[m + k] = maps.to(device=batch.device, dtype=batch.dtype)
        return [found[i] for i in chosen]


class Audit:
    """What every check starts from: the validated call, shared by all its methods."""

    def __init__(self, check: Check, models: Sequence[nn.Module], inputs: torch.Tensor,
                 method: Any, *, layer: Any, target: Any, batch_size: Any, similarity: Any,
                 seed: Any, method_options: Mapping[str, Any], output: Any = None
                 ) -> None:  # fmt: skip
        from ..engine.targets import ClassLogit, objective

        self.check = check
        self.single = not isinstance(method, (list, tuple))
        self.requests = method_requests(method, layer, method_options)
        metric = similarity if check.similarity else "ssim"  # validated only where used
        audited = [
            setup(models[0], inputs, r.method, r.layer, batch_size, r.options, metric, seed)
            for r in self.requests
        ]
        self.model, self.inputs, self.batch_size = audited[0][:3]
        self.metric = check_metric(similarity) if check.similarity else None
        self.seed = check_seed(seed)
        self.specs = [a[3] for a in audited]
        self.labels = [a[6] for a in audited]
        self.objective = objective(output, target, self.inputs.shape[0])
        kind = self.objective.target
        # The class target as given (None: predicted), or the target object of another kind.
        self.target = kind.index if isinstance(kind, ClassLogit) else kind
        self.x = model_inputs(self.model, self.inputs)
        self.controls = Controls(self.seed, self.x)

    @property
    def target_setting(self) -> Any:
        """The target as the results' settings show it: the class as given, or the kind's
        settings (with the output selector, when one was given)."""
        from ..engine.targets import ClassLogit

        if isinstance(self.objective.target, ClassLogit) and self.objective.output.spec is None:
            return self.target
        return self.objective.settings()

    def outputs(self, model: nn.Module | None = None) -> torch.Tensor:
        """The scored tensor on ``model`` (default: the audited one), no-grad, eval mode."""
        model = self.model if model is None else model
        return outputs_of(model, self.x, self.batch_size, self.objective)

    def targets_from(self, outputs: torch.Tensor) -> torch.Tensor:
        """Each sample's selection (on the outputs' device): given, or the kind's own choice
        (for class logits: the predicted class)."""
        return self.objective.target.resolve(outputs, None)

    def explainer(self, model: nn.Module | None = None, labels: Sequence | None = None
                  ) -> Explainer:  # fmt: skip
        """Maps of every method and control on ``model`` (default: the audited model); CAM
        layers by ``labels`` (default: as the call gave them)."""
        return Explainer(self, self.model if model is None else model, labels)

    def terms(self, model: nn.Module | None = None) -> list[Any]:
        """FullGrad's bias terms per method (None for other methods), for the settings."""
        from ..engine.state import eval_mode

        model = self.model if model is None else model
        with eval_mode(model):
            return [spec.describe(model, self.x, self.objective.output) if spec.describe
                    else None for spec in self.specs]  # fmt: skip

    @property
    def count(self) -> int:
        """Methods and controls: the length of what ``run`` returns."""
        return len(self.specs) + len(self.controls.names)

    def results(self, fields: list[dict], settings: dict[str, Any]) -> list:
        """Result objects from ``run``'s fields: one per method, each with the controls."""
        from .common import to_cpu

        m = len(self.specs)
        if len(fields) != self.count:
            raise AssertionError(f"{self.check.name}.run returned {len(fields)} of {self.count}")
        common = dict(
            check=self.check.name,
            similarity=self.metric or self.check.measure,
            inputs=to_cpu(self.inputs),
            seed=self.seed,
        )
        controls = {}
        for name, extra in zip(self.controls.names, fields[m:]):
            extra = dict(extra)
            extra.pop("settings", None)
            result = self.check.result(method=name, options={}, settings={}, **common, **extra)
            controls[name] = result.score
        out = []
        for spec, request, extra in zip(self.specs, self.requests, fields):
            extra = dict(extra)
            own = extra.pop("settings", {})
            out.append(
                self.check.result(
                    method=spec.name,
                    options=dict(request.options),
                    settings={**settings, **own, "batch_size": self.batch_size},
                    controls=dict(controls),
                    **common,
                    **extra,
                )
            )
        return out if not self.single else out[0]


def execute(check: Check, models: Sequence[Any], inputs: Any, method: Any, kwargs: dict) -> Any:
    """Run ``check`` on a call's arguments: the check's options, the shared ones, and the
    method's own options (everything else)."""
    kwargs = dict(kwargs)
    shared = {
        "layer": kwargs.pop("layer", None),
        "target": kwargs.pop("target", None),
        "output": kwargs.pop("output", None),
        "batch_size": kwargs.pop("batch_size", None),
        "seed": kwargs.pop("seed", 0),
        "similarity": kwargs.pop("similarity", check.similarity),
    }
    if not check.similarity and shared["similarity"] is not None:
        raise SaliencyError(
            f"{check.name} compares the complexity of maps, not their similarity: it takes no "
            f"similarity= (its options: {', '.join(o.name for o in check.options)})"
        )
    options = {}
    for opt in check.options:
        options[opt.name] = opt.validate(kwargs.pop(opt.name, opt.default))
    _check_method_keywords(check, method, kwargs)
    from ..data import is_data, sample

    if is_data(inputs):  # a Dataset or DataLoader: a seeded, class-balanced batch of it
        inputs = sample(inputs, seed=shared["seed"])[0]
    audit = Audit(check, models, inputs, method, method_options=kwargs, **shared)
    return check.run(audit, *models[1:], **options)


def _check_method_keywords(check: Check, method: Any, kwargs: dict) -> None:
    """What is left after the check's own keywords must be the method's options: a keyword
    that is neither is named with both lists, so a typo of a check option is not read as a
    method option."""
    if not kwargs:
        return
    own = ", ".join(o.name for o in check.options) or "none"
    shared = "similarity, seed, batch_size, layer, target, output" if check.similarity else (
        "seed, batch_size, layer, target, output")  # fmt: skip
    if isinstance(method, (list, tuple)):
        raise SaliencyError(
            f"{check.name} got keyword(s) {', '.join(map(repr, kwargs))}, which are not its "
            f"options ({own}; and {shared}); with a list of methods, give each method's options "
            "inside its mapping, e.g. {'name': 'gradcam', 'positive': True}"
        )
    if isinstance(method, str):
        from ..bundled.registry import get_method

        defaults = get_method(method).defaults
        wrong = [k for k in kwargs if k not in defaults]
        if wrong:
            from ..errors import closest

            names = [o.name for o in check.options] + list(defaults)
            names += [n.strip() for n in shared.split(",")]
            near = closest(wrong[0], names)
            hint = f"; did you mean {', '.join(map(repr, near))}?" if near else "."
            raise SaliencyError(
                f"{check.name} got an unknown keyword {wrong[0]!r}{hint} The check's options: "
                f"{own} (and {shared}); method {method!r}'s options: "
                f"{', '.join(defaults) or 'none'}"
            )


def api(check: Check) -> Callable[..., Any]:
    """The public function of ``check``: ``fn(model, [other models,] inputs, method, **kw)``."""
    from ..explainer import allow_grad

    n = len(check.models)

    @allow_grad
    def fn(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            names = ", ".join([*check.models, "inputs", "method"])
            raise SaliencyError(
                f"{check.name}() takes {len(check.models) + 2} positional arguments ({names}): "
                f"{exc}"
            ) from None
        values = dict(bound.arguments)
        extra = values.pop("method_options", {})
        models = [values.pop(name) for name in check.models]
        inputs, method = values.pop("inputs"), values.pop("method")
        return execute(check, models, inputs, method, {**values, **extra})

    P = inspect.Parameter
    params = [P(name, P.POSITIONAL_OR_KEYWORD) for name in check.models]
    params += [P("inputs", P.POSITIONAL_OR_KEYWORD), P("method", P.POSITIONAL_OR_KEYWORD)]
    params += [P(o.name, P.KEYWORD_ONLY, default=o.default) for o in check.options]
    if check.similarity:
        params.append(P("similarity", P.KEYWORD_ONLY, default=check.similarity))
    params += [
        P("seed", P.KEYWORD_ONLY, default=0),
        P("batch_size", P.KEYWORD_ONLY, default=None),
        P("layer", P.KEYWORD_ONLY, default=None),
        P("target", P.KEYWORD_ONLY, default=None),
        P("output", P.KEYWORD_ONLY, default=None),
        P("method_options", P.VAR_KEYWORD),
    ]
    signature = inspect.Signature(params)
    fn.__signature__ = signature  # type: ignore[attr-defined]
    fn.__name__ = fn.__qualname__ = check.name
    fn.__module__ = "pytest_saliency"
    fn.__doc__ = _doc(check, n)
    return fn


def _doc(check: Check, n: int) -> str:
    lines = [check.summary, "", check.states, "", "Args:"]
    lines.append("    model: the model (read through output= and target=); never changed.")
    for name in check.models[1:]:
        lines.append(f"    {name}: {check.model_help.get(name, '')}; never changed.")
    lines += [
        "    inputs: a float batch [N, C, H, W] (or [N, C, L], [N, D]).",
        "    method: a name from pytest_saliency.methods(), or a list of names and",
        "        {'name': ..., 'layer': ..., **options} mappings audited together (methods that",
        "        share a rule set share their passes); a list of results comes back.",
    ]
    for opt in check.options:
        lines.append(f"    {opt.name}: {opt.help} (default {opt.default!r}).")
    if check.similarity:
        lines.append(
            f"    similarity: a metric from pytest_saliency.metrics() "
            f"(default {check.similarity!r})."
        )
    lines += [
        "    seed: seeds every random choice of the audit and the bootstrap interval.",
        "    batch_size: samples per pass, to bound memory (results do not depend on it).",
        "    layer: the CAM layer (name or module) for CAM methods; None for the default.",
        "    target: what is explained: None (the predicted class), an int or a LongTensor [N]",
        "        of classes, a target object (ClassLogit, Binary, MultiLabel, Segmentation,",
        "        Regression)",
        "        or a callable(output) -> [N] scores.",
        "    output: the scored tensor of what the model returns: None (the tensor, or its",
        "        'logits'), an int (a tuple's element), a str (a dict key or an attribute) or a",
        "        callable(returned) -> Tensor.",
        "    **method_options: the method's own options.",
        "",
        f"Returns: a {check.result.__name__} (a list for a list of methods); it passes when its "
        f"score is {check.threshold.symbol()} {check.threshold.key} ({check.threshold.help}).",
        f"result.controls holds the scores of the null controls ({', '.join(CONTROLS)}).",
    ]
    return "\n".join(lines)
