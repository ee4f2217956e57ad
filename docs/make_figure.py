"""Render docs/randomization.png from the HTML report's own images.

Cascading randomization of DigitsNet (examples/digits), the same audit as
``saliency_digits.yaml``: guided backprop's maps stay the same while the layers are
re-initialised from the logits down; the gradient's maps do not. The cells are the PNGs that
``pytest_saliency.html.figures`` embeds in the HTML report, decoded and tiled with Pillow.

Run from the repository root: ``python docs/make_figure.py``.
"""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from digits import model as digits_model  # noqa: E402

import pytest_saliency as ps  # noqa: E402
from pytest_saliency.html import figures  # noqa: E402

CELL = 64  # pixels per map (the report's 32 x 32 images, upscaled x2, nearest)
SAMPLES = (0, 3)  # two digits per method
LABEL_W, HEAD_H, GAP = 118, 34, 4


def decode(uri: str) -> Image.Image:
    raw = base64.b64decode(uri.split(",", 1)[1])
    return Image.open(io.BytesIO(raw)).convert("RGB").resize((CELL, CELL), Image.NEAREST)


def main(out: Path = ROOT / "docs" / "randomization.png") -> None:
    model = digits_model.trained_model()
    batch = digits_model.audit_batch(16)
    results = ps.parameter_randomization(model, batch, ["guided_backprop", "gradient"])
    font = ImageFont.load_default(size=11)
    figs = [figures(r) for r in results]
    columns = ["input", *figs[0]["columns"]]
    width = LABEL_W + len(columns) * (CELL + GAP)
    height = HEAD_H + len(results) * len(SAMPLES) * (CELL + GAP) + GAP
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        x = LABEL_W + c * (CELL + GAP)
        # "3. features.8" -> two short lines that fit over a cell
        top, _, bottom = name.partition(" ")
        draw.text((x + 2, 4), top, fill="black", font=font)
        draw.text((x + 2, 17), bottom, fill="black", font=font)
    y = HEAD_H
    for result, fig in zip(results, figs):
        for i in SAMPLES:
            row = fig["rows"][i]
            draw.text((6, y + CELL // 2 - 14), result.method, fill="black", font=font)
            step_scores = [cell["score"] for cell in row["cells"][1:]]
            worst = max(s for s in step_scores if s is not None)
            draw.text((6, y + CELL // 2 + 2), f"max SSIM {worst:.2f}", fill="dimgray", font=font)
            images = [row["input"], *(cell["image"] for cell in row["cells"])]
            for c, uri in enumerate(images):
                canvas.paste(decode(uri), (LABEL_W + c * (CELL + GAP), y))
            y += CELL + GAP
    # A 256-colour palette keeps the file small; the colormaps have few distinct colours anyway.
    canvas.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB, {width}x{height})")


if __name__ == "__main__":
    main()
