"""Regenerate tests/data/check_pins.json: today's scores of both checks on small seeded models.

Run by hand (``python tests/regen_check_pins.py``) only when a score is meant to change; the
test ``tests/test_check_pins.py`` fails whenever a refactor moves one of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import pytest_saliency as ps
from tests._models import conv1d_net, mlp, randn, small_cnn

PIN_FILE = Path(__file__).parent / "data" / "check_pins.json"
METHODS = ["gradient", "gradcam", "guided_backprop", "smoothgrad", "lrp_epsilon", "fullgrad"]


def cases():
    """(id, callable returning a result list) for every pinned audit."""
    cnn = small_cnn(seed=3, classes=5)
    x = randn(4, 3, 8, 8, seed=1)
    net1d, x1d = conv1d_net(seed=2), randn(3, 2, 16, seed=4)
    tab, xt = mlp(seed=5), randn(5, 6, seed=6)
    yield "sens-random", lambda: ps.output_sensitivity(cnn, x, METHODS)
    yield (
        "sens-all-spearman",
        lambda: ps.output_sensitivity(
            cnn, x, ["gradient", "gradcam"], against="all", similarity="spearman"
        ),
    )
    yield (
        "sens-second-seed",
        lambda: ps.output_sensitivity(
            cnn, x, ["input_x_gradient", "rectgrad"], against="second", seed=7
        ),
    )
    yield "rand-td", lambda: ps.parameter_randomization(cnn, x, METHODS)
    yield (
        "rand-bu-indep",
        lambda: ps.parameter_randomization(
            cnn,
            x,
            ["gradient", "gradcam"],
            mode="independent",
            order="bottom_up",
            similarity="pearson",
        ),
    )
    yield (
        "rand-blocks",
        lambda: ps.parameter_randomization(cnn, x, ["gradient"], layers="blocks", seed=11),
    )
    yield "1d", lambda: ps.parameter_randomization(net1d, x1d, ["gradient"], similarity="spearman")
    yield "tab", lambda: ps.output_sensitivity(tab, xt, ["gradient"], similarity="pearson")


def measure() -> dict:
    torch.manual_seed(0)
    out = {}
    for name, run in cases():
        for result in run():
            out[f"{name}:{result.method}"] = result.scores.double().tolist()
    return out


if __name__ == "__main__":
    PIN_FILE.write_text(json.dumps(measure(), indent=1) + "\n")
    print(f"wrote {PIN_FILE}")
