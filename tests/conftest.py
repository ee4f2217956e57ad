"""Settings every test shares."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inner pytest runs lay out their output for an 80-column terminal, wherever they run.

    pytest reads the width from COLUMNS; a CI runner that sets it wide would print each error's
    whole message a second time in the short summary, and tests that count lines would change.
    """
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("LINES", "24")
