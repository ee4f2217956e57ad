"""Find the layer a CAM method reads from: by name, by module, or the last spatial one."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SaliencyError, closest

LayerSpec = "str | nn.Module | None"


def layer_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise SaliencyError(
        f"layer {type(module).__name__} is not a submodule of the model {type(model).__name__}; "
        "pass a module of the model itself or its name from model.named_modules()"
    )


def without_compile_prefix(name: str) -> str:
    """A module name as seen from ``torch.compile``'s wrapper (``_orig_mod.layer4``), without
    the wrapper's segments: the engine explains the original module."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def resolve_layer(model: nn.Module, layer: str | nn.Module) -> tuple[str, nn.Module]:
    """Return ``(name, module)`` for a module name or a module of ``model``."""
    if isinstance(layer, nn.Module):
        return layer_name(model, layer), layer
    if not isinstance(layer, str):
        raise SaliencyError(
            "layer must be a module name (str) or an nn.Module of the model, "
            f"got {type(layer).__name__}"
        )
    modules = dict(model.named_modules())
    if layer in modules and layer != "":
        return layer, modules[layer]
    bare = without_compile_prefix(layer)
    if bare in modules and bare != "":
        return bare, modules[bare]
    names = [n for n in modules if n]
    near = closest(layer, names)
    hint = f" Closest names: {', '.join(repr(n) for n in near)}." if near else ""
    sample = ", ".join(repr(n) for n in names[:20])
    more = f", ... ({len(names) - 20} more)" if len(names) > 20 else ""
    raise SaliencyError(
        f"layer {layer!r} is not a module of {type(model).__name__}.{hint} "
        f"Names come from model.named_modules(): {sample}{more}."
    )


def _is_spatial(output: object, input_rank: int) -> bool:
    if not isinstance(output, torch.Tensor) or output.dim() < 3:
        return False
    if output.dim() != input_rank:
        return False
    return int(torch.tensor(output.shape[2:]).prod()) > 1


def spatial_layers(model: nn.Module, inputs: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """Modules whose output is spatial, in the order their forward calls finish (a dry forward)."""
    from .state import removable_hooks
    from .targets import call_model

    found: list[tuple[str, tuple[int, ...]]] = []
    seen: set[str] = set()
    with removable_hooks() as handles:
        for name, module in model.named_modules():
            if not name:
                continue

            def hook(mod, args, output, name=name):
                if name not in seen and _is_spatial(output, inputs.dim()):
                    seen.add(name)
                    found.append((name, tuple(output.shape[1:])))

            handles.append(module.register_forward_hook(hook))
        with torch.no_grad():
            call_model(model, inputs[:1])
    return found


def default_layer(model: nn.Module, inputs: torch.Tensor, method: str) -> tuple[str, nn.Module]:
    """The last module (in forward order) whose output still has more than one spatial position."""
    if inputs.dim() < 3:
        raise SaliencyError(
            f"method {method!r} reads a spatial layer, but the inputs have shape "
            f"{tuple(inputs.shape)} with no spatial axes; use an input-space method "
            "(e.g. 'gradient') for [N, D] inputs"
        )
    found = spatial_layers(model, inputs)
    if not found:
        raise SaliencyError(
            f"method {method!r} needs a layer with a spatial output (more than 1 position), but no "
            f"module of {type(model).__name__} produces one for inputs of shape "
            f"{tuple(inputs.shape[1:])}; use an input-space method or larger inputs"
        )
    name = found[-1][0]
    return name, dict(model.named_modules())[name]
