"""Real models of each task (random init, no weights fetched): torchvision segmentation with its
dict output, a multi-label ResNet head, a regression CNN; through the API and a YAML suite."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

import pytest_saliency as ps
from pytest_saliency.errors import SaliencyError
from tests._models import randn


def seeded(factory):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return factory().eval()


def lraspp() -> nn.Module:
    return seeded(lambda: torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3))  # fmt: skip


def reference(model, x, score) -> torch.Tensor:
    leaf = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(score(model(leaf)).sum(), leaf)
    return g.sum(dim=1)


X = randn(2, 3, 64, 64, seed=3)


def test_torchvision_segmentation_through_its_dict_output():
    model = lraspp()
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[16:40, 8:48] = True
    target = ps.Segmentation(2, pixels=mask)
    got = ps.explain(model, X, "gradient", target=target, output="out")
    want = reference(model, X, lambda out: (out["out"][:, 2] * mask).flatten(1).sum(dim=1))
    torch.testing.assert_close(got, want)
    # Grad-CAM on a layer of the segmentation head: the CAM of the selected score.
    cam = ps.explain(model, X, "gradcam", layer="classifier.cbr", target=target, output="out")
    assert cam.shape == (2, 64, 64) and bool(torch.isfinite(cam).all())
    # The dict is not guessed at; the error says how to select.
    with pytest.raises(
        SaliencyError,
        match=r"returned a OrderedDict with 'out': Tensor\[2, 3, 64, "
        r"64\].*output='out'",
    ):
        ps.explain(model, X, "gradient", target=target)
    # Untrained, it assigns every pixel to one class: another class has no predicted pixels.
    with torch.no_grad():
        predicted = model(X)["out"].argmax(dim=1)
    absent = next(c for c in range(3) if not bool((predicted == c).any()))
    with pytest.raises(SaliencyError, match=f"assigns no pixel to class {absent}"):
        ps.explain(model, X, "gradient", target=ps.Segmentation(absent), output="out")
    result = ps.output_sensitivity(model, X, "gradient", target=target, output="out")
    assert result.target_kind == "segmentation"
    assert set(result.others.tolist()) <= {0, 1} and result.to_dict()["targets"] == [2, 2]
    assert result.settings["target"]["output"] == "output['out']"


def test_torchvision_resnet_as_a_multilabel_head():
    model = seeded(lambda: torchvision.models.resnet18(num_classes=6))
    x = randn(2, 3, 32, 32, seed=4)
    got = ps.explain(model, x, "gradient", target=ps.MultiLabel([1, 4]))
    torch.testing.assert_close(got, reference(model, x, lambda out: out[:, 1] + out[:, 4]))
    result = ps.output_sensitivity(model, x, ["gradient", "gradcam"], target=ps.MultiLabel([1, 4]))
    for r in result:
        assert r.target_kind == "multilabel" and set(r.others.tolist()) <= {0, 2, 3, 5}
        assert r.to_dict()["targets"] == [[1, 4], [1, 4]]


class RegressionCNN(nn.Module):
    """A CNN with one scalar output per sample ([N], as a regression model returns)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())  # fmt: skip
        self.head = nn.Linear(4 * 8 * 8, 1)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))[:, 0]


def test_a_regression_cnn_is_audited_by_randomization_not_by_output_sensitivity():
    model = seeded(RegressionCNN)
    x = randn(4, 1, 8, 8, seed=5)
    got = ps.explain(model, x, "gradient", target=ps.Regression())
    torch.testing.assert_close(got, reference(model, x, lambda out: out))
    result = ps.parameter_randomization(model, x, "gradient", target=ps.Regression())
    assert result.target_kind == "regression" and result.layers
    with pytest.raises(SaliencyError, match="one unit, so there is no other target"):
        ps.output_sensitivity(model, x, "gradient", target=ps.Regression())


def tiny_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                       num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       num_labels=5)  # fmt: skip
    return seeded(lambda: ViTForImageClassification(config))


def test_a_transformers_vit_is_read_through_its_model_output():
    pytest.importorskip("transformers")
    model = tiny_vit()
    x = randn(2, 3, 16, 16, seed=6)
    got = ps.explain(model, x, "gradient", target=ps.ClassLogit(torch.tensor([1, 3])))
    want = reference(model, x, lambda out: out.logits[:, [1, 3]].diagonal())
    torch.testing.assert_close(got, want)
    assert torch.equal(ps.explain(model, x, "gradient", target=[1, 3], output="logits"), got)
    multi = ps.explain(model, x, "gradient", target=ps.MultiLabel([0, 2]))
    torch.testing.assert_close(
        multi, reference(model, x, lambda o: o.logits[:, 0] + o.logits[:, 2])
    )
    result = ps.output_sensitivity(model, x, ["gradient", "integrated_gradients"])
    assert [r.target_kind for r in result] == ["class", "class"]


HELPERS = """
import torch, torchvision
from torch import nn

def seeded(factory):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return factory().eval()

def segmenter():
    return seeded(lambda: torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3))

def tagger():
    return seeded(lambda: torchvision.models.resnet18(num_classes=6))

def pair():  # returns (scores, aux), as Inception does
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tagger()
        def forward(self, x):
            s = self.net(x)
            return s, s.detach()
    return seeded(Pair)

def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))

def margin(out):
    return out[:, 0] - out[:, 1]

def flat(returned):  # [N, 3]: each class's mean score over the pixels
    return returned["out"].mean(dim=(2, 3))

def vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=64, patch_size=16, num_channels=3, hidden_size=32,
                       num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       num_labels=5)
    return seeded(lambda: ViTForImageClassification(config))
"""

SUITE = """
models:
  segmenter:
    model: helpers:segmenter
    output: out
    targets: {kind: segmentation, index: 2, pixels: all}
    checks: {parameter_randomization: {layers: [classifier, backbone]}}
  tagger:
    model: helpers:tagger
    targets: {kind: multilabel, labels: [1, 4]}
    checks: {parameter_randomization: {layers: [fc, layer4]}}
  pair:
    model: helpers:pair
    output: 0
    targets: {kind: callable, function: "helpers:margin"}
    checks: {parameter_randomization: {layers: [net.fc, net.layer4]}}
    expect: {gradient: {output_sensitivity: error}}
  vit:
    model: helpers:vit
    targets: {kind: class, index: 3}
    checks: {parameter_randomization: {layers: [classifier, vit.embeddings]}}
inputs: helpers:images
methods: [gradient]
max_similarity: 1.0
"""


def test_a_suite_audits_each_task_and_reports_its_target(pytester: pytest.Pytester):
    pytest.importorskip("transformers")
    pytester.makepyfile(helpers=HELPERS)
    pytester.makefile(".yaml", saliency_tasks=SUITE)
    result = pytester.runpytest("--saliency-report=r.json", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=7, xfailed=1)
    records = json.loads((pytester.path / "r.json").read_text())["records"]
    kinds = {(r["model"], r["check"]): (r.get("target_kind"), r["targets"]) for r in records
             if r.get("verdict") != "refused"}  # fmt: skip
    assert kinds[("segmenter", "output_sensitivity")] == ("segmentation", [2, 2])
    assert kinds[("tagger", "parameter_randomization")] == ("multilabel", [[1, 4], [1, 4]])
    assert kinds[("pair", "parameter_randomization")][0] == "callable"
    assert kinds[("vit", "output_sensitivity")] == ("class", [3, 3])
    result.stdout.no_fnmatch_line("*Traceback*")


@pytest.mark.parametrize(
    "targets, output, message",
    [
        (
            "{kind: segmentaton, index: 2}",
            "out",
            "targets.kind: unknown target kind 'segmentaton'; did you mean 'segmentation'?",
        ),
        ("{kind: segmentation}", "out", "targets: a segmentation target needs 'index:'"),
        (
            "{kind: segmentation, index: 2, pixel: all}",
            "out",
            "targets.pixel: unknown key of a segmentation target 'pixel'; did you mean 'pixels'?",
        ),
        (
            "{kind: segmentation, index: 5, pixels: all}",
            "out",
            "targets: class indices must be in [[]0, 2[]] (the model has 3 outputs), got [[]5[]]",
        ),
        (
            "{kind: multilabel, labels: [1]}",
            "out",
            "targets: model LRASPP returned a tensor of shape (1, 3, 64, 64); a multi-label target "
            "needs label scores of shape [[]N=1, labels[]]",
        ),
        (
            "{kind: segmentation, index: 1, pixels: all}",
            "ot",
            "output: output='ot': model LRASPP returned a OrderedDict with 'out': * no key 'ot'; "
            "did you mean 'out'? Its keys: 'out'",
        ),
        (
            "{kind: segmentation, index: 1, pixels: all}",
            "1.5",
            "output: expected an index of a returned tuple (0), a key *, got 1.5",
        ),
        (
            "{kind: [segmentation], index: 1}",
            "out",
            "targets.kind: expected a target kind (one of: class, *), got [[]'segmentation'[]]",
        ),
        (
            "{kind: callable, function: margin.pt}",
            "out",
            "targets.function: expected 'package.module:function', got 'margin.pt'",
        ),
        (
            "{kind: multilabel, labels: [1, 9]}",
            "{call: 'helpers:flat'}",
            "targets: label 9 is out of range: the model has 3 labels*",
        ),
        (
            "{kind: regression}",
            "{call: 'helpers:flat'}",
            "targets: the regression output has 3 units; say which one*",
        ),
        (
            "{kind: multilabel, labels: [1], threshold: 0.5}",
            "{call: 'helpers:flat'}",
            "targets: MultiLabel threshold= picks the predicted labels*",
        ),
        (
            "{kind: binary}",
            "{call: 'helpers:flat'}",
            "targets: model LRASPP returned a tensor of shape (1, 3); a binary target needs one "
            "logit per sample*",
        ),
    ],
    ids=[
        "kind",
        "required",
        "key",
        "range",
        "shape",
        "output-key",
        "output-type",
        "kind-type",
        "function",
        "label-range",
        "unit",
        "threshold",
        "binary",
    ],
)
def test_a_suite_target_mistake_is_located(pytester: pytest.Pytester, targets, output, message):
    pytester.makepyfile(helpers=HELPERS)
    pytester.makefile(".yaml", saliency_bad=(
        f"model: helpers:segmenter\ninputs: helpers:images\noutput: {output}\n"
        f"targets: {targets}\nmethods: [gradient]\n"
    ))  # fmt: skip
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines([f"saliency_bad.yaml:*: {message}*"])
    result.stdout.no_fnmatch_line("*Traceback*")
