"""Targets and outputs: each kind's map is the gradient of the scalar it selects, written out here;
the class default is today's map bit for bit; bad selectors and kinds say what they found."""

from __future__ import annotations

import re
from collections import namedtuple

import numpy as np
import pytest
import torch
from torch import nn

import pytest_saliency as ps
from pytest_saliency.errors import SaliencyError
from tests._models import randn


def seeded(factory):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return factory().eval()


def classifier(outputs: int = 4) -> nn.Module:
    return seeded(lambda: nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, outputs),
    ))  # fmt: skip


class SegNet(nn.Module):
    """Fully convolutional: class scores per pixel [N, 4, 8, 8], returned as ``{"out": ...}``
    (torchvision's segmentation models do the same) when ``as_dict``."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU()
        )
        self.classifier = nn.Conv2d(6, 4, 1)
        nn.init.zeros_(self.classifier.bias)  # so that three of the classes show in each sample
        self.as_dict = as_dict

    def forward(self, x):
        out = self.classifier(self.body(x))
        return {"out": out, "aux": out.detach()} if self.as_dict else out


def segnet(as_dict: bool = False) -> SegNet:
    return seeded(lambda: SegNet(as_dict))


def gradient_of(model, x, score) -> torch.Tensor:
    """The reference: d score(model(x)).sum() / dx, summed over channels (the gradient map)."""
    leaf = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(score(model(leaf)).sum(), leaf)
    return g.sum(dim=1)


X = randn(3, 3, 8, 8, seed=1)


def test_the_class_default_is_todays_map_bit_for_bit():
    model = classifier()
    for target in (None, 2, torch.tensor([0, 3, 1])):
        plain = ps.explain(model, X, "guided_backprop", target=target)
        assert torch.equal(ps.explain(model, X, "guided_backprop", target=ps.ClassLogit(target)),
                           plain)  # fmt: skip
        assert torch.equal(ps.explain(model, X, "guided_backprop", target=target, output=None),
                           plain)  # fmt: skip
    want = gradient_of(model, X, lambda out: out[:, 2])
    torch.testing.assert_close(ps.explain(model, X, "gradient", target=2), want)


def test_multilabel_sums_its_labels():
    model = classifier()
    got = ps.explain(model, X, "gradient", target=ps.MultiLabel([1, 3]))
    torch.testing.assert_close(got, gradient_of(model, X, lambda out: out[:, 1] + out[:, 3]))
    # Default: each sample's labels with a positive logit (the top label where none is).
    with torch.no_grad():
        logits = model(X)
    mask = logits > 0
    mask[~mask.any(dim=1), logits[~mask.any(dim=1)].argmax(dim=1)] = True
    want = gradient_of(model, X, lambda out: (out * mask).sum(dim=1))
    torch.testing.assert_close(ps.explain(model, X, "gradient", target=ps.MultiLabel()), want)
    per_sample = torch.tensor([[True, False, False, True], [False, True, False, False],
                               [True, True, True, False]])  # fmt: skip
    want = gradient_of(model, X, lambda out: (out * per_sample).sum(dim=1))
    got = ps.explain(model, X, "gradient", target=ps.MultiLabel(per_sample), batch_size=2)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("pixels", ["predicted", "all", "mask", "per-sample"])
def test_segmentation_sums_one_class_over_its_pixels(pixels):
    model = segnet()
    with torch.no_grad():
        predicted = model(X).argmax(dim=1)
    c = int(predicted.flatten().mode().values)  # a class every sample shows
    assert bool((predicted == c).flatten(1).any(dim=1).all())
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:6, 1:5] = True
    masks = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(2)) > 0.6
    region = {
        "predicted": (predicted == c).float(),
        "all": torch.ones(3, 8, 8),
        "mask": mask.float().expand(3, 8, 8),
        "per-sample": masks.float(),
    }[pixels]
    given = {"mask": mask, "per-sample": masks}.get(pixels, pixels)
    target = ps.Segmentation(c, pixels=given)
    got = ps.explain(model, X, "gradient", target=target)
    want = gradient_of(model, X, lambda out: (out[:, c] * region).flatten(1).sum(dim=1))
    torch.testing.assert_close(got, want)
    # The same through the model's dict output, selected by key, in chunks.
    got = ps.explain(segnet(as_dict=True), X, "gradient", target=target, output="out",
                     batch_size=2)  # fmt: skip
    torch.testing.assert_close(got, want)


def test_regression_explains_one_output_unit():
    single = seeded(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
                                          nn.Linear(144, 1)))  # fmt: skip
    want = gradient_of(single, X, lambda out: out[:, 0])
    torch.testing.assert_close(ps.explain(single, X, "gradient", target=ps.Regression()), want)
    squeezed = nn.Sequential(single, nn.Flatten(0))  # returns [N]
    got = ps.explain(squeezed, X, "input_x_gradient", target=ps.Regression())
    leaf = X.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(squeezed(leaf).sum(), leaf)
    torch.testing.assert_close(got, (X * g).sum(dim=1))
    three = classifier(3)
    got = ps.explain(three, X, "gradient", target=ps.Regression(unit=1))
    torch.testing.assert_close(got, gradient_of(three, X, lambda out: out[:, 1]))
    with pytest.raises(SaliencyError, match=r"has 3 units; say which one .*Regression\(unit=k\)"):
        ps.explain(three, X, "gradient", target=ps.Regression())


def test_a_callable_target_is_differentiated_as_written():
    model = classifier()

    def margin(out):
        return out[:, 0] - out[:, 1:].logsumexp(dim=1)

    got = ps.explain(model, X, "gradient", target=margin, batch_size=2)
    torch.testing.assert_close(got, gradient_of(model, X, margin))
    with pytest.raises(SaliencyError, match=r"must return one score per sample.*\[N=3\], got \(\)"):
        ps.explain(model, X, "gradient", target=lambda out: out.sum())
    with pytest.raises(SaliencyError, match="no autograd graph"):
        ps.explain(model, X, "gradient", target=lambda out: out[:, 0].detach())
    # A score that reads other samples would change with batch_size: refused.
    with pytest.raises(SaliencyError, match="scores sample 0 differently alone"):
        ps.explain(model, X, "gradient", target=lambda out: out[:, 0] - out[:, 1].mean())


Pair = namedtuple("Pair", "scores aux")


class Returns(nn.Module):
    def __init__(self, wrap) -> None:
        super().__init__()
        self.body, self.wrap = classifier(), wrap

    def forward(self, x):
        logits = self.body(x)
        return self.wrap(logits, logits.detach() * 0 + 1)


@pytest.mark.parametrize(
    "wrap, output",
    [
        (lambda s, a: (s, a), 0),  # Inception-style (logits, aux)
        (lambda s, a: [a, s], -1),
        (lambda s, a: {"out": s, "aux": a}, "out"),
        (lambda s, a: Pair(s, a), "scores"),  # an attribute
        (lambda s, a: {"nested": (a, s)}, lambda r: r["nested"][1]),
    ],
    ids=["tuple", "list-negative", "dict", "attribute", "callable"],
)
@pytest.mark.parametrize("method", ["gradient", "guided_backprop", "lrp_epsilon",
                                    {"name": "gradcam", "layer": "2"}],
                         ids=lambda m: m if isinstance(m, str) else m["name"])  # fmt: skip
def test_an_output_selector_gives_the_plain_models_maps(wrap, output, method):
    spec = {"name": method} if isinstance(method, str) else dict(method)
    name = spec.pop("name")
    plain = ps.explain(classifier(), X, name, target=1, **spec)
    spec["layer"] = "body." + spec["layer"] if "layer" in spec else None
    got = ps.explain(Returns(wrap), X, name, target=1, output=output, **spec)
    assert torch.equal(got, plain)


def test_bad_selectors_name_what_the_model_returned():
    as_tuple = Returns(lambda s, a: (s, a))
    with pytest.raises(
        SaliencyError,
        match=r"output=2 is out of range.*a tuple of \(Tensor"
        r"\[3, 4\], Tensor\[3, 4\]\), 2 element.*0 to 1",
    ):
        ps.explain(as_tuple, X, "gradient", output=2)
    with pytest.raises(SaliencyError, match=r"select it with output= \(an int"):
        ps.explain(as_tuple, X, "gradient")
    as_dict = Returns(lambda s, a: {"out": s, "aux": a})
    with pytest.raises(
        SaliencyError,
        match=r"output='ot': model Returns returned a dict with "
        r"'out': .* no key 'ot'; did you mean 'out'\? Its "
        r"keys: 'out', 'aux'",
    ):
        ps.explain(as_dict, X, "gradient", output="ot")
    with pytest.raises(SaliencyError, match=r"selects an element of a returned tuple.*a dict"):
        ps.explain(as_dict, X, "gradient", output=0)
    as_pair = Returns(lambda s, a: Pair(s, a))
    with pytest.raises(
        SaliencyError,
        match=r"no key or attribute 'logit'.*attributes: "
        r"scores, aux",
    ):
        ps.explain(as_pair, X, "gradient", output="logit")
    with pytest.raises(SaliencyError, match=r"output\['aux'\] is Tensor|is a str, not a tensor"):
        ps.explain(Returns(lambda s, a: {"out": s, "aux": "text"}), X, "gradient", output="aux")
    with pytest.raises(SaliencyError, match=r"output must be None.*got float 1.5"):
        ps.explain(as_tuple, X, "gradient", output=1.5)
    with pytest.raises(SaliencyError, match=r"output=.*raised KeyError"):
        ps.explain(as_dict, X, "gradient", output=lambda r: r["missing"])


def test_a_kind_that_does_not_fit_the_output_says_what_it_expected():
    with pytest.raises(
        SaliencyError,
        match=r"shape \(3, 4, 8, 8\); a class target needs class "
        r"scores of shape \[N=3, classes\].*Segmentation",
    ):
        ps.explain(segnet(), X, "gradient")
    with pytest.raises(
        SaliencyError,
        match=r"shape \(3, 4\); a segmentation target needs class "
        r"scores per pixel, \[N=3, classes, H, W\]",
    ):
        ps.explain(classifier(), X, "gradient", target=ps.Segmentation(1))
    with pytest.raises(
        SaliencyError,
        match=r"target 4 is out of range: the model has 4 classes, "
        r"so targets must be in \[0, 3\]",
    ):
        ps.explain(segnet(), X, "gradient", target=ps.Segmentation(4, pixels="all"))
    with pytest.raises(SaliencyError, match=r"needs its class: Segmentation\(index=k\).*\[0, 3\]"):
        ps.explain(segnet(), X, "gradient", target=ps.Segmentation())
    with pytest.raises(
        SaliencyError,
        match=r"mask has shape \(4, 4\), but the output's pixels "
        r"are \(8, 8\)",
    ):
        ps.explain(
            segnet(),
            X,
            "gradient",
            target=ps.Segmentation(0, pixels=torch.ones(4, 4, dtype=torch.bool)),
        )
    with pytest.raises(
        SaliencyError,
        match=r"unknown Segmentation pixels choice 'predictd'; did you "
        r"mean 'predicted'",
    ):
        ps.Segmentation(0, pixels="predictd")
    with pytest.raises(SaliencyError, match=r"label 7 is out of range: the model has 4 labels"):
        ps.explain(classifier(), X, "gradient", target=ps.MultiLabel([1, 7]))


def test_a_class_the_model_never_predicts_is_refused_not_a_blank_map():
    model = segnet()
    with torch.no_grad():
        present = model(X).argmax(dim=1)
    absent = next(c for c in range(4) if not bool((present == c).flatten(1).any(dim=1).all()))
    samples = [i for i in range(3) if not bool((present[i] == absent).any())]
    with pytest.raises(
        SaliencyError,
        match=rf"assigns no pixel to class {absent} in sample\(s\) "
        rf"{re.escape(str(samples))}.*pixels='all'",
    ):
        ps.explain(model, X, "gradient", target=ps.Segmentation(absent))


def test_peer_grad_cam_targets_equal_ours():
    """pytorch-grad-cam's ClassifierOutputTarget and SemanticSegmentationTarget (with the
    predicted mask) are our ClassLogit and Segmentation(pixels='predicted') on Grad-CAM."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import (
        ClassifierOutputTarget,
        SemanticSegmentationTarget,
    )

    from tests.bundled.test_cam import minmax

    model = classifier()
    with GradCAM(model, [model[2]]) as peer:
        want = peer(X, [ClassifierOutputTarget(t) for t in (0, 3, 1)])
    got = ps.explain(model, X, "gradcam", layer="2", target=ps.ClassLogit(torch.tensor([0, 3, 1])))
    np.testing.assert_allclose(minmax(got.numpy()), minmax(want), atol=2e-5)

    seg = segnet()
    with torch.no_grad():
        predicted = seg(X).argmax(dim=1)
    c = int(predicted.flatten().mode().values)
    masks = [(predicted[i] == c).float().numpy() for i in range(3)]
    with GradCAM(seg, [seg.body[2]]) as peer:
        want = peer(X, [SemanticSegmentationTarget(c, m) for m in masks])
    got = ps.explain(seg, X, "gradcam", layer="body.2", target=ps.Segmentation(c))
    assert float(got.abs().max()) > 0
    np.testing.assert_allclose(minmax(got.numpy()), minmax(want), atol=2e-5)


def test_output_sensitivity_compares_a_target_with_another_of_its_kind():
    seg = segnet()
    with torch.no_grad():
        predicted = seg(X).argmax(dim=1)
    c = int(predicted.flatten().mode().values)
    result = ps.output_sensitivity(seg, X, "gradient", target=ps.Segmentation(c))
    assert result.target_kind == "segmentation" and result.to_dict()["targets"] == [c] * 3
    for i in range(3):  # another class, one the model assigns pixels to in that sample
        other = int(result.others[i])
        assert other != c and bool((predicted[i] == other).any())
        region = (predicted[i : i + 1] == other).float()
        want = gradient_of(seg, X[i : i + 1], lambda out, o=other, r=region: (out[:, o] * r).sum())
        torch.testing.assert_close(result.maps["other"][i], want[0])
    assert result.settings["target"] == {"kind": "segmentation", "index": c,
                                         "pixels": "predicted"}  # fmt: skip
    every = ps.output_sensitivity(seg, X, "gradient", target=ps.Segmentation(c, pixels="all"),
                                  against="all")  # fmt: skip
    assert every.n == 3 and bool(torch.isfinite(every.scores).all())
    # A mask per sample: the other class over the same pixels of that sample.
    masks = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(2)) > 0.6
    own = ps.output_sensitivity(seg, X, "gradient", target=ps.Segmentation(c, pixels=masks),
                                batch_size=2)  # fmt: skip
    for i in range(3):
        other = int(own.others[i])
        want = gradient_of(seg, X[i : i + 1],
                           lambda out, o=other, m=masks[i]: (out[:, o] * m).sum())  # fmt: skip
        torch.testing.assert_close(own.maps["other"][i], want[0])

    model = classifier()
    multi = ps.output_sensitivity(model, X, "gradient", target=ps.MultiLabel([0, 2]),
                                  against="second")  # fmt: skip
    with torch.no_grad():
        logits = model(X)
    assert multi.others.tolist() == logits[:, [1, 3]].argmax(dim=1).mul(2).add(1).tolist()
    assert multi.to_dict()["targets"] == [[0, 2]] * 3
    assert "0+2" in multi.summary()
    with pytest.raises(SaliencyError, match="has one unit, so there is no other target"):
        single = seeded(lambda: nn.Sequential(nn.Flatten(), nn.Linear(192, 1)))
        ps.output_sensitivity(single, X, "gradient", target=ps.Regression())
    with pytest.raises(SaliencyError, match="a callable target has none"):
        ps.output_sensitivity(model, X, "gradient", target=lambda out: out[:, 0])
    with pytest.raises(SaliencyError, match=r"sample\(s\) \[0, 1, 2\] hold every label"):
        ps.output_sensitivity(model, X, "gradient", target=ps.MultiLabel([0, 1, 2, 3]))


@pytest.mark.parametrize("target", ["segmentation", "multilabel", "regression", "callable"])
def test_parameter_randomization_audits_every_kind(target):
    model, kind = {
        "segmentation": (segnet(), ps.Segmentation(1, pixels="all")),
        "multilabel": (classifier(), ps.MultiLabel([0, 3])),
        "regression": (classifier(2), ps.Regression(unit=1)),
        "callable": (classifier(), lambda out: out[:, 0] - out[:, 1]),
    }[target]
    result = ps.parameter_randomization(model, X, "gradient", target=kind)
    assert result.target_kind == target
    # The first map is the original model's: the reference gradient of the selected score.
    score = {
        "segmentation": lambda out: out[:, 1].flatten(1).sum(dim=1),
        "multilabel": lambda out: out[:, 0] + out[:, 3],
        "regression": lambda out: out[:, 1],
        "callable": lambda out: out[:, 0] - out[:, 1],
    }[target]
    torch.testing.assert_close(result.maps["original"], gradient_of(model, X, score))
    assert result.scores.shape[0] == len(result.layers) and bool(
        torch.isfinite(result.scores).all()
    )


def test_the_predicted_pixels_are_fixed_on_the_explained_model_and_inputs():
    """A path point, a noisy copy or a randomized model scores the pixels the trained model
    assigned to the class on the inputs, not the pixels it would assign itself: the same as
    that region given as a mask per sample."""
    model = segnet()
    with torch.no_grad():
        region = model(X).argmax(dim=1) == 1
    fixed = ps.Segmentation(1, pixels=region)

    for method in ("integrated_gradients", "smoothgrad"):
        got = ps.explain(model, X, method, target=ps.Segmentation(1))
        torch.testing.assert_close(got, ps.explain(model, X, method, target=fixed))
    ours = ps.parameter_randomization(model, X, "gradient", target=ps.Segmentation(1))
    theirs = ps.parameter_randomization(model, X, "gradient", target=fixed)
    assert torch.equal(ours.scores, theirs.scores)
    assert torch.equal(ours.maps["original"], theirs.maps["original"])


def test_review_cases_of_each_kind():
    """Per-sample units are split with the inputs; bad combinations are refused, clearly."""
    three = classifier(3)
    units = [0, 1, 2]
    got = ps.explain(three, X, "gradient", target=ps.Regression(unit=units), batch_size=2)
    want = gradient_of(three, X, lambda out: out[torch.arange(3), torch.tensor(units)])
    torch.testing.assert_close(got, want)
    masks = torch.ones(3, 8, 8, dtype=torch.bool)
    with pytest.raises(SaliencyError, match=r"target 9 \(sample 0\) is out of range: the model "
                                            r"has 4 classes"):  # fmt: skip
        ps.explain(segnet(), X, "gradient", target=ps.Segmentation(9, pixels=masks))
    with pytest.raises(SaliencyError, match=r"no default layer on SegNet: it scores every "
                                            r"position .*layer=.*'body.2'"):  # fmt: skip
        ps.explain(segnet(), X, "gradcam", target=ps.Segmentation(1, pixels="all"))
    with pytest.raises(SaliencyError, match=r"threshold= picks the predicted labels, so it "
                                            r"applies only without labels="):  # fmt: skip
        ps.MultiLabel([1], threshold=0.5)
    with pytest.raises(SaliencyError, match=r"output='T' selects a key .* a tensor"):
        ps.explain(classifier(), X, "gradient", output="T")
    with pytest.raises(SaliencyError, match=r"for a multi-label mask pass target=MultiLabel"):
        ps.explain(classifier(), X, "gradient", target=torch.ones(3, 4, dtype=torch.bool))
    # No label above the threshold: the top label alone.
    low = classifier()
    with torch.no_grad():
        low[-1].bias.fill_(-100.0)
        top = low(X).argmax(dim=1)
    got = ps.explain(low, X, "gradient", target=ps.MultiLabel())
    torch.testing.assert_close(got, gradient_of(low, X, lambda out: out[torch.arange(3), top]))


def test_against_all_is_the_mean_over_the_other_classes_the_sample_shows():
    from pytest_saliency.checks.common import compare

    seg = segnet()
    with torch.no_grad():
        predicted = seg(X).argmax(dim=1)
    result = ps.output_sensitivity(seg, X, "gradient", target=ps.Segmentation(1), against="all")
    for i in range(3):
        present = [c for c in range(4) if c != 1 and bool((predicted[i] == c).any())]
        own = gradient_of(seg, X[i : i + 1],
                          lambda out, i=i: (out[:, 1] * (predicted[i] == 1)).sum())  # fmt: skip
        scores = []
        for c in present:
            other = gradient_of(
                seg, X[i : i + 1], lambda out, c=c, i=i: (out[:, c] * (predicted[i] == c)).sum()
            )
            scores.append(float(compare(own, other, "ssim")[0][0]))
        assert float(result.scores[i]) == pytest.approx(sum(scores) / len(scores), abs=1e-5)


def test_a_binary_head_explains_the_logit_or_its_negation():
    """One logit per sample: class 1 is the logit, class 0 its negation, as pytorch-grad-cam's
    BinaryClassifierOutputTarget; the predicted class is 1 where the logit is positive."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

    from tests.bundled.test_cam import minmax

    model = classifier(1)
    with torch.no_grad():
        logit = model(X)[:, 0]
    predicted = (logit > 0).long()
    sign = predicted.float() * 2 - 1
    got = ps.explain(model, X, "gradient", target=ps.Binary())
    torch.testing.assert_close(got, gradient_of(model, X, lambda out: out[:, 0] * sign))
    squeezed = nn.Sequential(model, nn.Flatten(0))  # returns [N]
    torch.testing.assert_close(ps.explain(squeezed, X, "gradient", target=ps.Binary(0)),
                               gradient_of(model, X, lambda out: -out[:, 0]))  # fmt: skip
    with GradCAM(model, [model[2]]) as peer:
        want = peer(X, [BinaryClassifierOutputTarget(c) for c in (1, 0, 1)])
    cam = ps.explain(model, X, "gradcam", layer="2", target=ps.Binary(torch.tensor([1, 0, 1])))
    np.testing.assert_allclose(minmax(cam.numpy()), minmax(want), atol=2e-5)
    # The other class's map is this one negated for every gradient method: no comparison.
    with pytest.raises(SaliencyError, match=r"one logit and its negation.*randomization checks"):
        ps.output_sensitivity(model, X, "gradient", target=ps.Binary())
    result = ps.parameter_randomization(model, X, "gradient", target=ps.Binary())
    assert result.target_kind == "binary" and result.targets.tolist() == predicted.tolist()
    torch.testing.assert_close(result.maps["original"], got)
    probabilities = nn.Sequential(model, nn.Sigmoid())  # a head that ends in a sigmoid
    got = ps.explain(probabilities, X, "gradient", target=ps.Binary(threshold=0.5))
    sign = (torch.sigmoid(logit) > 0.5).float() * 2 - 1
    torch.testing.assert_close(got, gradient_of(probabilities, X, lambda out: out[:, 0] * sign))
    with pytest.raises(SaliencyError, match=r"a binary target needs one logit per sample"):
        ps.explain(classifier(), X, "gradient", target=ps.Binary())
    with pytest.raises(SaliencyError, match=r"target 2 is out of range: the model has 2 classes"):
        ps.explain(model, X, "gradient", target=ps.Binary(2))


class MultiDigit(nn.Module):
    """Four digit readers on one flattened feature vector: scores [N, 4, 10], no grid."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4 * 64, 40)

    def forward(self, x):
        return self.head(self.features(x).flatten(1)).view(-1, 4, 10)


def test_scores_with_more_axes_but_no_grid_keep_their_default_cam_layer():
    """Only scores on the input's grid (segmentation) lose the default CAM layer: a model that
    reads several digits from one vector, or a conv head ending on a 1 x 1 grid, keep it."""
    reader = seeded(MultiDigit)
    got = ps.explain(reader, X, "gradcam", target=lambda out: out[:, 0, 3])
    assert torch.equal(got, ps.explain(reader, X, "gradcam", layer="features.1",
                                       target=lambda out: out[:, 0, 3]))  # fmt: skip
    head = seeded(lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                        nn.Conv2d(4, 5, 8)))  # fmt: skip
    got = ps.explain(head, X, "gradcam", target=lambda out: out[:, 1, 0, 0])
    assert got.shape == (3, 8, 8) and float(got.abs().max()) > 0


def test_a_row_wise_callable_is_never_refused_for_its_numbers():
    """The row check reads the callable's gradient structure, not its values: NaN-free
    cancellation, a squeeze of [N, 1] and low precision pass; a NaN is the map's own error."""
    model = classifier(1)
    got = ps.explain(model, X, "gradient", target=lambda out: out.squeeze(1))
    torch.testing.assert_close(got, gradient_of(model, X, lambda out: out[:, 0]))
    wide = classifier()
    direction = torch.tensor([1.0, -1.0, 1.0, -1.0])
    got = ps.explain(wide, X, "gradient", target=lambda out: (out - out.mean(1, keepdim=True))
                     @ direction)  # fmt: skip
    want = gradient_of(wide, X, lambda out: (out - out.mean(1, keepdim=True)) @ direction)
    torch.testing.assert_close(got, want)
    with pytest.raises(ps.NonFiniteError, match="NaN or inf"):
        ps.explain(wide, X, "gradient", target=lambda out: (out[:, 0] - 1e9).sqrt())


class Probabilities(nn.Module):
    """SegNet's scores through softmax(dim=1): the op drops the grid layout of the scores."""

    def __init__(self) -> None:
        super().__init__()
        self.net = SegNet()

    def forward(self, x):
        return self.net(x).softmax(dim=1)


def test_review_three():
    """Dense probabilities keep the refusal; captured per-sample tensors and detached batch
    statistics in a callable are refused; Binary's threshold is for the predicted class."""
    with pytest.raises(SaliencyError, match="has no default layer on Probabilities"):
        ps.explain(seeded(Probabilities), X, "gradcam", target=ps.Segmentation(1, pixels="all"))
    model = classifier()
    labels = torch.tensor([1, 3, 0])
    with pytest.raises(SaliencyError, match=r"returns shape \(3,\) for one sample"):
        ps.explain(model, X, "gradient", target=lambda out: out[torch.arange(len(out)), labels])
    with pytest.raises(SaliencyError, match="scores sample 0 differently alone"):
        ps.explain(model, X, "gradient",
                   target=lambda out: out[:, 0] / out[:, 0].detach().abs().max())  # fmt: skip
    # The same values alone and in the batch, but the gradient reaches every row.
    with pytest.raises(SaliencyError, match="depend on other samples' outputs"):
        ps.explain(model, X, "gradient",
                   target=lambda out: out[:, 0] + (out - out.detach()).sum())  # fmt: skip
    with pytest.raises(SaliencyError, match="applies only without index="):
        ps.Binary(1, threshold=0.5)
    with pytest.raises(SaliencyError, match="Binary threshold must be a finite number"):
        ps.Binary(threshold=float("nan"))
    assert ps.Binary(threshold=np.float32(0.5)).threshold == 0.5
    # A collapsed twin shows: its own predictions, whatever class is explained.
    head = classifier(1)
    twin = classifier(1)
    with torch.no_grad():
        twin[-1].bias.fill_(-100.0)
    result = ps.data_randomization(head, twin, X, "gradient", target=ps.Binary(1))
    assert result.twin_predictions.tolist() == [0, 0, 0]


def test_every_kind_leaves_the_model_and_the_rng_as_found_even_when_refused():
    from tests._models import assert_unchanged, snapshot

    seg = segnet()
    seg.train()  # a mode the audit must put back
    calls = [
        lambda: ps.explain(seg, X, "guided_backprop", target=ps.Segmentation(1, pixels="all")),
        lambda: ps.parameter_randomization(seg, X, "gradient", target=ps.Segmentation(1)),
        lambda: ps.output_sensitivity(seg, X, "smoothgrad", target=ps.Segmentation(2)),  # no px
        lambda: ps.explain(seg, X, "gradient", target=lambda out: out.mean()),  # refused
        lambda: ps.explain(seg, X, "gradcam", target=ps.Segmentation(1, pixels="all")),
    ]
    for call in calls:
        before, rng = snapshot(seg), torch.random.get_rng_state()
        try:
            call()
        except SaliencyError:
            pass
        assert_unchanged(before, snapshot(seg))
        assert torch.equal(rng, torch.random.get_rng_state())
    assert seg.training
