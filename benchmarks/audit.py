"""Time a cascading randomization audit of five plain-autograd methods, beside floor and quantus.

One run prints, for ``resnet18`` (weights=None, eval) on 8x3x64x64 inputs and every module with
parameters (41 steps, top-down, cascading), the wall time of (``--model vit_b_16``: torchvision's
ViT-B/16 on 64x64 inputs, 77 steps, gradient and Grad-CAM, no quantus):

- the floor: (steps + 1) forward+backward passes back to back (forward, target logits,
  ``autograd.grad`` w.r.t. the inputs), timed right before and right after each configuration;
- ours, the five methods in one ``ps.parameter_randomization(model, x, [methods])`` call, which
  shares one forward+backward per model state across them;
- ours, the same five methods one call each;
- quantus ``MPRT`` once per method on the same model, inputs, targets and layers (quantus
  re-initialises the same 41 modules in the same order). Its explanations come from
  ``quantus.explain`` with the captum backend where captum has the method (Saliency with
  abs=False, InputXGradient, LayerGradCam on ``layer4``); captum and zennit have no Grad-CAM++ or
  FullGrad, so those two use pytorch-grad-cam's through an ``explain_func``.

Both sides score with Spearman rank correlation. Each configuration runs ``--repeats`` times,
each time divided by the mean of the floors timed just before and just after it, and the median
of these ratios is reported.

    OMP_NUM_THREADS=2 python benchmarks/audit.py --repeats 3
    python benchmarks/audit.py --device cuda --no-quantus --phases

``--phases`` adds one more run of the five methods together, timed phase by phase (the GPU is
synchronised around each phase, so the phases add up to a little more than an untimed run).
On CUDA, every configuration runs with cuDNN deterministic and TF32 off, as the audits do.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
import warnings
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch
import torchvision

import pytest_saliency as ps

METHODS = ["gradient", "input_x_gradient", "gradcam", "gradcam++", "fullgrad"]
# Per model: the methods audited together, and how the model is built (weights=None).
MODELS = {
    "resnet18": (METHODS, lambda size: torchvision.models.resnet18(weights=None)),
    "vit_b_16": (["gradient", "gradcam"], lambda size: vit_b_16(size)),
}


def vit_b_16(size: int) -> torch.nn.Module:
    """torchvision's ViT-B/16 on ``size`` inputs; its head starts at zero (every gradient would
    be zero), so it is drawn like the other linear layers."""
    model = torchvision.models.vit_b_16(weights=None, image_size=size)
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


def sync() -> None:
    """Wait for the GPU (if any): a timer must not stop before the work it times."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def seconds(fn: Callable[[], object]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def phase_seconds(run: Callable[[], object]) -> dict[str, float]:
    """One call of ``run`` (an audit), its wall time split by phase."""
    from pytest_saliency.checks import randomization as audit

    totals: dict[str, float] = defaultdict(float)

    def timed(label, fn):
        def wrapper(*args, **kwargs):
            sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            totals[label] += time.perf_counter() - start
            return out

        return wrapper

    base = audit.Comparer

    class TimedComparer(base):
        __init__ = timed("similarity: prepare the reference maps", base.__init__)
        score = timed("similarity: score each step's maps", base.score)

    saved = {name: getattr(audit, name) for name in ("randomize", "explain_step", "to_cpu")}
    audit.randomize = timed("re-initialise the weights", audit.randomize)
    audit.explain_step = timed("maps: forward+backward+readouts", audit.explain_step)
    audit.to_cpu = timed("copy maps to host memory", audit.to_cpu)
    audit.Comparer = TimedComparer
    try:
        total = seconds(run)
    finally:
        for name, value in saved.items():
            setattr(audit, name, value)
        audit.Comparer = base
    totals["the rest (copy of the model, plan, results)"] = total - sum(totals.values())
    totals["total"] = total
    return dict(totals)


def forward_backward(model, x, targets) -> Callable[[], object]:
    def run():
        xg = x.detach().requires_grad_(True)
        score = model(xg).gather(1, targets[:, None]).sum()
        return torch.autograd.grad(score, xg)[0]

    return run


def pytorch_grad_cam_explain(cls):
    """A quantus ``explain_func`` computing a pytorch-grad-cam method on ``model.layer4``."""

    def explain(model, inputs, targets, **kwargs):
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        x = torch.as_tensor(inputs, dtype=torch.float32)
        wanted = [ClassifierOutputTarget(int(t)) for t in targets]
        layers = [] if cls.__name__ == "FullGrad" else [model.layer4]
        # FullGrad prints a notice on every construction.
        with contextlib.redirect_stdout(io.StringIO()), cls(model, target_layers=layers) as cam:
            return cam(input_tensor=x, targets=wanted)[:, None]

    return explain


def mapped(explain_func, fn):
    """``explain_func`` followed by ``fn`` on its maps."""

    def explain(model, inputs, targets, **kwargs):
        return fn(explain_func(model, inputs, targets, **kwargs))

    return explain


def relu(maps: np.ndarray) -> np.ndarray:
    return np.maximum(maps, 0)


def quantus_runs(model, x, targets) -> tuple[dict[str, Callable[[], object]], str]:
    """One MPRT call per method, or the reason quantus cannot run here."""
    try:
        import pytorch_grad_cam as pgc
        import quantus
    except Exception as exc:  # noqa: BLE001 (any import failure is reported, not raised)
        return {}, f"quantus unavailable: {type(exc).__name__}: {exc}"
    size = tuple(x.shape[2:])
    captum = {"xai_lib": "captum", "reduce_axes": (1,)}
    kwargs = {
        "gradient": (quantus.explain, {**captum, "method": "Gradient"}),
        "input_x_gradient": (quantus.explain, {**captum, "method": "InputXGradient"}),
        "gradcam": (mapped(quantus.explain, relu), {**captum, "method": "LayerGradCam",
                                      "gc_layer": "model.layer4", "interpolate": size}),
        "gradcam++": (pytorch_grad_cam_explain(pgc.GradCAMPlusPlus), {}),
        "fullgrad": (pytorch_grad_cam_explain(pgc.FullGrad), {}),
    }  # fmt: skip
    xs, ys = x.numpy(), targets.numpy()

    def mprt(name, explain_func=None):
        explain_func = explain_func or kwargs[name][0]
        explain_kwargs = kwargs[name][1]
        metric = quantus.MPRT(
            layer_order="top_down",
            similarity_func=quantus.similarity_func.correlation_spearman,
            display_progressbar=False,
            disable_warnings=True,
        )
        return lambda: metric(
            model=model, x_batch=xs, y_batch=ys, a_batch=None, device="cpu",
            explain_func=explain_func, explain_func_kwargs=explain_kwargs, batch_size=len(xs),
        )  # fmt: skip

    runs = {name: mprt(name) for name in METHODS}
    note = f"quantus {quantus.__version__}"
    try:
        runs["gradcam"]()
    except AssertionError as exc:
        # Grad-CAM is ReLU(sum_k w_k A_k): on a randomized resnet18 every map of the batch can
        # be zero (and without the ReLU, which quantus' LayerGradCam call leaves out, all
        # negative), and quantus' input checks then abort the whole MPRT run. The same work
        # with |LayerGradCam| instead keeps the timing comparable.
        runs["gradcam"] = mprt("gradcam", mapped(quantus.explain, np.abs))
        note += (
            f"; quantus MPRT aborts on Grad-CAM (AssertionError: {exc}), so its gradcam run "
            "times |LayerGradCam| (same passes, no ReLU)"
        )
    return runs, note


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet18")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-quantus", action="store_true", help="skip the quantus runs")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--phases", action="store_true", help="time each phase of one audit")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    methods, build = MODELS[args.model]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build(args.size).eval()
        x = torch.randn(args.batch, 3, args.size, args.size)
    model, x = model.to(device), x.to(device)
    if device.type == "cuda":
        exact_gpu_kernels()
    with torch.no_grad():
        targets = model(x).argmax(dim=1)

    def together():
        return ps.parameter_randomization(model, x, methods, similarity="spearman", target=targets)

    def one_at_a_time():
        for name in methods:
            ps.parameter_randomization(model, x, name, similarity="spearman", target=targets)

    steps = len(together()[0].layers)
    fb = forward_backward(model, x, targets)
    fb()
    k = len(methods)
    together_name = f"ours, {k} methods together"
    runs: dict[str, Callable[[], object]] = {
        together_name: together,
        f"ours, {k} methods one at a time": one_at_a_time,
    }
    note = "quantus skipped (--no-quantus)"
    if args.model != "resnet18":
        note = "quantus skipped (its comparison is set up for resnet18)"
    elif not args.no_quantus and device.type != "cpu":
        note = "quantus skipped (its MPRT runs here on CPU inputs only)"
    elif not args.no_quantus:
        found, note = quantus_runs(model, x, targets)
        if found:
            runs["quantus MPRT, 5 calls (one per method)"] = lambda: [r() for r in found.values()]

    def floor_seconds() -> float:
        # Back to back, like the audit's own steps: a median of single passes would leave
        # out the slow passes that a 42-pass run on a shared machine always has some of.
        return seconds(lambda: [fb() for _ in range(steps + 1)])

    # Each configuration is timed between two floors, and its ratio is to their mean, so that
    # load drifting over the run moves both sides of a ratio alike.
    times: dict[str, list[float]] = {name: [] for name in ["floor", *runs]}
    ratios: dict[str, list[float]] = {name: [] for name in ["floor", *runs]}
    ratios["single-pass floor"] = []
    for _ in range(args.repeats):
        after = floor_seconds()
        for name, run in runs.items():
            before, took, after = after, seconds(run), floor_seconds()
            floor = (before + after) / 2
            times["floor"].append(floor)
            ratios["floor"].append(1.0)
            times[name].append(took)
            ratios[name].append(took / floor)
            if name == together_name:
                single = (steps + 1) * statistics.median(seconds(fb) for _ in range(5))
                ratios["single-pass floor"].append(took / single)
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = {name: statistics.median(r) for name, r in ratios.items()}

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.model} (weights=None, eval), batch {args.batch}x3x{args.size}x{args.size}, "
          f"{where}, torch {torch.__version__}, {torch.get_num_threads()} threads; cascading "
          f"top-down over {steps} modules, spearman; median of {args.repeats} rounds; "
          f"{note}")  # fmt: skip
    print(f"methods: {', '.join(methods)}\n")
    print(f"{'configuration':<42}{'seconds':>9}{'/ floor':>9}{'/ together':>12}")
    for name, value in median.items():
        label = f"floor: ({steps} + 1) x forward+backward" if name == "floor" else name
        print(f"{label:<42}{value:9.2f}{ratio[name]:8.2f}x"
              f"{ratio[name] / ratio[together_name]:11.2f}x")  # fmt: skip
    quantus_name = "quantus MPRT, 5 calls (one per method)"
    verdict = {True: "met", False: "NOT met"}
    floor_ratio = ratio[together_name]
    print(f"\ntarget: {k} methods together <= 1.5x floor: {floor_ratio:.2f}x "
          f"({verdict[floor_ratio <= 1.5]})")  # fmt: skip
    print(f"  (the same runs against (steps + 1) x the median of 5 single passes, the floor "
          f"this script used before: {ratio['single-pass floor']:.2f}x)")  # fmt: skip
    if quantus_name in ratio:
        speedup = ratio[quantus_name] / floor_ratio
        print(f"target: quantus MPRT / ours together >= 3x: {speedup:.1f}x "
              f"({verdict[speedup >= 3]})")  # fmt: skip
    if args.phases:
        phases = phase_seconds(together)
        total = phases.pop("total")
        print(f"\nphases of one audit, {k} methods together ({total:.3f} s in all):")
        for label, value in phases.items():
            print(f"  {label:<46}{value:8.3f} s {100 * value / total:5.1f}%")


def exact_gpu_kernels() -> None:
    """cuDNN deterministic and no TF32 for every configuration, as inside our audits."""
    from pytest_saliency.engine.state import exact_kernels

    exact_kernels().__enter__()  # for the rest of the script


if __name__ == "__main__":
    main()
