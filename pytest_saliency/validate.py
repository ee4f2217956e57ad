"""The settings every check shares: one check of each, whoever gives the value.

The thresholds' rules (:class:`Threshold`: which way a score passes, its bounds) live here
too. The API, the ``saliency`` marker, the suites' keys and the options / ini keys all validate
``similarity``, ``seed``, ``max_similarity``, ``min_rise``, ``batch_size`` and ``confidence``
here; each caller says where the value came from (``file:line: key``,
``@pytest.mark.saliency(seed=...)``, ``--saliency-seed``) before the message.
No torch import at module level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import SaliencyError

SHARED = ("similarity", "seed", "max_similarity", "min_rise", "batch_size", "confidence")


@dataclass(frozen=True)
class Threshold:
    """How a check's score becomes a verdict: ``at_most`` (similarities: lower is better) or
    ``at_least`` (a rise: higher is better), within ``bounds``."""

    key: str
    passes: str
    default: float
    bounds: tuple[float, float]
    help: str

    def check(self, value: object, where: str | None = None, *, bounded: bool = True) -> float:
        """``value`` as a float; an error unless it is a finite number (within ``bounds``
        unless ``bounded`` is False)."""
        low, high = self.bounds if bounded else (-math.inf, math.inf)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or not low <= value <= high:
            if not bounded:
                raise SaliencyError(f"{where or self.key} must be a finite number, got {value!r}")
            raise SaliencyError(
                f"{where or self.key} must be a number in [{low:g}, {high:g}] ({self.help}), "
                f"got {value!r}"
            )
        return float(value)

    def passed(self, score: float, low: float, high: float, limit: float, confidence: bool
               ) -> bool:  # fmt: skip
        if math.isnan(score):
            return False
        if self.passes == "at_most":
            return score <= limit and (not confidence or high <= limit)
        return score >= limit and (not confidence or low >= limit)

    def symbol(self) -> str:
        return "<=" if self.passes == "at_most" else ">="


SIMILARITY_THRESHOLD = Threshold(
    "max_similarity", "at_most", 0.5, (-1.0, 1.0),
    "the highest mean similarity that passes; similarities lie in [-1, 1]",
)  # fmt: skip

MIN_RISE = Threshold(
    "min_rise", "at_least", 0.1, (-1.0, 1e6),
    "the lowest mean relative rise in map entropy that passes; 0 means no change",
)  # fmt: skip


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def problem(key: str, value: Any) -> str | None:
    """What is wrong with ``value`` for shared setting ``key`` (None: nothing)."""
    if key == "seed":
        if not _int(value) or not 0 <= value < 2**63:
            return f"expected an int in [0, 2**63 - 1] (a 64-bit seed), got {value!r}"
    elif key == "batch_size":
        if value is not None and (not _int(value) or value < 1):
            return f"expected a positive int, or null / None for no limit, got {value!r}"
    elif key == "confidence":
        kind = type(value)
        numpy_bool = kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_")
        truth = isinstance(value, bool) or numpy_bool
        if not truth and not (_int(value) and value in (0, 1)):
            return f"expected true or false, got {value!r}"
    elif key in ("max_similarity", "min_rise"):
        rule = SIMILARITY_THRESHOLD if key == "max_similarity" else MIN_RISE
        low, high = rule.bounds
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or not low <= value <= high:
            return f"expected a number in [{low:g}, {high:g}] ({rule.help}), got {value!r}"
    elif key == "similarity":
        from .errors import closest
        from .similarities import metrics

        valid = list(metrics())
        if value not in valid:
            near = closest(str(value), valid)
            hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else "."
            return f"unknown similarity {value!r}{hint} Valid choices: {', '.join(valid)}"
    else:
        raise KeyError(f"{key!r} is not a shared setting ({', '.join(SHARED)})")
    return None


def setting(key: str, value: Any, where: str) -> Any:
    """``value``, or a SaliencyError ``"<where>: <what is wrong>"``."""
    found = problem(key, value)
    if found is not None:
        raise SaliencyError(f"{where}: {found}")
    return value
