"""The HTML report: one self-contained page with each audit's inputs, maps and similarity curve.

:func:`figures` turns an audit result into JSON-able data (PNG data URIs), so xdist workers can
send it home inside their records; :func:`write_html` renders the records into one page with no
external assets. Colormaps are computed here in numpy (no matplotlib at run time): a
blue-white-red diverging map, symmetric around 0, when any map shown is signed, else a
sequential (inferno-like) one. Each map is scaled on its own, as in Adebayo et al.'s figures.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MAX_SAMPLES = 2  # samples shown per audit: the ones whose scores count most against it
MAX_STEPS = 5  # randomization steps shown (evenly spaced, the last one always)
MAX_PIXELS = 64  # longest side of an embedded image; CSS upscales it, pixelated

_DIVERGING = np.array(
    [(33, 102, 172), (103, 169, 207), (247, 247, 247), (239, 138, 98), (178, 24, 43)], float
)
_SEQUENTIAL = np.array(
    [(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], float
)


# --- images -----------------------------------------------------------------------------------


def _apply(colors: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Piecewise-linear colormap: ``t`` in [0, 1] -> uint8 RGB."""
    stops = np.linspace(0.0, 1.0, len(colors))
    rgb = [np.interp(t, stops, colors[:, c]) for c in range(3)]
    return np.clip(np.rint(np.stack(rgb, axis=-1)), 0, 255).astype(np.uint8)


def _tame(values: Any) -> np.ndarray:
    """float64 values any arithmetic below takes without overflow (or a numpy warning, an
    error under ``-W error``): NaN as 0, +-inf as the largest / smallest finite value, and
    values beyond 1e30 divided by their largest magnitude (both colorings and the min-max
    scaling are invariant to a positive factor)."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        if finite.any():
            high, low = values[finite].max(), values[finite].min()
        else:
            high = low = 0.0
        values = np.where(np.isnan(values), 0.0, values)
        values = np.where(np.isposinf(values), high, np.where(np.isneginf(values), low, values))
    peak = np.abs(values).max() if values.size else 0.0
    return values / peak if peak > 1e30 else values


def colorize(values: np.ndarray, signed: bool) -> np.ndarray:
    """A 2-D map as uint8 RGB: diverging around 0 (``signed``) or sequential min-max."""
    values = _tame(values)
    if signed:
        scale = np.abs(values).max()
        t = 0.5 + 0.5 * values / scale if scale > 0 else np.full(values.shape, 0.5)
        return _apply(_DIVERGING, t)
    low, high = values.min(), values.max()
    t = (values - low) / (high - low) if high > low else np.zeros(values.shape)
    return _apply(_SEQUENTIAL, t)


def _shrink(values: np.ndarray) -> np.ndarray:
    """Box-average a 2-D float array so its longest side is at most MAX_PIXELS."""
    from PIL import Image

    h, w = values.shape
    if max(h, w) <= MAX_PIXELS:
        return values
    scale = MAX_PIXELS / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = Image.fromarray(values.astype(np.float32), mode="F")
    return np.asarray(image.resize(size, Image.Resampling.BOX), dtype=np.float64)


def _as_2d(values: np.ndarray) -> np.ndarray:
    return values.reshape(1, -1) if values.ndim == 1 else values.reshape(values.shape[-2:])


def input_image(x: np.ndarray) -> np.ndarray:
    """One input sample as uint8 gray [H, W] or RGB [H, W, 3], min-max de-normalised.

    [3, H, W] is RGB; [C, H, W] with other C is the channel mean; [C, L] is a C x L strip.
    """
    x = _tame(x)
    if x.ndim == 3:
        planes = list(x) if x.shape[0] == 3 else [x.mean(axis=0)]
    else:
        planes = [_as_2d(x)]
    planes = [_shrink(p) for p in planes]
    stacked = np.stack(planes, axis=-1)
    low, high = stacked.min(), stacked.max()
    scaled = (stacked - low) / (high - low) if high > low else np.zeros_like(stacked)
    out = np.rint(scaled * 255).astype(np.uint8)
    return out if out.shape[-1] == 3 else out[..., 0]


def png_uri(pixels: np.ndarray) -> str:
    """uint8 gray [H, W] or RGB [H, W, 3] -> ``data:image/png;base64,...``."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _levels(values: np.ndarray, signed: bool) -> np.ndarray:
    """A 2-D map as uint8 levels 0..255 of :func:`colorize`'s scaling."""
    values = _tame(values)
    if signed:
        scale = np.abs(values).max()
        t = 0.5 + 0.5 * values / scale if scale > 0 else np.full(values.shape, 0.5)
    else:
        low, high = values.min(), values.max()
        t = (values - low) / (high - low) if high > low else np.zeros(values.shape)
    return np.clip(np.rint(t * 255), 0, 255).astype(np.uint8)


_PALETTES: dict[bool, bytes] = {}


_WEBP: list[bool] = []


def _webp() -> bool:
    """Whether this Pillow writes WebP (asked once, quietly: an odd build warns)."""
    if not _WEBP:
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from PIL import features

                _WEBP.append(bool(features.check("webp")))
        except Exception:  # an unusual Pillow build: the PNG fallback
            _WEBP.append(False)
    return _WEBP[0]


def map_uri(values: np.ndarray, signed: bool) -> str:
    """A map in the colormap's 256 levels, as lossless WebP (every current browser draws it;
    about half a palette PNG's bytes), or as a palette PNG where Pillow has no WebP."""
    from PIL import Image

    if signed not in _PALETTES:
        colors = _DIVERGING if signed else _SEQUENTIAL
        _PALETTES[signed] = _apply(colors, np.linspace(0.0, 1.0, 256)).tobytes()
    image = Image.fromarray(_levels(_shrink(_as_2d(_tame(values))), signed), mode="P")
    image.putpalette(_PALETTES[signed])
    buffer = io.BytesIO()
    if _webp():
        image.convert("RGB").save(buffer, format="WEBP", lossless=True, method=4)
        kind = "webp"
    else:
        image.save(buffer, format="PNG", optimize=True)
        kind = "png"
    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# --- figures ----------------------------------------------------------------------------------


def _shown_steps(total: int) -> list[int]:
    if total <= MAX_STEPS:
        return list(range(total))
    picks = np.linspace(0, total - 1, MAX_STEPS).round().astype(int)
    return sorted(set(picks.tolist()))


def _score(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def _key(result: Any) -> str:
    threshold = getattr(result, "threshold", None)
    return getattr(threshold, "key", "max_similarity")


def figures(result: Any) -> dict[str, Any]:
    """JSON-able figures of an audit result: inputs, compared maps and their scores.

    Rows are samples (at most MAX_SAMPLES: the worst first, as the verdict reads them: the
    most similar, or the least risen; a constant map's sample before them); columns are the
    input, then the target-class and other-class maps (output sensitivity) or the original map
    and the maps after the randomization steps (a subset of at most MAX_STEPS, like Adebayo et
    al.'s cascading figure).
    """
    n = min(int(result.scores.shape[-1]), MAX_SAMPLES)
    row = result._worst() if hasattr(result, "_worst") else result.scores
    row = row.detach().cpu().double()
    row = row.max(dim=0).values if row.dim() == 2 else row  # steps x samples: the worst
    sign = 1.0 if _key(result) == "max_similarity" else -1.0
    shown = sorted(range(row.shape[0]), key=lambda i: (
        not math.isnan(float(row[i])), -sign * float(row[i]) if not math.isnan(float(row[i]))
        else 0.0, i))[:n]  # fmt: skip
    scores = result.scores.detach().cpu().double()
    if result.check == "output_sensitivity":
        noun = {"multilabel": "label", "regression": "unit"}.get(
            getattr(result, "target_kind", "class"), "class")  # fmt: skip
        keys, headers = ["target", "other"], [f"target {noun}", f"other {noun}"]
        others = getattr(result, "others", None)

        def cell_score(col: int, i: int) -> float | None:
            return None if col == 0 else _score(scores[i])

        def caption(col: int, i: int) -> str:
            if col == 0:
                return f"{noun} {result.target_of(i)}"
            cls = int(others[i]) if others is not None else -1
            return f"{noun} {cls}" if cls >= 0 else "all others"
    elif not hasattr(result, "layers"):  # two maps per sample: reference, compared
        keys = list(result.maps)
        headers = [k.replace("_", " ") for k in keys]

        def cell_score(col: int, i: int) -> float | None:
            return None if col == 0 else _score(scores[i])

        def caption(col: int, i: int) -> str:
            return ""
    else:
        steps = _shown_steps(len(result.layers))
        keys = ["original", *(result.layers[s] for s in steps)]
        headers = ["original", *(f"{s + 1}. {result.layers[s]}" for s in steps)]

        def cell_score(col: int, i: int) -> float | None:
            return None if col == 0 else _score(scores[steps[col - 1], i])

        def caption(col: int, i: int) -> str:
            return ""

    maps = [result.maps[k][shown].detach().cpu().double().numpy() for k in keys]
    signed = any(float(m.min()) < 0 for m in maps if m.size)
    inputs = result.inputs[shown].detach().cpu().double().numpy()
    rows = []
    for j, i in enumerate(shown):
        cells = [
            {"image": map_uri(m[j], signed), "score": cell_score(c, i), "caption": caption(c, i)}
            for c, m in enumerate(maps)
        ]
        rows.append({"sample": i, "input": png_uri(input_image(inputs[j])), "cells": cells})
    return {
        "check": result.check,
        "colormap": "diverging" if signed else "sequential",
        "columns": headers,
        "rows": rows,
        "samples_total": int(result.scores.shape[-1]),
        "steps_total": len(getattr(result, "layers", [])),
        "score_label": "score" if _key(result) == "min_rise" else "sim",
    }


# --- SVG plots --------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return f"{value:.{digits}f}"


def _finite(values: Sequence[Any]) -> list[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def curve_svg(labels: list[str], scores: list[list[Any]], threshold: float) -> str:
    """Similarity per randomization step: one faint line per sample, the mean, the threshold."""
    width, height, left, top, plot_h = 80 + 56 * max(len(labels), 1), 250, 48, 12, 140

    def x(k: int) -> float:
        return left + 28 + 56 * k

    def y(v: float) -> float:
        return top + (1 - (max(-1.0, min(1.0, v)) + 1) / 2) * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'class="curve" role="img" aria-label="similarity per randomization step">'
    ]
    for v in (-1.0, -0.5, 0.0, 0.5, 1.0):
        parts.append(
            f'<line x1="{left}" x2="{width - 8}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
            f'class="grid"/><text x="{left - 6}" y="{y(v) + 4:.1f}" '
            f'text-anchor="end">{v:g}</text>'
        )
    parts.append(
        f'<line x1="{left}" x2="{width - 8}" y1="{y(threshold):.1f}" '
        f'y2="{y(threshold):.1f}" class="threshold"><title>max_similarity '
        f"{threshold:g}</title></line>"
    )
    samples = list(zip(*scores)) if scores else []
    for sample in samples:
        parts.append(_polyline([(x(k), v) for k, v in enumerate(sample)], y, "sample"))
    means = [(sum(_finite(row)) / len(_finite(row))) if _finite(row) else None for row in scores]
    parts.append(_polyline([(x(k), v) for k, v in enumerate(means)], y, "mean"))
    for k, (label, mean) in enumerate(zip(labels, means)):
        if mean is not None:
            parts.append(
                f'<circle cx="{x(k):.1f}" cy="{y(mean):.1f}" r="3" class="mean">'
                f"<title>{html.escape(label)}: {_fmt(mean)}</title></circle>"
            )
        short = label if len(label) <= 14 else label[:13] + "…"
        parts.append(
            f'<text x="{x(k):.1f}" y="{top + plot_h + 14}" text-anchor="end" '
            f'transform="rotate(-40 {x(k):.1f} {top + plot_h + 14})">'
            f"{html.escape(short)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _polyline(points: list[tuple[float, Any]], y, cls: str) -> str:
    """Polylines broken at missing (NaN) values."""
    runs: list[list[str]] = [[]]
    for px, v in points:
        if v is None or math.isnan(v):
            runs.append([])
        else:
            runs[-1].append(f"{px:.1f},{y(v):.1f}")
    runs = [r for r in runs if r]
    return "".join(f'<polyline points="{" ".join(r)}" class="{cls}"/>' for r in runs)


def strip_svg(scores: list[Any], threshold: float, key: str = "max_similarity") -> str:
    """Output sensitivity: each sample's similarity on a [-1, 1] axis, the mean and threshold."""
    width, height, left, right = 360, 46, 16, 16

    def x(v: float) -> float:
        return left + (max(-1.0, min(1.0, v)) + 1) / 2 * (width - left - right)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'class="strip" role="img" aria-label="similarity per sample">',
        f'<line x1="{left}" x2="{width - right}" y1="18" y2="18" class="grid"/>',
    ]
    for v in (-1.0, 0.0, 1.0):
        parts.append(f'<text x="{x(v):.1f}" y="40" text-anchor="middle">{v:g}</text>')
    parts.append(
        f'<line x1="{x(threshold):.1f}" x2="{x(threshold):.1f}" y1="4" y2="32" '
        f'class="threshold"><title>{key} {threshold:g}</title></line>'
    )
    for i, v in enumerate(scores):
        if v is not None and not math.isnan(v):
            parts.append(
                f'<circle cx="{x(v):.1f}" cy="18" r="3" class="sample">'
                f"<title>sample {i}: {_fmt(v)}</title></circle>"
            )
    finite = _finite(scores)
    if finite:
        mean = sum(finite) / len(finite)
        parts.append(
            f'<line x1="{x(mean):.1f}" x2="{x(mean):.1f}" y1="8" y2="28" class="mean">'
            f"<title>mean {_fmt(mean)}</title></line>"
        )
    parts.append("</svg>")
    return "".join(parts)


# --- the page ---------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse}th,td{padding:3px 8px;text-align:left;vertical-align:top}
table.summary td,table.summary th{border-bottom:1px solid #ddd}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.verdict{font-weight:600;padding:1px 6px;border-radius:3px;color:#fff}
.pass,.xfail{background:#2a7d3f}.fail,.xpass{background:#b3261e}
.xfail{background:#6b7d2a}.error{background:#7a1f6e}.refused{background:#5d6b7a}
pre.error{white-space:pre-wrap;background:#f6eef5;padding:6px;font-size:12px}
details.audit{border-top:1px solid #ccc;margin-top:6px;padding-top:4px}
details.audit summary{cursor:pointer}
table.overview td,table.overview th{border:1px solid #ddd;font-size:12px;padding:2px 6px}
td.cell a{color:inherit;text-decoration:none;display:block}
td.cell.pass{background:#d7efdc}td.cell.fail,td.cell.xpass{background:#f5c9c5}
td.cell.xfail{background:#e8ecd0}td.cell.error{background:#ecc9e6}
td.cell.refused{background:#dde2e8}ul.attention{font-size:13px}
table.maps td{text-align:center;font-size:12px}
table.maps img{width:64px;height:auto;image-rendering:pixelated;display:block;margin:auto}
.note{color:#666;font-size:12px}
svg text{font-size:10px;fill:#444}svg .grid{stroke:#ddd}
svg .threshold{stroke:#b3261e;stroke-dasharray:4 3}
svg polyline.sample{fill:none;stroke:#9ab;stroke-width:1}
svg polyline.mean{fill:none;stroke:#124;stroke-width:2}svg circle.mean{fill:#124}
svg circle.sample{fill:#468;opacity:.7}svg line.mean{stroke:#124;stroke-width:2}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _label(record: dict) -> str:
    return str(record.get("method_id") or record.get("method", "?"))


def _ci(record: dict) -> str:
    ci = record.get("ci") or [None, None]
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _symbol(r: dict) -> str:
    return "&lt;=" if (r.get("threshold_key") or "max_similarity") == "max_similarity" else "&gt;="


def _controls(r: dict) -> str:
    controls = r.get("controls") or {}
    return "/".join(_fmt(controls.get(k)) if k in controls else "-" for k in ("noise", "edge"))


def _summary(records: list[dict]) -> str:
    head = ("test", "method", "check", "metric", "score", "95% CI", "noise/edge", "threshold",
            "verdict")  # fmt: skip
    rows = ["<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for k, r in enumerate(records):
        verdict = str(r.get("verdict", "?"))
        rows.append(
            f'<tr><td><a href="#audit-{k}">{_e(r.get("nodeid", ""))}</a></td>'
            f"<td>{_e(_label(r))}</td><td>{_e(r.get('check', ''))}</td>"
            f"<td>{_e(r.get('similarity', ''))}</td><td class=num>{_fmt(r.get('score'))}</td>"
            f"<td class=num>{_ci(r)}</td><td class=num>{_e(_controls(r))}</td>"
            f"<td class=num>{_symbol(r)} {_fmt(r.get('threshold'), 2)}</td>"
            f'<td><span class="verdict {_e(verdict)}">{_e(verdict.upper())}</span></td></tr>'
        )
    return '<table class="summary">' + "".join(rows) + "</table>"


def _maps_table(fig: dict) -> str:
    head = "<tr><th>sample</th><th>input</th>" + "".join(
        f"<th>{_e(c)}</th>" for c in fig.get("columns", [])
    )
    rows = [head + "</tr>"]
    for row in fig.get("rows", []):
        cells = [f"<td>#{row['sample']}</td>", f'<td><img src="{row["input"]}" alt="input"></td>']
        for cell in row["cells"]:
            note = cell.get("caption") or ""
            if cell.get("score") is not None:
                note = f"{note} {fig.get('score_label', 'sim')} {_fmt(cell['score'])}".strip()
            cells.append(f'<td><img src="{cell["image"]}" alt="map"><div>{_e(note)}</div></td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    shown = len(fig.get("rows", []))
    note = f"{shown} of {fig.get('samples_total', shown)} samples; {fig.get('colormap')} colormap"
    if fig.get("colormap") == "diverging":
        note += " (blue < 0 < red, symmetric, each map scaled to its own max |value|)"
    else:
        note += " (each map min-max scaled)"
    steps = fig.get("steps_total", 0)
    if steps > len(fig.get("columns", [])) - 1:
        note += f"; {len(fig['columns']) - 1} of {steps} steps shown"
    return f'<table class="maps">{"".join(rows)}</table><p class="note">{_e(note)}.</p>'


def _coverage(r: dict) -> str:
    """A randomization record's coverage line: how much was re-initialised, what was not."""
    text = f"coverage {_fmt(r.get('coverage'))} of the parameters the forward uses"
    for key, what in (("skipped", "not re-initialised"), ("unused", "unused by the forward"),
                      ("fallback", "drawn by the fallback")):  # fmt: skip
        names = r.get(key) or []
        if names:
            shown = ", ".join(str(n) for n in names[:12])
            text += (
                f"; {what}: {shown}{f' ... ({len(names) - 12} more)' if len(names) > 12 else ''}"
            )
    return text


def _section(k: int, r: dict) -> str:
    verdict = str(r.get("verdict", "?"))
    threshold = float(r.get("threshold", 0.5))
    key = str(r.get("threshold_key") or "max_similarity")
    parts = [
        f'<details class="audit" id="audit-{k}"><summary><span class="verdict {_e(verdict)}">'
        f"{_e(verdict.upper())}</span> {_e(r.get('nodeid', ''))} · {_e(r.get('check', ''))}"
        "</summary>",
        f"<p>{_e(_label(r))} · {_e(r.get('check', ''))} · {_e(r.get('similarity', ''))} "
        f"score <b>{_fmt(r.get('score'))}</b> 95% CI {_ci(r)} · {_e(key)} "
        f"{_fmt(threshold, 2)}{' (CI bound too)' if r.get('confidence') else ''}</p>",
    ]
    if r.get("error"):
        error = r["error"]
        what = "refused as expected" if verdict == "refused" else "the audit raised"
        kind = f" (refusal: {_e(error['kind'])})" if error.get("kind") else ""
        parts.append(
            f'<p class="note">{what}: {_e(error.get("type"))}{kind}</p>'
            f'<pre class="error">{_e(error.get("message", ""))}</pre>'
        )
    if r.get("controls"):
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in r["controls"].items())
        parts.append(
            f'<p class="note">null controls (the same check on maps that cannot be faithful: '
            f"fresh noise, the input's edges): {_e(shown)}</p>"
        )
    settings = {**(r.get("options") or {}), **(r.get("settings") or {})}
    if settings:
        parts.append(
            f'<p class="note">settings: {_e(_text(settings))}; seed {_e(r.get("seed"))}</p>'
        )
    if r.get("degenerate"):
        parts.append(
            f'<p class="note">constant maps (NaN scores) for samples '
            f"{_e(r['degenerate'])}: {_e(r.get('cause', ''))}</p>"
        )
    if "coverage" in r:
        parts.append(f'<p class="note">{_e(_coverage(r))}</p>')
    if r.get("figures"):
        parts.append(_maps_table(r["figures"]))
    scores = r.get("scores") or []
    if r.get("step_scores") is not None and scores:
        parts.append("<h3>similarity per step</h3>")
        parts.append(curve_svg([str(n) for n in r.get("layers", [])], scores, threshold))
    elif scores:
        what = "similarity" if key == "max_similarity" else "score"
        parts.append(f"<h3>{what} per sample</h3>" + strip_svg(scores, threshold, key))
    parts.append("</details>")
    return "".join(parts)


ATTENTION = ("fail", "xpass", "error")
_RANK = {"error": 0, "fail": 1, "xpass": 2, "refused": 3, "xfail": 4, "pass": 5}


def _overview(records: list[dict]) -> str:
    """What needs attention (links), then one matrix per test or suite model: methods by
    checks, each cell the score, coloured by verdict, linking to the audit's details. The
    methods with failures and errors come first."""
    from .report import where_of

    parts = []
    attention = [(k, r) for k, r in enumerate(records) if r.get("verdict") in ATTENTION]
    if attention:
        items = "".join(
            f'<li><a href="#audit-{k}"><span class="verdict {_e(r["verdict"])}">'
            f"{_e(str(r['verdict']).upper())}</span> {_e(r.get('nodeid', ''))} "
            f"· {_e(r.get('check', ''))}</a></li>"
            for k, r in attention
        )
        parts.append(
            f'<h2>Needs attention ({len(attention)})</h2><ul class="attention">{items}</ul>'
        )
    groups: dict[str, dict] = {}
    for k, r in enumerate(records):
        where = where_of(r) if r.get("source") == "suite" else str(r.get("nodeid", ""))
        if r.get("source") != "suite":  # tests: one matrix per file
            where = where.split("::", 1)[0]
        group = groups.setdefault(where, {"checks": [], "rows": {}})
        if r.get("check") not in group["checks"]:
            group["checks"].append(r.get("check"))
        label = (
            _label(r) if r.get("source") == "suite" else str(r.get("nodeid", "")).split("::", 1)[-1]
        )
        group["rows"].setdefault(label, {})[r.get("check")] = k
    for where, group in groups.items():
        checks = group["checks"]
        rows = sorted(
            group["rows"].items(),
            key=lambda item: min(
                _RANK.get(str(records[k].get("verdict")), 9) for k in item[1].values()
            ),
        )
        head = "<tr><th>method</th>" + "".join(f"<th>{_e(c)}</th>" for c in checks) + "</tr>"
        body = []
        for label, cells in rows:
            tds = []
            for check in checks:
                if check not in cells:
                    tds.append("<td></td>")
                    continue
                k = cells[check]
                r = records[k]
                verdict = str(r.get("verdict", "?"))
                shown = "error" if r.get("error") else _fmt(r.get("score"))
                at_most = (r.get("threshold_key") or "max_similarity") == "max_similarity"
                limit = f"{'<=' if at_most else '>='} {_fmt(r.get('threshold'), 2)}"
                tip = f"{verdict}: score {_fmt(r.get('score'))}, passes at {limit}"
                tds.append(
                    f'<td class="cell {_e(verdict)}"><a href="#audit-{k}" title="{_e(tip)}">'
                    f"{_e(shown)}</a></td>"
                )
            body.append(f"<tr><th>{_e(label)}</th>{''.join(tds)}</tr>")
        parts.append(f'<h2>{_e(where)}</h2><table class="overview">{head}{"".join(body)}</table>')
    return "".join(parts)


_IMAGE = re.compile(r'src="(data:image/(?:png|webp);base64,[A-Za-z0-9+/=]+)"')
# Sets every deduplicated image's source from the list U, and opens the audit a link points
# at (the details start collapsed).
_SCRIPT = (
    "document.querySelectorAll('img[data-u]').forEach(i=>{i.src=U[+i.dataset.u]});"
    "function openTarget(){const d=document.getElementById(location.hash.slice(1));"
    "if(d&&d.tagName==='DETAILS'){d.open=true;}}"
    "window.addEventListener('hashchange',openTarget);openTarget();"
)


def _dedupe(body: str) -> tuple[str, list[str]]:
    """Each distinct image once: ``<img data-u="i">`` with the URIs in one list (the same
    inputs appear in every audit of a batch)."""
    uris: dict[str, int] = {}

    def ref(match: re.Match) -> str:
        index = uris.setdefault(match.group(1), len(uris))
        return f'data-u="{index}"'

    return _IMAGE.sub(ref, body), list(uris)


def render_html(records: Sequence[dict], meta: dict | None = None) -> str:
    """The report page as a string (see :func:`write_html`)."""
    records = list(records)
    meta = meta or {}
    counts: dict[str, int] = {}
    for r in records:
        counts[str(r.get("verdict"))] = counts.get(str(r.get("verdict")), 0) + 1
    tally = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no audits"
    info = " · ".join(f"{_e(k)}: {_e(_text(v))}" for k, v in meta.items())
    body, uris = _dedupe("".join(_section(k, r) for k, r in enumerate(records)))
    script = f"<script>const U={json.dumps(uris)};{_SCRIPT}</script>"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        "<title>pytest-saliency report</title>"
        f"<style>{_CSS}</style></head><body><h1>pytest-saliency report</h1>"
        f'<p class="note">{info}</p><p>{len(records)} audits: {_e(tally)}</p>'
        f"{_overview(records)}<h2>All audits</h2>{_summary(records)}{body}{script}</body></html>\n"
    )


def write_html(records: Sequence[dict], path: str | Path, meta: dict | None = None) -> Path:
    """Write one self-contained HTML page (images inline, no external assets) for ``records``.

    ``records`` are the plugin's JSON-able records; those with a ``figures`` entry (from
    :func:`figures`) get their images, every one gets its scores plotted.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(records, meta), encoding="utf-8")
    return path
