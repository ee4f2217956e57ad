"""Model state is restored: train/eval flags per module, hooks; device and dtype lookup."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from pytest_saliency.engine.state import eval_mode, model_device_dtype, removable_hooks
from tests._models import mlp, randn


def flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


@pytest.mark.parametrize("fail", [False, True])
def test_eval_mode_restores_each_modules_flag(fail):
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Dropout(), nn.BatchNorm1d(2)))
    model.train()
    model[1][1].eval()  # a frozen submodule inside a training model
    before = flags(model)
    with pytest.raises(RuntimeError) if fail else contextlib.nullcontext():
        with eval_mode(model) as inside:
            assert inside is model
            assert not any(flags(model))
            if fail:
                raise RuntimeError("boom")
    assert flags(model) == before == [True, True, True, True, False]


@pytest.mark.parametrize("fail", [False, True])
def test_removable_hooks_removed_even_on_error(fail):
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError) if fail else contextlib.nullcontext():
        with removable_hooks() as handles:
            handles.append(model.register_forward_hook(lambda m, a, o: None))
            handles.append(model.register_forward_pre_hook(lambda m, a: None))
            handles.append(model.register_full_backward_hook(lambda m, gi, go: None))
            assert model._forward_hooks and model._forward_pre_hooks and model._backward_hooks
            if fail:
                raise ValueError("boom")
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert not model._backward_hooks


def test_model_device_dtype():
    x = randn(2, 6)
    assert model_device_dtype(mlp().double(), x) == (torch.device("cpu"), torch.float64)
    assert model_device_dtype(nn.ReLU(), x.half()) == (torch.device("cpu"), torch.float16)
    # An integer buffer does not decide the dtype; the first float tensor does.
    model = mlp()
    model.register_buffer("step", torch.tensor(0))
    model.register_buffer("scale", torch.ones(1, dtype=torch.float64))
    assert model_device_dtype(model, x)[1] == torch.float32
    only_int = nn.Module()
    only_int.register_buffer("count", torch.zeros(2, dtype=torch.long))
    assert model_device_dtype(only_int, x.double()) == (torch.device("cpu"), torch.float64)
