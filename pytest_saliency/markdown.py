"""The Markdown summary (``--saliency-report summary.md``): short enough for a pull-request
comment or ``$GITHUB_STEP_SUMMARY``: the tally, what needs attention, what got worse than the
baseline, and every audit in a collapsed section."""

from __future__ import annotations

import re
from pathlib import Path

from .report import _ci, _controls, _num, _symbol, _why, error_text, groups, tally

ATTENTION = ("fail", "xpass", "error")


_SPECIAL = re.compile(r"([\\`*_\[\]<>#|~])")


def _md(text: object) -> str:
    """Plain text in a table cell: one line, Markdown's and HTML's marks escaped."""
    return _SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _code(text: object) -> str:
    """Text as a code span in a table cell: a fence longer than its longest run of
    backticks, pipes escaped (GitHub splits cells on them even in code)."""
    text = " ".join(str(text).split())
    runs = [len(m) for m in re.findall(r"`+", text)]
    fence = "`" * (max(runs, default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text.replace('|', chr(92) + '|')}{pad}{fence}"


def _verdict(record: dict) -> str:
    verdict = str(record["verdict"])
    return f"**{verdict.upper()}**" if verdict in ATTENTION else verdict


def _audit(record: dict) -> str:
    """A suite item's id names its check; a test's id is followed by the check's name."""
    shown = _code(record["nodeid"])
    return shown if record.get("source") == "suite" else f"{shown} {_md(record['check'])}"


def _reason(record: dict) -> str:
    if record.get("error"):
        return error_text(record)
    if record["verdict"] == "xpass":
        return "expected to fail or be refused, but passed: update its 'expect'"
    return _why(record)


def format_markdown(records: list[dict], meta: dict | None = None) -> str:
    """The summary as one Markdown string (records in the order to show them)."""
    meta = meta or {}
    lines = [f"## pytest-saliency: {tally(records)}", ""]
    about = [f"{k} {meta[k]}" for k in ("version", "torch", "device", "seed") if k in meta]
    if about:
        lines += ["pytest-saliency " + ", ".join(about), ""]
    attention = [r for r in records if r["verdict"] in ATTENTION]
    if attention:
        lines += [f"### Needs attention ({len(attention)})", ""]
        lines += ["| audit | score | threshold | verdict | why |", "|---|---|---|---|---|"]
        for r in attention:
            lines.append(
                f"| {_audit(r)} | {'-' if r.get('error') else _num(r.get('score'))} | "
                f"{_symbol(r)} {r['threshold']:.3f} | {_verdict(r)} | {_md(_reason(r))} |"
            )
        lines.append("")
    compared = [r for r in records if r.get("baseline") and r["baseline"].get("worse_by")]
    worse = sorted((r for r in compared if r["baseline"]["worse_by"] > 0),
                   key=lambda r: -r["baseline"]["worse_by"])  # fmt: skip
    new = [r for r in records if "baseline" in r and r["baseline"] is None]
    gone = (meta.get("baseline") or {}).get("gone") or []
    if worse or new or gone:
        lines += ["### Compared with the baseline", ""]
        if worse:
            lines += ["| audit | baseline | now | worse by | |", "|---|---|---|---|---|"]
            for r in worse[:50]:
                base = r["baseline"]
                mark = "**regressed**" if r.get("regressed") else "within tolerance"
                lines.append(
                    f"| {_audit(r)} | {_num(base['score'])} | "
                    f"{_num(r.get('score'))} | {base['worse_by']:.3f} | {mark} |"
                )
            lines.append("")
        if new:
            lines.append(f"New audits (not in the baseline): {len(new)}")
        if gone:
            lines.append(f"Gone (in the baseline, not run): {len(gone)}")
        lines.append("")
    lines += [f"<details><summary>All {len(records)} audits</summary>", ""]
    for title, members in groups(records):
        lines += [f"#### {_code(title)}", "",
                  "| method | metric | score | 95% CI | noise/edge | threshold | verdict |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in members:
            scored = ("-", "-", "-") if r.get("error") else (_num(r["score"]), _ci(r), _controls(r))
            lines.append(
                f"| {_md(r.get('method_id') or r['method'])} | {_md(r.get('similarity') or '-')} | "
                f"{' | '.join(scored)} | {_symbol(r)} {r['threshold']:.3f} | {_verdict(r)} |"
            )
        lines.append("")
    lines += ["</details>", ""]
    return "\n".join(lines)


def write_markdown(records: list[dict], path: str | Path, meta: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_markdown(records, meta), encoding="utf-8")
    return path
