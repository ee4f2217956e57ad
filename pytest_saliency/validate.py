"""The settings every check shares: one check of each, whoever gives the value.

The API, the ``saliency`` marker, the suites' keys and the options / ini keys all validate
``similarity``, ``seed``, ``max_similarity``, ``min_rise``, ``batch_size`` and ``confidence``
here; each caller says where the value came from (``file:line: key``,
``@pytest.mark.saliency(seed=...)``, ``--saliency-seed``) before the message.
No torch import at module level.
"""

from __future__ import annotations

import math
from typing import Any

SHARED = ("similarity", "seed", "max_similarity", "min_rise", "batch_size", "confidence")


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
        if not isinstance(value, bool):
            return f"expected true or false, got {value!r}"
    elif key in ("max_similarity", "min_rise"):
        from .checks.base import MIN_RISE, SIMILARITY_THRESHOLD

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
    from .errors import SaliencyError

    found = problem(key, value)
    if found is not None:
        raise SaliencyError(f"{where}: {found}")
    return value
