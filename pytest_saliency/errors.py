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
