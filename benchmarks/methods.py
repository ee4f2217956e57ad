"""Time every saliency method as a multiple of one plain forward+backward, beside its peers.

The baseline is what every gradient method must do at least once: forward the batch, select
each sample's target logit, and ``torch.autograd.grad`` their sum w.r.t. the input. A ratio of
1.0 means "as cheap as one gradient"; integrated gradients and smoothgrad take one pass per path
point or noise sample, so they sit near their ``steps`` / ``samples``.

Peers run on the same model, batch and targets, with their counterpart of our defaults:
captum (Saliency, InputXGradient, IntegratedGradients, NoiseTunnel, GuidedBackprop,
Deconvolution, LayerGradCam), pytorch-grad-cam (GradCAM, GradCAMPlusPlus, FullGrad) and zennit
(Epsilon, ZPlus, AlphaBeta layer-map composites with the ResNetCanonizer). A peer that is not
installed is skipped.

    OMP_NUM_THREADS=2 python benchmarks/methods.py --batch 16 --size 224 --repeats 3
    OMP_NUM_THREADS=2 python benchmarks/methods.py --model vit_b_16 --batch 8 \
        --methods gradient,lrp_epsilon,lrp_zplus,gradcam

On ``vit_b_16`` the peer is lxt's CP-LRP for torchvision's ViT (its LayerNorm, GELU and
``nn.MultiheadAttention`` patches with zennit's epsilon rule on Linear and Conv layers), run in a
child process (``_lxt_vit.py``) because lxt patches torch's classes.

Ratios, not seconds, are the result: each is the median over rounds of one call's wall time
divided by a baseline call timed beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torchvision
from torch import nn

import pytest_saliency as ps

Run = Callable[[], object]


def sync() -> None:
    """Wait for the GPU (if any): a timer must not stop before the work it times."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def seconds(fn: Run) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def median_ratio(fn: Run, base: Run, repeats: int) -> float:
    """Median over ``repeats`` rounds of ``time(fn) / time(base)``, after one warm-up call.

    Each round times the baseline right before and right after ``fn`` and divides by the
    faster of the two, so that load from other processes drifting over the run (this machine
    is shared) moves both sides of a ratio together.
    """
    fn()
    ratios = []
    for _ in range(repeats):
        before = seconds(base)
        took = seconds(fn)
        after = seconds(base)
        ratios.append(took / min(before, after))
    return statistics.median(ratios)


def baseline(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> Run:
    def run():
        xg = x.detach().requires_grad_(True)
        score = model(xg).gather(1, targets[:, None]).sum()
        return torch.autograd.grad(score, xg)[0]

    return run


def captum_peers(model, x, targets) -> dict[str, list[tuple[str, Run]]]:
    try:
        from captum import attr
    except ImportError:
        return {}
    n = len(x)
    sigma = 0.15 * float(x.max() - x.min())  # captum takes one sigma, ours is per sample

    def call(make, **kw):
        return lambda: make().attribute(x.clone(), target=targets, **kw)

    return {
        "gradient": [("captum Saliency", call(lambda: attr.Saliency(model), abs=False))],
        "input_x_gradient": [("captum InputXGradient", call(lambda: attr.InputXGradient(model)))],
        "integrated_gradients": [("captum IntegratedGradients", call(
            lambda: attr.IntegratedGradients(model), n_steps=32, method="riemann_trapezoid",
            internal_batch_size=n))],
        "smoothgrad": [("captum NoiseTunnel(Saliency)", call(
            lambda: attr.NoiseTunnel(attr.Saliency(model)), nt_type="smoothgrad", nt_samples=16,
            nt_samples_batch_size=n, stdevs=sigma, abs=False))],
        "guided_backprop": [("captum GuidedBackprop", call(lambda: attr.GuidedBackprop(model)))],
        "deconvnet": [("captum Deconvolution", call(lambda: attr.Deconvolution(model)))],
        "gradcam": [("captum LayerGradCam", call(lambda: attr.LayerGradCam(model, model.layer4)))],
    }  # fmt: skip


def gradcam_peers(model, x, targets) -> dict[str, list[tuple[str, Run]]]:
    try:
        import pytorch_grad_cam as pgc
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        return {}
    wanted = [ClassifierOutputTarget(int(t)) for t in targets]

    def call(cls, layers):
        def run():
            # FullGrad prints a notice on every construction; keep the table readable.
            with contextlib.redirect_stdout(io.StringIO()), cls(model, target_layers=layers) as cam:
                return cam(input_tensor=x.clone(), targets=wanted)

        return run

    return {
        "gradcam": [("grad-cam GradCAM", call(pgc.GradCAM, [model.layer4[-1]]))],
        "gradcam++": [("grad-cam GradCAMPlusPlus", call(pgc.GradCAMPlusPlus, [model.layer4[-1]]))],
        "fullgrad": [("grad-cam FullGrad", call(pgc.FullGrad, []))],
    }


def zennit_peers(model, x, targets) -> dict[str, list[tuple[str, Run]]]:
    try:
        from zennit.attribution import Gradient
        from zennit.composites import LayerMapComposite, layer_map_base
        from zennit.rules import AlphaBeta, Epsilon, ZPlus
        from zennit.torchvision import ResNetCanonizer
        from zennit.types import Convolution
    except ImportError:
        return {}
    with torch.no_grad():
        classes = model(x[:1]).shape[1]
    one_hot = torch.eye(classes, device=x.device)[targets]

    def call(rule):
        def run():
            composite = LayerMapComposite(
                layer_map=layer_map_base() + [(Convolution, rule), (nn.Linear, rule)],
                canonizers=[ResNetCanonizer()],
            )
            with Gradient(model=model, composite=composite) as attributor:
                return attributor(x.clone(), one_hot)[1]

        return run

    return {
        "lrp_epsilon": [("zennit Epsilon", call(Epsilon(epsilon=1e-6)))],
        "lrp_zplus": [("zennit ZPlus", call(ZPlus()))],
        "lrp_alpha_beta": [("zennit AlphaBeta(2, 1)", call(AlphaBeta(alpha=2.0, beta=1.0)))],
    }


def lxt_peers(args) -> dict[str, list[tuple[str, float | None]]]:
    """lxt's ratio, measured in a child process (see the module docstring)."""
    try:
        import lxt  # noqa: F401
    except ImportError:
        return {}
    script = str(__import__("pathlib").Path(__file__).with_name("_lxt_vit.py"))
    done = subprocess.run(
        [sys.executable, script, str(args.batch), str(args.size), str(args.repeats), args.device],
        capture_output=True,
        text=True,
    )
    ratio = float(done.stdout.split()[-1]) if done.returncode == 0 else None
    return {"lrp_epsilon": [("lxt CP-LRP (zennit Epsilon)", ratio)]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="images per batch (default 16)")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (224)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method (3)")
    parser.add_argument("--methods", default="", help="comma-separated subset of ps.methods()")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument(
        "--model", default="resnet18", choices=("resnet18", "vit_b_16"), help="(resnet18)"
    )
    args = parser.parse_args(argv)
    methods = ps.methods()
    if args.methods:
        chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
        for name in chosen:
            if name not in methods:
                parser.error(f"unknown method {name!r}; valid: {', '.join(methods)}")
        methods = chosen

    warnings.filterwarnings("ignore")  # peers warn on every call (hooks, requires_grad)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if args.model == "vit_b_16":
            model = torchvision.models.vit_b_16(weights=None, image_size=args.size).eval()
        else:
            model = torchvision.models.resnet18(weights=None).eval()
        x = torch.randn(args.batch, 3, args.size, args.size)
    targets = torch.arange(args.batch) % 1000
    device = torch.device(args.device)
    model, x, targets = model.to(device), x.to(device), targets.to(device)
    where = "CPU"
    if device.type == "cuda":
        # Everyone (baseline, peers, ours) in exact float32 with deterministic cuDNN, as
        # inside our calls; TF32 would make the others' convolutions cheaper, not ours.
        from pytest_saliency.engine.state import exact_kernels

        exact_kernels().__enter__()  # for the rest of the script
        where = f"{torch.cuda.get_device_name(device)}, deterministic cuDNN, no TF32"

    base_run = baseline(model, x, targets)
    base_run()
    base = statistics.median(seconds(base_run) for _ in range(args.repeats))
    peers: dict[str, list[tuple[str, Run | float | None]]] = {}
    if args.model == "vit_b_16":
        peers.update(lxt_peers(args))
    else:
        for found in (captum_peers, gradcam_peers, zennit_peers):
            for name, entries in found(model, x, targets).items():
                peers.setdefault(name, []).extend(entries)

    print(f"{args.model} (weights=None, eval), batch {args.batch}x3x{args.size}x{args.size}, "
          f"{where}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved ratios")  # fmt: skip
    print(f"baseline (forward + target logits + autograd.grad w.r.t. input): {base:.3f} s\n")
    print(f"{'method':<22}{'ours':>8}   {'peer':<30}{'peer':>8}")
    for name in methods:
        try:
            ours = median_ratio(
                lambda n=name: ps.explain(model, x, n, target=targets), base_run, args.repeats
            )
            mine = f"{ours:7.2f}x"
        except ps.SaliencyError as error:  # a rule method the model's ops refuse
            mine = f"{'refused':>8}"
            print(f"{name}: {str(error).splitlines()[0][:100]}")
        rows = peers.get(name) or [("-", None)]
        for i, (label, run) in enumerate(rows):
            if isinstance(run, float):  # measured in a child process
                theirs = f"{run:7.2f}x"
            elif run is not None:
                theirs = f"{median_ratio(run, base_run, args.repeats):7.2f}x"
            else:
                theirs = f"{'-':>8}"
            left = f"{name:<22}{mine}" if i == 0 else " " * 30
            print(f"{left}   {label:<30}{theirs}")


if __name__ == "__main__":
    main()
