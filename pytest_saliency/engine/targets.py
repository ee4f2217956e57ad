"""What is explained: the score tensor a model returns (outputs) and the scalar per sample that
the backward starts from (targets).

An :class:`Objective` is the pair. Its :class:`Output` picks one tensor out of what the model
returns (the tensor itself, a tuple's element, a dict's entry, an attribute, or a callable's
result); its target kind turns that tensor into one score per sample and, for output
sensitivity, names another target of the same kind to compare with.

Every kind works with a *selection*: a tensor with one row per sample (class indices [N] for
most kinds, a label mask [N, K] for multi-label heads). Selections are sliced into chunks and
concatenated along the sample axis like the inputs, so the engine never needs to know the kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import ModelError, NonFiniteError, SaliencyError, closest, non_finite_samples, unknown


def call_model(model: torch.nn.Module, inputs: torch.Tensor) -> object:
    """``model(inputs)``; a failure inside the user's model becomes an error that says which
    call failed and on what (the original exception stays chained for the traceback)."""
    try:
        return model(inputs)
    except SaliencyError:
        raise
    except Exception as exc:
        raise ModelError(
            f"model {type(model).__name__} failed on inputs of shape {tuple(inputs.shape)} "
            f"({inputs.dtype}, {inputs.device}): {type(exc).__name__}: {exc}. Check that the "
            "inputs have the shape, channels, dtype and device the model expects"
        ) from exc


def _described(value: object, depth: int = 0) -> str:
    """What a model returned, in a few words: ``Tensor[4, 10]``, ``a tuple of (Tensor[4, 10],
    Tensor[4, 10])``, ``a dict with 'out': Tensor[4, 21, 8, 8]``."""
    if isinstance(value, torch.Tensor):
        return f"Tensor{list(value.shape)}"
    if depth > 0:
        return type(value).__name__
    if isinstance(value, Mapping):
        items = ", ".join(f"{k!r}: {_described(v, 1)}" for k, v in list(value.items())[:6])
        return f"a {type(value).__name__} with {items or 'no keys'}"
    if isinstance(value, (tuple, list)):
        items = ", ".join(_described(v, 1) for v in value[:6])
        return f"a {type(value).__name__} of ({items})"
    tensors = _tensor_attributes(value)
    if tensors:
        return f"a {type(value).__name__} with attributes {', '.join(tensors)}"
    return f"a {type(value).__name__}"


def _tensor_attributes(value: object) -> list[str]:
    names = getattr(value, "_fields", None) or [
        k for k in getattr(value, "__dict__", {}) if not k.startswith("_")
    ]
    return [str(k) for k in names if isinstance(getattr(value, str(k), None), torch.Tensor)][:8]


def _name_of(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


class Output:
    """Which tensor of the model's return value is scored.

    ``None`` (the default): the tensor the model returns, or its entry or attribute named
    ``logits`` (transformers' ``ModelOutput``, torchvision's ``InceptionOutputs``). An int: that
    element of a tuple or list. A str: that key of a dict, or that attribute. A callable:
    ``fn(returned) -> Tensor``.
    """

    def __init__(self, spec: object = None) -> None:
        if isinstance(spec, Output):
            spec = spec.spec
        if not (spec is None or callable(spec) or isinstance(spec, str)
                or (isinstance(spec, int) and not isinstance(spec, bool))):  # fmt: skip
            raise SaliencyError(
                f"output must be None (the tensor the model returns, or its 'logits'), an int "
                f"(an element of a returned tuple), a str (a key of a returned dict, or an "
                f"attribute) or a callable(returned) -> Tensor; got {type(spec).__name__} "
                f"{spec!r}"
            )
        self.spec = spec

    def __repr__(self) -> str:
        return f"Output({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Output) and self.spec == other.spec

    def __hash__(self) -> int:
        return hash(("Output", id(self.spec) if callable(self.spec) else self.spec))

    def describe(self) -> str:
        """How the reports name the scored tensor: ``output``, ``output[0]``, ``output['out']``,
        ``output.logits``, ``fn(output)``."""
        spec = self.spec
        if spec is None:
            return "output"
        if isinstance(spec, int):
            return f"output[{spec}]"
        if isinstance(spec, str):
            return f"output[{spec!r}]"
        return f"{_name_of(spec)}(output)"

    def __call__(self, returned: object, model_name: str) -> torch.Tensor:
        spec = self.spec
        seen = _described(returned)
        if spec is None:
            if isinstance(returned, torch.Tensor):
                return returned
            if isinstance(returned, Mapping) and isinstance(returned.get("logits"), torch.Tensor):
                return returned["logits"]
            if isinstance(getattr(returned, "logits", None), torch.Tensor):
                return returned.logits
            raise SaliencyError(
                f"model {model_name} returned {seen}; saliency methods need the class scores "
                "[N, classes] (or another task's scores): a tensor, or an entry or attribute "
                "named 'logits' (as transformers' ModelOutput and "
                "torchvision's InceptionOutputs have). Which element holds them is not guessed: "
                "select it with output= (an int for a tuple's element, e.g. output=0 for "
                "(logits, aux); a str for a dict's key or an attribute, e.g. output='out'; or a "
                "callable(returned) -> Tensor)"
            )
        if isinstance(spec, int):
            if not isinstance(returned, (tuple, list)):
                raise SaliencyError(
                    f"output={spec} selects an element of a returned tuple, but model "
                    f"{model_name} returned {seen}"
                )
            if not -len(returned) <= spec < len(returned):
                raise SaliencyError(
                    f"output={spec} is out of range: model {model_name} returned {seen}, "
                    f"{len(returned)} element(s); valid: 0 to {len(returned) - 1}"
                )
            found = returned[spec]
        elif isinstance(spec, str):
            if isinstance(returned, Mapping):
                if spec not in returned:
                    keys = [str(k) for k in returned]
                    near = closest(spec, keys)
                    hint = f"; did you mean {', '.join(map(repr, near))}?" if near else "."
                    raise SaliencyError(
                        f"output={spec!r}: model {model_name} returned {seen}, which has no key "
                        f"{spec!r}{hint} Its keys: {', '.join(map(repr, keys)) or 'none'}"
                    )
                found = returned[spec]
            elif isinstance(returned, torch.Tensor):
                raise SaliencyError(
                    f"output={spec!r} selects a key of a returned dict or an attribute of a "
                    f"returned object, but model {model_name} returned {seen}, a tensor: leave "
                    "output unset to score it"
                )
            elif hasattr(returned, spec) and not spec.startswith("_"):
                found = getattr(returned, spec)
            else:
                names = _tensor_attributes(returned)
                raise SaliencyError(
                    f"output={spec!r}: model {model_name} returned {seen}, which has no key or "
                    f"attribute {spec!r}"
                    + (f"; its tensor attributes: {', '.join(names)}" if names else "")
                )
        else:
            try:
                found = spec(returned)
            except SaliencyError:
                raise
            except Exception as exc:
                raise SaliencyError(
                    f"output={_name_of(spec)} raised {type(exc).__name__}: {exc}, on what model "
                    f"{model_name} returned ({seen})"
                ) from exc
        if not isinstance(found, torch.Tensor):
            raise SaliencyError(
                f"{self.describe()} is {_described(found)}, not a tensor: model {model_name} "
                f"returned {seen}; select a tensor with output="
            )
        return found


def _check_finite(out: torch.Tensor, model_name: str, what: str) -> None:
    bad = non_finite_samples(out)
    if bad:
        raise NonFiniteError(
            bad,
            (
                f"model {model_name} returned NaN or inf {what} for {{which}}; the explained "
                "score and its gradient are undefined there. Check the model on these inputs (an "
                "overflow, a division by zero, a float16 model)"
            ),
        )


def _indices(given: object, n: int, count: int, noun: str, device) -> torch.Tensor:
    """``given`` (an int or integer tensor [N]) as a LongTensor [N] in [0, count)."""
    if isinstance(given, bool):
        raise SaliencyError(f"{noun} must be an int or a LongTensor [N], got {given!r}")
    plural = f"{noun}es" if noun.endswith("s") else f"{noun}s"
    if isinstance(given, int):
        if not 0 <= given < count:
            raise SaliencyError(
                f"target {given} is out of range: the model has {count} {plural}, so targets "
                f"must be in [0, {count - 1}]"
            )
        return torch.full((n,), given, dtype=torch.long, device=device)
    try:
        found = torch.as_tensor(given)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise SaliencyError(
            f"target must be None, an int or a LongTensor [N], got {type(given).__name__}"
        ) from exc
    if found.is_floating_point() or found.is_complex() or found.dtype == torch.bool:
        raise SaliencyError(f"target must hold integer {noun} indices, got dtype {found.dtype}")
    if found.dim() == 0:
        found = found.expand(n)
    if found.dim() != 1 or found.shape[0] != n:
        raise SaliencyError(
            f"target has shape {tuple(found.shape)}; expected one {noun} per sample, shape [{n}]"
        )
    found = found.long()
    bad = (found < 0) | (found >= count)
    if bool(bad.any()):
        idx = int(bad.nonzero()[0])
        raise SaliencyError(
            f"target {int(found[idx])} (sample {idx}) is out of range: the model has {count} "
            f"{plural}, so targets must be in [0, {count - 1}]"
        )
    return found.to(device)


def resolve_targets(target: object, logits: torch.Tensor) -> torch.Tensor:
    """A LongTensor [N] of class indices on the logits' device, checked against the class count."""
    if target is None:
        return logits.detach().argmax(dim=1)
    return _indices(target, logits.shape[0], logits.shape[1], "class", logits.device)


class Target:
    """A target kind: what one sample's score is, and which other targets it can be compared to.

    Subclasses set ``kind`` (the name in suites and reports) and ``noun`` (what an index
    names: "class", "label", "unit"), and implement :meth:`check`, :meth:`resolve` and
    :meth:`score`; output sensitivity needs :meth:`alternatives` and :meth:`alternative`.
    """

    kind: ClassVar[str] = ""
    noun: ClassVar[str] = "class"
    shape: ClassVar[str] = "[N, classes]"

    def check(self, out: torch.Tensor, n: int, model_name: str) -> torch.Tensor:
        """The scored tensor, checked for this kind (shape, finite); may be reshaped."""
        raise NotImplementedError

    def resolve(self, out: torch.Tensor, given: object = None) -> torch.Tensor:
        """The selection (one row per sample) on ``out``'s device: ``given`` (a selection made
        before, or the caller's per-call choice), else the kind's own, else predicted."""
        raise NotImplementedError

    def score(self, out: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
        """One differentiable score per sample, [N]."""
        raise NotImplementedError

    def alternatives(self, out: torch.Tensor, selection: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(scores [N, K], allowed [N, K] bool): every other target a sample's map can be
        compared with, with a score to rank them ('second', 'least_likely')."""
        raise SaliencyError(
            f"output sensitivity compares the map of a target with the map of another target "
            f"of the same kind, and a {self.kind} target has none; audit this model with the "
            "randomization checks, or give a target kind that has others"
        )

    def alternative(self, units: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The selection that explains unit ``units[i]`` for sample ``i``."""
        return units.to(out.device)

    def per_sample(self) -> torch.Tensor | None:
        """The kind's own choice where it is one row per sample (a tensor [N, ...]), which the
        engine splits into chunks with the inputs; None where it holds for every sample."""
        for name in ("index", "unit", "labels"):
            value = getattr(self, name, None)
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return value
        return None

    def units_of(self, selection: torch.Tensor) -> torch.Tensor | None:
        """The unit each sample explains ([N] long), or None when a selection is not one unit
        (several labels at once)."""
        return selection

    def label(self, selection: torch.Tensor) -> list:
        """Per sample, what it explains, as JSON (an int, or a list of labels)."""
        return [int(v) for v in selection.reshape(-1).tolist()]

    def settings(self) -> dict[str, Any]:
        """The kind and its options, for the results' settings and the reports."""
        return {"kind": self.kind}

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.settings().items() if k != "kind")
        return f"{type(self).__name__}({inner})"


def _rows_of(
    out: torch.Tensor,
    n: int,
    model_name: str,
    needs: str,
    *,
    flat: bool = False,
    width: int | None = None,
    what: str = "scores",
) -> torch.Tensor:
    """``out`` as [N, K] (a flat [N] read as [N, 1] where ``flat``), finite, or an error saying
    which shape the target kind ``needs``."""
    if flat and out.dim() == 1 and out.shape[0] == n:
        out = out[:, None]
    if out.dim() != 2 or out.shape[0] != n or (width is not None and out.shape[1] != width):
        raise SaliencyError(
            f"model {model_name} returned a tensor of shape {tuple(out.shape)}; {needs}"
        )
    _check_finite(out, model_name, what)
    return out


def _threshold(kind: str, value: object, chosen: object, name: str) -> float:
    """A finite real number (numpy and 0-d tensor scalars too) as a float; it picks the
    predicted classes or labels, so it may differ from 0 only where ``chosen`` (the
    explicit ``name=``) is None."""
    import numbers

    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dim() == 0:
        value = value.item()
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
    ):
        raise SaliencyError(
            f"{kind} threshold must be a finite number (the score above which a sample is "
            f"predicted positive: 0 for logits, 0.5 for probabilities), got {value!r}"
        )
    if chosen is not None and float(value) != 0.0:
        raise SaliencyError(
            f"{kind} threshold= picks the predicted {'class' if name == 'index' else name}, so "
            f"it applies only without {name}=; got both {name}={_jsonable(chosen)!r} and "
            f"threshold={float(value)!r}"
        )
    return float(value)


def _all_but_own(out: torch.Tensor, selection: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every unit but the sample's own, ranked by its score: ``alternatives`` of the kinds
    whose selection is one unit of a [N, K] output."""
    allowed = torch.ones(out.shape, dtype=torch.bool)
    allowed[torch.arange(out.shape[0]), selection.cpu()] = False
    return out.detach().double().cpu(), allowed


def _given(own: object, given: object) -> object:
    return own if given is None else given


@dataclass(repr=False)
class ClassLogit(Target):
    """One class logit per sample, of scores [N, classes] (the default).

    ``index``: None (each sample's predicted class), an int, or a LongTensor [N].
    """

    index: object = None
    kind: ClassVar[str] = "class"

    def check(self, out, n, model_name):
        return _rows_of(out, n, model_name, (
            f"a class target needs class scores of shape [N={n}, classes]. For another task "
            "pass target= a Segmentation, MultiLabel, Binary or Regression target, or a "
            "callable(output) -> [N]"))  # fmt: skip

    def resolve(self, out, given=None):
        return resolve_targets(_given(self.index, given), out)

    def score(self, out, selection):
        return out.gather(1, selection[:, None])[:, 0]

    def alternatives(self, out, selection):
        if out.shape[1] < 2:
            raise SaliencyError(
                f"output sensitivity compares the maps of two classes, but the model has "
                f"{out.shape[1]} output; it needs at least 2 classes"
            )
        return _all_but_own(out, selection)

    def settings(self):
        return {
            "kind": self.kind,
            **({} if self.index is None else {"index": _jsonable(self.index)}),
        }


@dataclass(repr=False)
class Regression(Target):
    """One output unit of a regression head, [N] or [N, units].

    ``unit``: None (the only unit of a one-output head), an int, or a LongTensor [N].
    """

    unit: object = None
    kind: ClassVar[str] = "regression"
    noun: ClassVar[str] = "unit"
    shape: ClassVar[str] = "[N] or [N, units]"

    def check(self, out, n, model_name):
        needs = f"a regression target needs outputs of shape [N={n}] or [N={n}, units]"
        return _rows_of(out, n, model_name, needs, flat=True, what="outputs")

    def resolve(self, out, given=None):
        chosen = _given(self.unit, given)
        if chosen is None:
            if out.shape[1] != 1:
                raise SaliencyError(
                    f"the regression output has {out.shape[1]} units; say which one is "
                    f"explained with Regression(unit=k), k in [0, {out.shape[1] - 1}]"
                )
            chosen = 0
        return _indices(chosen, out.shape[0], out.shape[1], "unit", out.device)

    def score(self, out, selection):
        return out.gather(1, selection[:, None])[:, 0]

    def alternatives(self, out, selection):
        if out.shape[1] < 2:
            raise SaliencyError(
                "output sensitivity compares the maps of two output units, but the regression "
                "output has one unit, so there is no other target to compare with; audit this "
                "model with the randomization checks (parameter_randomization, "
                "data_randomization) instead"
            )
        return _all_but_own(out, selection)

    def settings(self):
        unit = self.unit
        return {"kind": self.kind, **({} if unit is None else {"unit": _jsonable(unit)})}


@dataclass(repr=False)
class Binary(Target):
    """One logit per sample, [N] or [N, 1], read as two classes: class 1 scores the logit,
    class 0 its negation (pytorch-grad-cam's BinaryClassifierOutputTarget).

    ``index``: None (each sample's predicted class: 1 where the output is above
    ``threshold``, 0 for a logit; give 0.5 for a head that ends in a sigmoid), 0 or 1, or a
    LongTensor [N]. Output sensitivity is refused: the other class's map is this map negated.
    """

    index: object = None
    threshold: float = 0.0
    kind: ClassVar[str] = "binary"
    shape: ClassVar[str] = "[N] or [N, 1]"

    def check(self, out, n, model_name):
        needs = (f"a binary target needs one logit per sample, [N={n}] or [N={n}, 1] (a head "
                 "with a score per class is a ClassLogit target)")  # fmt: skip
        return _rows_of(out, n, model_name, needs, flat=True, width=1, what="logits")

    def resolve(self, out, given=None):
        chosen = _given(self.index, given)
        if chosen is None:
            return (out.detach()[:, 0] > self.threshold).long()
        return _indices(chosen, out.shape[0], 2, "class", out.device)

    def score(self, out, selection):
        sign = selection.to(out.dtype) * 2 - 1  # class 1: +logit, class 0: -logit
        return out[:, 0] * sign

    def alternatives(self, out, selection):
        raise SaliencyError(
            "output sensitivity compares the maps of two targets, but a binary head's two "
            "classes are one logit and its negation: the other class's map is this map with "
            "its sign flipped for every gradient method, so the comparison says nothing about "
            "the model. Audit it with the randomization checks (parameter_randomization, "
            "data_randomization) instead"
        )

    def __post_init__(self) -> None:
        self.threshold = _threshold("Binary", self.threshold, self.index, "index")

    def settings(self):
        found: dict[str, Any] = {"kind": self.kind}
        if self.index is not None:
            found["index"] = _jsonable(self.index)
        if self.threshold != 0.0:
            found["threshold"] = self.threshold
        return found


@dataclass(repr=False)
class MultiLabel(Target):
    """The sum of several label logits of a multi-label head [N, labels].

    ``labels``: None (each sample's predicted labels, logit > ``threshold``; the top label
    where none is), a list of label indices (the same for every sample), or a bool mask
    [N, labels]. Output sensitivity compares with one label the sample's set does not hold.
    Each label on its own is a :class:`ClassLogit` with that index.
    """

    labels: object = None
    threshold: float = 0.0
    kind: ClassVar[str] = "multilabel"
    noun: ClassVar[str] = "label"
    shape: ClassVar[str] = "[N, labels]"

    def __post_init__(self) -> None:
        self.threshold = _threshold("MultiLabel", self.threshold, self.labels, "labels")

    def check(self, out, n, model_name):
        needs = f"a multi-label target needs label scores of shape [N={n}, labels]"
        return _rows_of(out, n, model_name, needs)

    def resolve(self, out, given=None):
        n, count = out.shape
        chosen = _given(self.labels, given)
        if chosen is None:
            mask = out.detach() > self.threshold
            top = torch.nn.functional.one_hot(out.detach().argmax(dim=1), count).bool()
            return torch.where(mask.any(dim=1, keepdim=True), mask, top)
        if isinstance(chosen, torch.Tensor) and chosen.dtype == torch.bool:
            if tuple(chosen.shape) != (n, count):
                raise SaliencyError(
                    f"a multi-label mask must have shape [N={n}, labels={count}], got "
                    f"{tuple(chosen.shape)}"
                )
            empty = (~chosen.any(dim=1)).nonzero().flatten().tolist()
            if empty:
                raise SaliencyError(
                    f"the multi-label mask selects no label for sample(s) {empty}; each sample "
                    "needs at least one label"
                )
            return chosen.to(out.device)
        if (
            isinstance(chosen, (list, tuple))
            and chosen
            and all(isinstance(v, int) and not isinstance(v, bool) for v in chosen)
        ):
            for v in chosen:
                if not 0 <= v < count:
                    raise SaliencyError(
                        f"label {v} is out of range: the model has {count} labels, so labels "
                        f"must be in [0, {count - 1}]"
                    )
            mask = torch.zeros(n, count, dtype=torch.bool, device=out.device)
            mask[:, list(chosen)] = True
            return mask
        raise SaliencyError(
            "MultiLabel labels must be None (the predicted labels), a non-empty list of label "
            f"indices or a bool mask [N, labels], got {type(chosen).__name__} {chosen!r}"
        )

    def score(self, out, selection):
        return (out * selection.to(out.dtype)).sum(dim=1)

    def alternatives(self, out, selection):
        allowed = ~selection.cpu()
        full = (~allowed.any(dim=1)).nonzero().flatten().tolist()
        if full:
            raise SaliencyError(
                f"sample(s) {full} hold every label, so no other label is left to compare "
                "their maps with; explain fewer labels (labels=[...]), or raise threshold= "
                "(a logit: 0 is probability 0.5; a head that outputs probabilities needs "
                "another threshold, or its logits through output=)"
            )
        return out.detach().double().cpu(), allowed

    def alternative(self, units, out):
        return torch.nn.functional.one_hot(units.to(out.device), out.shape[1]).bool()

    def units_of(self, selection):
        return None

    def label(self, selection):
        return [row.nonzero().flatten().tolist() for row in selection.cpu()]

    def settings(self):
        found: dict[str, Any] = {"kind": self.kind}
        if self.labels is not None:
            found["labels"] = _jsonable(self.labels)
        if self.threshold != 0.0:
            found["threshold"] = self.threshold
        return found


PIXELS = ("predicted", "all")


@dataclass(repr=False)
class Segmentation(Target):
    """One class of a segmentation head [N, classes, *spatial], summed over pixels.

    ``index``: the class (an int or a LongTensor [N]). ``pixels``: ``"predicted"`` (the
    pixels the model assigns to the class, as pytorch-grad-cam's SemanticSegmentationTarget
    with the predicted mask), ``"all"``, a bool mask [H, W] shared by every sample, or a bool
    mask per sample [N, H, W] (e.g. the ground truth). Output sensitivity compares with another
    class over its own predicted pixels (``"predicted"``) or over the same pixels.
    """

    index: object = None
    pixels: object = "predicted"
    kind: ClassVar[str] = "segmentation"
    shape: ClassVar[str] = "[N, classes, *spatial]"

    def __post_init__(self) -> None:
        if isinstance(self.pixels, torch.Tensor):
            if self.pixels.dtype != torch.bool or self.pixels.dim() < 1:
                raise SaliencyError(
                    "Segmentation pixels= as a mask must be a bool tensor of the output's "
                    f"spatial shape, got {self.pixels.dtype} of shape {tuple(self.pixels.shape)}"
                )
            if not bool(self.pixels.any()):
                raise SaliencyError("Segmentation pixels= mask selects no pixel")
            if self.pixels.dim() == 3:
                empty = (~self.pixels.flatten(1).any(dim=1)).nonzero().flatten().tolist()
                if empty:
                    raise SaliencyError(
                        f"the Segmentation mask selects no pixel of sample(s) {empty}; each "
                        "sample's score would be an empty sum and its map blank"
                    )
        elif not (isinstance(self.pixels, str) and self.pixels in PIXELS):
            raise unknown("Segmentation pixels choice", self.pixels, PIXELS)

    def check(self, out, n, model_name):
        if out.dim() < 3 or out.shape[0] != n:
            raise SaliencyError(
                f"model {model_name} returned a tensor of shape {tuple(out.shape)}; a "
                f"segmentation target needs class scores per pixel, [N={n}, classes, H, W] "
                "(or [N, classes, L])"
            )
        mask = self.pixels
        if isinstance(mask, torch.Tensor) and tuple(mask.shape[self._per_row() :]) != tuple(
            out.shape[2:]
        ):
            raise SaliencyError(
                f"the Segmentation mask has shape {tuple(mask.shape)}, but the output's pixels "
                f"are {tuple(out.shape[2:])} (output {tuple(out.shape)}); give a mask of the "
                "output's spatial shape, [H, W] for every sample or [N, H, W] for each"
            )
        _check_finite(out, model_name, "scores")
        return out

    def _per_row(self) -> int:
        """1 for a mask per sample [N, H, W], else 0."""
        return int(isinstance(self.pixels, torch.Tensor) and self.pixels.dim() == 3)

    def per_sample(self) -> torch.Tensor | None:
        if not self._per_row():
            return super().per_sample()
        n = self.pixels.shape[0]
        if self.index is None:
            raise SaliencyError(
                "a segmentation target needs its class: Segmentation(index=k, pixels=mask)"
            )
        classes = torch.as_tensor(self.index).long().reshape(-1).expand(n)
        return self._selection(classes, self.pixels)

    def _region(self, out: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """The pixels summed for class ``classes[i]``, a bool tensor [M, *spatial]; row ``i``
        reads sample ``i % N`` of ``out`` (M may be several rounds of the N samples)."""
        shape = (classes.shape[0], *out.shape[2:])
        if self._per_row():
            rows = torch.arange(classes.shape[0]) % self.pixels.shape[0]
            return self.pixels[rows].to(out.device)
        if isinstance(self.pixels, torch.Tensor):
            return self.pixels.to(out.device).expand(shape)
        if self.pixels == "all":
            return torch.ones(shape, dtype=torch.bool, device=out.device)
        assigned = out.detach().argmax(dim=1)
        rows = torch.arange(classes.shape[0], device=out.device) % out.shape[0]
        view = classes.to(out.device).reshape(-1, *([1] * (out.dim() - 2)))
        return assigned[rows] == view

    def _selection(self, classes: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """A selection row per sample: its class, then its pixels (0/1, flattened). The
        pixels are fixed when the target is resolved, on the explained model and inputs:
        the same pixels are then scored on a randomized model or a perturbed input."""
        return torch.cat([classes[:, None].int(), region.flatten(1).int()], dim=1)

    def resolve(self, out, given=None):
        chosen = _given(self.index, given)
        pixels = math.prod(out.shape[2:])
        if isinstance(chosen, torch.Tensor) and chosen.dim() == 2:  # a selection made before
            if chosen.shape != (out.shape[0], 1 + pixels):
                if self._per_row():
                    raise SaliencyError(
                        f"the Segmentation mask has {self.pixels.shape[0]} rows (one per "
                        f"sample), but the batch has {out.shape[0]} samples"
                    )
                raise SaliencyError(
                    f"a segmentation selection has shape {tuple(chosen.shape)}; expected "
                    f"[N={out.shape[0]}, 1 + {pixels} pixels] (a class index per sample, or "
                    "one class for every sample, is the usual target)"
                )
            _indices(chosen[:, 0], out.shape[0], out.shape[1], "class", out.device)
            return chosen.to(out.device)
        if self._per_row():
            if self.pixels.shape[0] != out.shape[0]:
                raise SaliencyError(
                    f"the Segmentation mask has one row per sample, {self.pixels.shape[0]}, "
                    f"but the batch has {out.shape[0]} samples"
                )
            chosen = self.index  # the class (the mask is read below, per sample)
        if chosen is None:
            raise SaliencyError(
                "a segmentation target needs its class: Segmentation(index=k) (in a suite, "
                f"targets: {{kind: segmentation, index: k}}), k in [0, {out.shape[1] - 1}]"
            )
        classes = _indices(chosen, out.shape[0], out.shape[1], "class", out.device)
        region = self._region(out, classes)
        if self.pixels == "predicted":
            empty = region.flatten(1).sum(dim=1) == 0
            if bool(empty.any()):
                samples = empty.nonzero().flatten().tolist()
                which = sorted({int(classes[i]) for i in samples})
                shown = ", ".join(map(str, which[:10])) + (", ..." if len(which) > 10 else "")
                listed = str(samples[:20])[:-1] + (", ...]" if len(samples) > 20 else "]")
                raise SaliencyError(
                    f"the model assigns no pixel to class {shown} in sample(s) {listed}, so "
                    "the class's score over its predicted pixels is an empty sum and its map "
                    "would be blank; explain samples that show the class, or sum over every "
                    "pixel (pixels='all') or a mask"
                )
        return self._selection(classes, region)

    def score(self, out, selection):
        rows = torch.arange(out.shape[0], device=out.device)
        channel = out[rows, selection[:, 0].long()]
        region = selection[:, 1:].reshape(channel.shape).to(out.dtype)
        return (channel * region).flatten(1).sum(dim=1)

    def alternative(self, units, out):
        """Class ``units[i]`` over its own pixels of sample ``i % N`` (predicted on ``out``,
        the explained model's output on the inputs), or over the same pixels as the target
        (``pixels='all'`` or a mask)."""
        units = units.to(out.device)
        return self._selection(units, self._region(out, units))

    def units_of(self, selection):
        return selection[:, 0].long()

    def label(self, selection):
        return [int(v) for v in selection[:, 0].tolist()]

    def alternatives(self, out, selection):
        n, count = out.shape[:2]
        if count < 2:
            raise SaliencyError(
                "output sensitivity compares the maps of two classes, but the segmentation "
                "output has one class channel"
            )
        with torch.no_grad():
            detached = out.detach()
            scores = torch.stack(
                [self.score(detached, self.alternative(torch.full((n,), c), detached))
                 for c in range(count)], dim=1,
            ).double().cpu()  # fmt: skip
            allowed = torch.ones(n, count, dtype=torch.bool)
            if self.pixels == "predicted":
                assigned = out.detach().argmax(dim=1).flatten(1)
                allowed = torch.zeros(n, count, dtype=torch.bool, device=out.device)
                allowed = allowed.scatter_(1, assigned, True).cpu()
        allowed = allowed.clone()
        allowed[torch.arange(n), selection[:, 0].long().cpu()] = False
        alone = (~allowed.any(dim=1)).nonzero().flatten().tolist()
        if alone:
            raise SaliencyError(
                f"in sample(s) {alone} the model assigns every pixel to the explained class, so "
                "no other class has predicted pixels to compare with; sum over every pixel "
                "(pixels='all') or a mask, or explain samples that show two classes"
            )
        return scores, allowed

    def settings(self):
        found: dict[str, Any] = {"kind": self.kind}
        if self.index is not None:
            found["index"] = _jsonable(self.index)
        found["pixels"] = (
            f"mask {list(self.pixels.shape)}{' per sample' if self._per_row() else ''} "
            f"({int(self.pixels.sum())} px)"
            if isinstance(self.pixels, torch.Tensor)
            else self.pixels
        )
        return found


@dataclass(repr=False)
class CallableTarget(Target):
    """``fn(output) -> [N]``: any differentiable score per sample. Each sample's score must
    come from its own row of the output (the engine splits and joins batches)."""

    fn: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda out: out)
    kind: ClassVar[str] = "callable"
    shape: ClassVar[str] = "[N, ...]"

    def check(self, out, n, model_name):
        if out.dim() == 0 or out.shape[0] != n:
            raise SaliencyError(
                f"model {model_name} returned a tensor of shape {tuple(out.shape)}; the target "
                f"callable {_name_of(self.fn)} needs one row per sample, [N={n}, ...]"
            )
        _check_finite(out, model_name, "outputs")
        return out

    def resolve(self, out, given=None):
        if given is not None and not isinstance(given, torch.Tensor):
            raise SaliencyError(
                f"a callable target ({_name_of(self.fn)}) chooses its own score; it takes no "
                f"per-sample target, got {given!r}"
            )
        return torch.zeros(out.shape[0], dtype=torch.long, device=out.device)

    def score(self, out, selection):
        try:
            found = self.fn(out)
        except SaliencyError:
            raise
        except Exception as exc:
            raise SaliencyError(
                f"the target callable {_name_of(self.fn)} raised {type(exc).__name__}: {exc} on "
                f"an output of shape {tuple(out.shape)}"
            ) from exc
        if not isinstance(found, torch.Tensor) or tuple(found.shape) != (out.shape[0],):
            got = tuple(found.shape) if isinstance(found, torch.Tensor) else type(found).__name__
            raise SaliencyError(
                f"the target callable {_name_of(self.fn)} must return one score per sample, a "
                f"tensor of shape [N={out.shape[0]}], got {got}"
            )
        if not found.requires_grad and out.requires_grad:
            raise SaliencyError(
                f"the target callable {_name_of(self.fn)} returned scores with no autograd "
                "graph (it detaches the output or converts it through numpy); keep it "
                "differentiable"
            )
        if out.shape[0] > 1:
            self._alone(found, out)
            if out.requires_grad:
                self._rowwise(found, out)
        return found

    def _mixes(self, what: str) -> SaliencyError:
        return SaliencyError(
            f"the target callable {_name_of(self.fn)} {what}: each sample's score must come "
            "from its own row of the output, since the engine splits and joins batches "
            "(batch_size, the 2N batches of output sensitivity), so it would change with them. "
            "Compute it row by row: no means or other statistics over the batch, and no "
            "per-sample tensor captured from outside (use a target kind, or a target= tensor)"
        )

    def _alone(self, found: torch.Tensor, out: torch.Tensor) -> None:
        """Samples 0 and N-1 scored alone must score as in the batch (within rounding): a
        callable that indexes a captured per-sample tensor, or divides by a batch statistic,
        does not."""
        with torch.no_grad():
            for i in (0, out.shape[0] - 1):
                try:
                    alone = self.fn(out[i : i + 1].detach())
                    alone = torch.as_tensor(alone).reshape(-1)
                except Exception as exc:
                    raise self._mixes(
                        f"fails on one sample alone ({type(exc).__name__}: {exc})"
                    ) from exc
                want = found.detach()[i : i + 1].reshape(-1)
                if alone.shape != want.shape:
                    raise self._mixes(f"returns shape {tuple(alone.shape)} for one sample")
                finite = want[torch.isfinite(want)]
                scale = float(finite.abs().max()) if finite.numel() else 0.0
                eps = torch.finfo(want.dtype).eps if want.is_floating_point() else 0.0
                rtol = max(1e-3, 8 * eps)
                if not torch.allclose(alone.to(want), want, rtol=rtol, atol=rtol * scale + 1e-12,
                                      equal_nan=True):  # fmt: skip
                    raise self._mixes(
                        f"scores sample {i} differently alone ({float(alone[0]):.6g}) than in "
                        f"the batch ({float(want[0]):.6g})"
                    )

    def _rowwise(self, found: torch.Tensor, out: torch.Tensor) -> None:
        """Each score must come from its own row of the output (the engine splits and joins
        batches): the first and last scores' gradients must be zero on every other row."""
        n = out.shape[0]
        for i in (0, n - 1):
            (g,) = torch.autograd.grad(found[i], out, retain_graph=True, allow_unused=True)
            if g is None:
                continue
            # A NaN there is 0 times an infinite derivative (sqrt at a negative score): the
            # map's own non-finite error says so; only finite, non-zero entries mix samples.
            others = torch.cat([g[:i], g[i + 1 :]]).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
            if bool(others.ne(0).any()):
                raise self._mixes(
                    f"makes the score of sample {i} depend on other samples' outputs (its "
                    "gradient reaches their rows)"
                )

    def label(self, selection):
        return [_name_of(self.fn)] * selection.shape[0]

    def units_of(self, selection):
        return None

    def settings(self):
        return {"kind": self.kind, "function": _name_of(self.fn)}

    def __repr__(self):
        return f"CallableTarget({_name_of(self.fn)})"


def _jsonable(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


KINDS: dict[str, type[Target]] = {
    "class": ClassLogit,
    "binary": Binary,
    "multilabel": MultiLabel,
    "segmentation": Segmentation,
    "regression": Regression,
}


def as_target(target: object, n: int) -> Target:
    """What ``target=`` accepts, as a target kind: None, an int or integer tensor / list [N]
    (a class logit), a :class:`Target` (ClassLogit, Binary, MultiLabel, Segmentation,
    Regression), or a callable(output) -> [N]."""
    from ..explainer import check_target  # the class-index forms, as before

    if isinstance(target, Target):
        name = {ClassLogit: "index", Binary: "index", Segmentation: "index",
                Regression: "unit"}.get(type(target))  # fmt: skip
        value = getattr(target, name) if name else None
        if value is not None:
            checked = check_target(value, n)
            if checked is not value:
                target = type(target)(**{**vars(target), name: checked})
        return target
    if callable(target) and not isinstance(target, torch.Tensor):
        return CallableTarget(target)
    if isinstance(target, torch.Tensor) and target.dtype == torch.bool:
        raise SaliencyError(
            f"target is a bool tensor of shape {tuple(target.shape)}; for a multi-label mask "
            "pass target=MultiLabel(mask), for a segmentation mask "
            "target=Segmentation(index, pixels=mask)"
        )
    if isinstance(target, (str, Mapping)):
        raise SaliencyError(
            f"target must be None, an int or a LongTensor [N] of classes, a target object "
            f"(ClassLogit, Binary, MultiLabel, Segmentation, Regression) or a "
            f"callable(output) -> [N]; got {type(target).__name__} {target!r}"
        )
    return ClassLogit(check_target(target, n))


@dataclass(frozen=True)
class Objective:
    """The scored tensor (``output``) and what is explained of it (``target``)."""

    output: Output = field(default_factory=Output)
    target: Target = field(default_factory=ClassLogit)

    def scores(self, returned: object, model_name: str, n: int) -> torch.Tensor:
        """The scored tensor of what the model returned, checked for the target's kind."""
        return self.target.check(self.output(returned, model_name), n, model_name)

    def settings(self) -> dict[str, Any]:
        found = dict(self.target.settings())
        if self.output.spec is not None:
            found["output"] = self.output.describe()
        return found


DEFAULT = Objective()


def objective(output: object = None, target: object = None, n: int = 1) -> Objective:
    """An :class:`Objective` from the ``output=`` and ``target=`` a call gave."""
    if output is None and target is None:
        return DEFAULT
    return Objective(Output(output), as_target(target, n))


def other_units(
    target: Target, out: torch.Tensor, selection: torch.Tensor, against: str, seed: int
) -> torch.Tensor:
    """The unit (class, label, output unit) compared with each sample's target, a LongTensor
    [N] on the CPU: 'random' (uniform over the sample's other targets, seeded), 'second' (the
    highest-scoring other), 'least_likely' (the lowest-scoring other)."""
    scores, allowed = target.alternatives(out, selection)
    n = scores.shape[0]
    if against == "random":
        counts = allowed.sum(dim=1)
        generator = torch.Generator().manual_seed(seed)
        if bool((counts == counts[0]).all()):
            draw = torch.randint(0, int(counts[0]), (n,), generator=generator)
        else:
            u = torch.rand(n, generator=generator, dtype=torch.float64)
            draw = (u * counts).floor().long().clamp(max=counts.max() - 1)
            draw = torch.minimum(draw, counts - 1)
        # The draw-th allowed unit of each row (units in increasing order).
        return (allowed.long().cumsum(dim=1) > draw[:, None]).long().argmax(dim=1)
    if against == "second":
        return scores.masked_fill(~allowed, -math.inf).argmax(dim=1)
    if against == "least_likely":
        return scores.masked_fill(~allowed, math.inf).argmin(dim=1)
    raise AssertionError(against)


__all__ = [
    "Binary",
    "CallableTarget",
    "ClassLogit",
    "KINDS",
    "MultiLabel",
    "Objective",
    "Output",
    "Regression",
    "Segmentation",
    "Target",
    "as_target",
    "objective",
    "other_units",
]
