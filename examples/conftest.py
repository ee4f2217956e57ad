"""Shared set-up of the examples: import paths, the checkpoint cache and the default report."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

REPORT = "saliency-report.html"


def pytest_configure(config: pytest.Config) -> None:
    # `pytest examples` writes the HTML report unless the user asked for a report of their own
    # (--saliency-report or the saliency_report ini key); relative to the invocation directory.
    # This runs before the plugin reads its settings: pluggy calls a conftest's hook before
    # those of plugins registered earlier (the installed plugin), and after cacheprovider's
    # tryfirst one, so config.cache exists below.
    if not config.getoption("saliency_report") and not config.getini("saliency_report"):
        config.option.saliency_report = [REPORT]
    # Respect a cache location the user already chose; otherwise reuse pytest's own cache
    # (absent with ``-p no:cacheprovider``, then the models fall back to the temp dir).
    if os.environ.get("PYTEST_SALIENCY_CACHE"):
        return
    cache = getattr(config, "cache", None)
    if cache is not None:
        os.environ["PYTEST_SALIENCY_CACHE"] = str(cache.mkdir("saliency-examples"))
