"""Report formats by suffix: the built-in ones, then those of ``pytest_saliency_report_formats``
implementations. A writer is ``writer(records, path, meta)``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

Writer = Callable[[list, Path, dict], Any]


def _json(records: list, path: Path, meta: dict) -> None:
    from .report import write_json

    write_json(records, path, meta)


def _html(records: list, path: Path, meta: dict) -> None:
    from .html import write_html

    write_html(records, path, meta)


def _markdown(records: list, path: Path, meta: dict) -> None:
    from .markdown import write_markdown

    write_markdown(records, path, meta)


BUILTIN: dict[str, Writer] = {".json": _json, ".html": _html, ".md": _markdown}


def formats(config: pytest.Config) -> dict[str, Writer]:
    """Every suffix a report may have, built-in first; a hook's result that is not a mapping
    of ``".suffix"`` to a callable, or that takes a built-in suffix, is a usage error."""
    found = dict(BUILTIN)
    for result in config.hook.pytest_saliency_report_formats(config=config):
        if not isinstance(result, dict):
            raise pytest.UsageError(
                f"pytest_saliency_report_formats must return a dict {{'.suffix': writer}}, "
                f"got {type(result).__name__}"
            )
        for suffix, writer in result.items():
            ok = isinstance(suffix, str) and suffix.startswith(".") and len(suffix) > 1
            if not ok or not callable(writer):
                raise pytest.UsageError(
                    f"pytest_saliency_report_formats: {suffix!r}: {writer!r} is not a "
                    "'.suffix': callable(records, path, meta) pair"
                )
            if suffix.lower() in BUILTIN:
                raise pytest.UsageError(
                    f"pytest_saliency_report_formats: {suffix!r} is a built-in report format; "
                    "choose another suffix"
                )
            found[suffix.lower()] = writer
    return found
