"""``explain``: one saliency map per sample, from any registered method."""

from __future__ import annotations

import functools
import itertools
import numbers
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import numpy as np
import torch
from torch import nn

from .bundled.registry import Method, get_method
from .engine.layers import CamLayer, parse_cam_layer, resolve_cam_layer
from .engine.state import eval_mode, exact_kernels, model_device_dtype, rng_preserved
from .errors import ModelError, NonFiniteError, SaliencyError, non_finite_samples

P = ParamSpec("P")
R = TypeVar("R")


def check_model(model: object) -> nn.Module:
    """The module to explain: a ``torch.compile``d model is explained through its original
    module (the same function, with every op visible to the rules and hooks)."""
    if not isinstance(model, nn.Module):
        raise SaliencyError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    while _is_compiled(model):
        model = model._orig_mod
    return model


def _is_compiled(module: nn.Module) -> bool:
    return type(module).__name__ == "OptimizedModule" and isinstance(
        getattr(module, "_orig_mod", None), nn.Module
    )


def opaque_module(model: nn.Module, modules=None, *, compiled: bool = True):
    """``(label, kind)`` of the first of ``modules`` (default: all of ``model``'s) whose ops and
    hooks Python cannot see: a TorchScript module or, with ``compiled``, a nested
    ``torch.compile``d one; None if there is none."""
    for name, module in model.named_modules() if modules is None else modules:
        if isinstance(module, torch.jit.ScriptModule):
            kind = "a TorchScript module"
        elif compiled and name and _is_compiled(module):
            kind = "a torch.compile'd submodule"
        else:
            continue
        return (repr(name) if name else f"the model ({type(model).__name__})"), kind
    return None


def check_opaque(
    model: nn.Module, spec: Method, opts: dict, layer: tuple[str, nn.Module] | None = None
) -> None:
    """Refuse, before any work, a model whose ops a method must see but cannot.

    Rule methods see every op through a torch-function mode and module hooks, FullGrad hooks
    every biased layer, and a CAM method hooks its layer (or, to find the default one, every
    module): none reaches inside a TorchScript module or a ``torch.compile``d submodule.
    Plain-gradient methods only need autograd and run on both.
    """
    rules = spec.compute is None and not spec.rules(opts).is_plain
    hooks = spec.needs_layer or spec.taps is not _NO_TAPS
    if not (rules or hooks):
        return
    modules = None
    if spec.needs_layer and layer is not None and not rules:
        # Only the chosen layer is hooked; a compiled ancestor shows in its name.
        name, module = layer
        modules = [(name, module)]
        if "_orig_mod" in name.split("."):
            prefix = name.split("._orig_mod")[0]
            modules.insert(0, (prefix, dict(model.named_modules())[prefix]))
    found = opaque_module(model, modules)
    if found is not None:
        label, kind = found
        need = "see every op it runs" if rules else "hook the layers it reads"
        raise SaliencyError(
            f"method {spec.name!r} must {need}, but {label} is {kind}, whose ops and module "
            "hooks are hidden from Python. Pass the eager model (the plain nn.Module before "
            "torch.jit.script/trace; a top-level torch.compile is unwrapped for you), or use a "
            "plain-gradient method (gradient, input_x_gradient, integrated_gradients, "
            "smoothgrad), which only need autograd"
        )


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
    if inputs.device.type == "meta":
        raise SaliencyError(
            "inputs are on the meta device, which holds shapes but no values; move real data "
            "to the model's device (e.g. inputs.to('cpu') after loading it)"
        )
    bad = non_finite_samples(inputs)
    if bad:
        raise NonFiniteError(
            bad,
            (
                "inputs hold NaN or inf in {which}; a map of a non-finite input "
                "explains nothing. Clean or drop those samples before explaining"
            ),
        )
    return inputs


def check_devices(model: nn.Module) -> None:
    """The model's weights hold values, on one device."""
    devices = {t.device for t in itertools.chain(model.parameters(), model.buffers())}
    if any(d.type == "meta" for d in devices):
        raise SaliencyError(
            f"model {type(model).__name__} has parameters or buffers on the meta device (no "
            "values: built under torch.device('meta') or with init_empty_weights); load its "
            "weights first (e.g. model.to_empty(device='cpu') then load_state_dict)"
        )
    if len(devices) > 1:
        found = ", ".join(sorted(str(d) for d in devices))
        raise SaliencyError(
            f"model {type(model).__name__} has parameters or buffers on several devices "
            f"({found}); the engine runs a model on one device. Move it with model.to(device) "
            "before explaining"
        )


def batch_statistics(model: nn.Module, inputs: torch.Tensor) -> bool:
    """True when the model normalises with batch statistics even in eval mode (a BatchNorm
    without running statistics): its maps are then computed one sample at a time, so that no
    sample's map depends on the others or on ``batch_size``. Without spatial axes a single
    sample has no statistics of its own, and that is an error."""
    found = [
        name or type(model).__name__
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and (not m.track_running_stats or m.running_mean is None)
    ]
    if found and inputs.dim() < 3:
        raise SaliencyError(
            f"module {found[0]!r} normalises with batch statistics in eval mode (a BatchNorm "
            "without running statistics), so every map would depend on the other samples in "
            f"the batch, and inputs of shape {tuple(inputs.shape)} give one sample no "
            "statistics of its own. Build it with track_running_stats=True (and train or load "
            "its statistics), or use a per-sample norm (LayerNorm)"
        )
    return bool(found)


def check_maps(maps: torch.Tensor, method: str) -> torch.Tensor:
    """A map with NaN or inf is refused, naming the method, the samples and the likely cause."""
    bad = non_finite_samples(maps)
    if not bad:
        return maps
    cause = (
        "integrated_gradients takes the gradient at every point of the path from the baseline "
        "to the input, the baseline itself included, and it is NaN or inf at one of them "
        "(a norm or sqrt at an all-zero input is a common cause): try another baseline"
        if method == "integrated_gradients"
        else "the model's gradient (or the method's relevance) is NaN or inf there: an op with "
        "an infinite derivative (sqrt or a norm at 0, log at 0, a fractional power) or an "
        "overflow (float16/bfloat16); check the model on these inputs, or run it in float32"
    )
    raise NonFiniteError(
        bad, f"method {method!r} gave a map with NaN or inf for {{which}}: {cause}"
    )


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
        f"target must be None, an int or a LongTensor [N] of classes, a target object "
        f"(ClassLogit, Binary, MultiLabel, Segmentation, Regression) or a "
        f"callable(output) -> [N]; "
        f"got {type(target).__name__}"
    )


_NO_TAPS = Method.__dataclass_fields__["taps"].default

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
        raise ModelError(hint.format(what=f"fails on it ({type(exc).__name__}: {exc})")) from exc
    if isinstance(output, torch.Tensor) and (output.dim() != 2 or output.shape[0] != 1):
        shape = tuple(output.shape)
        raise SaliencyError(hint.format(what=f"returns shape {shape} for one such sample"))


def prepare(model, inputs, method, layer, batch_size, options):
    """Validate a call and resolve the method and its options; the CAM layer is checked
    (returned as given, resolved later on the inputs by :func:`cam_layer_of`)."""
    model = check_model(model)
    check_devices(model)
    inputs = check_inputs(inputs)
    batch_size = check_batch_size(batch_size)
    if batch_statistics(model, inputs):
        batch_size = 1  # per-sample evaluation: no map may depend on the other samples
    check_rank(model, inputs)
    spec = get_method(method)
    opts = spec.bind(options)
    if spec.needs_layer:
        if inputs.dim() < 3:
            raise SaliencyError(
                f"method {spec.name!r} reads a spatial layer, but inputs of shape "
                f"{tuple(inputs.shape)} have no spatial axes; use an input-space method"
            )
        resolved = None
        if layer is not None:
            name, point, module = parse_cam_layer(model, layer)
            resolved = (name.removesuffix(":input"), module) if module is not None else None
        check_opaque(model, spec, opts, resolved)
        resolved = layer  # the layer as given: resolved on the model and inputs later
    elif layer is not None:
        raise SaliencyError(
            f"method {spec.name!r} works in input space and takes no layer; layer={layer!r} "
            "applies to CAM methods (gradcam, gradcam++) only"
        )
    else:
        resolved = None
        check_opaque(model, spec, opts)
    return model, inputs, batch_size, spec, opts, resolved


def cam_layer_of(model: nn.Module, x: torch.Tensor, spec: Method, opts: dict, layer: object,
                 output=None) -> CamLayer | None:  # fmt: skip
    """A CAM method's layer (given, or the default) with its layout, on ``x`` (model in eval
    mode); None for other methods. ``output`` selects the scored tensor."""
    if not spec.needs_layer:
        return None
    return resolve_cam_layer(model, x, spec.name, layer, opts.get("layout"), output)


def allow_grad(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a public entry point: autograd available, exact and deterministic GPU kernels.

    Autograd is off inside ``torch.inference_mode()``; every method needs it, so a call made
    there leaves inference mode for its own duration (as ``torch.enable_grad`` does for
    ``no_grad``). See :func:`exact_kernels` for the cuDNN / TF32 settings.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with torch.inference_mode(False), exact_kernels(), rng_preserved():
            return fn(*args, **kwargs)

    return wrapper


@allow_grad
def explain(
    model: nn.Module,
    inputs: torch.Tensor,
    method: str,
    *,
    target: Any = None,
    output: Any = None,
    layer: str | nn.Module | None = None,
    batch_size: int | None = None,
    **options: Any,
) -> torch.Tensor:
    """Explain ``model``'s output for ``inputs`` with ``method``.

    Args:
        model: the model; what it returns is read through ``output``.
        inputs: a float tensor [N, C, H, W] (or [N, C, L], [N, D]).
        method: a name from :func:`methods`.
        target: what is explained: None (each sample's predicted class), an int or a
            LongTensor [N] (class logits); a target object (:class:`ClassLogit`,
            :class:`Binary`, :class:`MultiLabel`, :class:`Segmentation`,
            :class:`Regression`); or a
            callable(output) -> [N] scores.
        output: which tensor of the model's return value is scored: None (the tensor, or its
            'logits' entry or attribute), an int (a tuple's element), a str (a dict's key or
            an attribute) or a callable(returned) -> Tensor.
        layer: for CAM methods, a module of the model or its name (its output),
            ``"name:input"`` (its first input), ``"<global_pool>"`` (the tensor the model's
            global pooling reads) or None (the default: see the README).
        batch_size: samples per pass, to bound memory; the maps do not depend on it.
        **options: the method's own options (e.g. ``positive=False``, ``steps=64``).

    Returns:
        A float tensor [N, H, W] ([N, L] or [N, D]) on the inputs' device.
    """
    from .engine.targets import objective
    from .multi import Plan, Request  # the one executor: explain, every check, shared passes

    if not isinstance(method, str):
        get_method(method)  # a clear error naming the valid methods
    inputs = check_inputs(inputs)
    goal = objective(output, target, inputs.shape[0])
    plan = Plan(model, inputs, [Request(method, options, layer)], batch_size=batch_size,
                objective=goal)  # fmt: skip
    return plan(inputs, goal.target.per_sample())[0]
