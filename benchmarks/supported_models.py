"""Which method runs on which architecture: the README's "Supported models" table.

Every bundled method (and the ``other_activations="gradient"`` variants) is called through
``ps.explain`` on torchvision and timm models (weights=None, eval, 2 random inputs) and the
outcome is one cell: ``ok`` for a finite map of the input's shape, or the error's first cause
(the op, module or layer the engine refused). FullGrad cells add the share of the biased grid
layers it reads; Grad-CAM cells the default layer and its layout.

    python benchmarks/supported_models.py > /tmp/table.md   # about 5 minutes on 2 CPU cores
    python benchmarks/supported_models.py --full             # one column per method

Nothing is downloaded; timm is optional (its rows are left out without it).
"""

from __future__ import annotations

import re
import sys
import time
import warnings

import torch
import torchvision

import pytest_saliency as ps
from pytest_saliency.bundled.cam import bias_terms
from pytest_saliency.engine.layers import resolve_cam_layer

METHODS = [
    ("gradient", {}), ("input_x_gradient", {}), ("integrated_gradients", {"steps": 8}),
    ("smoothgrad", {"samples": 4}), ("guided_backprop", {}),
    ("guided_backprop", {"other_activations": "gradient"}), ("deconvnet", {}),
    ("deconvnet", {"other_activations": "gradient"}), ("rectgrad", {}),
    ("rectgrad", {"other_activations": "gradient"}), ("lrp_epsilon", {}), ("lrp_zplus", {}),
    ("lrp_alpha_beta", {}), ("gradcam", {}), ("gradcam++", {}), ("fullgrad", {}),
]  # fmt: skip


def tv(name, **kw):
    return lambda: getattr(torchvision.models, name)(weights=None, **kw)


def tm(name, **kw):
    def build():
        import timm

        return timm.create_model(name, pretrained=False, **kw)

    return build


def vit_b_16():
    model = torchvision.models.vit_b_16(weights=None, image_size=64)
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # it starts at zero
    return model


MODELS = [
    ("torchvision resnet18", tv("resnet18"), 64),
    ("torchvision densenet121", tv("densenet121"), 64),
    ("torchvision inception_v3", tv("inception_v3", init_weights=False), 160),
    ("torchvision efficientnet_b0", tv("efficientnet_b0"), 64),
    ("torchvision mobilenet_v3_small", tv("mobilenet_v3_small"), 64),
    ("torchvision regnet_y_400mf", tv("regnet_y_400mf"), 64),
    ("torchvision convnext_tiny", tv("convnext_tiny"), 64),
    ("torchvision swin_t", tv("swin_t"), 64),
    ("torchvision vit_b_16 (64 px)", vit_b_16, 64),
    ("timm vit_tiny_patch16_224 (64 px)", tm("vit_tiny_patch16_224", img_size=64), 64),
    ("timm deit_tiny_distilled (64 px)", tm("deit_tiny_distilled_patch16_224", img_size=64), 64),
    ("timm convnext_atto", tm("convnext_atto"), 64),
    ("timm seresnet18", tm("seresnet18"), 64),
    ("timm efficientnet_b0", tm("efficientnet_b0"), 64),
]


def label(method: str, options: dict) -> str:
    return method + ("+gradient" if options.get("other_activations") == "gradient" else "")


def cause(exc: Exception) -> str:
    """The first thing an error names: an op as called, a module type, a layer."""
    text = str(exc)
    for pattern in (
        r"  - ([\w.]+) \(autograd",  # op accounting: the first op listed
        r"module '[^']*' is (\w+)",  # an activation module
        r"no LRP rule for ([\w.]+)",
        r"model calls ([\w.]+)",  # a functional activation
    ):
        found = re.search(pattern, text)
        if found:
            return found.group(1)
    return type(exc).__name__


def cell(model, x, method, options) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            maps = ps.explain(model, x, method, **options)
    except ps.SaliencyError as exc:
        return f"no: {cause(exc)}"
    if maps.shape != (x.shape[0], *x.shape[2:]) or not bool(torch.isfinite(maps).all()):
        return "WRONG"
    if method == "fullgrad":
        terms = bias_terms(model, x[:1])
        return f"ok ({len(terms.read)}/{len(terms.read) + len(terms.not_read)})"
    return "ok"


# The README's columns: methods whose outcome is the same on every model share one column.
GROUPS = [
    ("gradient, input × gradient, IG, SmoothGrad", ["gradient", "input_x_gradient",
                                                    "integrated_gradients", "smoothgrad"]),
    ("guided, deconvnet, RectGrad", ["guided_backprop", "deconvnet", "rectgrad"]),
    ("the same, `other_activations=\"gradient\"`", ["guided_backprop+gradient",
                                                    "deconvnet+gradient", "rectgrad+gradient"]),
    ("LRP (ε, z+, αβ)", ["lrp_epsilon", "lrp_zplus", "lrp_alpha_beta"]),
    ("Grad-CAM, Grad-CAM++", ["gradcam", "gradcam++"]),
    ("FullGrad (grid layers read)", ["fullgrad"]),
]  # fmt: skip


def grouped(cells: dict[str, str]) -> list[str]:
    out = []
    for _, members in GROUPS:
        values = [cells[m] for m in members]
        out.append(values[0] if len(set(values)) == 1 else " / ".join(values))
    return out


def main() -> None:
    full = "--full" in sys.argv
    try:
        import timm  # noqa: F401
    except ImportError:
        models = [m for m in MODELS if not m[0].startswith("timm")]
    else:
        models = MODELS
    columns = [label(m, o) for m, o in METHODS]
    heads = columns if full else [g for g, _ in GROUPS]
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}; 2 inputs each\n")
    print("| model | default CAM layer | " + " | ".join(heads) + " |")
    print("|---|---|" + "---|" * len(heads))
    for name, build, size in models:
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build().eval()
            x = torch.randn(2, 3, size, size)
        try:
            layer = resolve_cam_layer(model, x, "gradcam", None, None)
            default = f"`{layer.name}` {layer.layout}"
        except ps.SaliencyError as exc:
            default = f"none: {cause(exc)}"
        cells = {label(m, o): cell(model, x, m, o) for m, o in METHODS}
        shown = list(cells.values()) if full else grouped(cells)
        print(f"| {name} | {default} | " + " | ".join(shown) + " |", flush=True)
        warnings.warn(f"{name}: {time.perf_counter() - start:.1f} s", stacklevel=1)


if __name__ == "__main__":
    main()
