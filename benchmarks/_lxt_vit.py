"""lxt's CP-LRP on torchvision's vit_b_16, timed as methods.py times ours (a child process:
lxt patches torch's own classes, which must not leak into the timings of the others).

    python benchmarks/_lxt_vit.py BATCH SIZE REPEATS DEVICE

Prints one number: the median ratio of an lxt call to the plain forward+backward baseline.
lxt's package __init__ imports its language-model patches, which need transformers < 5, so
only its ViT patches are loaded.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import baseline, median_ratio  # noqa: E402


def lxt_call(model, x, targets):
    root = Path(importlib.util.find_spec("lxt").origin).parent
    for name in ("lxt.efficient", "lxt.efficient.models"):
        stub = types.ModuleType(name)
        stub.__path__ = [str(root / Path(*name.split(".")[1:]))]
        sys.modules.setdefault(name, stub)
    from lxt.efficient.models import vit_torch
    from lxt.efficient.zennit_patches import monkey_patch_zennit
    from zennit.composites import LayerMapComposite
    from zennit.rules import Epsilon

    for cls, patch in vit_torch.cp_LRP.items():
        patch(cls)
    monkey_patch_zennit()
    composite = LayerMapComposite(
        [(torch.nn.Linear, Epsilon(1e-6)), (torch.nn.Conv2d, Epsilon(1e-6))]
    )

    def run():
        xg = x.detach().requires_grad_(True)
        with composite.context(model) as modified:
            logits = modified(xg)
            start = torch.zeros_like(logits).scatter_(1, targets[:, None], 1.0)
            (grad,) = torch.autograd.grad(logits, xg, start)
        return (xg * grad).sum(1)

    return run


def main() -> None:
    batch, size, repeats = (int(a) for a in sys.argv[1:4])
    device = torch.device(sys.argv[4])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.vit_b_16(weights=None, image_size=size).eval()
        x = torch.randn(batch, 3, size, size)
    targets = torch.arange(batch) % 1000
    model, x, targets = model.to(device), x.to(device), targets.to(device)
    run = lxt_call(model, x, targets)
    print(f"{median_ratio(run, baseline(model, x, targets), repeats):.4f}")


if __name__ == "__main__":
    main()
