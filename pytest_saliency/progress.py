"""Progress of a long audit: the checks say which step they are at, whoever listens prints.

The checks call :func:`step` as they go (one call per model state); outside
:func:`listening` that costs one context-variable read. The plugin listens while an item
audits and prints a line when the audit has run for a while (see ``plugin.Progress``).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

Listener = Callable[[int, int, str], None]
_LISTENER: contextvars.ContextVar[Listener | None] = contextvars.ContextVar(
    "pytest_saliency_progress", default=None
)


@contextlib.contextmanager
def listening(listener: Listener | None) -> Iterator[None]:
    """Call ``listener(done, total, label)`` at each step of the audits run in the block."""
    token = _LISTENER.set(listener)
    try:
        yield
    finally:
        _LISTENER.reset(token)


def step(done: int, total: int, label: str) -> None:
    """A check finished model state ``done`` of ``total`` (``label``: e.g. the layer)."""
    listener = _LISTENER.get()
    if listener is not None:
        listener(done, total, label)
