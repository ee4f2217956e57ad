"""The layer a CAM method reads: named by the user (a module's output or input, or the input of
the global pooling), or found by default; and its feature layout.

**The default.** A dry forward and backward on one sample, under the layout tagger
(:mod:`.layouts`), with every module's input and output recorded:

1. If the forward collapses the grid by a global pooling (a pooling to one position, or a mean
   or max over every spatial axis or over the tokens) after which nothing spatial is made, the
   default is the tensor that pooling reads: the output of the module that made it, else the
   input of a module that reads it, else ``"<global_pool>"`` (a functional ``F.relu`` before a
   functional pooling: no module sees the rectified map).
2. Otherwise, or if that map is blank, it is the last recorded tensor, in forward order, that a
   CAM can read: a known layout with more than one position on a grid of the inputs' rank, a
   gradient that is not zero at every grid position, an activation that is not constant over
   the grid, one call per forward. When the forward reads one prefix token (a ViT's class
   token), only tensors of that token's width count: after the last attention the patch
   tokens no longer reach the class token (a blank map), so the default is the last block's
   first norm, where pytorch-grad-cam's ViT tutorial points; attention internals (other
   widths, other layouts) never qualify.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..errors import SaliencyError, closest
from .layouts import TOKENS, Layout, Tagger, given_layout, parse_layout


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


GLOBAL_POOL = "<global_pool>"
_POINTS = ("output", "input")


@dataclass(frozen=True)
class CamLayer:
    """A resolved CAM layer: what the readout taps, and how its tensor is laid out."""

    name: str  # as reported, and as the user can write it again
    point: str  # "output" | "input" | "pool"
    module: nn.Module | None  # None for the global-pooling tap
    layout: Layout
    default: bool = False
    pool: tuple[str, int] | None = None  # (function, call) for point == "pool"

    def describe(self) -> str:
        return f"layer {self.name!r}" + (" (chosen by default)" if self.default else "")


def parse_cam_layer(model: nn.Module, layer: object) -> tuple[str, str, nn.Module | None]:
    """``(name, point, module)`` for a CAM layer as the user wrote it: a module or its name (its
    output), ``"name:input"`` / ``"name:output"``, or ``"<global_pool>"``."""
    if isinstance(layer, CamLayer):
        return layer.name, layer.point, layer.module
    if isinstance(layer, str) and layer == GLOBAL_POOL:
        return layer, "pool", None
    if isinstance(layer, str) and ":" in layer:
        base, _, point = layer.rpartition(":")
        if point not in _POINTS:
            raise SaliencyError(
                f"layer {layer!r}: {point!r} is not a point of a module; write 'name' or "
                f"'name:output' for a module's output, 'name:input' for its first input, or "
                f"{GLOBAL_POOL!r} for the tensor the model's global pooling reads"
            )
        name, module = resolve_layer(model, base)
        return (name if point == "output" else f"{name}:input"), point, module
    name, module = resolve_layer(model, layer)
    return name, "output", module


@dataclass
class _Point:
    name: str
    point: str
    module: nn.Module | None
    tensors: list[torch.Tensor]
    versions: list[int]  # each tensor's version counter when recorded (in-place ops bump it)
    layout: Layout | None
    order: int
    layouts: list[Layout | None] = field(default_factory=list)  # per call

    @property
    def label(self) -> str:
        return self.name if self.point == "output" else f"{self.name}:input"


@dataclass
class _Probe:
    points: dict[tuple[str, str], _Point]
    events: list  # grid collapses on the way to the class scores, nothing spatial after them
    grads: dict[int, torch.Tensor | None]  # from the readout events (or the scores), by id
    width: int | None  # the channel width of a selected prefix token, if one is read
    derived: dict[int, torch.Tensor]
    inputs: torch.Tensor  # the probe's own input: never a CAM layer
    informative: bool  # some recorded gradient is not zero (else blankness is unknown)
    used: set[int]  # ids of the parameters the forward took as arguments
    scores: tuple[int, ...] = ()  # the shape of the scored tensor, for one sample
    scores_layout: Layout | None = None  # its layout on the input's grid, if it has one

    def grad(self, t: torch.Tensor) -> torch.Tensor | None:
        return self.grads.get(id(t))


def _probe(model: nn.Module, x: torch.Tensor, *, gradients: bool = True, output=None) -> _Probe:
    """One dry forward and backward on ``x[:1]`` recording every module's input and output.

    The gradients come from the readout: the outputs of the last grid collapse (the global
    pooling, or the selected class tokens) under fixed random weights, so that whether a
    tensor reaches the readout does not hang on the head's weights (torchvision's ViT
    initialises its head to zeros). Without a collapse, from the scored tensor the same way
    (``output``: the call's :class:`~.targets.Output`, default the tensor or its 'logits').
    """
    from .state import removable_hooks
    from .targets import DEFAULT, call_model

    x1 = x[:1].detach().clone().requires_grad_(gradients)
    tagger = _SpatialWatch(x1, {id(p) for p in model.parameters()})
    points: dict[tuple[str, str], _Point] = {}

    def record(key, module, t):
        entry = points.get(key)
        if entry is None:
            layout = tagger.layout_of(t)
            points[key] = _Point(*key, module, [t], [t._version], layout, len(points), [layout])
        else:
            entry.tensors.append(t)
            entry.versions.append(t._version)
            entry.layouts.append(tagger.layout_of(t))

    grad_mode = torch.enable_grad() if gradients else torch.no_grad()
    with grad_mode, removable_hooks() as handles:
        for name, module in model.named_modules():
            if not name or isinstance(module, torch.jit.ScriptModule):
                continue  # a scripted module takes no hooks: its output is not a CAM layer

            def pre(mod, args, name=name):
                if args and isinstance(args[0], torch.Tensor):
                    record((name, "input"), mod, args[0])

            def post(mod, args, output, name=name):
                if isinstance(output, torch.Tensor):
                    copy = output.clone()  # its own tensor: the next module's input differs
                    record((name, "output"), mod, copy)
                    return copy
                return None

            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
        with tagger:
            returned = call_model(model, x1)
        logits = (output or DEFAULT.output)(returned, type(model).__name__)
        if logits.dim() == 0 or logits.shape[0] != 1:
            raise SaliencyError(
                f"model {type(model).__name__} returned a tensor of shape "
                f"{tuple(logits.shape)} for one sample; expected one row per sample [1, ...]"
            )
        if not gradients:
            return _Probe(points, [], {}, None, tagger.derived, x1, False, tagger.used,
                          tuple(logits.shape), tagger.layout_of(logits))  # fmt: skip
        # Collapses that reach the scores, with nothing spatial made after them.
        late = [e for e, after in zip(tagger.events, tagger.spatial_after()) if not after]
        outs = [e.output for e in late if e.output.requires_grad]
        reach = torch.autograd.grad(logits.sum(), outs, allow_unused=True, retain_graph=True) \
            if outs else []  # fmt: skip
        reached = {id(o) for o, g in zip(outs, reach) if g is not None}
        events = [e for e in late if id(e.output) in reached]
        wanted: dict[int, torch.Tensor] = {}
        for entry in points.values():
            for t in entry.tensors:
                wanted.setdefault(id(t), t)
        for event in events:
            wanted.setdefault(id(event.source), event.source)
        tensors = [t for t in wanted.values() if t.requires_grad]
        selects = [e for e in events if e.kind == "select"]
        heads = selects or [e for e in events if e.kind == "pool"][-1:]
        ends = [e.output for e in heads] or [logits]
        generator = torch.Generator().manual_seed(0)
        score = sum(
            (end * torch.randn(end.shape, generator=generator).to(end)).sum() for end in ends
        )
        found = torch.autograd.grad(score, tensors, allow_unused=True) if tensors else []
    grads = {id(t): g for t, g in zip(tensors, found)}
    informative = any(g is not None and bool(g.ne(0).any()) for g in found)
    width = int(selects[-1].source.shape[-1]) if selects else None
    return _Probe(points, events, grads, width, tagger.derived, x1, informative, tagger.used,
                  tuple(logits.shape), tagger.layout_of(logits))  # fmt: skip


class _SpatialWatch(Tagger):
    """The tagger, also noting the call count at which each spatial tensor was made, so that a
    grid collapse can be told apart from a squeeze inside a block (an SE gate's pooling)."""

    def __init__(self, inputs: torch.Tensor, params: set[int]) -> None:
        self.made: list[int] = []
        self.at: list[int] = []
        self.calls = 0
        self.params = params
        self.used: set[int] = set()
        super().__init__(inputs)

    def tag(self, t, layout) -> None:
        super().tag(t, layout)
        if isinstance(t, torch.Tensor) and self.layout_of(t) is not None:
            if math.prod(self.layout_of(t).grid) > 1:
                self.made.append(self.calls)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        if self.params:
            for leaf in tree_flatten((args, kwargs or {}))[0]:
                if id(leaf) in self.params:
                    self.used.add(id(leaf))
        before = len(self.events)
        out = super().__torch_function__(func, types, args, kwargs)
        self.at.extend([self.calls] * (len(self.events) - before))
        return out

    def spatial_after(self) -> list[bool]:
        last = self.made[-1] if self.made else -1
        return [last > at for at in self.at]


def _attention_scopes(model: nn.Module) -> list[str]:
    """Names of the modules whose class is an attention: a class name with ``Attention`` or
    ``Attn`` in it that is not a block or layer around one (timm's
    ``LayerScaleBlockClassAttn``)."""
    found = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if name and re.search(r"attention|attn", kind, re.IGNORECASE):
            if not re.search(r"block|layer", kind, re.IGNORECASE):
                found.append(name)
    return found


def _inside(entry: _Point, scopes: list[str]) -> bool:
    """An attention module's output, or any tensor inside one (its input is the block's)."""
    for scope in scopes:
        if entry.name.startswith(scope + ".") or (entry.name == scope and entry.point == "output"):
            return True
    return False


def _blank(layout: Layout, activation: torch.Tensor, grad: torch.Tensor | None) -> str:
    """Why a CAM of this tensor is blank by construction ('' when it is not)."""
    if grad is None:
        return "no gradient reaches it from the class score"
    if not bool(layout.positions(grad).ne(0).any()):
        return "its gradient is zero at every grid position"
    values = layout.positions(activation.detach())
    if bool((values.amax(dim=2) == values.amin(dim=2)).all()):
        return "its activation is constant over the grid"
    return ""


def _readable(layout: Layout | None, spatial: int) -> bool:
    return layout is not None and len(layout.grid) == spatial and math.prod(layout.grid) > 1


def _name_of(probe: _Probe, t: torch.Tensor, version: int) -> _Point | None:
    """The recorded point holding ``t`` as it is now: a module's output before a module's
    input; none if an in-place op changed ``t`` after it was recorded (DenseNet's
    ``F.relu(features, inplace=True)``: the module's output is the map before the ReLU)."""
    t = probe.derived.get(id(t), t)
    if t is probe.inputs:
        return None
    best = None
    for entry in probe.points.values():
        held = [v for s, v in zip(entry.tensors, entry.versions) if s is t]
        if len(entry.tensors) == 1 and held and held[0] == version:
            if entry.point == "output":
                return entry
            best = best or entry
    return best


def resolve_cam_layer(
    model: nn.Module, x: torch.Tensor, method: str, layer: object, layout: object, output=None
) -> CamLayer:
    """The CAM layer for ``method`` on ``model``: ``layer`` as the user wrote it (None: the
    default), with its layout (``layout``: None to infer, or a kind); ``output`` selects the
    scored tensor of what the model returns."""
    if isinstance(layer, CamLayer):
        return layer  # resolved already, on this model (an audit's plan)
    given = parse_layout(layout, method)
    spatial = x.dim() - 2
    if layer is None:
        probe = _probe(model, x, output=output)
        if _dense_scores(probe, x, spatial) and not _pool_events(probe):
            _no_default_on_dense_scores(model, method, probe)
        return _default(model, x, method, probe, given, spatial)
    name, point, module = parse_cam_layer(model, layer)
    if point == "pool":
        probe = _probe(model, x, output=output)
        return _pool_layer(model, x, method, probe, given, spatial, default=False)
    # A named module needs only its tensors and their layouts: no backward.
    probe = _probe(model, x, gradients=False, output=output)
    entry = probe.points.get((name.removesuffix(":input"), point))
    return _checked(model, x, method, name, point, module, entry, given, spatial, False)


def _dense_scores(probe: _Probe, x: torch.Tensor, spatial: int) -> bool:
    """The scored tensor has a score per position of the input's grid, or of a grid the
    forward made: its own layout says so, or (an op along the channels, such as
    ``softmax(dim=1)``, dropped it) its trailing axes are such a grid."""
    if _readable(probe.scores_layout, spatial):
        return True
    shape = probe.scores
    if len(shape) != spatial + 2:
        return False
    grids = {tuple(x.shape[2:])} | {
        tuple(e.layout.grid) for e in probe.points.values()
        if e.layout is not None and len(e.layout.grid) == spatial
    }  # fmt: skip
    trailing = (tuple(shape[2:]), tuple(shape[1:-1]))  # channels first, channels last
    return any(t in grids and math.prod(t) > 1 for t in trailing)


def _no_default_on_dense_scores(model: nn.Module, method: str, probe: _Probe) -> None:
    """A model that scores every position (segmentation) with no global pooling has no
    default CAM layer: the last spatial layer would be the score map itself, and a CAM of it
    is the class's own logits, not an explanation. The error names the candidates."""
    spatial = [
        e.label for e in sorted(probe.points.values(), key=lambda e: e.order)
        if e.point == "output" and e.layout is not None and len(e.tensors) == 1
    ]  # fmt: skip
    shown = ", ".join(repr(n) for n in spatial[-6:-1]) or "none found"
    raise SaliencyError(
        f"method {method!r} has no default layer on {type(model).__name__}: it scores every "
        f"position (output {list(probe.scores)} for one sample) and pools nothing before the "
        "scores, so the last spatial layer would be the score map itself and its CAM the "
        "class's own logits. Name the layer to read with layer=..., e.g. the last feature "
        f"layer before the classifier (the last spatial outputs, in forward order: {shown}); "
        "a segmentation model is explained with a Segmentation target"
    )


def _checked(model, x, method, name, point, module, entry, given, spatial, default) -> CamLayer:
    kind = type(module).__name__
    where = f"{'layer' if not default else 'the default layer'} {name!r} ({kind})"
    if entry is None or not entry.tensors:
        raise SaliencyError(
            f"method {method!r}: {where} did not "
            f"{'get a tensor input' if point == 'input' else 'return a tensor'} during the "
            "forward pass on these inputs (it was not called, or its output is a tuple or "
            "another non-tensor); pick a module on the path from the inputs to the class "
            "scores that returns its feature map"
        )
    if len(entry.tensors) > 1:
        raise SaliencyError(
            f"method {method!r}: {where} runs {len(entry.tensors)} times in one forward pass, "
            "so its activation is ambiguous; pick a module that runs once (e.g. the block or "
            "conv around this call)"
        )
    tensor = entry.tensors[0]
    shape = tuple(tensor.shape)
    layout = _layout_for(method, where, shape, x, entry.layout, given, spatial)
    return CamLayer(name, point, module, layout, default)


def _layout_for(method, where, shape, x, tag, given, spatial) -> Layout:
    if given is not None:
        return given_layout(*given, shape, tuple(x.shape), tag, f"method {method!r}: {where}")
    if tag is None or len(tag.grid) != spatial:
        raise SaliencyError(
            f"method {method!r}: {where} outputs shape {shape[1:]} per sample, and its layout "
            "cannot be told from how the tensor is made (an op the layout tagger does not "
            "know, or attention internals). CAM methods read channels-first [N, C, *grid], "
            "channels-last [N, *grid, C] or tokens [N, prefix + grid, C] feature maps; if the "
            "tensor is one of those, give layout='channels_first', 'channels_last', 'tokens' "
            "or 'tokens:K' (K prefix tokens), else pick another layer"
        )
    return tag  # a single grid position gives constant maps, which the audits report


def _pool_events(probe: _Probe) -> list:
    return [e for e in probe.events if e.kind == "pool"]


def _pool_layer(model, x, method, probe, given, spatial, default) -> CamLayer:
    events = _pool_events(probe)
    if not events:
        raise SaliencyError(
            f"method {method!r}: layer {GLOBAL_POOL!r} is the input of the model's global "
            f"pooling, but {type(model).__name__}'s forward pools no feature map to a single "
            "position before the class scores; name a module instead"
        )
    event = events[-1]
    shape = tuple(event.source.shape)
    where = f"{'the default layer' if default else 'layer'} {GLOBAL_POOL!r}"
    layout = _layout_for(method, where, shape, x, event.layout, given, spatial)
    return CamLayer(GLOBAL_POOL, "pool", None, layout, default, (event.func, event.call))


def _default(model, x, method, probe, given, spatial) -> CamLayer:
    label = type(model).__name__
    events = _pool_events(probe)
    if events and probe.width is None:
        event = events[-1]
        entry = _name_of(probe, event.source, event.version)
        source = probe.derived.get(id(event.source), event.source)
        tensor, layout = event.source, event.layout
        if source is not event.source and entry is not None:
            tensor, layout = source, entry.layout  # a slice was pooled: read the whole tensor
        if given is not None:
            where = f"method {method!r}: the pooled map"
            layout = given_layout(*given, tuple(tensor.shape), tuple(x.shape), layout, where)
        usable = source is not probe.inputs and _readable(layout, spatial)
        if usable and not _blank(layout, tensor, probe.grad(tensor)):
            if entry is not None:
                return CamLayer(entry.label, entry.point, entry.module, layout, True)
            return CamLayer(GLOBAL_POOL, "pool", None, layout, True, (event.func, event.call))
    reasons: list[str] = []
    attention = _attention_scopes(model)
    # A module's input is often the output of the module before it: one tensor, named by the
    # module that made it (the latest such module, for nested ones).
    owner = {}
    for entry in sorted(probe.points.values(), key=lambda e: e.order):
        if entry.point == "output" and len(entry.tensors) == 1:
            owner[(id(entry.tensors[0]), entry.versions[0])] = entry
    for entry in sorted(probe.points.values(), key=lambda e: e.order, reverse=True):
        t = entry.tensors[-1]
        if entry.point == "input" and len(entry.tensors) == 1:
            made = owner.get((id(t), entry.versions[0]))
            if made is not None:
                entry = made
        name = entry.label
        layout = entry.layout
        if (
            given is not None
            and layout is not None
            and (layout.kind != given[0] or (given[1] is not None and layout.prefix != given[1]))
        ):
            layout = None
        why = ""
        if t is probe.inputs:
            continue  # the model's inputs: an input-space method's business
        if _inside(entry, attention):
            continue  # attention internals: queries, keys, values, mixed heads
        if len(entry.tensors) > 1:
            why = f"runs {len(entry.tensors)} times"
        elif not _readable(layout, spatial):
            why = "no CAM layout" if layout is None or len(layout.grid) != spatial else \
                f"one grid position ({layout})"  # fmt: skip
        elif probe.width is not None and (layout.kind != TOKENS or t.shape[-1] != probe.width):
            why = f"not the class token's width {probe.width}"
        elif probe.informative:
            why = _blank(layout, t, probe.grad(t))
        if not why:
            return CamLayer(name, entry.point, entry.module, layout, True)
        if len(reasons) < 8 and entry.point == "output":
            reasons.append(f"{name!r} {tuple(t.shape[1:])}: {why}")
    considered = "; ".join(reasons) or "no module outputs a tensor"
    raise SaliencyError(
        f"method {method!r} needs a feature map with more than one grid position, but no "
        f"module of {label} gives a usable one for inputs of shape {tuple(x.shape[1:])} "
        f"(the last modules: {considered}). Use larger inputs, name a layer (layer=...), or use "
        "an input-space method (e.g. 'gradient')"
    )


def output_layouts(
    model: nn.Module, x: torch.Tensor, output=None
) -> tuple[dict[str, list[tuple[Layout | None, tuple[int, ...]]]], set[int]]:
    """Each module's output (layout, shape) per call, from one dry forward (no backward) on
    ``x[:1]`` (eval mode), and the ids of the parameters the forward used; modules never
    called with a tensor output are absent."""
    probe = _probe(model, x, gradients=False, output=output)
    layouts = {
        entry.name: [(lay, tuple(t.shape)) for lay, t in zip(entry.layouts, entry.tensors)]
        for entry in probe.points.values()
        if entry.point == "output"
    }
    return layouts, probe.used
