"""Audit records, the terminal verdict table, the failure message and the JSON report.

A *record* is one audit as plain JSON types, built by :func:`make_record`. The JSON report
(``--saliency-report run.json``) has this schema::

    {
      "schema": "pytest-saliency/1",
      "meta": {"plugin", "version", "torch", "pytest", "seed", "device",
               "settings": {"device", "seed", "similarity", "max_similarity", "reports"}},
      "records": [   # in collection order (serial and xdist runs alike)
        {
          "nodeid":     test id, e.g. "test_x.py::test_a[gradcam]" or a suite item's id,
          "method_id":  readable method id ("gradcam++-positive=false"),
          "method":     registry name,   "options": method options given,
          "check":      a name from pytest_saliency.checks(),
          "similarity": metric name,
          "score":      mean similarity (randomization: the worst step's); null if degenerate,
          "ci":         [low, high] 95% bootstrap interval of the score,
          "scores":     per-sample scores [N] (randomization: [steps][N]); null = degenerate,
          "threshold":  the limit, "threshold_key": "max_similarity" (passes when the score
                        is at most it) | "min_rise" (at least it),
          "confidence": the CI's bound had to pass too,
          "controls":   {"noise": score, "edge": score} of the null controls (no edge for
                        [N, D] inputs), scored by the same check, metric and samples,
          "passed":     bool,
          "expected":   "pass" | "fail" | a refusal: "error" (any) | "unsupported" | "nonfinite",
          "verdict":    "pass" | "fail" | "xfail" | "xpass" | "error" (it raised) |
                        "refused" (it raised the refusal "expected" names),
          "error":      only when it raised: {"type": class name, "kind": refusal kind or null
                        (not a refusal: a bug or a crash), "message": the whole message};
                        such a record has null scores and controls,
          "degenerate": sample indices with a constant map, "cause": why,
          "targets":    what each sample explains (a class, unit or index; a list of labels
                        for a multi-label target), "target_kind": "class" | "binary" |
                        "multilabel" | "segmentation" | "regression" | "callable", "seed",
          "settings":   audit settings ("target": the class as given, or the kind's settings
                        with the output selector),
          "device", "torch", "source": "python" | "suite",
          "model":      the suite's model id (``models:``), null for one ``model:`` and tests,
          sensitivity: "against", "others";
          parameter/smooth randomization: "mode", "order", "layers", "skipped",
                         "coverage", "unused", "fallback", "step_scores";
          efficient randomization: "entropies" {"original", "randomized"}, "bins",
                         "coverage", "skipped", "unused", "fallback"
        }
      ]
    }

No module here imports torch at import time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

SCHEMA = "pytest-saliency/1"
VERDICTS = ("pass", "fail", "xfail", "xpass", "error", "refused")
# What an audit may be expected to do: pass, fail its threshold, or be refused by the engine
# (one of errors.REFUSALS: "error" for any refusal, or a more specific kind).
OUTCOMES = ("pass", "fail")


def torch_version() -> str:
    """torch's version (``torch.__version__``, which may differ from the wheel's metadata)."""
    import torch

    return str(torch.__version__)


def _plain(value: Any) -> Any:
    """JSON-safe: NaN/inf become None, tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def expectations() -> tuple[str, ...]:
    """Every valid ``expected``: the outcomes, then the refusal kinds."""
    from .errors import REFUSALS

    return OUTCOMES + tuple(REFUSALS)


def verdict_of(passed: bool, expected: str) -> str:
    """The verdict of an audit that ran. Expected to be refused, it ran: strict, so a pass is
    an ``xpass`` (the engine vouches for the map now) and a failure a plain ``fail``."""
    if expected not in expectations():
        raise ValueError(f"expected must be one of {expectations()}, got {expected!r}")
    if expected == "pass":
        return "pass" if passed else "fail"
    if expected == "fail":
        return "xpass" if passed else "xfail"
    return "xpass" if passed else "fail"


def error_verdict(exc: BaseException, expected: str) -> str:
    """``refused`` when ``exc`` is the refusal ``expected`` names, else ``error``."""
    from .errors import REFUSALS, refusal_kind

    wanted = REFUSALS.get(expected)
    refused = wanted is not None and refusal_kind(exc) is not None and isinstance(exc, wanted)
    return "refused" if refused else "error"


def make_error_record(
    nodeid: str,
    exc: BaseException,
    *,
    check: str,
    method: str,
    method_id: str,
    options: dict | None = None,
    threshold: float,
    confidence: bool = False,
    expected: str = "pass",
    device: str = "cpu",
    source: str = "python",
    seed: int | None = None,
    settings: dict | None = None,
    model: str | None = None,
) -> dict:
    """An audit that raised, as a row like any other: no score, its verdict ``error`` (or
    ``refused`` when ``expected`` names the refusal) and ``error`` = type, refusal kind (None
    for an error that is not a refusal) and message."""
    from .checks.base import get_check
    from .errors import refusal_kind

    rule = get_check(check)
    record = {
        "nodeid": nodeid,
        "method_id": method_id,
        "method": method,
        "options": dict(options or {}),
        "check": check,
        "similarity": (settings or {}).get("similarity", rule.similarity),
        "score": None,
        "ci": None,
        "scores": None,
        "threshold": float(threshold),
        "threshold_key": rule.threshold.key,
        "confidence": bool(confidence),
        "controls": None,
        "expected": expected,
        "passed": False,
        "verdict": error_verdict(exc, expected),
        "error": {
            "type": type(exc).__name__,
            "kind": refusal_kind(exc),
            "message": str(exc),
        },
        "seed": seed,
        "settings": {k: v for k, v in (settings or {}).items() if k != "similarity"},
        "device": str(device),
        "torch": torch_version(),
        "source": source,
        "model": model,
    }
    return _plain(json.loads(json.dumps(record, default=repr)))


def make_record(
    nodeid: str,
    result: Any,
    *,
    threshold: float,
    confidence: bool = False,
    expected: str = "pass",
    method_id: str | None = None,
    device: str = "cpu",
    source: str = "python",
    model: str | None = None,
) -> dict:
    """One audit as JSON types: ``result.to_dict()`` plus where it ran and its verdict."""
    passed = bool(result.passed(threshold, confidence=confidence))
    record = dict(result.to_dict())
    record.update(
        nodeid=nodeid,
        method_id=method_id or result.method,
        threshold=float(threshold),
        confidence=bool(confidence),
        expected=expected,
        passed=passed,
        verdict=verdict_of(passed, expected),
        device=str(device),
        torch=torch_version(),
        source=source,
        model=model,
    )
    return _plain(record)


def _num(value: Any) -> str:
    return "nan" if value is None else f"{value:.3f}"


def _ci(record: dict) -> str:
    low, high = record.get("ci") or (None, None)
    return f"[{_num(low)}, {_num(high)}]"


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _cell(text: str) -> str:
    """One line, whatever the user named things: control characters shown escaped."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else _ESCAPES.get(c, c.encode("unicode_escape").decode("ascii"))
        for c in text
    )


def _table(rows: list[list[str]], indent: str = "", *, header: bool = True) -> str:
    rows = [[_cell(str(c)) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        lines.append(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if k == 0 and header:
            lines.append(indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _shown_verdict(record: dict) -> str:
    verdict = record["verdict"]
    return verdict.upper() if verdict in ("fail", "xpass", "error") else verdict


def _key(record: dict) -> str:
    return record.get("threshold_key") or "max_similarity"


def _symbol(record: dict) -> str:
    return "<=" if _key(record) == "max_similarity" else ">="


def _controls(record: dict) -> str:
    """The null controls' scores, compact: ``noise/edge``."""
    controls = record.get("controls") or {}
    return "/".join(_num(controls[k]) if controls.get(k) is not None else "-"
                    for k in ("noise", "edge")) if controls else "-"  # fmt: skip


def error_text(record: dict) -> str:
    """An error row's ``Type: first line of the message``."""
    error = record.get("error") or {}
    lines = str(error.get("message", "")).strip().splitlines()
    text = f"{error.get('type', 'Error')}: {lines[0]}" if lines else str(error.get("type"))
    return text if len(text) <= 300 else text[:297] + "..."


TABLE_WIDTH = 120  # the terminal table's lines; longer names are shortened in the middle


def shorten(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, cut in the middle (``ab...yz``)."""
    text = _cell(text)
    if len(text) <= width:
        return text
    keep = max(width - 3, 2)
    return text[: (keep + 1) // 2] + "..." + text[len(text) - keep // 2 :]


def where_of(record: dict) -> str:
    """What an audit belongs to: a suite item's id without its ``check[method]`` part (the
    file, or file::model); a test's id, without its ``[param]`` when that is the method id
    the row shows (``test_x[gradcam]`` -> ``test_x``)."""
    nodeid = str(record["nodeid"])
    if record.get("source") == "suite":
        return nodeid.rsplit("::", 1)[0]
    shown = f"[{record.get('method_id') or record.get('method')}]"
    return nodeid[: -len(shown)] if nodeid.endswith(shown) else nodeid


def in_order(records: list[dict], order: dict[str, int] | None = None) -> list[dict]:
    """``records`` in collection order (``order``: node id -> position; records of one test
    keep the order they were made in); records of unknown ids last, by id."""
    order = order or {}
    last = len(order)
    ranked = sorted(
        enumerate(records),
        key=lambda p: (
            order.get(p[1]["nodeid"], last),
            "" if p[1]["nodeid"] in order else str(p[1]["nodeid"]),
            p[0],
        ),
    )
    return [r for _, r in ranked]


def groups(records: list[dict]) -> list[tuple[str, list]]:
    """``[(f"{where} :: {check}", records)]``: the audits of one check on one test or suite
    model, together, in the order of their first record."""
    out: dict[str, list] = {}
    for r in records:
        out.setdefault(f"{where_of(r)} :: {r['check']}", []).append(r)
    return list(out.items())


def _baseline_cell(record: dict) -> str:
    base = record.get("baseline")
    if not base:
        return "new" if record.get("baseline") is None and "baseline" in record else "-"
    if base.get("score") is None or record.get("score") is None:
        return f"{_num(base.get('score'))} (-)"
    return f"{_num(base['score'])} ({record['score'] - base['score']:+.3f})"


def tally(records: list[dict]) -> str:
    """``178 audits: 105 pass, 73 xfail``."""
    counts = {v: sum(r["verdict"] == v for r in records) for v in VERDICTS}
    shown = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    noun = "audit" if len(records) == 1 else "audits"
    return f"{len(records)} {noun}: {shown}" if shown else f"{len(records)} {noun}"


def format_table(records: list[dict], width: int = TABLE_WIDTH) -> str:
    """The terminal verdict table: the audits of each test or suite model and check under
    one heading (in the records' order: the session gives them in collection order), with
    the null controls' scores (and the baseline's, when one was given); lines of at most
    ``width`` characters. The audits that raised are rows too, their errors listed under
    the table."""
    with_baseline = any("baseline" in r for r in records)
    head = ["method", "metric", "score", "95% CI", "noise/edge", "threshold", "verdict"]
    head += ["baseline (change)"] if with_baseline else []
    grouped, raised = [], []
    for title, members in groups(records):
        rows = []
        for r in members:
            limit = f"{_symbol(r)} {r['threshold']:.3f}" + (" CI" if r.get("confidence") else "")
            if r.get("error"):
                raised.append(r)
                scored = ["-", "-", "-"]
            else:
                scored = [_num(r["score"]), _ci(r), _controls(r)]
            row = [str(r.get("method_id") or r["method"]), str(r.get("similarity") or "-"),
                   *scored, limit, _shown_verdict(r)]  # fmt: skip
            rows.append(row + ([_baseline_cell(r)] if with_baseline else []))
        grouped.append((title, rows))
    cells = [head] + [row for _, rows in grouped for row in rows]
    widths = [max(len(_cell(row[i])) for row in cells) for i in range(len(head))]
    room = width - 2 - sum(widths[1:]) - 2 * (len(head) - 1)
    widths[0] = max(12, min(widths[0], room))

    def line(row: list[str]) -> str:
        texts = [shorten(row[0], widths[0])] + [_cell(c) for c in row[1:]]
        return ("  " + "  ".join(t.ljust(w) for t, w in zip(texts, widths))).rstrip()

    lines = [line(head), "  " + "  ".join("-" * w for w in widths)]
    for title, rows in grouped:
        lines.append(shorten(title, width))
        lines += [line(row) for row in rows]
    lines.append(tally(records))
    if raised:
        lines.append("raised:")
        for r in raised:
            note = " (refused as expected)" if r["verdict"] == "refused" else ""
            text = _cell(f"  {r['nodeid']}: {error_text(r)}{note}")
            lines.append(text if len(text) <= width else text[: width - 3] + "...")
    return "\n".join(lines)


def _regression(record: dict) -> str:
    base = record["baseline"]
    return (
        f"worse than the baseline by {base['worse_by']:.3f} (tolerance {base['tolerance']:g}; "
        f"baseline score {_num(base['score'])}, now {_num(record['score'])})"
    )


def _why(record: dict) -> str:
    if record.get("regressed"):
        return _regression(record)
    score, threshold, key = record["score"], record["threshold"], _key(record)
    if score is None:
        return "degenerate maps (a constant map has no score)"
    at_most = key == "max_similarity"
    if (score > threshold) if at_most else (score < threshold):
        return f"score {score:.3f} {'>' if at_most else '<'} {key} {threshold:.3f}"
    low, high = record.get("ci") or [None, None]
    bound = high if at_most else low
    missed = bound is None or ((bound > threshold) if at_most else (bound < threshold))
    if record.get("confidence") and missed:
        side, op = ("upper", ">") if at_most else ("lower", "<")
        return f"95% CI {side} bound {_num(bound)} {op} {key} {threshold:.3f}"
    return "passed"


def _sample_scores(record: dict) -> list[tuple[int, float | None]]:
    """Per sample, the score that counts: randomization takes each sample's worst step (its
    mean over steps, or its last step, with ``aggregate`` "mean" or "last")."""
    scores = record.get("scores") or []
    aggregate = record.get("aggregate") or "worst"
    if scores and isinstance(scores[0], list):
        per_sample = []
        for i in range(len(scores[0])):
            column = [row[i] for row in scores]
            if None in column:
                per_sample.append(None)
            elif aggregate == "mean":
                per_sample.append(sum(column) / len(column))
            elif aggregate == "last":
                per_sample.append(column[-1])
            else:
                per_sample.append(max(column))
    else:
        per_sample = list(scores)
    return list(enumerate(per_sample))


def most_similar(record: dict, limit: int = 5) -> list[tuple[int, float | None]]:
    """The samples whose scores are worst (degenerate ones first): the most similar maps, or
    the lowest rise for a check that passes by ``min_rise``."""
    sign = 1.0 if _key(record) == "max_similarity" else -1.0
    ranked = sorted(
        _sample_scores(record), key=lambda p: (p[1] is not None, -sign * (p[1] or 0.0), p[0])
    )
    return ranked[:limit]


def format_failure(record: dict) -> str:
    """The message of a failed ``assert_*``: verdict inputs, steps and the worst samples."""
    head = [
        ["method", record.get("method_id") or record["method"]],
        ["check", record["check"]],
        ["metric", record["similarity"]],
        ["score", f"{_num(record['score'])}  95% CI {_ci(record)}"],
        ["threshold", f"{_key(record)} {record['threshold']:.3f}"
                      + (" (the CI bound too)" if record.get("confidence") else "")],
        ["verdict", f"{record['verdict'].upper()}: {_why(record)}"],
    ]  # fmt: skip
    if record.get("controls"):
        shown = ", ".join(f"{k} {_num(v)}" for k, v in record["controls"].items())
        head.insert(4, ["controls", f"{shown} (null controls, scored the same way)"])
    kind = record.get("target_kind") or "class"
    if kind != "class" or isinstance((record.get("settings") or {}).get("target"), dict):
        described = (record.get("settings") or {}).get("target")
        shown = ", ".join(f"{k}={v}" for k, v in described.items()) if isinstance(
            described, dict) else kind  # fmt: skip
        head.insert(2, ["target", shown])
    parts = [f"saliency audit failed: {record['nodeid']}", _table(head, "  ", header=False)]
    if record.get("step_scores") and record.get("layers"):
        rows = [["step", "randomized layer", "mean similarity"]]
        for i, (layer, value) in enumerate(zip(record["layers"], record.get("step_scores", []))):
            rows.append([str(i + 1), layer, _num(value)])
        parts += [f"  per-step scores ({record.get('mode')}, {record.get('order')}):",
                  _table(rows, "    ")]  # fmt: skip
    targets, others = record.get("targets") or [], record.get("others") or []
    column = "similarity" if _key(record) == "max_similarity" else "score"
    rows = [["sample", "target"] + (["other"] if others else []) + [column]]
    for i, value in most_similar(record):
        target = targets[i] if i < len(targets) else "?"
        row = [str(i), "+".join(map(str, target)) if isinstance(target, list) else str(target)]
        if others:
            row.append("all" if others[i] == -1 else str(others[i]))
        rows.append(row + [_num(value)])
    worst = "most similar" if _key(record) == "max_similarity" else "lowest-scoring"
    parts += [f"  {worst} samples:", _table(rows, "    ")]
    if record.get("degenerate"):
        cause = f": {record['cause']}" if record.get("cause") else ""
        parts.append(f"  degenerate samples {record['degenerate']}{cause}")
    return "\n".join(parts)


def write_json(records: list[dict], path: str | Path, meta: dict) -> Path:
    """Write the JSON report (schema in the module docstring); figures are left to the HTML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "schema": SCHEMA,
        "meta": _plain(meta),
        "records": [_plain({k: v for k, v in r.items() if k != "figures"}) for r in records],
    }
    path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path
