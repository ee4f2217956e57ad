"""Shared pytester helpers for the plugin tests: a tiny seeded CNN module for inner projects."""

from __future__ import annotations

import pytest

# pytester's in-process runs drop every module first imported during a run; torch cannot be
# imported twice in one process, and the method registry must not register twice, so load
# them here, before any inner run.
import torch  # noqa: F401

import pytest_saliency.checks  # noqa: F401
from pytest_saliency.bundled.registry import methods

methods()

TINYNET = '''
import torch
from torch import nn


def make_model():
    """conv-relu-conv-relu-linear on 1x8x8 inputs, 3 classes, seeded weights."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(4 * 8 * 8, 3),
        )
    return model.eval()


def make_inputs(n=4):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))
'''


# An inner project's model the propagation rules refuse: a custom autograd function on the
# signal path, whose backward they cannot vouch for (refused() in a models.py).
REFUSED_MODEL = """
import torch
from torch import nn

import tinynet


class Doubler(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


class Custom(nn.Module):
    def forward(self, x):
        return Doubler.apply(x).relu()


def refused():
    model = tinynet.make_model()
    model[1] = Custom()
    return model
"""


def write_tinynet(pytester: pytest.Pytester) -> None:
    """Write ``tinynet.py`` (``make_model()``, ``make_inputs(n)``) into the inner project."""
    pytester.makepyfile(tinynet=TINYNET)


@pytest.fixture
def tiny_project(pytester: pytest.Pytester) -> pytest.Pytester:
    """A pytester project with ``tinynet.py`` importable from its tests."""
    write_tinynet(pytester)
    return pytester
