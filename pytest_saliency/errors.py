"""Errors raised for bad input, with the valid choices spelled out."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SaliencyError(ValueError):
    """A call or a suite asked for something pytest-saliency cannot do as asked."""


class SaliencyWarning(UserWarning):
    """A map the engine computed but whose reading the user should know about (FullGrad that
    cannot place every bias on the input grid)."""


class UnsupportedActivationError(SaliencyError):
    """A propagation rule met an activation it cannot handle faithfully."""


class ModelError(SaliencyError):
    """The user's model raised on inputs pytest-saliency gave it (the original exception is
    chained). A crash, not a refusal: ``expect: error`` does not cover it."""


class NonFiniteError(SaliencyError):
    """NaN or inf where a finite value is needed (inputs, model scores, a map). ``samples``
    lists the samples concerned, numbered in the caller's batch; ``template`` is the message
    with ``{which}`` where the samples go."""

    def __init__(self, samples: list[int], template: str):
        self.samples, self.template = list(samples), template
        super().__init__(template.format(which=samples_text(self.samples)))

    def __reduce__(self):  # picklable (process pools, xdist)
        return type(self), (self.samples, self.template)

    def renumbered(self, samples: list[int]) -> NonFiniteError:
        """The same error about other sample numbers (e.g. a chunk's, in the whole batch)."""
        return NonFiniteError(sorted(set(samples)), self.template)


# The refusals a suite's ``expect:`` (or a test's xfail mark) can declare, most general first:
# an audit the engine refuses to vouch for raises one of these. Anything else (a TypeError
# from the model, a CUDA error) is a bug or a crash, never an expected refusal.
REFUSALS: dict[str, type[SaliencyError]] = {
    "error": SaliencyError,
    "unsupported": UnsupportedActivationError,
    "nonfinite": NonFiniteError,
}


def refusal_kind(exc: BaseException) -> str | None:
    """The most specific :data:`REFUSALS` name ``exc`` is, or None for an error that is not
    a refusal (the model's own crash, a ModelError, included)."""
    if isinstance(exc, ModelError):
        return None
    found = None
    for kind, cls in REFUSALS.items():
        if isinstance(exc, cls):
            found = kind
    return found


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: the message's first line``, at most ``limit`` characters."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def samples_text(samples: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(s) for s in samples[:limit])
    more = f", ... ({len(samples) - limit} more)" if len(samples) > limit else ""
    return f"sample{'s' if len(samples) > 1 else ''} {shown}{more}"


def non_finite_samples(values) -> list[int]:
    """Indices along axis 0 of ``values`` holding any NaN or inf."""
    import torch

    finite = torch.isfinite(values.detach()).reshape(values.shape[0], -1).all(dim=1)
    return (~finite).nonzero().flatten().tolist()


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
