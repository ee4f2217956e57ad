"""Time methods as multiples of a forward+backward timed right around each call.

For comparing two versions of pytest_saliency on the same machine: run this script once per
checkout, alternately, with ``PYTHONPATH`` pointing at the checkout, e.g.

    for v in /tmp/old /path/to/repo; do PYTHONPATH=$v OMP_NUM_THREADS=2 \\
        python benchmarks/versus.py --methods rectgrad,lrp_epsilon,lrp_zplus; done

Each method's ratio is the median over ``--repeats`` calls of the call's time divided by the
mean of one plain forward+backward timed just before and one just after it (resnet18,
weights=None, eval, 16x3x224x224 by default).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import pytest_saliency as ps


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="rectgrad,lrp_epsilon,lrp_zplus")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.resnet18(weights=None).eval()
        x = torch.randn(args.batch, 3, args.size, args.size)
    with torch.no_grad():
        targets = model(x).argmax(dim=1)

    def forward_backward():
        xg = x.detach().requires_grad_(True)
        torch.autograd.grad(model(xg).gather(1, targets[:, None]).sum(), xg)

    forward_backward()
    results = []
    for method in args.methods.split(","):
        run = lambda m=method: ps.explain(model, x, m, target=targets)  # noqa: E731
        run()
        ratios = []
        for _ in range(args.repeats):
            before, took, after = seconds(forward_backward), seconds(run), seconds(forward_backward)
            ratios.append(took / ((before + after) / 2))
        results.append(f"{method} {statistics.median(ratios):.2f}")
    print(f"{ps.__file__}: " + " | ".join(results))


if __name__ == "__main__":
    main()
