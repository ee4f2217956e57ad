"""lxt's efficient CP-LRP map of a torchvision ViT-B/16 (image size 32), run as a child process
by test_lrp_transformer.py, since lxt patches torch's own classes.

Arguments: state_dict.pt inputs.pt targets.pt out.pt. lxt's package __init__ imports its
language-model patches, which need transformers < 5; only its ViT patches are loaded here.
"""

import importlib.util
import sys
import types
from pathlib import Path

import torch
import torchvision

root = Path(importlib.util.find_spec("lxt").origin).parent
for name in ("lxt.efficient", "lxt.efficient.models"):
    stub = types.ModuleType(name)
    stub.__path__ = [str(root / Path(*name.split(".")[1:]))]
    sys.modules[name] = stub
from lxt.efficient.models import vit_torch  # noqa: E402 (after the stubs)
from lxt.efficient.zennit_patches import monkey_patch_zennit  # noqa: E402 (after the stubs)
from zennit.composites import LayerMapComposite  # noqa: E402 (after the stubs)
from zennit.rules import Epsilon  # noqa: E402 (after the stubs)

state, x, target, out = sys.argv[1:5]
for cls, patch in vit_torch.cp_LRP.items():
    assert patch(cls)
monkey_patch_zennit()
model = torchvision.models.vit_b_16(weights=None, image_size=32).double().eval()
model.load_state_dict(torch.load(state))
x = torch.load(x).requires_grad_(True)
target = torch.load(target)
composite = LayerMapComposite([(torch.nn.Linear, Epsilon(1e-6)), (torch.nn.Conv2d, Epsilon(1e-6))])
with composite.context(model) as modified:
    logits = modified(x)
    start = torch.zeros_like(logits).scatter_(1, target[:, None], 1.0)
    (grad,) = torch.autograd.grad(logits, x, start)
torch.save((x * grad).sum(1).detach(), out)
