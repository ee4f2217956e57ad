"""LRP epsilon, z+ and alpha-beta against closed matrix forms and zennit."""

from __future__ import annotations

import copy
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pytest_saliency as ps
from pytest_saliency.bundled.registry import methods
from pytest_saliency.errors import SaliencyError, UnsupportedActivationError
from tests._models import (
    RELU_STYLES,
    assert_unchanged,
    randn,
    small_cnn,
    snapshot,
    torchvision_model,
)

METHODS = ("lrp_epsilon", "lrp_zplus", "lrp_alpha_beta")

# --- closed forms, numpy, batch-first: X [N, D_in], W [D_out, D_in], b [D_out], R [N, D_out] ---


def stab(z, eps):
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def epsilon_rule(x, w, b, r, eps=1e-6):
    return x * ((r / stab(x @ w.T + b, eps)) @ w)


def alpha_beta_rule(x, w, b, r, alpha=2.0, beta=1.0):
    xp, xn = np.maximum(x, 0), np.minimum(x, 0)
    wp, wn = np.maximum(w, 0), np.minimum(w, 0)
    zp = xp @ wp.T + xn @ wn.T + np.maximum(b, 0)
    zn = xp @ wn.T + xn @ wp.T + np.minimum(b, 0)
    sp, sn = r / stab(zp, 1e-6), r / stab(zn, 1e-6)
    return alpha * (xp * (sp @ wp) + xn * (sp @ wn)) - beta * (xp * (sn @ wn) + xn * (sn @ wp))


RULES = {
    "lrp_epsilon": epsilon_rule,
    "lrp_zplus": lambda x, w, b, r: alpha_beta_rule(x, w, b, r, 1.0, 0.0),
    "lrp_alpha_beta": alpha_beta_rule,
}


def dense_relevance(layers, x, targets, rule):
    """LRP through dense affine layers (W, b) with ReLUs between them (ReLUs pass relevance)."""
    inputs = []
    h = x
    for i, (w, b) in enumerate(layers):
        inputs.append(h)
        h = h @ w.T + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    r = np.zeros_like(h)
    r[np.arange(len(x)), targets] = 1.0  # relevance starts as the one-hot target, not the logit
    for (w, b), a in zip(reversed(layers), reversed(inputs)):
        r = rule(a, w, b, r)
    return r


def dense_params(linear: nn.Linear):
    return linear.weight.detach().numpy(), linear.bias.detach().numpy()


def conv_matrix(conv: nn.Conv2d, in_shape):
    """The conv as a dense matrix [D_out, D_in] and bias [D_out], read off basis images."""
    d_in = int(np.prod(in_shape))
    basis = torch.eye(d_in, dtype=torch.float64).reshape(d_in, *in_shape)
    with torch.no_grad():
        columns = conv._conv_forward(basis, conv.weight, None).reshape(d_in, -1)
    out_positions = columns.shape[1] // conv.out_channels
    bias = np.repeat(conv.bias.detach().numpy(), out_positions)
    return columns.T.numpy(), bias


def fold(matrix, bias, bn: nn.BatchNorm2d):
    """Dense BatchNorm folding in numpy: W * s, (b - mean) * s + beta per output channel."""
    scale = bn.weight.detach().numpy() / np.sqrt(bn.running_var.numpy() + bn.eps)
    repeat = matrix.shape[0] // scale.shape[0]
    s = np.repeat(scale, repeat)
    shift = np.repeat(bn.bias.detach().numpy() - bn.running_mean.numpy() * scale, repeat)
    return matrix * s[:, None], bias * s + shift


def seeded(model: nn.Module, seed: int, scale: float = 1.0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale)
    return model.eval()


def randomize_batch_norms(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that folding matters.

    ``eps`` is set to 1e-30: zennit's merge leaves each BatchNorm as x / sqrt(1 + eps) (it resets
    the statistics to mean 0, var 1 but keeps eps), a 5e-6 rescaling that the epsilon rule can
    amplify to ~1e-2 on deep nets; with eps below float64's resolution next to 1 both foldings
    are exact and comparable (torch 2.11 refuses eps = 0 itself).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=generator) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(c, generator=generator) * 0.2)
                m.eps = 1e-30
    return model


# --- (1) closed forms on single layers and small stacks ---


@pytest.mark.parametrize("method", METHODS)
def test_mlp_matches_closed_form(method):
    model = seeded(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(),
                                 nn.Linear(5, 3)).double(), 0)  # fmt: skip
    x = randn(4, 6, seed=1, dtype=torch.float64)
    targets = np.array([0, 2, 1, 2])
    layers = [dense_params(m) for m in model if isinstance(m, nn.Linear)]
    expected = dense_relevance(layers, x.numpy(), targets, RULES[method])
    got = ps.explain(model, x, method, target=torch.as_tensor(targets))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-12)


CONVS = {
    "pad1": dict(kernel_size=3, padding=1),
    "stride2_groups2": dict(kernel_size=3, stride=2, groups=2),
    "same_dilated": dict(kernel_size=3, padding="same", dilation=2),
}


@pytest.mark.parametrize("batch_norm", [False, True], ids=["plain", "bn_folded"])
@pytest.mark.parametrize("conv", sorted(CONVS))
@pytest.mark.parametrize("method", METHODS)
def test_conv_matches_closed_form(method, conv, batch_norm):
    in_shape = (2, 6, 6)
    conv_layer = nn.Conv2d(2, 4, **CONVS[conv])
    layers: list[nn.Module] = [conv_layer]
    if batch_norm:
        layers.append(nn.BatchNorm2d(4))
    probe = nn.Sequential(*layers).eval()(torch.zeros(1, *in_shape))
    head = nn.Linear(probe.numel(), 3)
    model = seeded(nn.Sequential(*layers, nn.ReLU(), nn.Flatten(), head).double(), 2, 0.7)
    if batch_norm:
        randomize_batch_norms(model)
        model[1].eps = 1e-3  # no peer here, so a non-zero eps is checked too
    x = randn(3, *in_shape, seed=3, dtype=torch.float64)
    targets = np.array([2, 0, 1])

    matrix, bias = conv_matrix(model[0], in_shape)
    if batch_norm:
        matrix, bias = fold(matrix, bias, model[1])
    layers_np = [(matrix, bias), dense_params(model[-1])]
    flat = dense_relevance(layers_np, x.reshape(3, -1).numpy(), targets, RULES[method])
    expected = flat.reshape(3, *in_shape).sum(axis=1)
    got = ps.explain(model, x, method, target=torch.as_tensor(targets))
    assert got.shape == (3, 6, 6)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_relevance_is_conserved_without_biases(method):
    """Bias-free ReLU net: the input relevance sums to the one-hot's 1 (up to the stabilizer);
    z+ relevance is never negative."""
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(24, 4, bias=False),
    ).double()  # fmt: skip
    seeded(model, 4)
    x = randn(3, 3, 8, 8, seed=5, dtype=torch.float64)
    maps = ps.explain(model, x, method, target=torch.tensor([0, 1, 3]))
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(3, dtype=torch.float64), rtol=1e-4,
                               atol=0)  # fmt: skip
    if method == "lrp_zplus":
        assert (maps >= 0).all()


# --- (2) agreement with zennit on the same model, rule on every Conv/Linear ---


def zennit_lrp(model, x, targets, method, canonizers):
    from zennit.composites import LayerMapComposite
    from zennit.layer import Sum
    from zennit.rules import AlphaBeta, Epsilon, Norm, Pass, ZPlus
    from zennit.types import Activation, AvgPool, BatchNorm, Convolution

    rule = {"lrp_epsilon": Epsilon, "lrp_zplus": ZPlus, "lrp_alpha_beta": AlphaBeta}[method]
    composite = LayerMapComposite(
        [
            (Activation, Pass()),
            (Sum, Norm()),
            (AvgPool, Norm()),
            (BatchNorm, Pass()),
            (Convolution, rule()),
            (nn.Linear, rule()),
        ],
        canonizers=canonizers,
    )
    model = copy.deepcopy(model)  # zennit's canonizers edit the model they are given
    x = x.clone().requires_grad_(True)
    with composite.context(model) as modified:
        out = modified(x)
        (grad,) = torch.autograd.grad(out, x, F.one_hot(targets, out.shape[1]).to(out))
    return grad.sum(dim=1)


def assert_agrees(ours, ref):
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-6, f"max |ours - zennit| / max |zennit| = {err:.2e}"


def small_sequential_cnn() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True), nn.AvgPool2d(2),
        nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(24, 10), nn.ReLU(), nn.Linear(10, 5),
    ).double()  # fmt: skip
    return randomize_batch_norms(seeded(model, 6, 0.5))


def vgg11_bn_small_head() -> nn.Module:
    """torchvision's vgg11_bn features and pooling; the 25088x4096 classifier is swapped for a
    small one of the same layout so the float64 runs stay fast."""
    model = copy.deepcopy(torchvision_model("vgg11_bn"))
    model.classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, 16), nn.ReLU(True), nn.Dropout(),
        nn.Linear(16, 16), nn.ReLU(True), nn.Dropout(), nn.Linear(16, 10),
    )  # fmt: skip
    seeded(model.classifier, 7, 0.05)
    return randomize_batch_norms(model.double().eval())


def resnet18() -> nn.Module:
    return randomize_batch_norms(copy.deepcopy(torchvision_model("resnet18")).double())


def _seq_canonizers():
    from zennit.canonizers import SequentialMergeBatchNorm

    return [SequentialMergeBatchNorm()]


def _resnet_canonizers():
    from zennit.torchvision import ResNetCanonizer

    return [ResNetCanonizer()]


PEER_MODELS = {
    "small_cnn": (small_sequential_cnn, _seq_canonizers, (2, 3, 16, 16)),
    "resnet18": (resnet18, _resnet_canonizers, (2, 3, 64, 64)),
    "vgg11_bn": (vgg11_bn_small_head, _seq_canonizers, (2, 3, 64, 64)),
}


@pytest.mark.parametrize("name", sorted(PEER_MODELS))
def test_matches_zennit(name):
    pytest.importorskip("zennit")
    build, canonizers, shape = PEER_MODELS[name]
    model = build()
    x = randn(*shape, seed=8, dtype=torch.float64)
    targets = torch.tensor([1, 3])
    for method in METHODS:
        ours = ps.explain(model, x, method, target=targets)
        assert ours.shape == (shape[0], *shape[2:])
        assert_agrees(ours, zennit_lrp(model, x, targets, method, canonizers()))


# --- (3) functional, in-place and module spellings give the same map ---


@pytest.mark.parametrize("method", METHODS)
def test_relu_spellings_agree(method):
    x = randn(3, 3, 8, 8, seed=9)
    reference = ps.explain(small_cnn("module"), x, method, target=1)
    for style in RELU_STYLES:
        got = ps.explain(small_cnn(style), x, method, target=1)
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-7, msg=style)


class ResidualNet(nn.Module):
    """conv-bn-relu, one residual block, global pooling, fc; the sum and the pooling spelled
    several ways. ``zennit`` spells the sum as zennit's canonizer does (stack + Sum module)."""

    def __init__(self, add: str, pool: str):
        super().__init__()
        from zennit.layer import Sum

        self.add, self.pool = add, pool
        self.conv0, self.bn0 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv1, self.bn1 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.sum = Sum()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        identity = self.relu(self.bn0(self.conv0(x)))
        out = self.bn1(self.conv1(identity))
        if self.add == "plus":
            out = out + identity
        elif self.add == "iadd":
            out += identity
        elif self.add == "torch_add":
            out = torch.add(identity, out)
        elif self.add == "add_":
            out.add_(identity)
        else:
            out = self.sum(torch.stack([identity, out], dim=-1))
        out = F.relu(out)
        if self.pool == "module":
            out = self.avg(out).flatten(1)
        elif self.pool == "functional":
            out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        else:
            out = out.mean(dim=(2, 3))
        return self.fc(out)


def residual_net(add: str, pool: str) -> ResidualNet:
    model = seeded(ResidualNet(add, pool).double(), 10, 0.5)
    return randomize_batch_norms(model)


@pytest.mark.parametrize("method", METHODS)
def test_residual_sums_and_pooling_spellings_match_zennit(method):
    pytest.importorskip("zennit")
    x = randn(2, 3, 8, 8, seed=11, dtype=torch.float64)
    targets = torch.tensor([0, 3])
    ref = zennit_lrp(residual_net("zennit", "module"), x, targets, method, _seq_canonizers())
    for add in ("plus", "iadd", "torch_add", "add_"):
        for pool in ("module", "functional", "mean"):
            ours = ps.explain(residual_net(add, pool), x, method, target=targets)
            assert_agrees(ours, ref)


# --- (4) the user's model is left as it was ---


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = F.group_norm(self.conv(x), 2)
        return self.fc(F.relu(h).mean(dim=(2, 3)))


def test_model_unchanged_after_calls_and_errors():
    model = small_sequential_cnn()
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model
    model[0].weight.requires_grad_(False)
    model[4].register_forward_hook(lambda *args: None)
    before = snapshot(model)
    x = randn(2, 3, 16, 16, seed=12, dtype=torch.float64)
    for method in METHODS:
        ps.explain(model, x, method)
    assert_unchanged(before, snapshot(model))

    broken = GroupNormNet()
    broken.register_forward_pre_hook(lambda *args: None)
    before = snapshot(broken)
    with pytest.raises(UnsupportedActivationError, match="lrp_zplus.*group_norm"):
        ps.explain(broken, randn(2, 3, 8, 8, seed=13), "lrp_zplus")
    assert_unchanged(before, snapshot(broken))
    # nothing of the failed pass is left installed: a later call is exact again
    torch.testing.assert_close(ps.explain(model, x, "lrp_epsilon"),
                               ps.explain(model.eval(), x, "lrp_epsilon"))  # fmt: skip


def test_unknown_layers_raise():
    # Elementwise activations pass relevance (tests/bundled/test_other_activations.py); a
    # transposed convolution has no rule.
    transposed = nn.Sequential(nn.ConvTranspose2d(3, 2, 2), nn.Flatten(), nn.LazyLinear(2))
    transposed(randn(1, 3, 4, 4))
    with pytest.raises(UnsupportedActivationError, match="conv_transpose2d"):
        ps.explain(transposed, randn(2, 3, 4, 4), "lrp_alpha_beta")


# --- (5) chunking and options ---


@pytest.mark.parametrize("method", METHODS)
def test_batch_size_does_not_change_maps(method):
    model = small_sequential_cnn()
    x = randn(5, 3, 16, 16, seed=14, dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 3, 4])
    whole = ps.explain(model, x, method, target=targets)
    chunked = ps.explain(model, x, method, target=targets, batch_size=2)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-15)


def test_options_change_the_map_as_the_formula_says():
    model = seeded(nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double(), 15)
    x = randn(2, 5, seed=16, dtype=torch.float64)
    layers = [dense_params(m) for m in model if isinstance(m, nn.Linear)]
    for eps in (0.5, 3.0):
        expected = dense_relevance(layers, x.numpy(), [1, 1], partial(epsilon_rule, eps=eps))
        got = ps.explain(model, x, "lrp_epsilon", target=1, epsilon=eps)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9)
    rule = partial(alpha_beta_rule, alpha=1.5, beta=0.5)
    expected = dense_relevance(layers, x.numpy(), [2, 2], rule)
    got = ps.explain(model, x, "lrp_alpha_beta", target=2, alpha=1.5, beta=0.5)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9)


@pytest.mark.parametrize(
    ("method", "options", "match"),
    [
        ("lrp_epsilon", {"epsilon": 0}, "'epsilon' must be > 0"),
        ("lrp_epsilon", {"epsilon": -1e-3}, "'epsilon' must be > 0"),
        ("lrp_epsilon", {"epsilon": float("nan")}, "'epsilon' must be a finite number"),
        ("lrp_epsilon", {"epsilon": True}, "'epsilon' must be a finite number"),
        ("lrp_epsilon", {"epsilon": "small"}, "'epsilon' must be a finite number"),
        ("lrp_epsilon", {"gamma": 0.25}, "no option 'gamma'; its options are: attention, epsilon"),
        ("lrp_zplus", {"epsilon": 0.1}, "no option 'epsilon'; its options are: attention"),
        ("lrp_alpha_beta", {"alpha": 3}, r"alpha - beta = 1.*alpha=3.0, beta=1.0"),
        ("lrp_alpha_beta", {"alpha": 0.5, "beta": -0.5}, "must be >= 0"),
        ("lrp_alpha_beta", {"beta": float("inf")}, "'beta' must be a finite number"),
    ],
)
def test_bad_options_are_named(method, options, match):
    with pytest.raises(SaliencyError, match=match):
        ps.explain(nn.Linear(3, 2), randn(1, 3), method, **options)


def test_registered():
    assert set(METHODS) <= set(methods())


class InPlaceOddities(nn.Module):
    """Layer outputs changed in place by an op no LRP rule handles, and a folded conv whose
    output is read a second time."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        a = self.conv0(x)
        a.mul_(0.5)  # in place on a layer output, before anything else reads it
        b = self.conv1(F.relu(a))
        folded = self.bn1(b)  # folded into conv1 ...
        again = b.clone().relu_()  # ... whose own output is read again
        return self.fc((folded + again).flatten(1))


def _eager_prepare(self, x, layer, z):
    from pytest_saliency.bundled.lrp import Deferred

    deferred = Deferred(z, self.epsilon)
    deferred.settle()
    return deferred


@pytest.mark.parametrize("name", ["oddities", "small_cnn", "resnet18"])
def test_epsilon_deferred_stabiliser_equals_eager(monkeypatch, name):
    """The ε rule stabilises z when it is first needed (or never, for a conv folded with its
    BatchNorm): the maps are bitwise those of stabilising every z in the forward pass, and
    on resnet18 its 20 convs (each folded) are never stabilised."""
    from pytest_saliency.bundled import lrp

    model = {
        "oddities": lambda: randomize_batch_norms(seeded(InPlaceOddities().double(), 3, 0.5)),
        "small_cnn": small_sequential_cnn,
        "resnet18": resnet18,
    }[name]()
    size = 8 if name != "resnet18" else 32
    x = randn(2, 3, size, size, seed=4, dtype=torch.float64)
    calls = []
    counted = lambda z, eps: calls.append(z.shape) or stabilize(z, eps)  # noqa: E731
    stabilize = lrp.stabilize
    monkeypatch.setattr(lrp, "stabilize", counted)
    deferred = ps.explain(model, x, "lrp_epsilon", target=1)
    deferred_calls = len(calls)
    calls.clear()
    monkeypatch.setattr(lrp.EpsilonRule, "prepare", _eager_prepare)
    eager = ps.explain(model, x, "lrp_epsilon", target=1)
    assert torch.equal(deferred, eager)
    if name == "resnet18":
        assert deferred_calls == len(calls) - 20
    else:
        assert deferred_calls <= len(calls)


def test_epsilon_keeps_no_memory_between_calls():
    """Settling a deferred output during the forward pass builds no autograd graph, and a
    deferred output holds no reference back to its own autograd node: after a call, nothing
    of it stays alive (the tensors alive after the second and the fifth call are the same)."""
    import gc

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3),
    ).eval()  # fmt: skip
    x = randn(4, 3, 8, 8, seed=2)

    def alive() -> int:
        gc.collect()
        return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())

    gc.disable()  # the leak was a cycle through autograd nodes: count without collecting
    try:
        counts = []
        for _ in range(5):
            ps.explain(model, x, "lrp_epsilon", target=0)
            counts.append(sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects()))
    finally:
        gc.enable()
    assert counts[1] == counts[-1], counts
    assert alive() <= counts[-1]
