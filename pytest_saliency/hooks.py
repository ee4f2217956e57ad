"""Hooks a project's ``conftest.py`` (or another plugin) may implement."""

from __future__ import annotations

from typing import Any


def pytest_saliency_record(record: dict, config: Any) -> None:
    """Called with every audit record as it is made (on the process that ran the audit, an
    xdist worker included), before any report reads it. ``record`` is the JSON record of the
    report schema (see ``pytest_saliency.report``); keys added here reach every report. Do not
    change the keys pytest-saliency sets."""


def pytest_saliency_report_formats(config: Any) -> dict:
    """Return ``{".suffix": writer}`` for report formats of your own: ``--saliency-report
    run.suffix`` then calls ``writer(records, path, meta)`` at the end of the run, with the
    run's records (in the JSON report's order) and its meta. The built-in suffixes (.json,
    .html, .md) cannot be replaced."""
    return {}
