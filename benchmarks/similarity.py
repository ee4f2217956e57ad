"""Time the batched similarity metrics against the per-sample scipy / scikit-image loop.

Both sides get the same N maps of size x size; ours runs once on the whole batch, the peer once
per sample (``structural_similarity`` on the min-max normalised maps with ``data_range=1``,
``scipy.stats.spearmanr`` on the flattened maps, ``skimage.feature.hog`` + ``spearmanr``).
Each time is the best of ``--repeats`` runs after a warm-up; the largest absolute difference
between the two sides' scores is printed as a check. The peer always runs on the CPU.

    OMP_NUM_THREADS=1 python benchmarks/similarity.py --batch 64 --size 224 --repeats 3
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import scipy.stats
import torch
from skimage.feature import hog as skimage_hog
from skimage.metrics import structural_similarity

from pytest_saliency.similarities import similarity


def best_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def minmax(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / (x.max() - x.min())


PEERS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "ssim": lambda x, y: structural_similarity(minmax(x), minmax(y), data_range=1),
    "spearman": lambda x, y: scipy.stats.spearmanr(x.ravel(), y.ravel())[0],
    "hog": lambda x, y: scipy.stats.spearmanr(skimage_hog(minmax(x)), skimage_hog(minmax(y)))[0],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--metrics", nargs="+", default=["ssim", "spearman"], choices=list(PEERS))
    args = parser.parse_args()

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.size, args.size)
    a = torch.randn(shape, generator=g)
    b = a + torch.randn(shape, generator=g)
    a_dev, b_dev = a.to(device), b.to(device)
    a_np, b_np = a.double().numpy(), b.double().numpy()

    print(
        f"{args.batch} maps of {args.size}x{args.size} float32, ours on {device} "
        f"(torch threads: {torch.get_num_threads()}), peer loop on CPU; best of {args.repeats}"
    )
    header = ("metric", "ours (s)", "peer loop (s)", "speedup", "max |diff|")
    print("{:10s} {:>10s} {:>14s} {:>8s} {:>11s}".format(*header))
    for metric in args.metrics:
        ours_s, peer_s, diff = compare(metric, a_dev, b_dev, a_np, b_np, args.repeats, sync)
        print(f"{metric:10s} {ours_s:10.3f} {peer_s:14.3f} {peer_s / ours_s:7.1f}x {diff:11.1e}")


def compare(metric, a_dev, b_dev, a_np, b_np, repeats, sync) -> tuple[float, float, float]:
    """(our seconds, the peer loop's seconds, largest |score difference|) for one metric."""
    peer = PEERS[metric]
    ours_s = best_seconds(lambda: similarity(a_dev, b_dev, metric), repeats, sync)
    peer_s = best_seconds(lambda: [peer(x, y) for x, y in zip(a_np, b_np)], repeats, lambda: None)
    ours = similarity(a_dev, b_dev, metric).double().cpu().numpy()
    theirs = np.array([peer(x, y) for x, y in zip(a_np, b_np)])
    return ours_s, peer_s, float(np.abs(ours - theirs).max())


if __name__ == "__main__":
    main()
