"""Peak memory of a cascading randomization audit, with and without ``batch_size``.

Each configuration runs in a fresh Python process, so that one peak does not hide the next:

- on CPU the peak is the process's maximum resident set size (``resource.getrusage``), printed
  beside the peak of a process that only builds the model and inputs (the difference is what
  the audit added); the resident size after every step shows whether memory grows across steps;
- on CUDA (``--device cuda``) the peak is ``torch.cuda.max_memory_allocated`` and the step
  values are ``torch.cuda.memory_allocated`` after each step, which must not grow.

    OMP_NUM_THREADS=2 python benchmarks/memory.py --batch 32 --size 112
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

METHODS = ["gradient", "input_x_gradient", "gradcam", "gradcam++", "fullgrad"]
MB = 1024 * 1024


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args: argparse.Namespace) -> dict:
    """Run one configuration in this process and return its measurements."""
    import torch
    import torchvision

    import pytest_saliency as ps
    from pytest_saliency.checks import randomization

    device = torch.device(args.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.resnet18(weights=None).eval().to(device)
        x = torch.randn(args.batch, 3, args.size, args.size).to(device)
    cuda = device.type == "cuda"
    steps: list[float] = []
    if args.config != "load":
        shared = randomization.explain_step

        def measured(*a, **kw):  # memory held after each step's maps are made
            maps = shared(*a, **kw)
            if cuda:
                torch.cuda.synchronize(device)
            steps.append((torch.cuda.memory_allocated(device) if cuda else resident_bytes()) / MB)
            return maps

        randomization.explain_step = measured
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        batch_size = None if args.config == "none" else int(args.config)
        layers = None if args.every_layer else "blocks"
        ps.parameter_randomization(model, x, METHODS, layers=layers, batch_size=batch_size)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"peak_rss_mb": rss / MB, "cuda_peak_mb": peak and peak / MB, "steps_mb": steps}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="none,8,2", help="batch_size values (none = whole)")
    parser.add_argument("--every-layer", action="store_true", help="every module, not blocks")
    parser.add_argument("--config", help=argparse.SUPPRESS)  # internal: run one configuration
    args = parser.parse_args(argv)
    if args.config:
        print(json.dumps(child(args)))
        return
    common = [f"--batch={args.batch}", f"--size={args.size}", f"--device={args.device}"]
    common += ["--every-layer"] if args.every_layer else []
    rows = {}
    for config in ["load", *args.sizes.split(",")]:
        out = subprocess.run(
            [sys.executable, __file__, f"--config={config}", *common],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        rows[config] = json.loads(out.stdout.strip().splitlines()[-1])
    layers = "every module" if args.every_layer else "blocks"
    print(f"resnet18 (weights=None), {args.batch}x3x{args.size}x{args.size}, {args.device}, "
          f"cascading audit over {layers} of {len(METHODS)} methods together "
          f"({', '.join(METHODS)}); one fresh process per row\n")  # fmt: skip
    kept = len(METHODS) * args.batch * args.size * args.size * 4 / MB
    print(f"the result keeps every step's maps by design: {kept:.1f} MB per step\n")
    base = rows["load"]["peak_rss_mb"]
    print(f"{'batch_size':<12}{'peak RSS MB':>12}{'audit adds':>12}{'CUDA peak MB':>14}"
          f"   memory after each step, MB (growth = last - first)")  # fmt: skip
    for config, row in rows.items():
        label = "model only" if config == "load" else config
        added = "" if config == "load" else f"{row['peak_rss_mb'] - base:12.0f}"
        cuda = "-" if row["cuda_peak_mb"] is None else f"{row['cuda_peak_mb']:.0f}"
        steps = row["steps_mb"]
        trail = ""
        if steps:
            trail = " ".join(f"{s:.0f}" for s in steps) + f"  (growth {steps[-1] - steps[0]:+.1f})"
        print(f"{label:<12}{row['peak_rss_mb']:12.0f}{added:>12}{cuda:>14}   {trail}")


if __name__ == "__main__":
    main()
