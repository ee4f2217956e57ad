"""Feature layouts: how a tapped tensor maps to ``[N, C, *grid]``, and how the engine knows.

A CAM layer's output can be channels-first ``[N, C, H, W]`` (convolutions), channels-last
``[N, H, W, C]`` (Swin, ConvNeXt blocks) or tokens ``[N, T, C]`` with prefix tokens (class,
distillation, register tokens) before a patch grid (ViT, DeiT). Shapes alone are ambiguous
(``[N, 8, 8, 8]`` is either of the first two), so the layout is read off how the tensor was
made: a dry forward runs under a torch-function mode that tags tensors as they are produced.
Convolutions, pooling, BatchNorm and resizing make channels-first tensors; permutes, flattens,
transposes and concatenations of tagged tensors move the tag; ops that act along the channel
axis only (Linear, LayerNorm on channels-last or tokens), elementwise ops and residual sums keep
it; every other op drops it. An untagged tensor has no inferable layout: the caller is told to
give one, never a guess.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..errors import SaliencyError

CHANNELS_FIRST, CHANNELS_LAST, TOKENS = "channels_first", "channels_last", "tokens"
LAYOUTS = (CHANNELS_FIRST, CHANNELS_LAST, TOKENS)
_FLAT = "flat"  # [N, C, positions]: a flattened channels-first map, on its way to tokens


@dataclass(frozen=True)
class Layout:
    """``kind`` with the spatial ``grid``; tokens also have ``prefix`` tokens before the grid."""

    kind: str
    grid: tuple[int, ...]
    prefix: int = 0

    def __str__(self) -> str:
        grid = "x".join(str(g) for g in self.grid)
        if self.kind == TOKENS:
            return f"tokens(prefix={self.prefix}, grid={grid})"
        return f"{self.kind}({grid})"

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether a tensor of ``shape`` can be read with this layout."""
        g, r = self.grid, len(shape)
        if self.kind == CHANNELS_FIRST:
            return r == len(g) + 2 and tuple(shape[2:]) == g
        if self.kind == CHANNELS_LAST:
            return r == len(g) + 2 and tuple(shape[1:-1]) == g
        if self.kind == _FLAT:
            return r == 3 and shape[2] == math.prod(g)
        return r == 3 and shape[1] == self.prefix + math.prod(g)

    def channels(self, shape: tuple[int, ...]) -> int:
        return shape[1] if self.kind in (CHANNELS_FIRST, _FLAT) else shape[-1]

    def to_channels_first(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as ``[N, C, *grid]`` (a view where it can be)."""
        if self.kind == CHANNELS_FIRST:
            return t
        if self.kind == CHANNELS_LAST:
            return t.movedim(-1, 1)
        if self.kind == _FLAT:
            return t.reshape(*t.shape[:2], *self.grid)
        n, c = t.shape[0], t.shape[-1]
        return t[:, self.prefix :].transpose(1, 2).reshape(n, c, *self.grid)

    def positions(self, t: torch.Tensor) -> torch.Tensor:
        """``[N, C, P]``: the grid positions only (prefix tokens left out)."""
        return self.to_channels_first(t).flatten(2)


def parse_layout(value: object, method: str = "") -> tuple[str, int | None] | None:
    """A ``layout`` option: None (inferred), a kind, or ``"tokens:K"`` (K prefix tokens)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value in LAYOUTS:
            return value, None
        kind, _, count = value.partition(":")
        if kind == TOKENS and count.isdigit():
            return TOKENS, int(count)
    raise SaliencyError(
        f"{f'method {method!r}: ' if method else ''}layout={value!r} is not a feature layout; "
        f"choose one of {', '.join(repr(k) for k in LAYOUTS)}, 'tokens:K' for K prefix tokens "
        "before the patch grid, or None to infer it from how the layer's output is made"
    )


def check_layout_option(value: object) -> None:
    parse_layout(value)


def given_layout(
    kind: str, prefix: int | None, shape: tuple[int, ...], inputs: tuple[int, ...],
    tag: Layout | None, where: str,
) -> Layout:  # fmt: skip
    """The layout the user gave, checked against the tensor's ``shape``; a tokens grid comes from
    the tag, or is solved from the input size (square patches, at most 8 prefix tokens)."""
    spatial = len(inputs) - 2
    if kind in (CHANNELS_FIRST, CHANNELS_LAST):
        layout = Layout(kind, tuple(shape[2:] if kind == CHANNELS_FIRST else shape[1:-1]))
        if len(shape) != spatial + 2:
            raise SaliencyError(
                f"{where} outputs shape {tuple(shape)}; layout={kind!r} needs {spatial + 2} axes "
                f"like the inputs {tuple(inputs)}"
            )
        return layout
    if len(shape) != 3:
        raise SaliencyError(
            f"{where} outputs shape {tuple(shape)}; layout='tokens' needs [N, tokens, channels]"
        )
    if tag is not None and tag.kind == TOKENS and (prefix is None or prefix == tag.prefix):
        return tag
    options = token_grids(shape[1], inputs[2:], prefix)
    if not options and prefix is not None:
        raise SaliencyError(
            f"{where} has {shape[1]} tokens; with {prefix} prefix tokens the other "
            f"{shape[1] - prefix} form no grid of square patches on inputs {tuple(inputs[2:])}; "
            "check the prefix count, or give layout='tokens' to infer it"
        )
    if len(options) != 1:
        found = ", ".join(str(o) for o in options) or "none"
        raise SaliencyError(
            f"{where} has {shape[1]} tokens; the patch grid for inputs {tuple(inputs[2:])} is "
            f"ambiguous (candidates: {found}); give the prefix tokens as layout='tokens:K'"
        )
    return options[0]


def token_grids(tokens: int, size: tuple[int, ...], prefix: int | None) -> list[Layout]:
    """The (prefix, grid) splits of ``tokens`` with a grid of square patches on ``size``."""
    found = []
    for patch in range(1, max(size) + 1):
        if any(s % patch for s in size):
            continue
        grid = tuple(s // patch for s in size)
        rest = tokens - math.prod(grid)
        if (prefix is None and 0 <= rest <= 8) or rest == prefix:
            found.append(Layout(TOKENS, grid, rest))
    return found


# --- the tagger --------------------------------------------------------------------------------

_PRODUCERS = {
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices",
    "max_pool2d_with_indices", "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d",
    "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "lp_pool1d",
    "lp_pool2d", "batch_norm", "group_norm", "instance_norm", "local_response_norm",
    "interpolate", "upsample", "upsample_bilinear", "upsample_nearest", "pixel_shuffle",
    "pixel_unshuffle",
}  # fmt: skip
_POOLS = {n for n in _PRODUCERS if "pool" in n}
_REDUCTIONS = {"mean", "amax", "max", "sum", "nanmean", "logsumexp", "nansum"}
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "contiguous", "view_as", "reshape_as"}
_PERMUTES = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis"}
# Ops that act along the last axis only: they keep a channels-last or tokens tag.
_LAST_AXIS = {"linear", "layer_norm", "rms_norm", "matmul", "softmax", "log_softmax", "normalize"}
# Pointwise ops (an allow-list): an output of a tagged input's shape keeps its tag. Every
# other op drops it, whatever its output's shape (a swapdims or rot90 of a square map keeps
# the shape and moves the grid).
_POINTWISE = {
    "add", "sub", "rsub", "mul", "div", "true_divide", "neg", "abs", "sign", "pow", "square",
    "sqrt", "rsqrt", "reciprocal", "exp", "log", "log1p", "expm1", "erf", "sin", "cos",
    "maximum", "minimum", "clamp", "clip", "clamp_min", "clamp_max", "where", "masked_fill",
    "lerp", "addcmul", "addcdiv", "nan_to_num", "floor", "ceil", "round", "trunc",
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid",
    "hardtanh", "elu", "selu", "celu", "leaky_relu", "softplus", "mish", "prelu", "rrelu",
    "threshold", "logsigmoid", "softsign", "tanhshrink", "hardshrink", "softshrink",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout", "clone", "detach", "to", "type", "type_as", "float", "double",
    "half", "bfloat16", "cpu", "cuda", "requires_grad", "__add__", "__radd__", "__iadd__",
    "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__", "__truediv__",
    "__rtruediv__", "__rdiv__", "__itruediv__", "__neg__", "__pow__", "__rpow__", "__ipow__",
    "__abs__",
}  # fmt: skip
# Ops that rearrange axes: when they leave no tag, the grid is moved (see ``Tagger.moved``).
_REARRANGES = _PERMUTES | {"rot90", "flip", "fliplr", "flipud", "swapdims", "t", "adjoint",
                           "__property__", "roll", "mT", "mH"}  # fmt: skip
# Ops that copy along the channel axis only (a grey image repeated to three channels).
_CHANNEL_COPIES = {"repeat", "expand", "expand_as", "tile", "repeat_interleave"}


def function_name(func) -> str:
    """A torch function's name as the tagger and the pooling tap count it (in-place spellings
    as their out-of-place op)."""
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property (Tensor.mT and the like): never a layout-keeping op
        return "__property__"
    return name.rstrip("_") if name.endswith("_") and not name.startswith("__") else name


def _axes(value, rank: int) -> tuple[int, ...] | None:
    if value is None:
        return None
    values = value if isinstance(value, (list, tuple)) else (value,)
    if not all(isinstance(v, int) for v in values):
        return None
    return tuple(sorted(v % rank for v in values))


def _spatial_axes(tag: Layout, rank: int) -> tuple[int, ...]:
    if tag.kind == CHANNELS_FIRST:
        return tuple(range(2, rank))
    if tag.kind == CHANNELS_LAST:
        return tuple(range(1, rank - 1))
    return (2,) if tag.kind == _FLAT else (1,)


@dataclass
class Event:
    """Where the forward collapses the grid: a global pooling (``pool``) of ``source``, or the
    selection of one prefix token (``select``)."""

    kind: str
    source: torch.Tensor
    layout: Layout
    output: torch.Tensor
    func: str
    call: int  # the how-many-th call of ``func`` in the forward
    version: int = 0  # ``source``'s version counter then (in-place ops bump it)

    def __post_init__(self) -> None:
        self.version = self.source._version


class Tagger(TorchFunctionMode):
    """Tags tensors with their layout as the forward makes them, and notes grid collapses."""

    def __init__(self, inputs: torch.Tensor) -> None:
        super().__init__()
        self.tags: dict[int, tuple[torch.Tensor, Layout]] = {}
        self.derived: dict[int, torch.Tensor] = {}  # a token slice -> the tensor it was cut from
        # Tensors whose grid is known to be moved off the inputs' (transposed, rotated, read
        # across the wrong axes): nothing made from them gets a tag again. An untagged tensor
        # that is not moved (after a channel slice, say) is tagged again by a convolution.
        self.moved: dict[int, torch.Tensor] = {}
        self.events: list[Event] = []
        self.counts: dict[str, int] = {}
        self.size = tuple(inputs.shape[2:])
        if inputs.dim() >= 3:
            self.tag(inputs, Layout(CHANNELS_FIRST, tuple(inputs.shape[2:])))

    def tag(self, t: object, layout: Layout | None) -> None:
        if isinstance(t, torch.Tensor):
            if layout is not None and layout.fits(tuple(t.shape)):
                self.tags[id(t)] = (t, layout)
            else:
                self.tags.pop(id(t), None)

    def is_moved(self, t: object) -> bool:
        return isinstance(t, torch.Tensor) and self.moved.get(id(t)) is t

    def move(self, t: object) -> None:
        if isinstance(t, torch.Tensor):
            self.tags.pop(id(t), None)
            self.moved[id(t)] = t

    def layout_of(self, t: object) -> Layout | None:
        if not isinstance(t, torch.Tensor):
            return None
        kept = self.tags.get(id(t))
        return kept[1] if kept is not None and kept[0] is t else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = function_name(func)
        call = self.counts.get(name, 0)
        self.counts[name] = call + 1
        try:
            self._after(name, call, args, kwargs, out)
            self._moved_after(name, args, kwargs, out)
        except Exception:  # the tagger must never break the user's forward: no tag, no event
            self.move(out if isinstance(out, torch.Tensor) else None)
        return out

    def _moved_after(self, name, args, kwargs, out) -> None:
        """An op that rearranges axes of a tagged (or moved) tensor and leaves no tag moves the
        grid; a pointwise op or a producer of a moved tensor keeps it moved."""
        if not isinstance(out, torch.Tensor) or self.layout_of(out) is not None:
            self.moved.pop(id(out), None) if isinstance(out, torch.Tensor) else None
            return
        leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        first = leaves[0] if leaves else None
        if name in _REARRANGES and (self.layout_of(first) is not None or self.is_moved(first)):
            self.move(out)
        elif name in _POINTWISE | _PRODUCERS | _LAST_AXIS and any(self.is_moved(t) for t in leaves):
            self.move(out)

    def _after(self, name, call, args, kwargs, out) -> None:
        first = args[0] if args else None
        tag = self.layout_of(first)
        if isinstance(out, tuple) and name.endswith("with_indices"):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            return
        shape = tuple(out.shape)
        if name in _PRODUCERS:
            # A convolution, pooling or norm keeps a channels-first map channels-first, on
            # its own grid; on a map it did not get from the inputs that way (a transposed or
            # rotated one, or an untagged one) its grid is not the inputs' and has no tag.
            grown = name.startswith("adaptive") and tag is not None and any(
                o > i for o, i in zip(shape[2:], tag.grid))  # fmt: skip
            # An adaptive pooling to a larger grid (VGG's 7x7 on small inputs) resamples.
            # An untagged input that is not known to be moved (a channel slice, a concatenation
            # with an untagged part) is tagged again.
            aligned = isinstance(first, torch.Tensor) and out.dim() == first.dim() and (
                (tag is not None and tag.kind == CHANNELS_FIRST)
                or (tag is None and not self.is_moved(first))
            )  # fmt: skip
            self.tag(out, Layout(CHANNELS_FIRST, shape[2:]) if aligned and not grown else None)
            if name in _POOLS and isinstance(first, torch.Tensor) and first.dim() == out.dim():
                source = tag
                if tag is None and not self.is_moved(first):
                    source = self._declared(first, tuple(range(2, first.dim())))
                if source is not None and source.kind == CHANNELS_FIRST:
                    if math.prod(shape[2:]) == 1 < math.prod(source.grid):
                        self.events.append(Event("pool", first, source, out, name, call))
            return
        if name in _REDUCTIONS and isinstance(first, torch.Tensor):
            dims = _axes(kwargs.get("dim", args[1] if len(args) > 1 else None), first.dim())
            source = tag
            if tag is None and dims is not None and not self.is_moved(first):
                source = self._declared(first, dims)
            pooled = source is not None and dims == _spatial_axes(source, first.dim())
            if pooled:
                self.events.append(Event("pool", first, source, out, name, call))
            keepdim = bool(kwargs.get("keepdim", args[2] if len(args) > 2 else False))
            # A pooling that keeps its axes (an SE block's squeeze) leaves a one-position map.
            one = pooled and keepdim and source.kind in (CHANNELS_FIRST, CHANNELS_LAST)
            self.tag(out, Layout(source.kind, (1,) * len(source.grid)) if one else None)
            return
        if tag is not None and name == "__getitem__":
            self._index(first, tag, args[1] if len(args) > 1 else None, out, call)
            return
        if name == "__getitem__":
            self.tag(out, None)
            return
        if tag is not None and name == "pad":
            self.tag(out, _padded(tag, args[1] if len(args) > 1 else kwargs.get("pad"), shape))
            return
        if tag is not None and name in _PERMUTES:
            self.tag(out, _permuted(tag, first.dim(), name, args[1:], kwargs, shape))
            return
        if tag is not None and name in _RESHAPES:
            self.tag(out, _reshaped(tag, tuple(first.shape), shape))
            return
        if name in ("cat", "concat", "concatenate"):
            self.tag(out, self._concatenated(first, kwargs.get("dim", args[1] if len(args) > 1
                                                               else 0), shape))  # fmt: skip
            return
        if tag is not None and name in _CHANNEL_COPIES:
            self.tag(out, _channel_copy(tag, tuple(first.shape), shape))
            return
        if name in _LAST_AXIS or name in _POINTWISE:
            self.tag(out, self._kept(name, args, kwargs, shape))
            return
        self.tag(out, None)

    def _kept(self, name, args, kwargs, shape) -> Layout | None:
        """An elementwise op keeps the tag of an input of the output's shape; an op along the
        last axis keeps a channels-last or tokens tag whatever the channel count."""
        leaves, _ = tree_flatten((args, kwargs))
        for leaf in leaves:
            tag = self.layout_of(leaf)
            if tag is None:
                continue
            if tuple(leaf.shape) == shape and name not in _LAST_AXIS:
                return tag
            last = tag.kind in (CHANNELS_LAST, TOKENS)
            if name in _LAST_AXIS and last and tuple(leaf.shape[:-1]) == shape[:-1]:
                return tag
            if name in _LAST_AXIS:
                return None
        return None

    def _declared(self, t: torch.Tensor, dims: tuple[int, ...]) -> Layout | None:
        """The layout a global pooling over ``dims`` declares for an untagged ``t``: the axes
        the model itself averages are its grid. Only where the grid fits the inputs."""
        rank, size = t.dim(), self.size
        shape = tuple(t.shape)
        if rank == len(size) + 2:
            if dims == tuple(range(2, rank)):
                layout = Layout(CHANNELS_FIRST, shape[2:])
            elif dims == tuple(range(1, rank - 1)):
                layout = Layout(CHANNELS_LAST, shape[1:-1])
            else:
                return None
            fits = all(1 <= g <= s for g, s in zip(layout.grid, size))
            return layout if fits and _same_aspect(layout.grid, size) else None
        if rank == 3 and dims == (1,):
            grids = token_grids(shape[1], size, 0)
            return grids[0] if len(grids) == 1 else None
        return None

    def _index(self, source, tag: Layout, index, out, call) -> None:
        if tag.kind in (CHANNELS_FIRST, CHANNELS_LAST):
            self.tag(out, _sliced(tag, index, source.dim(), tuple(out.shape)))
            return
        self.tag(out, None)
        if tag.kind != TOKENS or not isinstance(index, tuple) or len(index) < 2:
            return
        head, pick = index[0], index[1]
        if not (isinstance(head, slice) and head == slice(None)):
            return
        rest = index[2:]
        if any(not (isinstance(r, slice) and r == slice(None)) and r is not Ellipsis
               for r in rest):  # fmt: skip
            return
        if isinstance(pick, int) and 0 <= pick < tag.prefix:
            self.events.append(Event("select", source, tag, out, "__getitem__", call))
        elif isinstance(pick, slice) and pick.step in (None, 1) and pick.stop is None:
            start = pick.start or 0
            if 0 <= start <= tag.prefix:
                self.tag(out, Layout(TOKENS, tag.grid, tag.prefix - start))
                self.derived[id(out)] = source

    def _concatenated(self, tensors, dim, shape) -> Layout | None:
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
            return None
        tags = [self.layout_of(t) for t in tensors]
        tagged = [(i, t) for i, t in enumerate(tags) if t is not None]
        if len(tagged) == 0:
            return None
        rank = len(shape)
        dim %= rank
        kinds = {t.kind for _, t in tagged}
        if len(kinds) != 1:
            return None
        kind, first = kinds.pop(), tagged[0][1]
        if kind == CHANNELS_FIRST and dim == 1 and all(t == first for t in tags):
            return Layout(CHANNELS_FIRST, first.grid)
        if kind == CHANNELS_LAST and dim == rank - 1 and all(t == first for t in tags):
            return first
        if kind == TOKENS and dim == 1 and len(tagged) == 1:
            i = tagged[0][0]
            before = sum(t.shape[1] for t in tensors[:i])
            after = sum(t.shape[1] for t in tensors[i + 1 :])
            return Layout(TOKENS, first.grid, first.prefix + before) if after == 0 else None
        return None


def _channel_copy(tag: Layout, before, after) -> Layout | None:
    if tag.kind not in (CHANNELS_FIRST, CHANNELS_LAST) or len(after) != len(before):
        return None
    grid = after[2:] if tag.kind == CHANNELS_FIRST else after[1:-1]
    return tag if after[0] == before[0] and tuple(grid) == tag.grid else None


def _same_aspect(grid: tuple[int, ...], size: tuple[int, ...]) -> bool:
    """A grid made from ``size`` by one stride on every axis (rounding aside)."""
    stride = size[0] / grid[0]
    return all(abs(s / stride - g) <= 1 for g, s in zip(grid, size))


def _sliced(tag: Layout, index, rank: int, shape: tuple[int, ...]) -> Layout | None:
    """Slicing a channels-first or channels-last map along its grid axes (Swin's patch
    merging: ``x[..., 0::2, 0::2, :]``) keeps the layout, on the smaller grid."""
    items = index if isinstance(index, tuple) else (index,)
    if sum(1 for i in items if i is Ellipsis) > 1:
        return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = items[:at] + (slice(None),) * (rank - len(items) + 1) + items[at + 1 :]
    items = items + (slice(None),) * (rank - len(items))
    if len(items) != rank or not all(isinstance(i, slice) for i in items):
        return None
    channel = 1 if tag.kind == CHANNELS_FIRST else rank - 1
    if items[0] != slice(None) or items[channel] != slice(None) or len(shape) != rank:
        return None
    grid = shape[2:] if tag.kind == CHANNELS_FIRST else shape[1:-1]
    return Layout(tag.kind, tuple(grid))


def _padded(tag: Layout, pad, shape: tuple[int, ...]) -> Layout | None:
    """``F.pad`` along grid axes only keeps the layout (on the padded grid)."""
    if tag.kind not in (CHANNELS_FIRST, CHANNELS_LAST) or not isinstance(pad, (list, tuple)):
        return None
    rank = len(shape)
    # pad pairs run from the last axis backwards: the axes they touch.
    touched = {rank - 1 - i // 2 for i, p in enumerate(pad) if p}
    channel = 1 if tag.kind == CHANNELS_FIRST else rank - 1
    if touched & {0, channel}:
        return None
    return Layout(tag.kind, tuple(shape[2:] if tag.kind == CHANNELS_FIRST else shape[1:-1]))


def _permuted(tag: Layout, rank: int, name: str, args, kwargs, shape) -> Layout | None:
    if name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        dims = kwargs.get("dims", dims)
        order = tuple(d % rank for d in dims)
    elif name in ("transpose", "swapaxes", "swapdims"):
        a, b = (args[0], args[1]) if len(args) >= 2 else (kwargs.get("dim0"), kwargs.get("dim1"))
        order = list(range(rank))
        order[a % rank], order[b % rank] = order[b % rank], order[a % rank]
        order = tuple(order)
    else:
        return None
    identity = tuple(range(rank))
    if order == identity:
        return tag
    to_last = (0, *range(2, rank), 1)
    to_first = (0, rank - 1, *range(1, rank - 1))
    if tag.kind == CHANNELS_FIRST and order == to_last:
        return Layout(CHANNELS_LAST, tag.grid)
    if tag.kind == CHANNELS_LAST and order == to_first:
        return Layout(CHANNELS_FIRST, tag.grid)
    if rank == 3 and order == (0, 2, 1):
        if tag.kind == _FLAT:
            return Layout(TOKENS, tag.grid, 0)
        if tag.kind == TOKENS and tag.prefix == 0:
            return Layout(_FLAT, tag.grid)
    return None


def _reshaped(tag: Layout, before: tuple[int, ...], after: tuple[int, ...]) -> Layout | None:
    """A reshape keeps the memory order: channel-major maps stay channel-major (channels-first
    and flattened), position-major ones stay position-major (channels-last and tokens)."""
    if before == after:
        return tag
    n, positions = before[0], math.prod(tag.grid)
    c = tag.channels(before)
    if after[0] != n:
        return None
    if tag.kind in (CHANNELS_FIRST, _FLAT):
        if after == (n, c, *tag.grid):
            return Layout(CHANNELS_FIRST, tag.grid)
        if after == (n, c, positions):
            return Layout(_FLAT, tag.grid)
        return None
    if tag.kind == TOKENS and tag.prefix:
        return None
    if after == (n, *tag.grid, c):
        return Layout(CHANNELS_LAST, tag.grid)
    if after == (n, positions, c):
        return Layout(TOKENS, tag.grid, 0)
    return None
