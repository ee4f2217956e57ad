"""Baselines: every audit's score saved, and a later run compared with it.

``--saliency-baseline-save PATH`` writes, at the end of the run, one entry per audit: its key
(a suite item's node id; a test's node id, then ``::check[method id]``, and ``#2`` and up for
a second audit of the same method and check in one test), score, threshold and verdict.
``--saliency-baseline PATH`` compares each audit with its entry: *worse by* is how far the
score moved in the check's failing direction (up for ``max_similarity``, down for
``min_rise``); worse by more than
``--saliency-baseline-tolerance`` (default 0.05) fails an audit that otherwise passes. Audits
with no entry are *new*; entries no audit of the run matched are *gone*.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

SCHEMA = "pytest-saliency-baseline/1"
DEFAULT_TOLERANCE = 0.05


def key_of(record: dict, seen: dict[str, int]) -> str:
    """``record``'s baseline key, counting in ``seen`` the audits already keyed this run."""
    r = record
    method = r.get("method_id") or r.get("method")
    base = r["nodeid"] if r.get("source") == "suite" else f"{r['nodeid']}::{r['check']}[{method}]"
    seen[base] = seen.get(base, 0) + 1
    return base if seen[base] == 1 else f"{base}#{seen[base]}"


def keys(records: list[dict]) -> list[str | None]:
    """Each record's baseline key (stable from run to run, unique in a run); None for an
    audit that raised (it has no score, and takes no number from the ones that follow)."""
    seen: dict[str, int] = {}
    return [None if r.get("error") else key_of(r, seen) for r in records]


def save(records: list[dict], path: Path, meta: dict) -> Path:
    """Write the baseline of ``records`` (in the run's order) to ``path``."""
    audits = {
        key: {
            "check": r["check"],
            "method_id": r.get("method_id"),
            "score": r.get("score"),
            "threshold": r.get("threshold"),
            "threshold_key": r.get("threshold_key") or "max_similarity",
            "verdict": r["verdict"],
        }
        for key, r in zip(keys(records), records)
        if key is not None
    }
    doc = {"schema": SCHEMA, "meta": meta, "audits": audits}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path


class Baseline:
    """A saved baseline, read once at the start of the run (a usage error if it cannot be)."""

    def __init__(self, path: Path, tolerance: float) -> None:
        self.path, self.tolerance = path, tolerance
        flag = "--saliency-baseline"
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise pytest.UsageError(
                f"{flag} {path}: no such file; write one with --saliency-baseline-save {path}"
            ) from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise pytest.UsageError(f"{flag} {path}: not a readable JSON file ({exc})") from None
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
            raise pytest.UsageError(
                f"{flag} {path}: not a pytest-saliency baseline (schema {got!r}, expected "
                f"{SCHEMA!r}); write one with --saliency-baseline-save"
            )
        audits = doc.get("audits")
        if not isinstance(audits, dict) or not all(isinstance(v, dict) for v in audits.values()):
            raise pytest.UsageError(f"{flag} {path}: 'audits' must map keys to entries")
        self.audits: dict[str, dict] = audits

    def compare(self, key: str, record: dict) -> None:
        """Set ``record["baseline"]`` (None: a new audit) and, when it got worse by more than
        the tolerance while passing its threshold, ``regressed`` and a ``fail`` verdict."""
        entry = self.audits.get(key)
        if entry is None:
            record["baseline"] = None
            return
        base, now = entry.get("score"), record.get("score")
        comparable = isinstance(base, (int, float)) and isinstance(now, (int, float))
        comparable = comparable and math.isfinite(base) and math.isfinite(now)
        worse_by = None
        if comparable:
            at_most = (record.get("threshold_key") or "max_similarity") == "max_similarity"
            worse_by = (now - base) if at_most else (base - now)
        regressed = worse_by is not None and worse_by > self.tolerance
        record["baseline"] = {
            "score": base,
            "verdict": entry.get("verdict"),
            "worse_by": worse_by,
            "tolerance": self.tolerance,
            "regressed": regressed,
        }
        if regressed and record["verdict"] == "pass":
            record["verdict"] = "fail"
            record["regressed"] = True

    def gone(self, records: list[dict]) -> list[str]:
        """Baseline entries no audit of ``records`` (the whole run's) matched: deselected,
        renamed or removed."""
        ran = {key for key in keys(records) if key is not None}
        ran |= {key_of(r, {}) for r in records if r.get("error")}  # raised, but it ran
        return [key for key in self.audits if key not in ran]


def tolerance_value(value: Any, where: str) -> float:
    try:
        tolerance = float(value)
    except (TypeError, ValueError):
        tolerance = math.nan
    if not math.isfinite(tolerance) or tolerance < 0:
        raise pytest.UsageError(f"{where} = {value!r}: expected a number >= 0")
    return tolerance
