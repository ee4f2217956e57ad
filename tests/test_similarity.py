"""Similarity metrics against scipy / scikit-image computed per sample on the same arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from skimage.feature import hog as skimage_hog
from skimage.metrics import structural_similarity

import pytest_saliency as ps
from pytest_saliency.errors import SaliencyError
from pytest_saliency.similarities import (
    Reference,
    constant_samples,
    hog,
    hog_features,
    metrics,
    pearson,
    similarity,
    spearman,
    spearman_abs,
    ssim,
    topk_iou,
)

ALL = ["ssim", "spearman", "spearman_abs", "pearson", "hog", "topk_iou"]
FLAT = ["spearman", "spearman_abs", "pearson", "topk_iou"]


# --- references: one sample at a time, numpy / scipy / scikit-image ------------------------


def _minmax(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / (x.max() - x.min())


def _top(x: np.ndarray, k: float) -> set[int]:
    flat = np.abs(x).ravel()
    count = max(1, math.ceil(k * flat.size / 100))
    return set(np.argsort(-flat, kind="stable")[:count].tolist())


def _topk_iou_ref(x, y, k=10):
    tx, ty = _top(x, k), _top(y, k)
    return len(tx & ty) / len(tx | ty)


REFERENCE = {
    "ssim": lambda x, y, win_size=7: structural_similarity(
        _minmax(x), _minmax(y), data_range=1, win_size=win_size
    ),
    "spearman": lambda x, y: scipy.stats.spearmanr(x.ravel(), y.ravel())[0],
    "spearman_abs": lambda x, y: scipy.stats.spearmanr(np.abs(x).ravel(), np.abs(y).ravel())[0],
    "pearson": lambda x, y: scipy.stats.pearsonr(x.ravel(), y.ravel())[0],
    "hog": lambda x, y, pixels_per_cell=(8, 8), correlation="spearman": (
        scipy.stats.spearmanr if correlation == "spearman" else scipy.stats.pearsonr
    )(
        skimage_hog(_minmax(x), pixels_per_cell=pixels_per_cell),
        skimage_hog(_minmax(y), pixels_per_cell=pixels_per_cell),
    )[0],
    "topk_iou": _topk_iou_ref,
}


def reference(metric, a, b, **options):
    """The peer's score per sample, on the very same values (as float64 arrays)."""
    a64, b64 = a.double().numpy(), b.double().numpy()
    return np.array([REFERENCE[metric](x, y, **options) for x, y in zip(a64, b64)])


# --- map fixtures -------------------------------------------------------------------------


def make_maps(kind: str, shape, dtype=torch.float64, seed=0):
    """A pair of related maps [N, ...]: b is a noisy copy of a, so scores are far from 0."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g, dtype=torch.float64)
    b = a + 0.8 * torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "ties":  # ReLU'd and quantised: most pixels tie at 0, the rest in few levels
        a, b = (4 * a).relu().round(), (4 * b).relu().round()
    elif kind == "smooth":  # blurred: local structure for ssim / hog to see
        kernel = torch.ones(1, 1, 5, 5, dtype=torch.float64) / 25
        a = torch.nn.functional.conv2d(a.unsqueeze(1), kernel, padding=2).squeeze(1)
        b = torch.nn.functional.conv2d(b.unsqueeze(1), kernel, padding=2).squeeze(1)
    return a.to(dtype), b.to(dtype)


# --- agreement with the peers ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["random", "ties", "smooth"])
@pytest.mark.parametrize("metric", ALL)
def test_matches_peer(metric, kind, dtype):
    a, b = make_maps(kind, (3, 27, 40), dtype)  # non-square, at least 3x3 hog cells
    got = similarity(a, b, metric)
    assert got.shape == (3,) and got.device == a.device
    assert got.dtype == dtype
    np.testing.assert_allclose(got.double().numpy(), reference(metric, a, b), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "kind", ["upsampled", "blocky", "near_identical", "offset", "relu", "spike"]
)
def test_float32_ssim_keeps_skimage_precision_on_smooth_maps(kind):
    """float32 ssim works in float32: maps with tiny local variance are where rounding shows."""
    g = torch.Generator().manual_seed(3)
    up = torch.nn.functional.interpolate

    def coarse(n, mode):
        return up(torch.rand(6, 1, n, n, generator=g), size=96, mode=mode)[:, 0]

    a = coarse(7, "bilinear")
    b = {
        "upsampled": lambda: coarse(7, "bilinear"),
        "blocky": lambda: a + 1e-2 * coarse(12, "nearest"),
        "near_identical": lambda: a + 1e-4 * coarse(14, "bicubic"),
        "offset": lambda: 1000 + 1e-3 * coarse(7, "bilinear"),
        "relu": lambda: (coarse(7, "bilinear") - 0.5).relu(),
        "spike": lambda: (1e-3 * coarse(7, "bilinear")).index_put_(
            (torch.arange(6), torch.tensor(40), torch.tensor(50)), torch.tensor(1.0)
        ),
    }[kind]()
    got = ssim(a, b)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), reference("ssim", a, b), rtol=0, atol=1e-6)
    prepared = Reference(a, "ssim")(b)  # the audits' path: window sums of a made once
    np.testing.assert_allclose(prepared.double().numpy(), reference("ssim", a, b), atol=1e-6)
    flipped = Reference(b, "ssim")(a)  # the spike on the reference side too
    np.testing.assert_allclose(flipped.double().numpy(), reference("ssim", b, a), atol=1e-6)


@pytest.mark.parametrize("metric", ALL)
def test_one_sample_square(metric):
    a, b = make_maps("smooth", (1, 32, 32))
    got = similarity(a, b, metric)
    assert got.shape == (1,)
    np.testing.assert_allclose(got.numpy(), reference(metric, a, b), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "metric, options",
    [
        ("ssim", {"win_size": 5}),
        ("ssim", {"win_size": 11}),
        ("hog", {"pixels_per_cell": (4, 6)}),
        ("hog", {"pixels_per_cell": (5, 5), "correlation": "pearson"}),
        ("topk_iou", {"k": 25}),
        ("topk_iou", {"k": 0.1}),  # fewer than one pixel: still one
    ],
)
def test_options_match_peer(metric, options):
    a, b = make_maps("smooth", (2, 30, 36))
    got = similarity(a, b, metric, **options)
    np.testing.assert_allclose(got.numpy(), reference(metric, a, b, **options), atol=1e-5)


def test_hog_features_equal_skimage():
    a, _ = make_maps("ties", (2, 33, 50))
    ours = hog_features(a, (8, 8)).numpy()
    theirs = np.stack([skimage_hog(x) for x in a.numpy()])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("metric", ALL)
def test_batches_larger_than_a_cpu_chunk(metric):
    # 256x256 maps: ssim works one map at a time on CPU, the others four; 6 maps cross both.
    a, b = make_maps("smooth", (6, 256, 256), torch.float32)
    got = similarity(a, b, metric)
    np.testing.assert_allclose(got.numpy(), reference(metric, a, b), rtol=0, atol=1e-5)


def test_scores_carry_no_autograd_graph():
    a, b = make_maps("random", (2, 24, 24))
    a.requires_grad_(True)
    for metric in ALL:
        got = similarity(a, b, metric)
        assert got.grad_fn is None and not got.requires_grad


@pytest.mark.parametrize("metric", FLAT)
def test_1d_maps(metric):
    a, b = make_maps("random", (4, 50))
    got = similarity(a, b, metric)
    np.testing.assert_allclose(got.numpy(), reference(metric, a, b), atol=1e-5)


def test_public_functions_are_the_metrics():
    a, b = make_maps("random", (2, 24, 24))
    for fn in (ssim, spearman, spearman_abs, pearson, hog, topk_iou):
        torch.testing.assert_close(fn(a, b), similarity(a, b, fn.__name__))
    assert metrics() == ALL


def test_integer_maps():
    a, b = make_maps("ties", (2, 20, 20))
    got = spearman(a.long(), b.long())
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), reference("spearman", a, b), atol=1e-5)


# --- closed forms ---------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ALL)
def test_self_similarity_is_one(metric):
    a, _ = make_maps("ties", (3, 26, 31))
    torch.testing.assert_close(similarity(a, a.clone(), metric), torch.ones(3, dtype=a.dtype))


def test_correlations_closed_form():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]], dtype=torch.float64)
    torch.testing.assert_close(pearson(x, -2 * x + 7), torch.tensor([-1.0], dtype=torch.float64))
    # Ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4]; r with [1, 2, 3, 4] is 4.5 / sqrt(4.5 * 5).
    y = torch.tensor([[1.0, 2.0, 2.0, 3.0]], dtype=torch.float64)
    z = torch.tensor([[10.0, 20.0, 30.0, 40.0]], dtype=torch.float64)
    torch.testing.assert_close(spearman(y, z), torch.tensor([4.5 / math.sqrt(4.5 * 5)]).double())
    # A monotone but non-linear map has rank correlation 1; |x| of a symmetric map flips it.
    torch.testing.assert_close(spearman(x, x**3), torch.ones(1, dtype=torch.float64))
    s = torch.tensor([[-3.0, -1.0, 2.0, 4.0]])
    torch.testing.assert_close(spearman_abs(s, s.abs()), torch.ones(1))


def test_topk_iou_closed_form_and_ties():
    a = torch.zeros(1, 20)
    b = torch.zeros(1, 20)
    a[0, [3, 4]] = torch.tensor([5.0, -6.0])
    b[0, [4, 9]] = torch.tensor([1.0, 2.0])
    # 10% of 20 pixels = 2: {3, 4} vs {4, 9} share one of three.
    torch.testing.assert_close(topk_iou(a, b), torch.tensor([1 / 3]))
    # One non-zero pixel each: the second pick is the lowest-index zero, so {7, 0} vs {7, 0}.
    c, d = torch.zeros(1, 20), torch.zeros(1, 20)
    c[0, 7], d[0, 7] = 1.0, 3.0
    torch.testing.assert_close(topk_iou(c, d), torch.ones(1))
    # With k = 15 (3 pixels) and b's top moved: {7, 0, 1} vs {12, 0, 1} -> 2 / 4.
    d = torch.zeros(1, 20)
    d[0, 12] = 1.0
    torch.testing.assert_close(topk_iou(c, d, k=15), torch.tensor([0.5]))


# --- degenerate maps ------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ALL)
def test_constant_maps_give_nan(metric):
    a, b = make_maps("random", (4, 24, 30))
    a[1] = 0.0  # constant in a
    b[2] = 3.5  # constant in b
    got = similarity(a, b, metric)
    assert torch.isnan(got[1]) and torch.isnan(got[2])
    assert torch.isfinite(got[[0, 3]]).all()
    np.testing.assert_allclose(
        got[[0, 3]].numpy(), reference(metric, a[[0, 3]], b[[0, 3]]), atol=1e-5
    )
    assert constant_samples(a, b).tolist() == [False, True, True, False]
    # Compared with itself, a constant map is still NaN, never 1.
    assert torch.isnan(similarity(a, a, metric)[1])


def test_constant_absolute_map_is_nan_for_spearman_abs():
    signs = torch.tensor([[1.0, -1.0, 1.0, -1.0], [1.0, 2.0, 3.0, 4.0]])
    other = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    got = spearman_abs(signs, other)
    assert torch.isnan(got[0]) and got[1] == -1.0


@pytest.mark.parametrize("metric", ALL)
def test_non_finite_maps_give_nan(metric):
    a, b = make_maps("random", (3, 24, 24))
    a[0, 3, 3] = float("nan")
    b[1, 0, 0] = float("inf")
    got = similarity(a, b, metric)
    assert torch.isnan(got[:2]).all() and torch.isfinite(got[2])


# --- bad input ------------------------------------------------------------------------------


def test_unknown_metric_lists_valid_names():
    a, b = make_maps("random", (1, 8, 8))
    with pytest.raises(SaliencyError, match="did you mean 'spearman'") as err:
        similarity(a, b, "spearmann")
    for name in ALL:
        assert repr(name) in str(err.value)


@pytest.mark.parametrize(
    "metric, option, valid",
    [("ssim", "sigma", "'win_size'"), ("pearson", "k", "no options"), ("topk_iou", "q", "'k'")],
)
def test_unknown_option_names_valid_ones(metric, option, valid):
    a, b = make_maps("random", (1, 8, 8))
    with pytest.raises(SaliencyError, match=f"{metric}.*{option}.*{valid}"):
        similarity(a, b, metric, **{option: 1})


@pytest.mark.parametrize(
    "a, b, match",
    [
        (np.zeros((2, 8, 8)), torch.zeros(2, 8, 8), "a must be a torch.Tensor"),
        (torch.rand(2, 8, 8), [0.0], "b must be a torch.Tensor"),
        (torch.rand(2, 8, 8), torch.rand(3, 8, 8), "different shapes"),
        (torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), r"shape \(2, 1, 8, 8\)"),
        (torch.rand(8), torch.rand(8), r"shape \(8,\)"),
        (torch.rand(0, 8, 8), torch.rand(0, 8, 8), "non-empty"),
        (torch.rand(2, 8, 8, dtype=torch.complex64), torch.rand(2, 8, 8), "complex"),
    ],
)
def test_bad_maps(a, b, match):
    with pytest.raises(SaliencyError, match=match):
        similarity(a, b, "pearson")


@pytest.mark.parametrize("metric", ["ssim", "hog"])
def test_2d_metrics_refuse_1d_maps(metric):
    with pytest.raises(SaliencyError, match=f"{metric}.*2-D maps"):
        similarity(torch.rand(2, 64), torch.rand(2, 64), metric)


def test_ssim_small_maps_error_like_skimage():
    a, b = torch.rand(2, 6, 20), torch.rand(2, 6, 20)
    with pytest.raises(ValueError, match="win_size exceeds image extent"):
        structural_similarity(a[0].numpy(), b[0].numpy(), data_range=1)
    with pytest.raises(SaliencyError, match="6x20 are smaller than the 7x7 window"):
        ssim(a, b)
    assert torch.isfinite(ssim(a, b, win_size=5)).all()
    for bad in (4, 1, 7.0, True):
        with pytest.raises(SaliencyError, match="win_size"):
            ssim(a, b, win_size=bad)


def test_hog_bad_options():
    a, b = torch.rand(1, 20, 40), torch.rand(1, 20, 40)
    with pytest.raises(SaliencyError, match="at least 24x24"):
        hog(a, b)
    with pytest.raises(SaliencyError, match="pixels_per_cell"):
        hog(a, b, pixels_per_cell=(0, 4))
    with pytest.raises(SaliencyError, match="'spearman' or 'pearson'"):
        hog(a, b, pixels_per_cell=4, correlation="kendall")


@pytest.mark.parametrize("k", [0, -1, 101, "10", True])
def test_topk_iou_bad_k(k):
    with pytest.raises(SaliencyError, match="k is a percentage"):
        topk_iou(torch.rand(1, 10), torch.rand(1, 10), k=k)


# --- package surface and devices ------------------------------------------------------------


def test_package_similarity_is_callable_after_submodule_import():
    import pytest_saliency.similarities  # noqa: F401  (rebinds the package attribute)

    a, b = make_maps("random", (2, 16, 16))
    torch.testing.assert_close(ps.similarity(a, b, "pearson"), pearson(a, b))
    assert ps.metrics() == ALL


def test_inputs_untouched():
    a, b = make_maps("random", (2, 24, 24), torch.float32)
    a0, b0 = a.clone(), b.clone()
    for metric in ALL:
        similarity(a, b, metric)
    assert torch.equal(a, a0) and torch.equal(b, b0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("metric", ALL)
def test_cuda_matches_cpu(metric):
    a, b = make_maps("ties", (3, 32, 40), torch.float32)
    got = similarity(a.cuda(), b.cuda(), metric)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), similarity(a, b, metric), atol=1e-6, rtol=0)


@pytest.mark.parametrize("metric", ALL)
def test_prepared_reference_equals_similarity_for_every_compared_set(metric):
    """A Reference scores many compared sets against one reference, as similarity does (float32
    ssim sums its windows in another grouping there: equal up to float32 rounding)."""
    a, b = make_maps("smooth", (5, 30, 36), torch.float32)
    _, c = make_maps("ties", (5, 30, 36), torch.float32, seed=4)
    prepared = Reference(a, metric)
    atol = 1e-6 if metric == "ssim" else 1e-12
    for other in (b, c, a):
        got = prepared(other)
        assert torch.equal(got.isnan(), similarity(a, other, metric).isnan())
        torch.testing.assert_close(got, similarity(a, other, metric), rtol=0, atol=atol,
                                   equal_nan=True)  # fmt: skip
    np.testing.assert_allclose(prepared(b).double().numpy(), reference(metric, a, b), atol=1e-5)


def test_prepared_reference_checks_what_it_is_given():
    a, _ = make_maps("random", (4, 20, 20))
    with pytest.raises(SaliencyError, match=r"different shapes \(4, 20, 20\) and \(3, 20, 20\)"):
        Reference(a, "spearman")(a[:3])
    with pytest.raises(SaliencyError, match="'ssimm'.*'ssim'"):
        Reference(a, "ssimm")
    with pytest.raises(SaliencyError, match="unknown option.*'k'"):
        Reference(a, "spearman", k=3)
    with pytest.raises(SaliencyError, match="b must be a torch.Tensor"):
        Reference(a, "pearson")(a.numpy())


def test_spearman_abs_takes_bool_and_integer_maps():
    a = torch.tensor([[1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 1, 0, 1, 0, 0]], dtype=torch.bool)
    np.testing.assert_allclose(similarity(a, b, "spearman_abs").numpy(),
                               reference("spearman_abs", a, b), atol=1e-12)  # fmt: skip
    a, b = a.long() - 1, b.long()
    np.testing.assert_allclose(similarity(a, b, "spearman_abs").numpy(),
                               reference("spearman_abs", a, b), atol=1e-12)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_ranks_equal_scipy_on_awkward_values(dtype):
    """Ranks through the sort used on CPU (float32 values packed with their index into one
    integer): signs, -0.0 next to 0.0, runs of ties, infinities, subnormals."""
    from pytest_saliency.similarities import _argsort_rows, _ranks

    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 300, generator=g)
    x[:, ::3] = x[:, ::3].relu()  # runs of zeros
    x[:, 1::7] = x[:, 1::7].round()  # runs of small integers
    x[0, :4] = torch.tensor([-0.0, 0.0, -0.0, 0.0])
    x[1, :4] = torch.tensor([math.inf, -math.inf, 1e-45, -1e-45])
    x[2] = 1.0  # a constant row
    x = x.to(dtype)
    want = np.stack([scipy.stats.rankdata(row) for row in x.double().numpy()])
    np.testing.assert_array_equal(_ranks(x).numpy(), want)
    # float32 rows go through the packed integer sort: a stable order of the values.
    order = _argsort_rows(x.float()).numpy()
    np.testing.assert_array_equal(order, np.argsort(x.float().numpy(), axis=1, kind="stable"))


@pytest.mark.parametrize("kind", ["subnormal_range", "near_float32_max"])
def test_float32_ssim_on_extreme_ranges(kind):
    """Maps whose value range is subnormal (1 / range overflows) or whose values are near the
    float32 maximum (their float32 sum overflows) still score as scikit-image does."""
    g = torch.Generator().manual_seed(8)
    a = {
        "subnormal_range": lambda: 1e-40 * torch.randn(2, 32, 32, generator=g),
        "near_float32_max": lambda: 3e37 * (1 + torch.rand(2, 100, 100, generator=g)),
    }[kind]()
    b = torch.randn(a.shape, generator=g)
    want = reference("ssim", a, b)
    np.testing.assert_allclose(ssim(a, b).double().numpy(), want, atol=1e-6)
    np.testing.assert_allclose(Reference(a, "ssim")(b).double().numpy(), want, atol=1e-6)
    np.testing.assert_allclose(Reference(b, "ssim")(a).double().numpy(), want, atol=1e-6)
