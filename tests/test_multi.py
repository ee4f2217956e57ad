"""Shared passes: explain_many and list-of-methods audits give exactly the single-method results."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pytest_saliency as ps
from pytest_saliency.bundled.registry import PLAIN
from pytest_saliency.engine.passes import Tap, forward_backward
from pytest_saliency.errors import SaliencyError
from pytest_saliency.multi import explain_many

from ._models import randn, small_cnn

# Small options for the multi-pass methods keep the test fast; equality does not depend on them.
CHEAP = {"integrated_gradients": {"steps": 3}, "smoothgrad": {"samples": 2}}
PLAIN_FIVE = ["gradient", "input_x_gradient", "gradcam", "gradcam++", "fullgrad"]


def bn_net() -> nn.Module:
    """Conv-BN-ReLU(inplace) twice and a linear head; BatchNorm statistics are not trivial."""
    generator = torch.Generator().manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(inplace=True),
        nn.Flatten(), nn.Linear(5 * 8 * 8, 4),
    )  # fmt: skip
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
        for bn in (model[1], model[4]):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=generator) * 0.2)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)
    return model.eval()


def every_method() -> list[dict]:
    return [{"name": name, **CHEAP.get(name, {})} for name in ps.methods()]


@pytest.mark.parametrize("make", [lambda: small_cnn("inplace"), bn_net], ids=["cnn", "bn"])
def test_explain_many_equals_explain_for_every_method(make):
    model = make()
    x = randn(3, 3, 8, 8, seed=1)
    target = torch.tensor([0, 3, 1])
    specs = every_method() + [{"name": "gradcam++", "positive": False}]
    many = explain_many(model, x, specs, target=target, batch_size=2)
    for spec, got in zip(specs, many):
        options = {k: v for k, v in spec.items() if k != "name"}
        want = ps.explain(model, x, spec["name"], target=target, batch_size=2, **options)
        assert got.shape == want.shape
        assert torch.equal(got, want), spec


def test_cam_pass_without_input_gradient_keeps_layer_gradients():
    """A pass that stops at the tapped layer gives the same activations and gradients there."""
    model = bn_net()
    x = randn(2, 3, 8, 8, seed=2)
    taps = {"conv": Tap(model[3], True), "bn": Tap(model[1], False)}
    full = forward_backward(model, x, [1, 2], PLAIN, taps=taps)
    short = forward_backward(model, x, [1, 2], PLAIN, taps=taps, input_grad=False)
    assert short.input_grad is None and full.input_grad.abs().max() > 0
    for name in taps:
        for (a_full, g_full), (a_short, g_short) in zip(full.taps[name], short.taps[name]):
            assert torch.equal(g_full, g_short)
            assert (a_full is None) == (a_short is None)
            if a_full is not None:
                assert torch.equal(a_full, a_short)
    # The kept activation is the conv output from before the in-place BN and ReLU after it.
    with torch.no_grad():
        expected = model[3](model[2](model[1](model[0](x))))
    assert (expected < 0).any()
    torch.testing.assert_close(short.taps["conv"][0][0], expected)


def assert_same_scores(together, alone):
    assert together.method == alone.method and together.options == alone.options
    torch.testing.assert_close(together.scores, alone.scores, rtol=0, atol=0, equal_nan=True)
    assert together.score == alone.score or (together.score != together.score)


@pytest.mark.parametrize(
    "audit,kwargs",
    [
        (ps.parameter_randomization, {"mode": "cascading", "layers": None}),
        (ps.parameter_randomization, {"mode": "independent", "layers": "blocks"}),
        (ps.output_sensitivity, {"against": "second"}),
        (ps.output_sensitivity, {"against": "random", "seed": 4}),
    ],
    ids=["cascading", "independent", "second", "random"],
)
def test_list_of_methods_audit_equals_single_audits(audit, kwargs):
    model = small_cnn("inplace", seed=1)
    x = randn(4, 3, 8, 8, seed=5)
    specs = PLAIN_FIVE + [{"name": "guided_backprop"}, {"name": "smoothgrad", "samples": 2}]
    results = audit(model, x, specs, similarity="spearman", **kwargs)
    assert len(results) == len(specs)
    for spec, together in zip(specs, results):
        name, options = (spec, {}) if isinstance(spec, str) else (spec["name"], dict(spec))
        options.pop("name", None)
        alone = audit(model, x, name, similarity="spearman", **kwargs, **options)
        assert_same_scores(together, alone)


def test_methods_whose_rules_are_built_per_call_never_share_a_pass():
    """Rule sets built afresh per call (rectgrad, LRP) are told apart by the objects themselves:
    a freed rule set's id() can come back for the next one, which must not merge two methods."""
    model = bn_net()
    x = randn(2, 3, 8, 8, seed=5)
    specs = [
        {"name": "rectgrad"},
        {"name": "lrp_epsilon"},
        {"name": "rectgrad", "percentile": 50},
        {"name": "lrp_zplus"},
        {"name": "lrp_epsilon", "epsilon": 0.1},
        {"name": "lrp_alpha_beta"},
        {"name": "rectgrad", "percentile": 80},
    ]
    many = explain_many(model, x, specs, target=0)
    for spec, got in zip(specs, many):
        options = {k: v for k, v in spec.items() if k != "name"}
        assert torch.equal(got, ps.explain(model, x, spec["name"], target=0, **options)), spec


def test_a_plan_follows_the_models_weights_and_checks_the_input_shape():
    """A Plan binds methods to the model object once; each call sees its current weights."""
    from pytest_saliency.multi import Plan

    model = bn_net()
    x = randn(3, 3, 8, 8, seed=6)
    plan = Plan(model, x, PLAIN_FIVE, batch_size=2)
    before = plan(x, torch.tensor([0, 1, 2]))
    with torch.no_grad():
        model[3].weight.mul_(-1.5)
    after = plan(x, torch.tensor([0, 1, 2]))
    for name, old, new in zip(PLAIN_FIVE, before, after):
        want = ps.explain(model, x, name, target=torch.tensor([0, 1, 2]), batch_size=2)
        assert torch.equal(new, want) and not torch.equal(old, new), name
    with pytest.raises(SaliencyError, match=r"made for inputs of shape \(3, 3, 8, 8\), got \(2,"):
        plan(x[:2])
