"""Both audits for every bundled method on the trained digits model, as one table.

Run: ``python benchmarks/paper_table.py [--n 16] [--threshold 0.5] [--similarity ssim]``.
Output sensitivity uses ``against="random"``; parameter randomization is cascading, top-down,
over every layer. A method passes an audit when its similarity score is at most the threshold.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import pytest_saliency as ps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from digits.model import audit_batch, trained_model  # noqa: E402


def _cell(result, threshold: float) -> str:
    low, high = result.ci
    verdict = "pass" if result.passed(threshold) else "FAIL"
    if math.isnan(result.score):
        return f"{'nan':>6} {'':>15} {verdict} (degenerate)"
    return f"{result.score:6.3f} [{low:6.3f}, {high:6.3f}] {verdict}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--similarity", default="ssim")
    parser.add_argument("--layers", default=None, help="'blocks' or leave out for every layer")
    args = parser.parse_args()

    model = trained_model()
    x = audit_batch(args.n)
    print(f"digits model, {args.n} held-out images, similarity={args.similarity}, "
          f"threshold={args.threshold}, CAM methods on their default layer")  # fmt: skip
    print(f"{'method':24} {'output sensitivity (random)':36} {'randomization (cascading)':36} s")
    for method in ps.methods():
        start = time.perf_counter()
        common = {"similarity": args.similarity}
        sens = ps.output_sensitivity(model, x, method, against="random", **common)
        rand = ps.parameter_randomization(model, x, method, layers=args.layers, **common)
        took = time.perf_counter() - start
        name = method + (f" @{sens.settings['layer']}" if sens.settings["layer"] else "")
        print(f"{name:24} {_cell(sens, args.threshold):36} {_cell(rand, args.threshold):36} "
              f"{took:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
