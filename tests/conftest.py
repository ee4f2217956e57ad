"""Settings every test shares."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inner pytest runs lay out their output as on an 80-column terminal, wherever they run.

    pytest reads the width from COLUMNS, and on a CI runner (CI or BUILD_NUMBER set) it does not
    truncate the short summary at all. Either would print each error's whole message a second
    time, and the tests that count messages would change with the machine they run on.
    """
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("LINES", "24")
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("BUILD_NUMBER", raising=False)
