"""Grad-CAM, Grad-CAM++ and FullGrad against closed forms and against captum / pytorch-grad-cam."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import pytest_saliency as ps
from pytest_saliency.errors import SaliencyError

CAMS = ["gradcam", "gradcam++"]
ALL = CAMS + ["fullgrad"]


# --- models and inputs ----------------------------------------------------------------------


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    """Fresh BatchNorms have mean 0, var 1, beta 0: their effective bias would be 0 everywhere."""
    g = seeded(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model


def build(factory, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():  # module init draws from the global RNG; leave it as found
        torch.manual_seed(seed)
        model = factory()
    return randomize_norms(model, seed).eval()


class Net(nn.Module):
    """Conv-BN-ReLU-pool-conv-ReLU; a dense head so layer gradients vary in space and sign."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 5, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(5 * 6 * 6, 6))

    def forward(self, x):
        return self.head(self.features(x))


class Twice(nn.Module):
    """One conv module called twice per forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))

    def forward(self, x):
        return self.head(self.conv(torch.relu(self.conv(x))))


class Scaled(nn.Module):
    """Logits times ``k``: pytorch-grad-cam adds eps=1e-6 (GradCAM++ alpha) and 1e-7 (min-max)
    to denominators; with gradients 1e4 times larger those are below float32 resolution, so
    the peers compute our formulas and can be compared to float tolerance."""

    def __init__(self, model: nn.Module, k: float = 1e4):
        super().__init__()
        self.m = model
        self.k = k

    def forward(self, x):
        return self.m(x) * self.k


@pytest.fixture(scope="module")
def net64():
    return build(Net).double()


@pytest.fixture(scope="module")
def x64():
    return torch.randn(3, 3, 12, 12, generator=seeded(1), dtype=torch.float64)


def vgg():
    model = torchvision.models.vgg11_bn(weights=None, num_classes=10)
    # The 25088x4096 classifier is 400 MB and irrelevant to the conv features being tested.
    model.classifier = nn.Linear(512 * 7 * 7, 10)
    return model


PEERS = {
    "net": (Net, "features", 12),
    "resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=10), "layer4", 64),
    "vgg11_bn": (vgg, "features", 64),
}


@pytest.fixture(scope="module", params=sorted(PEERS))
def peer_case(request):
    factory, layer, size = PEERS[request.param]
    x = torch.randn(2, 3, size, size, generator=seeded(2))
    return Scaled(build(factory)).eval(), "m." + layer, x, torch.tensor([3, 7]) % 6


# --- closed-form references (NumPy, float64) ------------------------------------------------


def resize(maps: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """(Bi)linear resize of [N, *s] with half-pixel centres, edge-clamped: separable np.interp."""
    out = maps
    for axis, new in enumerate(size, start=1):
        old = out.shape[axis]
        src = (np.arange(new) + 0.5) * old / new - 0.5  # np.interp clamps at the edges
        out = np.apply_along_axis(lambda v, s=src, o=old: np.interp(s, np.arange(o), v), axis, out)
    return out


def ref_gradcam(a, g, positive, size):
    axes = tuple(range(2, a.ndim))
    w = (np.maximum(g, 0) if positive else g).mean(axis=axes, keepdims=True)
    return resize(np.maximum((w * a).sum(axis=1), 0), size)


def ref_gradcam_pp(a, g, positive, size):
    axes = tuple(range(2, a.ndim))
    total = a.sum(axis=axes, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = g**2 / (2 * g**2 + total * g**3)
    alpha = np.where(g != 0, alpha, 0.0)
    w = (alpha * (np.maximum(g, 0) if positive else g)).sum(axis=axes, keepdims=True)
    return resize(np.maximum((w * a).sum(axis=1), 0), size)


def psi(m, size, positive):
    axes = tuple(range(2, m.ndim))
    if positive:
        m = np.abs(m)
        m = m - m.min(axis=axes, keepdims=True)
        span = m.max(axis=axes, keepdims=True)
    else:
        span = np.abs(m).max(axis=axes, keepdims=True)
    m = np.divide(m, span, out=np.zeros_like(m), where=span > 0)
    return sum(resize(m[:, c], size) for c in range(m.shape[1]))


def bn_bias(bn):
    return (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()


def ref_fullgrad(x, grad_x, biased, positive):
    """biased: (bias [C], gradient at the layer output [N, C, ...]) per layer call."""
    size = x.shape[2:]
    m = x.numpy() * grad_x.numpy()
    total = psi(m if not positive else np.abs(m), size, positive)
    for bias, grad in biased:
        b = bias.numpy().reshape((1, -1) + (1,) * (grad.dim() - 2))
        total = total + psi(b * grad.numpy(), size, positive)
    return total


def net_layer(net, x, target, split):
    """Activation and gradient at net.features[:split] (the whole block when split is None)."""
    a = net.features[:split](x)
    a_leaf = a.detach().requires_grad_(True)
    rest = net.features[split:] if split is not None else nn.Identity()
    score = net.head(rest(a_leaf)).gather(1, target[:, None]).sum()
    (g,) = torch.autograd.grad(score, a_leaf)
    return a.detach().numpy(), g.numpy()


# --- closed forms ---------------------------------------------------------------------------

REFS = {"gradcam": ref_gradcam, "gradcam++": ref_gradcam_pp}


@pytest.mark.parametrize("method", CAMS)
@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("layer,split", [("features", None), ("features.4", 5)])
def test_cam_matches_closed_form(net64, x64, method, positive, layer, split):
    target = torch.tensor([0, 4, 2])
    a, g = net_layer(net64, x64, target, split)
    if layer == "features.4":
        assert (a < 0).any()  # signed activations: sum A can be negative in alpha's denominator
    assert (g > 0).any() and (g < 0).any()
    got = ps.explain(net64, x64, method, target=target, layer=layer, positive=positive)
    want = REFS[method](a, g, positive, (12, 12))
    assert got.shape == (3, 12, 12) and got.dtype == torch.float64
    assert want.max() > 0
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("positive", [True, False])
def test_fullgrad_matches_closed_form(net64, x64, positive):
    target = torch.tensor([1, 1, 5])
    x = x64.clone().requires_grad_(True)
    h, outs, biases = x, [], []
    for m in net64.features:
        h = m(h)
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
            outs.append(h)
            biases.append(bn_bias(m) if isinstance(m, nn.BatchNorm2d) else m.bias.detach())
    score = net64.head(h).gather(1, target[:, None]).sum()
    grads = torch.autograd.grad(score, [x, *outs])
    want = ref_fullgrad(x64, grads[0], list(zip(biases, grads[1:])), positive)
    got = ps.explain(net64, x64, "fullgrad", target=target, positive=positive)
    assert got.shape == (3, 12, 12)
    if not positive:
        assert want.min() < 0  # the signed variant keeps negative evidence
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("positive", [True, False])
def test_fullgrad_counts_every_call_of_a_reused_module(positive):
    model = build(Twice).double()
    x = torch.randn(2, 3, 8, 8, generator=seeded(3), dtype=torch.float64)
    target = torch.tensor([0, 3])
    xg = x.clone().requires_grad_(True)
    first = model.conv(xg)
    second = model.conv(torch.relu(first))
    score = model.head(second).gather(1, target[:, None]).sum()
    gx, g1, g2 = torch.autograd.grad(score, [xg, first, second])
    bias = model.conv.bias.detach()
    want = ref_fullgrad(x, gx, [(bias, g1), (bias, g2)], positive)
    got = ps.explain(model, x, "fullgrad", target=target, positive=positive)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)
    with pytest.raises(SaliencyError, match=r"'conv'.*runs 2 times.*ambiguous"):
        ps.explain(model, x, "gradcam", layer="conv")


def test_fullgrad_without_biased_layers_is_the_input_term():
    model = build(lambda: nn.Sequential(nn.Flatten(), nn.Linear(2 * 5 * 5, 3))).double()
    x = torch.randn(2, 2, 5, 5, generator=seeded(4), dtype=torch.float64)
    grad = model[1].weight.detach()[torch.tensor([2, 0])].reshape(2, 2, 5, 5)
    for positive in (True, False):
        want = ref_fullgrad(x, grad, [], positive)
        got = ps.explain(model, x, "fullgrad", target=torch.tensor([2, 0]), positive=positive)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,size", [((2, 2), (64, 64)), ((7, 3), (224, 50)), ((9, 12), (4, 5))])
def test_upsample_equals_bilinear_interpolation(shape, size, dtype):
    """2-d maps are resized by two matrix products: the same numbers as F.interpolate."""
    from pytest_saliency.bundled.cam import upsample

    maps = torch.randn(3, 2, *shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    want = torch.nn.functional.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    got = upsample(maps, size)
    assert got.shape == want.shape and got.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_one_dimensional_inputs_use_linear_interpolation():
    factory = lambda: nn.Sequential(  # noqa: E731
        nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2)),
        nn.Sequential(nn.Flatten(), nn.Linear(3 * 5, 4)),
    )
    model = build(factory).double()
    x = torch.randn(2, 2, 10, generator=seeded(5), dtype=torch.float64)
    target = torch.tensor([1, 3])
    a = model[0](x)
    leaf = a.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(model[1](leaf).gather(1, target[:, None]).sum(), leaf)
    for method, ref in REFS.items():
        got = ps.explain(model, x, method, target=target)
        assert got.shape == (2, 10)
        want = ref(a.detach().numpy(), g.numpy(), method == "gradcam++", (10,))
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


# --- peers ----------------------------------------------------------------------------------


def minmax(maps) -> np.ndarray:
    """Per-sample min-max. pytorch-grad-cam min-max normalises at layer resolution and resizes
    with cv2 (half-pixel bilinear, same as ours); bilinear resizing commutes with that affine
    map, so after one more per-sample min-max both sides are the same quantity."""
    m = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
    m = m - m.min(axis=1, keepdims=True)
    return m / m.max(axis=1, keepdims=True)


def test_gradcam_matches_captum(peer_case):
    from captum.attr import LayerAttribution, LayerGradCam

    model, layer, x, target = peer_case
    module = dict(model.named_modules())[layer]
    attr = LayerGradCam(model, module).attribute(x, target=target, relu_attributions=True)
    want = LayerAttribution.interpolate(attr, tuple(x.shape[2:]), "bilinear")[:, 0]
    got = ps.explain(model, x, "gradcam", target=target, layer=layer)
    assert want.max() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.detach().abs().max()))


@pytest.mark.parametrize("method", ["gradcam++", "fullgrad"])
def test_matches_pytorch_grad_cam(peer_case, method):
    from pytorch_grad_cam import FullGrad, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, layer, x, target = peer_case
    if method == "gradcam++":
        peer = GradCAMPlusPlus(model, [dict(model.named_modules())[layer]])
    else:
        peer = FullGrad(model, [])
    with peer:  # removes its hooks on exit
        want = peer(x, [ClassifierOutputTarget(int(t)) for t in target])
    got = ps.explain(model, x, method, target=target, layer=layer if method in CAMS else None)
    assert got.shape == want.shape
    np.testing.assert_allclose(minmax(got.numpy()), minmax(want), atol=2e-5)


# --- layers, errors, side effects, batching -------------------------------------------------


def test_default_layer_is_the_last_spatial_module(net64, x64):
    resnet = build(lambda: torchvision.models.resnet18(weights=None, num_classes=10))
    x = torch.randn(1, 3, 64, 64, generator=seeded(6))
    for method in CAMS:
        torch.testing.assert_close(
            ps.explain(net64, x64, method), ps.explain(net64, x64, method, layer="features")
        )
        # layer4 is the last module to finish with a 2x2 output; avgpool's is 1x1.
        torch.testing.assert_close(
            ps.explain(resnet, x, method), ps.explain(resnet, x, method, layer=resnet.layer4)
        )


def test_layer_errors(net64, x64):
    with pytest.raises(SaliencyError, match=r"'featurs'.*Closest names: 'features'"):
        ps.explain(net64, x64, "gradcam", layer="featurs")
    with pytest.raises(SaliencyError, match=r"'head.1' \(Linear\) outputs shape \(6,\)"):
        ps.explain(net64, x64, "gradcam++", layer="head.1")
    with pytest.raises(SaliencyError, match="takes no layer"):
        ps.explain(net64, x64, "fullgrad", layer="features")
    flat = build(lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4)))
    with pytest.raises(SaliencyError, match="needs a feature map with more than one grid position"):
        ps.explain(flat, torch.ones(2, 3, 8, 8), "gradcam")
    dense = build(lambda: nn.Linear(5, 3))
    for method in ALL:
        with pytest.raises(SaliencyError, match="spatial axes"):
            ps.explain(dense, torch.ones(2, 5), method)


def test_layer_that_does_not_run(x64):
    model = build(Net).double()
    model.spare = nn.Conv2d(3, 3, 1).double()  # registered, never called
    with pytest.raises(SaliencyError, match=r"'spare' \(Conv2d\) did not return a tensor"):
        ps.explain(model, x64, "gradcam", layer="spare")
    # A module that never runs adds no FullGrad term, and is no unread term to warn about.
    plain = build(Net).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ps.SaliencyWarning)
        unused = ps.explain(model, x64, "fullgrad", target=1)
    torch.testing.assert_close(unused, ps.explain(plain, x64, "fullgrad", target=1))


@pytest.mark.parametrize("method", ALL)
def test_options_are_checked(net64, x64, method):
    with pytest.raises(SaliencyError, match="'positive' must be true or false"):
        ps.explain(net64, x64, method, positive="yes")
    valid = "positive" if method == "fullgrad" else "layout, positive"
    with pytest.raises(SaliencyError, match=f"its options are: {valid}$"):
        ps.explain(net64, x64, method, steps=3)


def test_fullgrad_needs_running_statistics(x64):
    model = build(Net).double()
    model.features[1] = nn.BatchNorm2d(4, track_running_stats=False).double()
    with pytest.raises(SaliencyError, match=r"'features.1'.*running statistics"):
        ps.explain(model, x64, "fullgrad")


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "hooks": [
            (
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(m._backward_pre_hooks),
            )
            for m in model.modules()
        ],
        "rng": torch.get_rng_state(),
    }


@pytest.mark.parametrize("method", ALL)
def test_model_is_left_as_found(x64, method):
    model = build(Net).double().train()
    model.features[1].eval()  # a per-module flag must survive too
    model.head[1].bias.requires_grad_(False)
    before = snapshot(model)
    ps.explain(model, x64, method, target=2)
    after = snapshot(model)
    for key in ("training", "requires_grad", "grads", "hooks"):
        assert after[key] == before[key], key
    assert torch.equal(after["rng"], before["rng"])
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k


@pytest.mark.parametrize("method", ALL)
def test_batch_size_does_not_change_maps(net64, method):
    x = torch.randn(5, 3, 12, 12, generator=seeded(7), dtype=torch.float64)
    whole = ps.explain(net64, x, method)
    torch.testing.assert_close(ps.explain(net64, x, method, batch_size=2), whole)
    assert whole.abs().max() > 0


@pytest.mark.parametrize("method", ALL)
def test_per_sample_targets_equal_single_calls(net64, x64, method):
    target = torch.tensor([5, 0, 3])
    batched = ps.explain(net64, x64, method, target=target)
    for i, t in enumerate(target.tolist()):
        single = ps.explain(net64, x64[i : i + 1], method, target=t)
        torch.testing.assert_close(batched[i : i + 1], single)
    assert not torch.allclose(batched[0], ps.explain(net64, x64[:1], method, target=0)[0])
