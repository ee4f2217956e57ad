"""Make the example packages importable and point their checkpoint cache at pytest's cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))


def pytest_configure(config: pytest.Config) -> None:
    # Respect a cache location the user already chose; otherwise reuse pytest's own cache
    # (absent with ``-p no:cacheprovider``, then the models fall back to the temp dir).
    if os.environ.get("PYTEST_SALIENCY_CACHE"):
        return
    cache = getattr(config, "cache", None)
    if cache is not None:
        os.environ["PYTEST_SALIENCY_CACHE"] = str(cache.mkdir("saliency-examples"))
