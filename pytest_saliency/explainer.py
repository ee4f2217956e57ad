"""``explain``: one saliency map per sample, from any registered method."""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import numpy as np
import torch
from torch import nn

from .bundled.registry import Context, get_method
from .engine.layers import default_layer, resolve_layer
from .engine.state import eval_mode, exact_kernels, model_device_dtype
from .errors import SaliencyError

P = ParamSpec("P")
R = TypeVar("R")


def check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise SaliencyError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def check_inputs(inputs: object) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor):
        raise SaliencyError(
            f"inputs must be a float tensor [N, C, H, W], [N, C, L] or [N, D], "
            f"got {type(inputs).__name__}"
        )
    if not inputs.is_floating_point():
        raise SaliencyError(f"inputs must be a floating-point tensor, got dtype {inputs.dtype}")
    if inputs.dim() not in (2, 3, 4) or inputs.shape[0] == 0:
        raise SaliencyError(
            f"inputs have shape {tuple(inputs.shape)}; expected a non-empty batch "
            "[N, C, H, W], [N, C, L] or [N, D] (add a batch axis with inputs.unsqueeze(0))"
        )
    return inputs


def check_batch_size(batch_size: object) -> int | None:
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SaliencyError(f"batch_size must be a positive int or None, got {batch_size!r}")
    return batch_size


def check_target(target: object, n: int) -> Any:
    """Tensors and lists become a LongTensor [N] (range is checked against the model's output)."""
    if target is None or (isinstance(target, int) and not isinstance(target, bool)):
        return target
    # numpy integers (e.g. from ``logits.argmax().item()`` on an array) are ints too.
    if isinstance(target, numbers.Integral) and not isinstance(target, (bool, np.bool_)):
        return int(target)
    if isinstance(target, (list, tuple, torch.Tensor, np.ndarray)):
        t = torch.as_tensor(target)
        if t.is_floating_point() or t.dtype == torch.bool:
            raise SaliencyError(f"target must hold integer class indices, got dtype {t.dtype}")
        if t.dim() == 0:
            return int(t)
        if t.dim() != 1 or t.shape[0] != n:
            raise SaliencyError(
                f"target has shape {tuple(t.shape)}; expected one class per sample, shape [{n}]"
            )
        return t.long()
    raise SaliencyError(
        f"target must be None, an int or a LongTensor [N], got {type(target).__name__}"
    )


_PLANAR = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_LINEAR_AXIS = (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d)


def check_rank(model: nn.Module, inputs: torch.Tensor) -> None:
    """A 3-D batch fed to an image model is usually one [C, H, W] image without its batch axis.

    Such a batch is valid [N, C, L] input, so only a model with 2-D layers and no 1-D ones is
    tried, on one sample (a no-grad forward in eval mode); if it fails, the error says why.
    """
    if inputs.dim() != 3:
        return
    modules = list(model.modules())
    if not any(isinstance(m, _PLANAR) for m in modules):
        return
    if any(isinstance(m, _LINEAR_AXIS) for m in modules):
        return
    hint = (
        f"inputs have shape {tuple(inputs.shape)}, read as [N, C, L], but "
        f"{type(model).__name__} has 2-D layers (e.g. Conv2d) and {{what}}; if this is one "
        "image [C, H, W], add a batch axis with inputs.unsqueeze(0) (expected [N, C, H, W])"
    )
    device, dtype = model_device_dtype(model, inputs)
    try:
        with eval_mode(model), torch.no_grad():
            output = model(inputs[:1].detach().to(device=device, dtype=dtype))
    except SaliencyError:
        raise
    except Exception as exc:
        raise SaliencyError(hint.format(what=f"fails on it ({type(exc).__name__}: {exc})")) from exc
    if isinstance(output, torch.Tensor) and (output.dim() != 2 or output.shape[0] != 1):
        shape = tuple(output.shape)
        raise SaliencyError(hint.format(what=f"returns shape {shape} for one such sample"))


def prepare(model, inputs, method, layer, batch_size, options):
    """Validate a call and resolve the method, its options and its layer."""
    model = check_model(model)
    inputs = check_inputs(inputs)
    batch_size = check_batch_size(batch_size)
    check_rank(model, inputs)
    spec = get_method(method)
    opts = spec.bind(options)
    if spec.needs_layer:
        if inputs.dim() < 3:
            raise SaliencyError(
                f"method {spec.name!r} reads a spatial layer, but inputs of shape "
                f"{tuple(inputs.shape)} have no spatial axes; use an input-space method"
            )
        resolved = resolve_layer(model, layer) if layer is not None else None
    elif layer is not None:
        raise SaliencyError(
            f"method {spec.name!r} works in input space and takes no layer; layer={layer!r} "
            "applies to CAM methods (gradcam, gradcam++) only"
        )
    else:
        resolved = None
    return model, inputs, batch_size, spec, opts, resolved


def allow_grad(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a public entry point: autograd available, exact and deterministic GPU kernels.

    Autograd is off inside ``torch.inference_mode()``; every method needs it, so a call made
    there leaves inference mode for its own duration (as ``torch.enable_grad`` does for
    ``no_grad``). See :func:`exact_kernels` for the cuDNN / TF32 settings.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with torch.inference_mode(False), exact_kernels():
            return fn(*args, **kwargs)

    return wrapper


@allow_grad
def explain(
    model: nn.Module,
    inputs: torch.Tensor,
    method: str,
    *,
    target: int | torch.Tensor | None = None,
    layer: str | nn.Module | None = None,
    batch_size: int | None = None,
    **options: Any,
) -> torch.Tensor:
    """Explain ``model``'s output for ``inputs`` with ``method``.

    Args:
        model: a classifier returning class scores [N, classes].
        inputs: a float tensor [N, C, H, W] (or [N, C, L], [N, D]).
        method: a name from :func:`methods`.
        target: None (each sample's predicted class), an int, or a LongTensor [N].
        layer: for CAM methods, a module name from ``model.named_modules()`` or the module;
            None picks the last module with a spatial output.
        batch_size: samples per pass, to bound memory; the maps do not depend on it.
        **options: the method's own options (e.g. ``positive=False``, ``steps=64``).

    Returns:
        A float tensor [N, H, W] ([N, L] or [N, D]) on the inputs' device.
    """
    model, inputs, batch_size, spec, opts, resolved = prepare(
        model, inputs, method, layer, batch_size, options
    )
    target = check_target(target, inputs.shape[0])
    with eval_mode(model):
        device, dtype = model_device_dtype(model, inputs)
        x = inputs.detach().to(device=device, dtype=dtype)
        if spec.needs_layer and resolved is None:
            resolved = default_layer(model, x, spec.name)
        if isinstance(target, torch.Tensor):
            target = target.to(device)
        ctx = Context(model, spec.name, resolved, batch_size, tuple(x.shape))
        maps = spec(ctx, x, target, opts)
    return maps.detach().to(device=inputs.device, dtype=inputs.dtype)
