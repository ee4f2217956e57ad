"""CAM family: Grad-CAM, Grad-CAM++ and FullGrad, each a readout of one plain-autograd pass.

Grad-CAM and Grad-CAM++ read the activation and its gradient at one layer (``Context.layer``);
FullGrad reads the input gradient and the gradient at the output of every biased Conv, Linear
and norm layer whose output lies on the inputs' grid, through that output's layout
(channels-first, channels-last or tokens). Layers whose outputs have no grid (a head on pooled
features) carry no spatial term and are left out, as in the paper; a grid layer whose bias
cannot be placed (an unknown layout, a bias used inside another op) is named in a
:class:`SaliencyWarning` and in the audits' ``settings["terms"]``. All three use plain
autograd, so their readouts are pure functions of the record and could share one pass.

A CAM layer whose module runs several times in one forward (a reused ``nn.ReLU``, say) is an
error: which call's activation is meant is ambiguous, and picking one silently would explain a
different layer than the user named.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.layers import output_layouts
from ..engine.layouts import Layout, check_layout_option
from ..engine.passes import Record, Tap
from ..errors import SaliencyError, SaliencyWarning
from .registry import Context, Method, check_bool, register

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}
_CAM_TAP = "cam:"
_BIAS_TAP = "fullgrad:"


def upsample(maps: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Resize [N, C, *spatial] to [N, C, *size], (bi/tri)linear with align_corners=False.

    Bilinear resizing is separable: 2-d maps go through two small matrix products (cached per
    size pair), several times faster than ``F.interpolate`` on the small maps of CAMs.
    """
    if tuple(maps.shape[2:]) == tuple(size):
        return maps
    if len(size) == 2:
        rows = _resize_matrix(maps.shape[2], size[0], maps.device, maps.dtype)
        cols = _resize_matrix(maps.shape[3], size[1], maps.device, maps.dtype)
        return rows @ maps @ cols.T
    return F.interpolate(maps, size=tuple(size), mode=_MODES[len(size)], align_corners=False)


@functools.lru_cache(maxsize=64)
def _resize_matrix(
    size_in: int, size_out: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """[size_out, size_in]: linear interpolation along one axis (align_corners=False) as a
    matrix, made by interpolating the identity so that the weights are torch's own."""
    eye = torch.eye(size_in, device=device, dtype=dtype)[None]
    return F.interpolate(eye, size=size_out, mode="linear", align_corners=False)[0].T


def _spatial_inputs(ctx: Context) -> None:
    if len(ctx.input_shape) < 3:
        raise SaliencyError(
            f"method {ctx.method!r} needs inputs with spatial axes [N, C, H, W] or [N, C, L], "
            f"got shape {ctx.input_shape}; use an input-space method (e.g. 'gradient') for "
            "[N, D] inputs"
        )


# --- Grad-CAM and Grad-CAM++ ----------------------------------------------------------------


def _layer_taps(ctx: Context, opts: dict) -> dict:
    layer = ctx.layer
    return {_CAM_TAP + layer.name: Tap(layer.module, True, layer.point, layer.pool, layer.name)}


def _layer_record(record: Record, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation [N, C, *grid] and its gradient at the CAM layer (read through the
    layer's layout), or a clear error."""
    layer = ctx.layer
    calls = record.taps.get(_CAM_TAP + layer.name, [])
    if not calls:
        raise SaliencyError(
            f"method {ctx.method!r}: {layer.describe()} produced no tensor that depends on the "
            "inputs in this forward pass (its output does not require grad: a buffer, a "
            "detached or no_grad computation); pick a layer on the path from the inputs to the "
            "class scores"
        )
    if len(calls) != 1:
        # The layer was checked on a dry forward; a forward that changes from call to call
        # (data-dependent control flow) is caught here.
        raise SaliencyError(
            f"method {ctx.method!r}: {layer.describe()} was recorded {len(calls)} times in "
            "this forward pass, once in the forward that chose it; the model's forward changes "
            "between calls, so the CAM layer is ambiguous. Name a layer that runs once"
        )
    activation, gradient = calls[0]
    if not layer.layout.fits(tuple(activation.shape)):
        raise SaliencyError(
            f"method {ctx.method!r}: {layer.describe()} gave shape {tuple(activation.shape)}, "
            f"which does not fit its layout {layer.layout} (found on a dry forward); audit "
            "inputs of one size"
        )
    return layer.layout.to_channels_first(activation), layer.layout.to_channels_first(gradient)


def _cam_map(activation: torch.Tensor, weights: torch.Tensor, ctx: Context) -> torch.Tensor:
    """ReLU(sum_k w_k A_k), upsampled to the inputs' spatial size: [N, *spatial]."""
    cam = (weights * activation).sum(dim=1, keepdim=True).clamp(min=0)
    return upsample(cam, ctx.input_shape[2:])[:, 0]


def _gradcam(record: Record, ctx: Context, opts: dict) -> torch.Tensor:
    activation, gradient = _layer_record(record, ctx)
    if opts["positive"]:
        gradient = gradient.clamp(min=0)
    axes = tuple(range(2, activation.dim()))
    return _cam_map(activation, gradient.mean(dim=axes, keepdim=True), ctx)


def _gradcam_pp(record: Record, ctx: Context, opts: dict) -> torch.Tensor:
    activation, g = _layer_record(record, ctx)
    axes = tuple(range(2, activation.dim()))
    total = activation.sum(dim=axes, keepdim=True)
    # alpha = g^2 / (2 g^2 + (sum A) g^3) = 1 / (2 + (sum A) g) where g != 0; the short form
    # avoids underflow of g^3. Where it is undefined (g = 0, or 2 + (sum A) g = 0) alpha is 0.
    denominator = 2 + total * g
    defined = (g != 0) & (denominator != 0)
    alpha = torch.where(defined, 1 / torch.where(defined, denominator, 1), 0)
    slope = g.clamp(min=0) if opts["positive"] else g
    return _cam_map(activation, (alpha * slope).sum(dim=axes, keepdim=True), ctx)


def _check_positive(opts: dict) -> None:
    check_bool(opts, "positive")


def _check_cam(opts: dict) -> None:
    check_bool(opts, "positive")
    check_layout_option(opts.get("layout"))


register(Method(
    name="gradcam",
    family="aggregation",
    positive=False,
    defaults={"positive": False, "layout": None},
    reference="Selvaraju et al. 2017",
    readout=_gradcam,
    needs_layer=True,
    taps=_layer_taps,
    input_grad=False,
    validate=_check_cam,
))  # fmt: skip

register(Method(
    name="gradcam++",
    family="aggregation",
    positive=True,
    defaults={"positive": True, "layout": None},
    reference="Chattopadhay et al. 2018",
    readout=_gradcam_pp,
    needs_layer=True,
    taps=_layer_taps,
    input_grad=False,
    validate=_check_cam,
))  # fmt: skip


# --- FullGrad -------------------------------------------------------------------------------


_BIASED = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
    nn.InstanceNorm3d, *_NORMS,
)  # fmt: skip


def effective_bias(module: nn.Module) -> torch.Tensor:
    """A layer's bias, or a BatchNorm's bias in eval mode: beta - mean * gamma / sqrt(var + eps).
    LayerNorm and GroupNorm add beta after normalising: their bias is beta."""
    if isinstance(module, _NORMS):
        scale = module.weight / torch.sqrt(module.running_var + module.eps)
        return (module.bias - module.running_mean * scale).detach()
    return module.bias.detach()


@dataclass
class BiasTerms:
    """Which biased layers FullGrad reads, with their output layout per call."""

    read: dict[str, list[Layout | None]]  # None: a call whose output has no grid
    no_grid: list[str]  # biased layers whose outputs have no grid (heads): not FullGrad terms
    not_read: dict[str, str]  # layer -> why its bias-gradient cannot be placed on the grid

    def describe(self) -> str:
        text = f"{len(self.read)} of {len(self.read) + len(self.not_read)} biased grid layers"
        if self.no_grid:
            text += f" ({len(self.no_grid)} without a grid, e.g. {self.no_grid[0]!r}, left out)"
        if self.not_read:
            shown = ", ".join(f"{k!r} ({v})" for k, v in list(self.not_read.items())[:6])
            more = f", ... ({len(self.not_read) - 6} more)" if len(self.not_read) > 6 else ""
            text += f"; not read: {shown}{more}"
        return text


def bias_terms(model: nn.Module, sample: torch.Tensor, output=None) -> BiasTerms:
    """Every biased Conv/Linear/norm layer whose output lies on the inputs' grid, read through
    its layout (channels-first, channels-last or tokens); the others, with the reason
    (``output``: the call's output selector)."""
    outputs, used = output_layouts(model, sample, output)
    spatial = sample.dim() - 2
    read, no_grid, not_read = {}, [], {}
    layer_biases: set[int] = set()
    for name, module in model.named_modules():
        bias = getattr(module, "bias", None)
        if not isinstance(module, _BIASED) or not isinstance(bias, nn.Parameter):
            continue
        layer_biases.add(id(bias))
        if isinstance(module, _NORMS) and module.running_mean is None:
            raise SaliencyError(
                f"fullgrad: BatchNorm layer {name!r} keeps no running statistics "
                "(track_running_stats=False), so its bias depends on the batch; FullGrad needs a "
                "fixed bias per layer"
            )
        calls = outputs.get(name)
        if not calls and id(bias) not in used:
            continue  # never used by the forward (an auxiliary head in eval mode): no term
        if not calls:
            not_read[name] = "not called as a module; its bias is used inside another op"
            continue
        layouts, why = [], ""
        for layout, shape in calls:
            # One position per sample ([1, C], [1, C, 1, 1], one token): no grid. The probe
            # runs one sample, so a first axis above 1 is samples and positions flattened.
            single = (
                len(shape) < 3 or math.prod(shape[2:]) == 1 or (len(shape) == 3 and shape[1] == 1)
            )
            if shape[0] == 1 and single:
                layouts.append(None)  # one vector per sample, no grid: nothing to place
                why = why or "its output has no grid"
            elif layout is None or len(layout.grid) != spatial:
                layouts.append(None)
                why = "its output layout is unknown"
            elif layout.channels(shape) != bias.numel():
                layouts.append(None)
                why = f"its bias ({bias.numel()}) is not one value per channel"
            else:
                layouts.append(layout)
        if any(lay is not None for lay in layouts):
            read[name] = layouts
        if why == "its output has no grid" and name not in read:
            no_grid.append(name)
        elif why and why != "its output has no grid":
            not_read[name] = why
    # Biases that no Conv/Linear/norm layer call adds (MultiheadAttention's in_proj_bias, a
    # bare bias parameter): their terms are not read either.
    for pname, p in model.named_parameters():
        if pname.rsplit(".", 1)[-1].endswith("bias") and id(p) not in layer_biases:
            if id(p) in used:
                not_read[pname] = (
                    "a bias parameter that no Conv/Linear/BatchNorm/LayerNorm/GroupNorm/"
                    "InstanceNorm call adds"
                )
    return BiasTerms(read, no_grid, not_read)


def _terms(ctx: Context) -> BiasTerms:
    terms = ctx.cache.get("fullgrad")
    if terms is None:
        terms = ctx.cache["fullgrad"] = bias_terms(ctx.model, ctx.sample, ctx.objective.output)
        if terms.not_read:
            warnings.warn(
                f"fullgrad on {type(ctx.model).__name__} reads {terms.describe()}; the map "
                "leaves those bias terms out (the audits' settings['terms'] says the same)",
                SaliencyWarning,
                stacklevel=2,
            )
    return terms


def _bias_taps(ctx: Context, opts: dict) -> dict:
    _spatial_inputs(ctx)
    return {_BIAS_TAP + name: Tap(ctx.module(name), False) for name in _terms(ctx).read}


def _psi(flat: torch.Tensor, positive: bool, factor: torch.Tensor | None = None) -> torch.Tensor:
    """Normalise each (sample, channel) map of ``factor * maps`` and sum over channels.

    ``flat`` is [N, C, S], C channels of S positions, and is overwritten; returns [N, S].
    positive: min-max of abs(maps); signed: divide by the max abs. A constant map carries no
    spatial information and becomes 0. A channel factor (one number per channel; None: 1)
    only survives the normalisation as its sign (and as a zero), so it scales the per-channel
    weights instead of every value.
    """
    if positive:
        flat = flat.abs_()
        low = flat.amin(dim=2, keepdim=True)
        span = flat.amax(dim=2, keepdim=True) - low  # = max(flat - low): the order is kept
        flat = flat.sub_(low)
    else:
        # max |m| = max(max m, -min m): two reductions, no full-size copy.
        span = torch.maximum(flat.amax(dim=2, keepdim=True), -flat.amin(dim=2, keepdim=True))
    scale = torch.where(span > 0, 1 / torch.where(span > 0, span, 1), 0)
    if factor is not None:
        scale = scale * (factor.ne(0) if positive else factor.sign()).reshape(1, -1, 1)
    # The weighting and the channel sum in one batched product: [N, 1, C] @ [N, C, S].
    return torch.bmm(scale.transpose(1, 2), flat)[:, 0]


def _stacked(maps: list[torch.Tensor]) -> torch.Tensor:
    """[N, C_i, *spatial] maps of one spatial size as one new [N, C, S] tensor of every channel.

    Maps of under 64 positions are laid out positions first in memory (a transposed view):
    the per-channel min and max then reduce over an outer axis, several times faster than
    over an inner axis of 4 or 16 values.
    """
    flat = [m.flatten(2) for m in maps]
    if flat[0].shape[2] >= 64:
        return torch.cat(flat, dim=1)
    return torch.cat([f.transpose(1, 2) for f in flat], dim=2).transpose(1, 2)


def _fullgrad(record: Record, ctx: Context, opts: dict) -> torch.Tensor:
    positive = opts["positive"]
    inputs = record.inputs
    n, size = inputs.shape[0], tuple(inputs.shape[2:])
    # Gradients of one spatial size are normalised and summed in one batched call: _psi works
    # per (sample, channel), so channels of several layers can sit side by side. Upsampling
    # is linear: the maps of one size are summed first and upsampled once.
    product = (inputs * record.input_grad).flatten(2)
    grouped: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    terms = _terms(ctx)
    for tap, calls in record.taps.items():
        if not tap.startswith(_BIAS_TAP):
            continue
        name = tap[len(_BIAS_TAP) :]
        bias = effective_bias(ctx.module(name))
        layouts = terms.read[name]
        if len(calls) != len(layouts):
            raise SaliencyError(
                f"fullgrad: layer {name!r} ran {len(calls)} times in this forward pass and "
                f"{len(layouts)} times in the forward that planned it; the model's forward "
                "changes between calls"
            )
        for (_, gradient), layout in zip(calls, layouts):
            # No gradient: the output does not reach the target score. No layout: the call's
            # output has no grid to bring into input space (a head on pooled features).
            if gradient is None or layout is None:
                continue
            gradient = layout.to_channels_first(gradient)
            grouped.setdefault(tuple(gradient.shape[2:]), []).append((gradient, bias))
    by_size = {size: _psi(product, positive)}
    for key, parts in grouped.items():
        biases = torch.cat([b.reshape(-1).to(inputs.dtype) for _, b in parts])
        part = _psi(_stacked([g for g, _ in parts]), positive, biases)
        by_size[key] = by_size[key] + part if key in by_size else part
    total = by_size.pop(size)
    for shape, part in by_size.items():
        total = total.add_(upsample(part.reshape((n, 1, *shape)), size).reshape(n, -1))
    return total.reshape((n, *size))


register(Method(
    name="fullgrad",
    family="aggregation",
    positive=True,
    defaults={"positive": True},
    reference="Srinivas & Fleuret 2019",
    readout=_fullgrad,
    taps=_bias_taps,
    describe=lambda model, x, output=None: bias_terms(model, x[:1], output).describe(),
    validate=_check_positive,
))  # fmt: skip
