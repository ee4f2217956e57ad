"""What a model returns: a tensor, or the class scores under the name 'logits' (transformers'
ModelOutput, torchvision's InceptionOutputs); anything else is refused, saying what it was."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models.inception import InceptionOutputs

import pytest_saliency as ps
from pytest_saliency.errors import SaliencyError
from tests._models import randn


class ModelOutput(OrderedDict):
    """transformers' ModelOutput in brief: a dict whose entries are attributes too."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 4),
    ).eval()  # fmt: skip


class Returning(nn.Module):
    """``net()`` whose forward returns its logits wrapped by ``wrap``."""

    def __init__(self, wrap) -> None:
        super().__init__()
        self.body, self.wrap = net(), wrap

    def forward(self, x):
        logits = self.body(x)
        return self.wrap(logits, logits.detach() * 0 + 1)


WRAPS = {
    "ModelOutput": lambda logits, aux: ModelOutput(logits=logits, hidden=aux),
    "InceptionOutputs": lambda logits, aux: InceptionOutputs(logits, aux),
    "dict": lambda logits, aux: {"aux": aux, "logits": logits},
}
METHODS = ["gradient", "integrated_gradients", "guided_backprop", "lrp_epsilon", "fullgrad",
           {"name": "gradcam", "layer": "body.2"}]  # fmt: skip


@pytest.mark.parametrize("wrap", list(WRAPS))
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m if isinstance(m, str) else m["name"])
def test_named_logits_give_the_plain_models_maps(wrap, method):
    x = randn(2, 3, 8, 8, seed=1)
    plain, wrapped = Returning(lambda logits, aux: logits), Returning(WRAPS[wrap])
    spec = method if isinstance(method, dict) else {"name": method}
    expected = ps.explain(plain, x, spec["name"], **{k: v for k, v in spec.items() if k != "name"})
    got = ps.explain(wrapped, x, spec["name"], **{k: v for k, v in spec.items() if k != "name"})
    assert torch.equal(got, expected)


def test_the_checks_read_named_logits_too():
    x = randn(4, 3, 8, 8, seed=2)
    plain, wrapped = Returning(lambda lo, aux: lo), Returning(WRAPS["ModelOutput"])
    for check in (ps.output_sensitivity, ps.parameter_randomization):
        assert check(wrapped, x, "gradient").score == check(plain, x, "gradient").score


@pytest.mark.parametrize(
    ("wrap", "message"),
    [
        (lambda lo, aux: (lo, aux), r"returned a tuple of \(Tensor\[2, 4\], Tensor\[2, 4\]\)"),
        (lambda lo, aux: {"out": lo}, r"returned a dict with 'out': Tensor\[2, 4\]"),
        (lambda lo, aux: [lo], r"returned a list of \(Tensor\[2, 4\]\)"),
        (lambda lo, aux: ModelOutput(loss=aux), r"returned a ModelOutput with 'loss': Tensor"),
        (lambda lo, aux: None, "returned a NoneType"),
    ],
)
def test_other_outputs_are_refused_saying_what_they_were(wrap, message):
    with pytest.raises(SaliencyError, match=message) as info:
        ps.explain(Returning(wrap), randn(2, 3, 8, 8), "gradient")
    assert "named 'logits'" in str(info.value) and "not guessed" in str(info.value)
