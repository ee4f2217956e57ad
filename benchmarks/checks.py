"""Time smooth and efficient MPRT beside their floors and quantus, side by side in one run.

For ``resnet18`` (weights=None, eval) on N x 3 x 32 x 32 inputs, every module with parameters as
a step (41 steps, bottom-up, cascading):

- smooth MPRT with ``noise_samples=S``: the floor is S x (steps + 1) forward+backward passes of
  the N inputs back to back (forward, target logits, ``autograd.grad`` w.r.t. the inputs);
  ours is ``ps.smooth_randomization(model, x, "gradient", noise_samples=S)`` (the S noisy copies
  batched with the inputs, one pass per model state), then gradient and input x gradient
  together, sharing those passes; quantus ``SmoothMPRT(nr_samples=S)`` explains with
  ``quantus.explain`` (captum's Gradient, InputXGradient) on the same model, inputs and
  targets, once per method (it re-initialises the same 41 modules in the same order).
- efficient MPRT: the floor is two explanations (forward+backward of the N inputs on the
  trained and on the randomized model) plus the entropy of the 2N maps; ours is
  ``ps.efficient_randomization(model, x, "gradient")``; quantus ``EfficientMPRT`` as above.

Each configuration runs ``--repeats`` times, each time divided by the mean of its floor timed
just before and just after it; the median ratio is printed.

    OMP_NUM_THREADS=2 python benchmarks/checks.py --repeats 3
    OMP_NUM_THREADS=2 python benchmarks/checks.py --only efficient --size 224
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
import warnings

import torch
import torchvision

import pytest_saliency as ps
from pytest_saliency.checks.efficient import discrete_entropy


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-quantus", action="store_true")
    parser.add_argument(
        "--only",
        choices=("smooth", "efficient"),
        default=None,
        help="time one check only (e.g. efficient MPRT on large inputs)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(args.n, 3, args.size, args.size)
    with torch.no_grad():
        targets = model(x).argmax(1)
    steps = sum(1 for m in model.modules() if hasattr(m, "reset_parameters"))

    def fwd_bwd() -> None:
        inp = x.clone().requires_grad_(True)
        out = model(inp)
        torch.autograd.grad(out.gather(1, targets[:, None]).sum(), inp)

    def smooth_floor() -> None:
        for _ in range(args.samples * (steps + 1)):
            fwd_bwd()

    def efficient_floor() -> None:
        fwd_bwd()
        fwd_bwd()
        maps = torch.rand(2 * args.n, args.size, args.size)
        discrete_entropy(maps, 100)

    def quantus_smooth(methods=("Gradient",)) -> None:
        import quantus

        for method in methods:
            metric = quantus.SmoothMPRT(nr_samples=args.samples, disable_warnings=True)
            with contextlib.redirect_stdout(io.StringIO()), torch.random.fork_rng():
                metric(model=model, x_batch=x.numpy(), y_batch=targets.numpy(), a_batch=None,
                       explain_func=quantus.explain, batch_size=len(x),
                       explain_func_kwargs={"method": method, "xai_lib": "captum",
                                            "reduce_axes": (1,)},
                       device="cpu", softmax=False, channel_first=True)  # fmt: skip

    def quantus_efficient() -> None:
        import quantus

        metric = quantus.EfficientMPRT(disable_warnings=True)
        with contextlib.redirect_stdout(io.StringIO()), torch.random.fork_rng():
            metric(model=model, x_batch=x.numpy(), y_batch=targets.numpy(), a_batch=None,
                   explain_func=quantus.explain, batch_size=len(x),
                   explain_func_kwargs={"method": "Gradient", "xai_lib": "captum",
                                        "reduce_axes": (1,)},
                   device="cpu", softmax=True, channel_first=True)  # fmt: skip

    two = ["gradient", "input_x_gradient"]
    rows = [
        ("smooth MPRT, gradient", smooth_floor,
         lambda: ps.smooth_randomization(model, x, "gradient", noise_samples=args.samples)),
        ("smooth MPRT, 2 methods together", smooth_floor,
         lambda: ps.smooth_randomization(model, x, two, noise_samples=args.samples)),
        ("efficient MPRT, gradient", efficient_floor,
         lambda: ps.efficient_randomization(model, x, "gradient")),
    ]  # fmt: skip
    if not args.no_quantus:
        rows.insert(2, ("quantus SmoothMPRT, Gradient", smooth_floor, quantus_smooth))
        rows.insert(
            3,
            (
                "quantus SmoothMPRT, 2 methods",
                smooth_floor,
                lambda: quantus_smooth(("Gradient", "InputXGradient")),
            ),
        )
        rows.append(("quantus EfficientMPRT, Gradient", efficient_floor, quantus_efficient))
    if args.only:
        rows = [r for r in rows if args.only in r[0].lower()]
    print(f"resnet18, {args.n}x3x{args.size}x{args.size}, {steps} steps, S={args.samples}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    results: dict[str, list[float]] = {}
    floors: dict[str, list[float]] = {}
    warnings.simplefilter("ignore")
    for _ in range(args.repeats):
        for name, floor, run in rows:
            before = seconds(floor)
            took = seconds(run)
            after = seconds(floor)
            results.setdefault(name, []).append(took / ((before + after) / 2))
            floors.setdefault(name, []).append((before + after) / 2)
    for name, _, _ in rows:
        print(f"{name:34s} {statistics.median(results[name]):6.2f}x its floor "
              f"(floor {statistics.median(floors[name]):.2f} s)")  # fmt: skip
    if not args.no_quantus:
        pairs = [
            ("smooth MPRT, gradient", "quantus SmoothMPRT, Gradient"),
            ("smooth MPRT, 2 methods together", "quantus SmoothMPRT, 2 methods"),
            ("efficient MPRT, gradient", "quantus EfficientMPRT, Gradient"),
        ]
        for ours, theirs in pairs:
            if ours not in results or theirs not in results:
                continue
            speedup = statistics.median(results[theirs]) / statistics.median(results[ours])
            print(f"{ours}: {speedup:.1f}x faster than quantus")


if __name__ == "__main__":
    main()
