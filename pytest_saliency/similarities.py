"""Batched similarity metrics between two sets of saliency maps.

Every metric takes two tensors of maps, ``[N, H, W]`` (or ``[N, L]`` for 1-D maps where the metric
makes sense), and returns ``[N]``: one score per sample pair, computed batched in torch on the
maps' device. Scores follow scipy / scikit-image on the same arrays:

=================  ========================================================================
``ssim``           ``skimage.metrics.structural_similarity`` (its defaults, ``data_range=1``)
                   on both maps min-max normalised per sample to [0, 1]. 2-D maps only.
``spearman``       ``scipy.stats.spearmanr`` of the flattened signed maps (ties averaged).
``spearman_abs``   ``spearman`` of the absolute maps.
``pearson``        ``scipy.stats.pearsonr`` of the flattened maps.
``hog``            rank (or Pearson) correlation of ``skimage.feature.hog`` features
                   (orientations 9, cells_per_block (3, 3), 'L2-Hys') of the min-max
                   normalised maps, after Adebayo et al. (2018). 2-D maps only.
``topk_iou``       intersection over union of the top ``k`` percent pixels by absolute value
                   (ties at the threshold go to the lower flat index).
=================  ========================================================================

Conventions:

* Work is done in float64 (float32 on devices without float64, e.g. MPS), except ``ssim`` on
  float32 maps, which works in float32 on centred maps (within 1e-6 of the float64 formula). The
  result is float64 when either input is float64, float32 otherwise. Scores are computed
  without autograd.
* Nothing loops over samples in Python, except that on CPU the batch goes in cache-sized chunks,
  and CPU rank sorts use numpy's (vectorised) argsort.
* A sample whose map is constant in ``a`` or ``b`` has no defined similarity: its score is NaN
  for every metric (never 1). :func:`constant_samples` tells which samples those are. A sample
  with a NaN or infinite value in either map also scores NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .errors import SaliencyError, unknown

__all__ = [
    "Reference",
    "constant_samples",
    "hog",
    "hog_features",
    "metrics",
    "pearson",
    "similarity",
    "spearman",
    "spearman_abs",
    "ssim",
    "topk_iou",
]


# --- input checks and shared helpers ---------------------------------------------------------


def _check_maps(t: object, metric: str, name: str = "a", *, spatial: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise SaliencyError(
            f"similarity {metric!r}: {name} must be a torch.Tensor of maps [N, H, W] "
            f"or [N, L], got {type(t).__name__}"
        )
    if t.is_complex():
        raise SaliencyError(f"similarity {metric!r}: {name} has complex dtype {t.dtype}")
    if t.dim() not in (2, 3) or t.shape[0] == 0 or t.numel() == 0:
        raise SaliencyError(
            f"similarity {metric!r}: {name} has shape {tuple(t.shape)}; expected a non-empty "
            "batch of maps [N, H, W] or [N, L] (add a batch axis with .unsqueeze(0))"
        )
    if spatial and t.dim() != 3:
        raise SaliencyError(
            f"similarity {metric!r} compares 2-D maps [N, H, W], got shape {tuple(t.shape)}; "
            "for 1-D maps use 'spearman', 'spearman_abs', 'pearson' or 'topk_iou'"
        )


def _check_pair(a: object, b: object, metric: str, *, spatial: bool = False) -> None:
    _check_maps(a, metric, "a", spatial=spatial)
    _check_maps(b, metric, "b", spatial=spatial)
    _check_match(a.shape, a.device, b, metric)


def _check_match(shape: torch.Size, device: torch.device, b: torch.Tensor, metric: str) -> None:
    """``b`` holds as many maps of the same size as ``a`` (of ``shape``), on ``a``'s device."""
    if b.shape != shape:
        raise SaliencyError(
            f"similarity {metric!r}: maps have different shapes {tuple(shape)} and "
            f"{tuple(b.shape)}; a and b must hold the same number of same-sized maps"
        )
    if b.device != device:
        raise SaliencyError(
            f"similarity {metric!r}: maps are on different devices ({device} and {b.device})"
        )


def _work_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64; everywhere else float64 keeps us within 1e-5 of scipy/skimage.
    return torch.float32 if device.type == "mps" else torch.float64


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).to(_work_dtype(x.device))


def _range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (min, max), shape [N] each; NaN anywhere in a map makes both NaN."""
    flat = x.reshape(x.shape[0], -1)
    # Two reductions: aminmax(dim=...) is about 5x slower on CPU.
    return flat.amin(dim=1), flat.amax(dim=1)


def _undefined(x: torch.Tensor) -> torch.Tensor:
    """Samples whose map is constant or holds a NaN or infinity: [N] bool (one pass)."""
    lo, hi = _range(x)
    if not lo.is_floating_point():
        return lo == hi
    return (lo == hi) | ~(torch.isfinite(lo) & torch.isfinite(hi))


def constant_samples(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Which samples have a constant map (max == min) in ``a`` or in ``b``.

    Returns:
        Bool tensor ``[N]`` on the maps' device; these samples score NaN under every metric.
    """
    _check_pair(a, b, "constant_samples")
    (lo_a, hi_a), (lo_b, hi_b) = _range(a), _range(b)
    return (lo_a == hi_a) | (lo_b == hi_b)


def _minmax(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-sample min-max normalisation to [0, 1] (constant maps give NaN, masked later)."""
    lo, hi = (v.to(dtype or _work_dtype(x.device))[:, None, None] for v in _range(x))
    return (x.to(lo.dtype) - lo) / (hi - lo)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of [N, P] centred and scaled to unit length: their dot products are correlations."""
    x = x - x.mean(dim=1, keepdim=True)
    return x / torch.sqrt((x * x).sum(dim=1, keepdim=True))


def _argsort_rows(x: torch.Tensor) -> torch.Tensor:
    """Row-wise argsort of [N, P]. Equal values may come in any order: ranks give each run of
    them its mean rank.

    On CPU, float32 rows are sorted as one int64 per value: the value's bits made monotone
    in the high half, its index in the low half. numpy sorts plain integers with vectorised
    code, 1.1-3.5x faster than its argsort (the most on maps with many equal values, such as
    ReLU'd CAMs), and its argsort is in turn about 3x faster than torch's.
    """
    if x.device.type != "cpu":
        return x.argsort(dim=1)
    a = x.detach().numpy()
    if a.dtype != np.float32:
        return torch.from_numpy(np.argsort(a, axis=1))
    bits = (a + np.float32(0)).view(np.int32)  # + 0 turns -0.0 into +0.0 (they are equal)
    # Negative floats order backwards by their bits: flip all but the sign bit.
    packed = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).astype(np.int64)
    packed <<= 32
    packed |= np.arange(a.shape[1], dtype=np.int64)
    packed.sort(axis=1)
    packed &= 0xFFFFFFFF
    return torch.from_numpy(packed)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Row-wise ranks of [N, P] values, ties given their mean rank (scipy 'average').

    float32 maps are sorted as float32 (half-precision ones too, converted exactly), other
    maps in the work dtype; ranks come out in the work dtype.
    """
    work = _work_dtype(x.device)
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    elif x.dtype not in (torch.float32, torch.float64):
        x = x.to(work)
    order = _argsort_rows(x)
    values = x.gather(1, order)
    n, p = values.shape
    out = torch.empty((n, p), dtype=work, device=x.device)
    starts = torch.ones_like(values, dtype=torch.bool)
    torch.ne(values[:, 1:], values[:, :-1], out=starts[:, 1:])
    if bool(starts.all()):  # no ties anywhere: ranks are the sorted positions
        return out.scatter_(
            1, order, torch.arange(1, p + 1, dtype=work, device=x.device).expand(n, p)
        )
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    # Each sorted position belongs to the run [first, last]: the latest run start at or before
    # it and the earliest run end at or after it (int32 positions while first + last fits).
    pos = torch.arange(1, p + 1, device=x.device, dtype=torch.int32 if p < 2**30 else torch.int64)
    pos = pos.expand(n, p)
    first = torch.where(starts, pos, 0).cummax(dim=1).values
    last = torch.where(ends, pos, p).flip(1).cummin(dim=1).values.flip(1)
    return out.scatter_(1, order, (first + last).to(work).mul_(0.5))


# --- prepared references -------------------------------------------------------------------


class Reference:
    """Reference maps prepared once, then compared with many sets of maps.

    ``Reference(a, metric, **options)(b)`` equals ``similarity(a, b, metric, **options)``; what
    depends on ``a`` alone (its ranks, normalised map, window sums, HOG features, top pixels,
    which samples are constant) is computed once. The audits compare each sample's map on the
    trained model with one map per randomization step this way.
    """

    @torch.no_grad()
    def __init__(self, a: torch.Tensor, metric: str = "ssim", **options: object) -> None:
        _lookup(metric, options)
        _check_maps(a, metric, spatial=metric in ("ssim", "hog"))
        self.metric = metric
        self.shape, self.device, self.dtype = a.shape, a.device, a.dtype
        self._kind = _KINDS[metric](a, **options)
        self._undefined = _undefined(self._kind.view(a))

    @torch.no_grad()
    def __call__(self, b: torch.Tensor) -> torch.Tensor:
        _check_maps(b, self.metric, "b")
        _check_match(self.shape, self.device, b, self.metric)
        kind = self._kind
        score = _chunked(lambda i, j: kind.score(i, j, b[i:j]), b, kind.budget)
        bad = self._undefined | _undefined(kind.view(b))
        return _finished(score, bad, self.dtype, b.dtype)


def _chunked(fn, x: torch.Tensor, budget: int):
    """``fn(start, stop)`` over the samples of ``x``, concatenated (a tensor or a tuple of them).

    On CPU the samples go in chunks of about ``budget`` pixels, which keeps a metric's
    temporaries in cache (1.5-2x faster); accelerators take the whole batch at once.
    """
    n = x.shape[0]
    step = max(1, budget // x[0].numel()) if x.device.type == "cpu" else n
    parts = [fn(i, min(n, i + step)) for i in range(0, n, step)]
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


def _finished(score: torch.Tensor, bad: torch.Tensor, *dtypes: torch.dtype) -> torch.Tensor:
    """NaN for the undefined samples; float64 if an input was float64, else float32."""
    score = torch.where(bad, torch.full_like(score, math.nan), score)
    return score.to(torch.float64 if torch.float64 in dtypes else torch.float32)


class _Kind:
    """One metric's work on the reference (in ``__init__``) and on compared maps (``score``)."""

    budget = 2**18  # pixels per CPU chunk: keeps a metric's temporaries in cache

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """The values whose constancy makes a sample undefined (the maps themselves)."""
        return x


class _Correlation(_Kind):
    """pearson / spearman / spearman_abs: unit-length rows of (ranked) values."""

    def __init__(self, a: torch.Tensor, *, ranked: bool, absolute: bool) -> None:
        self.ranked, self.absolute = ranked, absolute
        self.rows = _batched_rows(self._rows, a, self.budget)

    def view(self, x: torch.Tensor) -> torch.Tensor:
        # |map| can be constant where the map is not (e.g. +-1): that is undefined too.
        if not self.absolute:
            return x
        return (x if x.is_floating_point() else x.to(_work_dtype(x.device))).abs()

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        if not self.ranked or not x.is_floating_point():  # bool / int maps too
            x = x.to(_work_dtype(x.device))
        if self.absolute:
            x = x.abs()
        return _rows(_ranks(x) if self.ranked else x)

    def score(self, start: int, stop: int, b: torch.Tensor) -> torch.Tensor:
        return (self.rows[start:stop] * self._rows(b)).sum(dim=1).clamp(-1.0, 1.0)


def _batched_rows(fn, a: torch.Tensor, budget: int):
    """``fn`` over chunks of the samples of ``a`` (see :func:`_chunked`)."""
    return _chunked(lambda i, j: fn(a[i:j]), a, budget)


class _SSIM(_Kind):
    budget = 2**17

    def __init__(self, a: torch.Tensor, *, win_size: int = 7) -> None:
        _check_win(win_size, a)
        self.win = win_size
        self.work = _ssim_dtype(a, a)
        self.x, self.ox, self.ux, self.vx = _batched_rows(self._prepare, a, self.budget)

    def _prepare(self, a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Scaled centred maps, their offsets, the window means, and the reference's share of
        the contrast denominator (its window variance plus C2 / cov)."""
        stats = a.new_empty((2, *a.shape), dtype=self.work)
        x, ox = _centred(a, self.win, out=stats[0])
        _scaled_product(x, x, self.win, out=stats[1])
        ux, uxx = _window_means(stats, self.win)
        return x, ox, ux, uxx.addcmul_(ux, ux, value=-1).add_(_C2 / _cov(self.win))

    def score(self, start: int, stop: int, b: torch.Tensor) -> torch.Tensor:
        win, ux = self.win, self.ux[start:stop]
        stats = b.new_empty((3, *b.shape), dtype=self.work)
        y, oy = _centred(b, win, out=stats[0])
        _scaled_product(y, y, win, out=stats[1])
        _scaled_product(self.x[start:stop], y, win, out=stats[2])
        uy, uyy, uxy = _window_means(stats, win)
        variances = uyy.addcmul_(uy, uy, value=-1).add_(self.vx[start:stop])
        return _ssim_formula(ux, uy, uxy, variances, win, self.ox[start:stop], oy)


_C1, _C2 = 0.01**2, 0.03**2  # scikit-image's (K1 * data_range)^2 and (K2 * data_range)^2


def _cov(win: int) -> float:
    """scikit-image's sample-covariance factor for a ``win`` x ``win`` window."""
    return win * win / (win * win - 1)


def _ssim_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    """float32 maps are compared in float32, float64 maps in float64 (MPS has no float64).

    float32 is enough because each normalised map is centred on its own mean: the second
    moments stay small, and so does the rounding left after the variance subtraction (worst
    seen against the float64 formula: 2e-7).
    """
    if a.device.type == "mps":
        return torch.float32
    return torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32


def _centred(t: torch.Tensor, win: int, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The min-max normalised maps minus each one's mean, divided by ``win``^2, into ``out``;
    and each normalised map's mean [n].

    Dividing by ``win``^2 here, with the normalisation, makes window sums come out as window
    means; :func:`_scaled_product` multiplies it back into the products.
    """
    flat = t.reshape(t.shape[0], -1).to(out.dtype)
    lo, hi = flat.amin(dim=1), flat.amax(dim=1)
    # The mean accumulates in float64 (a float32 sum of 1e37-sized values overflows; MPS has
    # no float64) and is rounded back, so that the centring and the offset use one value.
    wide = torch.float32 if out.device.type == "mps" else torch.float64
    mean = flat.mean(dim=1, dtype=wide).to(out.dtype)
    span = (hi - lo)[:, None, None]
    # Subtract before scaling: t - mean is exact for maps far from zero relative to their
    # range (1000 + 1e-3 * noise), where t * scale would round away the detail. Then divide
    # by the range, and by win^2 apart: 1 / range overflows for subnormal ranges, and
    # range * win^2 for ranges near the float32 maximum.
    torch.sub(flat, mean[:, None], out=out.view_as(flat))
    out.div_(span).mul_(1.0 / (win * win))
    return out, (mean - lo) / span[:, 0, 0]


def _scaled_product(x: torch.Tensor, y: torch.Tensor, win: int, out: torch.Tensor) -> None:
    """``out = x * y * win^2`` in one pass: the product of two maps from :func:`_centred`,
    divided by ``win``^2 once."""
    torch.addcmul(out.new_zeros(()), x, y, value=win * win, out=out)


def _window_means(stats: torch.Tensor, win: int) -> tuple[torch.Tensor, ...]:
    """Means over every full ``win`` x ``win`` window of maps already divided by ``win``^2."""
    return _window_sums(_window_sums(stats, win, -2), win, -1).unbind(0)


def _ssim_pair(a: torch.Tensor, b: torch.Tensor, win: int, work: torch.dtype) -> torch.Tensor:
    """SSIM of two sets of maps [n, H, W] computed together: 4 window sums instead of 2 + 3."""
    stats = a.new_empty((4, *a.shape), dtype=work)
    (x, ox), (y, oy) = _centred(a, win, out=stats[0]), _centred(b, win, out=stats[1])
    _scaled_product(x, x, win, out=stats[2])
    stats[2].addcmul_(y, y, value=win * win)
    _scaled_product(x, y, win, out=stats[3])
    ux, uy, uss, uxy = _window_means(stats, win)
    variances = uss.addcmul_(ux, ux, value=-1).addcmul_(uy, uy, value=-1).add_(_C2 / _cov(win))
    return _ssim_formula(ux, uy, uxy, variances, win, ox, oy)


def _ssim_formula(ux, uy, uxy, variances, win: int, ox, oy) -> torch.Tensor:
    """scikit-image's mean SSIM over full windows from the window means of the centred maps
    x, y (``uxy`` the mean of x * y) and ``variances`` = var(x) + var(y) + C2 / cov per window.

    With cov the sample-covariance factor, the contrast-structure term
    (2 cov sxy + C2) / (cov (vx + vy) + C2) is 2 (sxy + C2 / 2cov) / (vx + vy + C2 / cov);
    the 2 is applied to the mean. Every step is one in-place pass over the windows.
    """
    one = ux.new_full((), _C1)
    # The luminance term needs the means of the uncentred maps: each map's mean goes back.
    mx, my = ux + ox[:, None, None], uy + oy[:, None, None]
    numerator = torch.addcmul(one, mx, my, value=2)
    denominator = torch.addcmul(one, mx, mx).addcmul_(my, my)
    covariance = uxy.addcmul_(ux, uy, value=-1).add_(_C2 / (2 * _cov(win)))
    numerator.mul_(covariance).div_(denominator.mul_(variances))
    return numerator.mean(dim=(1, 2)).mul_(2)


def _check_win(win_size: object, a: torch.Tensor) -> None:
    if isinstance(win_size, bool) or not isinstance(win_size, int) or win_size < 3:
        raise SaliencyError(f"ssim: win_size must be an odd int >= 3, got {win_size!r}")
    if win_size % 2 == 0:
        raise SaliencyError(f"ssim: win_size must be odd, got {win_size}")
    h, w = a.shape[1:]
    if min(h, w) < win_size:
        raise SaliencyError(
            f"ssim: maps of {h}x{w} are smaller than the {win_size}x{win_size} window "
            "(scikit-image refuses them too); pass an odd win_size <= the smaller side, "
            "or use 'spearman', 'pearson' or 'topk_iou'"
        )


def _window_sums(t: torch.Tensor, win: int, dim: int) -> torch.Tensor:
    """Sums of every ``win`` consecutive values along ``dim`` (only full windows are kept).

    Built by doubling: sums of 2, 4, 8... neighbours, added up along the binary digits of
    ``win`` (4 passes for a window of 7). Short sums keep float32 rounding small, unlike a
    running cumsum over the whole row.
    """
    out = t.shape[dim] - win + 1
    parts: list[torch.Tensor] = []
    span, offset, rest, width = t, 0, win, 1
    while rest:
        if rest & 1:
            parts.append(span.narrow(dim, offset, out))
            offset += width
        rest >>= 1
        if rest:
            m = span.shape[dim] - width
            span = span.narrow(dim, 0, m) + span.narrow(dim, width, m)
            width *= 2
    if len(parts) == 1:
        return parts[0].clone()
    acc = parts[0] + parts[1]
    for part in parts[2:]:
        acc.add_(part)
    return acc


class _HOG(_Kind):
    def __init__(
        self,
        a: torch.Tensor,
        *,
        pixels_per_cell: int | tuple[int, int] = (8, 8),
        correlation: str = "spearman",
    ) -> None:
        self.cell = _cells(pixels_per_cell)
        if correlation not in ("spearman", "pearson"):
            raise SaliencyError(
                f"hog: correlation must be 'spearman' or 'pearson', got {correlation!r}"
            )
        h, w = a.shape[1:]
        cr, cc = self.cell
        if h < 3 * cr or w < 3 * cc:
            raise SaliencyError(
                f"hog: maps of {h}x{w} hold fewer than 3x3 cells of {cr}x{cc} pixels; they "
                f"need at least {3 * cr}x{3 * cc} (or pass a smaller pixels_per_cell)"
            )
        self.ranked = correlation == "spearman"
        self.rows = _batched_rows(self._rows, a, self.budget)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        features = hog_features(_minmax(x), self.cell)
        return _rows(_ranks(features) if self.ranked else features)

    def score(self, start: int, stop: int, b: torch.Tensor) -> torch.Tensor:
        return (self.rows[start:stop] * self._rows(b)).sum(dim=1).clamp(-1.0, 1.0)


class _TopK(_Kind):
    def __init__(self, a: torch.Tensor, *, k: float = 10) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 100:
            raise SaliencyError(f"topk_iou: k is a percentage in (0, 100], got {k!r}")
        self.p = a[0].numel()
        self.count = max(1, math.ceil(k * self.p / 100))
        self.top_a = _batched_rows(self._top, a, self.budget)

    def _top(self, x: torch.Tensor) -> torch.Tensor:
        # Everything above the count-th largest value, then the tied values at it in index
        # order: the same set as a stable descending argsort, without sorting whole maps.
        t = _flat(x).abs()
        threshold = t.kthvalue(self.p - self.count + 1, dim=1, keepdim=True).values
        above = t > threshold
        tied = t == threshold
        room = self.count - above.sum(dim=1, keepdim=True)
        return above | (tied & (tied.cumsum(dim=1) <= room))

    def score(self, start: int, stop: int, b: torch.Tensor) -> torch.Tensor:
        inter = (self.top_a[start:stop] & self._top(b)).sum(dim=1)
        return inter.to(_work_dtype(b.device)) / (2 * self.count - inter)


_KINDS: dict[str, Callable[..., _Kind]] = {
    "ssim": _SSIM,
    "spearman": lambda a: _Correlation(a, ranked=True, absolute=False),
    "spearman_abs": lambda a: _Correlation(a, ranked=True, absolute=True),
    "pearson": lambda a: _Correlation(a, ranked=False, absolute=False),
    "hog": _HOG,
    "topk_iou": _TopK,
}


# --- metrics --------------------------------------------------------------------------------


@torch.no_grad()
def ssim(a: torch.Tensor, b: torch.Tensor, *, win_size: int = 7) -> torch.Tensor:
    """Mean structural similarity of min-max normalised maps, as scikit-image computes it.

    Matches ``structural_similarity(x, y, data_range=1)`` with its defaults: a uniform
    ``win_size`` window, K1=0.01, K2=0.03, sample covariance, and the mean taken over the
    pixels at least ``(win_size - 1) // 2`` from the border (so only full windows count).
    float32 maps are compared in float32, float64 maps in float64.

    Args:
        a, b: maps ``[N, H, W]``, each side at least ``win_size``.
        win_size: odd side of the sliding window (>= 3).

    Returns:
        ``[N]`` scores in [-1, 1]; NaN for constant maps.
    """
    _check_pair(a, b, "ssim", spatial=True)
    _check_win(win_size, a)
    work = _ssim_dtype(a, b)

    score = _chunked(lambda i, j: _ssim_pair(a[i:j], b[i:j], win_size, work), a, _SSIM.budget)
    return _finished(score, _undefined(a) | _undefined(b), a.dtype, b.dtype)


@torch.no_grad()
def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of the flattened maps, per sample (``scipy.stats.pearsonr``)."""
    _check_pair(a, b, "pearson")
    return Reference(a, "pearson")(b)


@torch.no_grad()
def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of the flattened signed maps, ties averaged (scipy)."""
    _check_pair(a, b, "spearman")
    return Reference(a, "spearman")(b)


@torch.no_grad()
def spearman_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of the absolute maps (Adebayo et al.'s 'absolute value')."""
    _check_pair(a, b, "spearman_abs")
    return Reference(a, "spearman_abs")(b)


def _cells(pixels_per_cell: object) -> tuple[int, int]:
    cell = (pixels_per_cell, pixels_per_cell) if isinstance(pixels_per_cell, int) else None
    if isinstance(pixels_per_cell, (tuple, list)) and len(pixels_per_cell) == 2:
        cell = tuple(pixels_per_cell)
    if cell is None or not all(
        isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in cell
    ):
        raise SaliencyError(
            "hog: pixels_per_cell must be a positive int or a pair of them, "
            f"got {pixels_per_cell!r}"
        )
    return cell


@torch.no_grad()
def hog_features(maps: torch.Tensor, pixels_per_cell: tuple[int, int] = (8, 8)) -> torch.Tensor:
    """``skimage.feature.hog`` features of each map, batched: ``[N, F]`` in the work dtype.

    Same defaults as scikit-image (orientations 9, cells_per_block (3, 3), 'L2-Hys', feature
    order as its ``feature_vector=True``); maps are used as given (no normalisation here).
    """
    orientations, block = 9, 3
    cr, cc = pixels_per_cell
    x = maps.to(_work_dtype(maps.device))
    n, h, w = x.shape
    g_row, g_col = torch.zeros_like(x), torch.zeros_like(x)
    g_row[:, 1:-1] = x[:, 2:] - x[:, :-2]
    g_col[:, :, 1:-1] = x[:, :, 2:] - x[:, :, :-2]
    rows, cols = h // cr, w // cc
    g_row, g_col = g_row[:, : rows * cr, : cols * cc], g_col[:, : rows * cr, : cols * cc]
    magnitude = torch.hypot(g_col, g_row)
    angle = torch.remainder(torch.rad2deg(torch.atan2(g_row, g_col)), 180)
    # Bin i holds angles in [20 i, 20 (i + 1)), as scikit-image compares them; an angle rounded
    # up to 180 is in none. floor(angle / 20) gives exactly that bin: 20 and every edge are exact
    # in binary and a correctly rounded quotient never crosses an integer the true one does not.
    bins = torch.floor(angle / (180 / orientations)).long()
    inside = (bins >= 0) & (bins < orientations)
    # scikit-image sums each cell's magnitudes in float32, pixel by pixel in row-major order; we
    # do the same (vectorised over samples, cells and bins) so that near-ties in the features,
    # and hence their ranks, come out exactly as scikit-image's.
    per_cell = (n, rows, cr, cols, cc)
    magnitude = (magnitude * inside).view(per_cell).permute(2, 4, 0, 1, 3).reshape(cr * cc, -1)
    bins = bins.clamp(0, orientations - 1).view(per_cell).permute(2, 4, 0, 1, 3)
    slot = bins.reshape(cr * cc, -1) + torch.arange(
        0, bins[0, 0].numel() * orientations, orientations, device=x.device
    )
    hist = torch.zeros(n * rows * cols * orientations, dtype=x.dtype, device=x.device)
    for pixel in range(cr * cc):
        at = slot[pixel]
        hist[at] = (hist[at] + magnitude[pixel]).to(torch.float32).to(x.dtype)
    hist = (hist.to(torch.float32) / (cr * cc)).to(x.dtype).view(n, rows, cols, orientations)
    # Blocks of 3x3 cells, laid out (block row, block col, cell row, cell col, orientation).
    blocks = hist.unfold(1, block, 1).unfold(2, block, 1).permute(0, 1, 2, 4, 5, 3)
    blocks = blocks.reshape(n, rows - block + 1, cols - block + 1, -1)
    eps2 = 1e-5**2
    blocks = blocks / torch.sqrt((blocks * blocks).sum(-1, keepdim=True) + eps2)
    blocks = blocks.clamp(max=0.2)
    blocks = blocks / torch.sqrt((blocks * blocks).sum(-1, keepdim=True) + eps2)
    return blocks.reshape(n, -1)


@torch.no_grad()
def hog(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    pixels_per_cell: int | tuple[int, int] = (8, 8),
    correlation: str = "spearman",
) -> torch.Tensor:
    """Correlation of the HOG features of the min-max normalised maps (Adebayo et al. 2018).

    HOG ignores offsets and (up to its 1e-5 epsilon) scale, so the normalisation only makes the
    epsilon act on a fixed range. Features equal ``skimage.feature.hog`` at its defaults with the
    given ``pixels_per_cell``, computed batched in torch.

    Args:
        a, b: maps ``[N, H, W]`` with at least 3 cells per side.
        pixels_per_cell: cell size, an int or ``(rows, cols)``.
        correlation: ``"spearman"`` (rank correlation, default) or ``"pearson"`` (as in
            Adebayo et al.'s paper).
    """
    _check_pair(a, b, "hog", spatial=True)
    return Reference(a, "hog", pixels_per_cell=pixels_per_cell, correlation=correlation)(b)


@torch.no_grad()
def topk_iou(a: torch.Tensor, b: torch.Tensor, *, k: float = 10) -> torch.Tensor:
    """Intersection over union of the top ``k`` percent pixels by absolute value.

    Each map selects ``max(1, ceil(k * P / 100))`` of its ``P`` pixels. Ties at the threshold are
    broken by position (the lower flat index wins), so the count is always exact and the
    result deterministic.
    """
    _check_pair(a, b, "topk_iou")
    return Reference(a, "topk_iou", k=k)(b)


# --- dispatch -------------------------------------------------------------------------------

_METRICS: dict[str, tuple[Callable[..., torch.Tensor], tuple[str, ...]]] = {
    "ssim": (ssim, ("win_size",)),
    "spearman": (spearman, ()),
    "spearman_abs": (spearman_abs, ()),
    "pearson": (pearson, ()),
    "hog": (hog, ("pixels_per_cell", "correlation")),
    "topk_iou": (topk_iou, ("k",)),
}


def metrics() -> list[str]:
    """Names of the similarity metrics :func:`similarity` accepts."""
    return list(_METRICS)


def _lookup(metric: object, options: dict) -> tuple[Callable[..., torch.Tensor], tuple[str, ...]]:
    if not isinstance(metric, str) or metric not in _METRICS:
        raise unknown("similarity metric", metric, metrics())
    fn, valid = _METRICS[metric]
    extra = sorted(set(options) - set(valid))
    if extra:
        takes = ", ".join(repr(o) for o in valid) if valid else "no options"
        raise SaliencyError(
            f"similarity {metric!r} got unknown option(s) {', '.join(map(repr, extra))}; "
            f"it takes {takes}"
        )
    return fn, valid


def similarity(
    a: torch.Tensor, b: torch.Tensor, metric: str = "ssim", **options: object
) -> torch.Tensor:
    """Similarity of each pair of maps ``a[i]``, ``b[i]`` under ``metric``.

    Args:
        a, b: maps ``[N, H, W]`` (or ``[N, L]`` for correlations and ``topk_iou``).
        metric: one of :func:`metrics`.
        **options: the metric's options (``ssim``: win_size; ``hog``: pixels_per_cell,
            correlation; ``topk_iou``: k).

    Returns:
        ``[N]`` scores on the maps' device (float64 if an input is float64, else float32),
        NaN for samples with a constant map.
    """
    fn, _ = _lookup(metric, options)
    return fn(a, b, **options)
