"""Result objects of the two audits: scores, a bootstrap interval, a verdict and a report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import SaliencyError
from .base import MIN_RISE, SIMILARITY_THRESHOLD

BOOTSTRAP_RESAMPLES = 1000


def mean_or_nan(scores: torch.Tensor) -> float:
    """The mean of ``scores``; NaN when any is NaN (a degenerate sample fails the whole audit)."""
    if scores.numel() == 0 or bool(torch.isnan(scores).any()):
        return math.nan
    return float(scores.double().mean())


def bootstrap_ci(scores: torch.Tensor, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``scores`` [N] (a local seeded generator)."""
    if scores.numel() == 0 or bool(torch.isnan(scores).any()):
        return (math.nan, math.nan)
    values = scores.double().cpu()
    generator = torch.Generator().manual_seed(int(seed))
    picks = torch.randint(
        0, values.numel(), (BOOTSTRAP_RESAMPLES, values.numel()), generator=generator
    )
    means = values[picks].mean(dim=1)
    tail = (1.0 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    return (float(low), float(high))


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types: tensors become lists, NaN becomes None."""
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist())
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return repr(value)


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.3f}"


def _names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{f', ... ({len(names) - limit} more)' if len(names) > limit else ''}]"


def _indices(indices: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return f"[{shown}{', ...' if len(indices) > limit else ''}]"


def coverage_notes(result: Any) -> list[str]:
    """What a randomization did not re-initialise, and what the fallback drew."""
    notes = []
    if result.skipped:
        notes.append(
            f"coverage {result.coverage:.3f}: not re-initialised (used by the forward): "
            f"{_names(result.skipped, 12)}"
        )
    if result.unused:
        notes.append(f"unused by the forward (not steps): {_names(result.unused, 12)}")
    if result.fallback:
        notes.append(
            "re-initialised by the fallback N(0, rms^2) (no reset_parameters, or one "
            f"that left the tensor as it was): {_names(result.fallback, 12)}"
        )
    return notes


@dataclass(repr=False)
class AuditResult:
    """What one audit measured. Lower similarity is better: a faithful method's maps change
    when the explained class or the model's weights change."""

    check: str
    method: str
    options: dict
    similarity: str
    scores: torch.Tensor
    maps: dict[str, torch.Tensor]
    inputs: torch.Tensor
    targets: torch.Tensor
    seed: int
    settings: dict
    cause: str = ""  # why some maps were constant (empty when none were)
    constant: dict[int, list[str]] = field(default_factory=dict)  # sample -> constant map names
    # sample -> compared maps that were constant next to a structured reference (scored 0)
    blank: dict[int, list[str]] = field(default_factory=dict)
    # the null controls' scores under the same check, metric and samples (name -> score)
    controls: dict[str, float] = field(default_factory=dict)
    # what each sample explains, as JSON (a class, or a list of labels), and the target kind
    target_labels: list = field(default_factory=list)
    target_kind: str = "class"

    # How the score becomes a verdict (a class attribute, shared by every result of a check).
    threshold = SIMILARITY_THRESHOLD
    _blank_meaning = "scored 0 (the map changed entirely)"

    @property
    def degenerate(self) -> list[int]:
        """Sample indices with a NaN score: one of the maps compared for them was constant."""
        flat = torch.isnan(self.scores.reshape(-1, self.scores.shape[-1])).any(dim=0)
        return [int(i) for i in flat.nonzero().flatten()]

    @property
    def n(self) -> int:
        return int(self.scores.shape[-1])

    def _worst(self) -> torch.Tensor:
        """The per-sample scores that ``score`` is the mean of."""
        return self.scores

    @property
    def score(self) -> float:
        return mean_or_nan(self._worst())

    @property
    def ci(self) -> tuple[float, float]:
        return bootstrap_ci(self._worst(), self.seed)

    def passed(self, limit: float | None = None, *, confidence: bool = False, **named: float
               ) -> bool:  # fmt: skip
        """True when the score meets ``limit`` in the check's direction: at most
        ``max_similarity`` for similarity checks (a faithful map changes), at least ``min_rise``
        for efficient randomization. The limit may be given by its name
        (``passed(max_similarity=0.5)``).

        With ``confidence=True`` the 95% bootstrap interval must meet the limit too (its upper
        end for ``max_similarity``, its lower end for ``min_rise``). Degenerate samples (a
        constant map) never pass.
        """
        key = self.threshold.key
        if named:
            if limit is not None or set(named) != {key}:
                raise SaliencyError(
                    f"{self.check} results pass by {key}; call passed({key}=...) or "
                    f"passed(X), got {', '.join(named)}"
                )
            limit = named[key]
        if limit is None:
            raise SaliencyError(f"passed() needs the threshold: passed({key}=...)")
        limit = self.threshold.check(limit, bounded=False)
        if confidence and self.n < 2:
            raise SaliencyError(
                "passed(confidence=True) needs at least 2 samples: a bootstrap over one sample "
                "has no spread, so its interval says nothing; audit more inputs or use "
                "confidence=False"
            )
        low, high = self.ci if confidence else (math.nan, math.nan)
        return self.threshold.passed(self.score, low, high, limit, confidence)

    def _controls_text(self) -> str:
        return ", ".join(f"{k} {_fmt(v)}" for k, v in self.controls.items())

    def _degenerate_note(self) -> str:
        if not self.degenerate:
            return ""
        parts = []
        for i in self.degenerate[:8]:
            names = self.constant.get(i)
            parts.append(f"{i} ({', '.join(names)})" if names else str(i))
        more = ", ..." if len(self.degenerate) > 8 else ""
        note = f"constant maps for samples {', '.join(parts)}{more}"
        return f"{note}: {self.cause}" if self.cause else note

    def _head(self) -> str:
        text = f"method={self.method!r}, similarity={self.similarity!r}"
        if self.settings.get("layer"):
            text += f", layer={self.settings['layer']!r} ({self.settings.get('layout')})"
        if self.target_kind != "class":
            text += f", target={self.target_kind!r}"
        return text

    def __repr__(self) -> str:
        low, high = self.ci
        text = (
            f"{type(self).__name__}({self._head()}, score={_fmt(self.score)}, "
            f"ci=({_fmt(low)}, {_fmt(high)}), n={self.n}"
        )
        if self.controls:
            text += f", controls=({self._controls_text()})"
        if self.degenerate:
            text += f", degenerate={_indices(self.degenerate)}: {self._degenerate_note()}"
        return text + ")"

    def _rows(self) -> list[tuple[str, ...]]:
        raise NotImplementedError

    def summary(self) -> str:
        """A small text table of the scores, with the verdict inputs and any degenerate samples."""
        rows = self._rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        kind = f", {self.target_kind} target" if self.target_kind != "class" else ""
        lines = [f"{self.check} of {self.method!r} ({self.similarity}, n={self.n}{kind})"]
        for k, row in enumerate(rows):
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
            if k == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        low, high = self.ci
        lines.append(f"  score {_fmt(self.score)}, 95% CI [{_fmt(low)}, {_fmt(high)}]")
        if self.controls:
            lines.append(
                f"  null controls (same check, scored the same way): {self._controls_text()}"
            )
        if self.degenerate:
            lines.append(f"  DEGENERATE: {self._degenerate_note()}")
        lines.extend(f"  {note}" for note in self._notes())
        if self.blank:
            lines.append(
                f"  note: {len(self.blank)} sample(s) {_indices(list(self.blank))} got a constant "
                f"map where the reference map was structured; {self._blank_meaning}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Everything but the maps and inputs, as JSON types (NaN -> None)."""
        return jsonable(
            {
                "check": self.check,
                "method": self.method,
                "options": self.options,
                "similarity": self.similarity,
                "score": self.score,
                "ci": list(self.ci),
                "scores": self.scores,
                "degenerate": self.degenerate,
                "cause": self.cause,
                "blank": {str(k): v for k, v in self.blank.items()},
                "targets": self.target_labels or self.targets,
                "target_kind": self.target_kind,
                "seed": self.seed,
                "settings": self.settings,
                "controls": self.controls,
                "threshold_key": self.threshold.key,
                **self._extra(),
            }
        )

    def _extra(self) -> dict:
        return {}

    def target_of(self, i: int) -> str:
        """What sample ``i`` explains, in a few characters (``3``, ``1+4``)."""
        label = self.target_labels[i] if i < len(self.target_labels) else int(self.targets[i])
        if isinstance(label, list):
            return "+".join(str(v) for v in label)
        return str(label)

    def _notes(self) -> list[str]:
        return []


@dataclass(repr=False)
class SensitivityResult(AuditResult):
    """Output sensitivity: maps for the explained class vs maps for another class, [N] scores.

    ``others[i]`` is the class compared for sample ``i`` (-1 with ``against="all"``, where the
    score is the mean over every other class and ``maps["other"]`` holds the most similar one).
    """

    against: str = "random"
    others: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    def _head(self) -> str:
        return f"{super()._head()}, against={self.against!r}"

    def _rows(self) -> list[tuple[str, ...]]:
        rows = [("sample", "target", "other", "similarity")]
        for i in range(self.n):
            other = int(self.others[i])
            rows.append(
                (
                    str(i),
                    self.target_of(i),
                    "all" if other < 0 else str(other),
                    _fmt(float(self.scores[i])),
                )
            )
        return rows

    def _extra(self) -> dict:
        return {"against": self.against, "others": self.others}


@dataclass(repr=False)
class RandomizationResult(AuditResult):
    """Parameter randomization: original maps vs maps after each randomization step, [L, N].

    ``score`` is the worst (most similar) step's mean and ``ci`` that step's bootstrap interval;
    with ``aggregate="mean"`` the mean over steps (``ci`` of the per-sample means over steps),
    with ``"last"`` the last step's (the fully randomized model in cascading mode).
    ``coverage`` is the fraction of the parameter elements the forward uses that the steps
    re-initialise (all steps together: what the last cascading step has randomized);
    ``skipped`` names what was used but not re-initialised, ``unused`` what the forward never
    used, ``fallback`` the parameters drawn by the scale-keeping fallback.
    """

    mode: str = "cascading"
    order: str = "top_down"
    aggregate: str = "worst"
    layers: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    coverage: float = 1.0
    unused: list[str] = field(default_factory=list)
    fallback: list[str] = field(default_factory=list)

    @property
    def step_scores(self) -> list[float]:
        return [mean_or_nan(row) for row in self.scores]

    @property
    def worst_step(self) -> int:
        """Index of the step whose mean similarity is highest (the first NaN step if any)."""
        steps = self.step_scores
        for i, value in enumerate(steps):
            if math.isnan(value):
                return i
        return max(range(len(steps)), key=lambda i: steps[i])

    def _worst(self) -> torch.Tensor:
        """The per-sample scores the verdict reads: the worst step's, every step's mean per
        sample (``aggregate="mean"``) or the last step's (``"last"``)."""
        if self.aggregate == "mean":
            return self.scores.double().mean(dim=0).float()  # NaN stays NaN
        if self.aggregate == "last":
            return self.scores[-1]
        return self.scores[self.worst_step]

    @property
    def score(self) -> float:
        steps = self.step_scores
        if any(math.isnan(s) for s in steps):
            return math.nan
        if self.aggregate == "worst":
            return max(steps)
        return mean_or_nan(self._worst())

    def _head(self) -> str:
        text = (
            f"{super()._head()}, mode={self.mode!r}, order={self.order!r}, steps={len(self.layers)}"
            + (f", aggregate={self.aggregate!r}" if self.aggregate != "worst" else "")
            + f", coverage={self.coverage:.3f}"
        )
        if self.skipped:
            text += f", skipped={_names(self.skipped)}"
        return text

    def _notes(self) -> list[str]:
        return coverage_notes(self)

    def _rows(self) -> list[tuple[str, ...]]:
        rows = [("step", "layer", "mean", "min", "max")]
        worst = self.worst_step
        for i, (name, row) in enumerate(zip(self.layers, self.scores)):
            finite = row[~torch.isnan(row)]
            low = _fmt(float(finite.min())) if finite.numel() else "nan"
            high = _fmt(float(finite.max())) if finite.numel() else "nan"
            mark = " <- worst" if i == worst else ""
            rows.append((str(i + 1), name, _fmt(mean_or_nan(row)), low, high + mark))
        return rows

    def _extra(self) -> dict:
        return {
            "mode": self.mode,
            "order": self.order,
            "aggregate": self.aggregate,
            "layers": self.layers,
            "skipped": self.skipped,
            "coverage": self.coverage,
            "unused": self.unused,
            "fallback": self.fallback,
            "step_scores": self.step_scores,
        }


@dataclass(repr=False)
class DataRandomizationResult(AuditResult):
    """Data randomization: maps of the trained model vs maps of the same architecture trained
    on permuted labels, [N] similarities (``maps["trained"]``, ``maps["permuted"]``).

    ``twin_predictions`` are the twin's predicted classes [N]: a twin that predicts one class
    for every input has not fitted its labels (a collapsed network), which the notes say.
    """

    twin_predictions: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    def _rows(self) -> list[tuple[str, ...]]:
        rows = [("sample", "target", "twin predicts", "similarity")]
        for i in range(self.n):
            twin = str(int(self.twin_predictions[i])) if self.twin_predictions.numel() else "?"
            rows.append((str(i), self.target_of(i), twin, _fmt(float(self.scores[i]))))
        return rows

    @property
    def collapsed(self) -> bool:
        """The twin predicts one class for every input, on 8 inputs or more (fewer can share a
        class by chance)."""
        p = self.twin_predictions
        return p.numel() >= 8 and bool((p == p[0]).all())

    def _notes(self) -> list[str]:
        if not self.collapsed:
            return []
        return [
            f"the randomized model predicts class {int(self.twin_predictions[0])} for all "
            f"{self.n} inputs: it has likely not fitted its (permuted) labels, and this compares "
            "with the maps of a near-constant network; train the twin until it fits them "
            "(Adebayo et al. train to above 95% training accuracy)"
        ]

    def _extra(self) -> dict:
        return {"twin_predictions": self.twin_predictions, "collapsed": self.collapsed}


@dataclass(repr=False)
class ComplexityResult(AuditResult):
    """Efficient randomization: per sample, the relative rise in the entropy of the map from
    the trained model to the fully randomized one, [N]; higher is better.

    ``entropies`` holds both states' entropies [N]; ``coverage``, ``skipped``, ``unused`` and
    ``fallback`` say what the randomized state re-initialised, as for parameter randomization.
    """

    entropies: dict[str, torch.Tensor] = field(default_factory=dict)
    bins: int = 100
    coverage: float = 1.0
    skipped: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    fallback: list[str] = field(default_factory=list)

    threshold = MIN_RISE
    _blank_meaning = "its entropy counts as 0, a rise of -1 (the randomized map is blank)"

    def _head(self) -> str:
        text = f"method={self.method!r}, measure='entropy_rise', bins={self.bins}"
        if self.settings.get("layer"):
            text += f", layer={self.settings['layer']!r} ({self.settings.get('layout')})"
        return text + f", coverage={self.coverage:.3f}"

    def _rows(self) -> list[tuple[str, ...]]:
        rows = [("sample", "target", "H trained", "H randomized", "rise")]
        h0, h1 = self.entropies.get("original"), self.entropies.get("randomized")
        for i in range(self.n):
            rows.append((str(i), self.target_of(i), _fmt(float(h0[i])),
                         _fmt(float(h1[i])), _fmt(float(self.scores[i]))))  # fmt: skip
        return rows

    def _notes(self) -> list[str]:
        return coverage_notes(self)

    def _extra(self) -> dict:
        return {
            "entropies": self.entropies,
            "bins": self.bins,
            "coverage": self.coverage,
            "skipped": self.skipped,
            "unused": self.unused,
            "fallback": self.fallback,
        }
