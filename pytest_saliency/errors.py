"""Errors raised for bad input, with the valid choices spelled out."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SaliencyError(ValueError):
    """A call or a suite asked for something pytest-saliency cannot do as asked."""


class UnsupportedActivationError(SaliencyError):
    """A propagation rule met an activation it cannot handle faithfully."""


def closest(name: str, choices: Iterable[str], n: int = 5) -> list[str]:
    """The valid names closest to ``name`` (best first)."""
    choices = [str(c) for c in choices]
    found = difflib.get_close_matches(str(name), choices, n=n, cutoff=0.4)
    if not found:
        lowered = str(name).lower()
        found = [c for c in choices if lowered and (lowered in c.lower() or c.lower() in lowered)]
    return found[:n]


def unknown(kind: str, name: object, choices: Iterable[str], *, limit: int = 40) -> SaliencyError:
    """An error for an unknown ``kind`` called ``name``, naming the closest and valid choices."""
    choices = list(choices)
    near = closest(str(name), choices)
    msg = f"unknown {kind} {name!r}"
    if near:
        msg += f"; did you mean {', '.join(repr(c) for c in near)}?"
    else:
        msg += "."
    shown = ", ".join(repr(c) for c in choices[:limit])
    if len(choices) > limit:
        shown += f", ... ({len(choices) - limit} more)"
    msg += f" Valid {kind}s: {shown}."
    return SaliencyError(msg)
