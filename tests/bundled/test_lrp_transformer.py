"""LRP on transformers: each new rule against its closed form in numpy, conservation on real
vision transformers with zero biases, agreement with lxt, and what is still refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pytest_saliency as ps
from pytest_saliency.errors import SaliencyError, UnsupportedActivationError
from tests._models import assert_unchanged, randn, snapshot

METHODS = ("lrp_epsilon", "lrp_zplus", "lrp_alpha_beta")
TOKENS, WIDTH, HEADS = 5, 8, 2


# --- closed forms in numpy (float64, one sample at a time) ---------------------------------


def stab(z, eps=1e-6):
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def eps_linear(x, w, b, r, eps=1e-6):
    """The epsilon rule of x @ w.T + b on rows of x."""
    return x * ((r / stab(x @ w.T + b, eps)) @ w)


def norm_relevance(x, gamma, beta, r, center, eps=1e-5):
    """LayerNorm (center) or RMSNorm with its statistic constant, the epsilon rule of the
    linear map J = diag(gamma / sigma) C, written out as a matrix for every row."""
    out = np.empty_like(x)
    n = x.shape[-1]
    for i, row in enumerate(x):
        centred = row - row.mean() if center else row
        sigma = np.sqrt((centred**2).mean() + eps)
        c = np.eye(n) - (1.0 / n if center else 0.0)
        jac = np.diag(gamma / sigma) @ c  # y = J x + beta
        y = jac @ row + beta
        out[i] = row * (jac.T @ (r[i] / stab(y)))
    return out


def softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class Attention(nn.Module):
    """One attention layer on [N, TOKENS * WIDTH] inputs, then a mean over tokens and a head.

    ``spelling``: "sdpa" (F.scaled_dot_product_attention), "explicit" (q @ k^T, softmax,
    weights @ v, as timm's non-fused path and transformers' eager attention), or "mha"
    (nn.MultiheadAttention, as torchvision's ViT)."""

    def __init__(self, spelling: str, norm: str | None = None, seed: int = 0):
        super().__init__()
        self.spelling = spelling
        torch.manual_seed(seed)
        self.q, self.k, self.v = (nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(3))
        self.mha = nn.MultiheadAttention(WIDTH, HEADS, bias=False, batch_first=True)
        with torch.no_grad():  # the same projections for every spelling
            self.mha.in_proj_weight.copy_(torch.cat([self.q.weight, self.k.weight, self.v.weight]))
            self.mha.out_proj.weight.copy_(torch.eye(WIDTH))
        self.norm = {None: nn.Identity(), "layer": nn.LayerNorm(WIDTH)}[norm]
        if norm == "rms":
            self.norm = nn.RMSNorm(WIDTH, eps=1e-5)
        if norm is not None:
            with torch.no_grad():
                self.norm.weight.uniform_(0.5, 1.5)
                if getattr(self.norm, "bias", None) is not None:
                    self.norm.bias.normal_(0, 0.1)
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, x):
        t = self.norm(x.view(len(x), TOKENS, WIDTH))
        if self.spelling == "mha":
            mixed, _ = self.mha(t, t, t, need_weights=False)
        else:
            n = len(t)

            def split(z):
                return z.view(n, TOKENS, HEADS, WIDTH // HEADS).transpose(1, 2)

            q, k, v = split(self.q(t)), split(self.k(t)), split(self.v(t))
            if self.spelling == "sdpa":
                mixed = F.scaled_dot_product_attention(q, k, v)
            else:
                weights = ((q @ k.transpose(-2, -1)) * (WIDTH // HEADS) ** -0.5).softmax(dim=-1)
                mixed = weights @ v
            mixed = mixed.transpose(1, 2).reshape(n, TOKENS, WIDTH)
        return self.head(mixed.mean(dim=1))


def attention_reference(model: Attention, x: np.ndarray, target: int, rule: str) -> np.ndarray:
    """The map of ``model`` for one flat sample, by the closed forms of CP-LRP or AttnLRP."""
    w = {name: getattr(model, name).weight.detach().double().numpy() for name in "qkv"}
    head_w, head_b = (p.detach().double().numpy() for p in (model.head.weight, model.head.bias))
    t = x.reshape(TOKENS, WIDTH)
    q, k, v = (t @ w[name].T for name in "qkv")
    d = WIDTH // HEADS
    mixed = np.zeros_like(t)
    parts = []
    for h in range(HEADS):
        cols = slice(h * d, (h + 1) * d)
        scores = q[:, cols] @ k[:, cols].T / np.sqrt(d)
        a = softmax(scores)
        mixed[:, cols] = a @ v[:, cols]
        parts.append((cols, scores, a))
    pooled = mixed.mean(0)
    r = np.zeros(3)
    r[target] = 1.0
    r_pooled = eps_linear(pooled[None], head_w, head_b, r[None])[0]
    r_mixed = mixed * (r_pooled / stab(pooled) / TOKENS)  # the mean: Norm rule
    if model.spelling == "mha":  # its output projection, the identity here, is a layer too
        r_mixed = eps_linear(mixed, np.eye(WIDTH), np.zeros(WIDTH), r_mixed)
    r_q, r_k, r_v = np.zeros_like(t), np.zeros_like(t), np.zeros_like(t)
    for cols, scores, a in parts:
        s = r_mixed[:, cols] / stab(a @ v[:, cols])
        if rule == "cp":
            r_v[:, cols] = v[:, cols] * (a.T @ s)
            continue
        r_v[:, cols] = 0.5 * v[:, cols] * (a.T @ s)
        r_a = 0.5 * a * (s @ v[:, cols].T)
        r_s = scores * (r_a - a * r_a.sum(-1, keepdims=True))
        p = q[:, cols] @ k[:, cols].T
        u = r_s / stab(p)
        r_q[:, cols] = 0.5 * q[:, cols] * (u @ k[:, cols])
        r_k[:, cols] = 0.5 * k[:, cols] * (u.T @ q[:, cols])
    zero = np.zeros(WIDTH)
    total = sum(
        eps_linear(t, w[name], zero, rel) for name, rel in (("q", r_q), ("k", r_k), ("v", r_v))
    )
    return total.reshape(-1)


@pytest.mark.parametrize("spelling", ["sdpa", "explicit", "mha"])
@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
def test_attention_rules_match_their_closed_forms(spelling, attention):
    model = Attention(spelling).double().eval()
    x = randn(3, TOKENS * WIDTH, seed=1, dtype=torch.float64)
    targets = [0, 2, 1]
    got = ps.explain(model, x, "lrp_epsilon", target=torch.tensor(targets), attention=attention)
    for i, target in enumerate(targets):
        expected = attention_reference(model, x[i].numpy(), target, attention)
        # Up to the stabilisers (1e-6) of the ops between: the scale of q @ k^T is an op too,
        # whose epsilon rule takes a little relevance from scores near zero.
        atol = 1e-5 * np.abs(expected).max()
        np.testing.assert_allclose(got[i].numpy(), expected, rtol=1e-4, atol=atol)


def test_every_attention_spelling_gives_one_map():
    x = randn(2, TOKENS * WIDTH, seed=2, dtype=torch.float64)
    for attention in ("cp", "attnlrp"):
        maps = [
            ps.explain(Attention(s).double().eval(), x, "lrp_epsilon", attention=attention)
            for s in ("sdpa", "explicit", "mha")
        ]
        for other in maps[1:]:
            scale = float(maps[0].abs().max())
            torch.testing.assert_close(other, maps[0], rtol=1e-4, atol=1e-4 * scale)


class NormNet(nn.Module):
    def __init__(self, norm: str):
        super().__init__()
        torch.manual_seed(3)
        self.inner = nn.Linear(6, WIDTH)
        self.norm = nn.LayerNorm(WIDTH) if norm == "layer" else nn.RMSNorm(WIDTH, eps=1e-5)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            if getattr(self.norm, "bias", None) is not None:
                self.norm.bias.normal_(0, 0.2)
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, x):
        return self.head(self.norm(self.inner(x)))


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_norm_rule_matches_its_closed_form(norm):
    if norm == "rms" and not hasattr(nn, "RMSNorm"):
        pytest.skip("nn.RMSNorm needs torch >= 2.4")
    model = NormNet(norm).double().eval()
    x = randn(4, 6, seed=4, dtype=torch.float64)
    targets = np.array([0, 1, 2, 1])
    got = ps.explain(model, x, "lrp_epsilon", target=torch.tensor(targets)).numpy()

    def numpy(p):
        return None if p is None else p.detach().numpy()

    w1, b1 = numpy(model.inner.weight), numpy(model.inner.bias)
    gamma, beta = numpy(model.norm.weight), numpy(getattr(model.norm, "bias", None))
    beta = np.zeros(WIDTH) if beta is None else beta
    wh, bh = numpy(model.head.weight), numpy(model.head.bias)
    h = x.numpy() @ w1.T + b1
    centred = h - h.mean(-1, keepdims=True) if norm == "layer" else h
    y = gamma * centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5) + beta
    r = np.eye(3)[targets]
    r = eps_linear(y, wh, bh, r)
    r = norm_relevance(h, gamma, beta, r, center=norm == "layer")
    expected = eps_linear(x.numpy(), w1, b1, r)
    np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-12)


def test_layer_norm_conserves_relevance_without_bias():
    norm = nn.LayerNorm(WIDTH, bias=True).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.zero_()
    model = nn.Sequential(nn.Linear(6, WIDTH, bias=False), norm, nn.Linear(WIDTH, 3, bias=False))
    model = model.double().eval()
    got = ps.explain(model, randn(3, 6, seed=5, dtype=torch.float64), "lrp_epsilon", target=1)
    torch.testing.assert_close(got.sum(1), torch.ones(3, dtype=torch.float64), rtol=1e-5, atol=0)


# --- conservation on real vision transformers with zero biases ------------------------------


def _bias_free(model: nn.Module) -> nn.Module:
    """Zero every bias and every constant added to the signal (class token, position
    embedding): relevance then has nowhere to go but the inputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or any(
                key in name for key in ("cls_token", "class_token", "pos_emb", "position_emb")
            ):
                p.zero_()
    return model.eval()


def _digits_vit():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    try:
        from vit.model import DigitsViT
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    return DigitsViT(), (1, 32, 32)


def _torchvision(name, size):
    def build():
        import torchvision

        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None, **size[1])
        if name.startswith("vit"):
            nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-inits it
        return model, size[0]

    return build


def _timm(name):
    def build():
        timm = pytest.importorskip("timm")
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, img_size=32, depth=3), (3, 32, 32)

    return build


def _hf_vit(attention):
    def build():
        transformers = pytest.importorskip("transformers")
        config = transformers.ViTConfig(
            image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, num_labels=5,
            attn_implementation=attention,
        )  # fmt: skip
        torch.manual_seed(0)
        return transformers.ViTForImageClassification(config), (3, 32, 32)

    return build


VITS = {
    "digits_vit": _digits_vit,
    "vit_b_16": _torchvision("vit_b_16", ((3, 32, 32), {"image_size": 32})),
    "swin_t": _torchvision("swin_t", ((3, 64, 64), {})),
    "timm_vit": _timm("vit_tiny_patch16_224"),
    "timm_deit": _timm("deit_tiny_patch16_224"),
    "hf_vit_sdpa": _hf_vit("sdpa"),
    "hf_vit_eager": _hf_vit("eager"),
}


@pytest.mark.parametrize("name", list(VITS))
def test_relevance_is_conserved_on_vision_transformers_without_biases(name):
    model, shape = VITS[name]()
    model = _bias_free(model).double()
    before = snapshot(model)
    x = randn(2, *shape, seed=6, dtype=torch.float64)
    for method in METHODS if name == "digits_vit" else ("lrp_epsilon",):
        maps = ps.explain(model, x, method, target=torch.tensor([1, 3]))
        assert torch.isfinite(maps).all()
        # The stabilisers (1e-6) take a little: 0.9995 on the smallest model.
        torch.testing.assert_close(
            maps.sum((1, 2)), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-3
        )
    assert_unchanged(before, snapshot(model))


@pytest.mark.parametrize("name", list(VITS))
def test_lrp_runs_on_vision_transformers_with_biases(name):
    """With biases and embeddings the relevance is not conserved, but the maps are finite,
    depend on the class, and AttnLRP's differ from CP-LRP's."""
    model, shape = VITS[name]()
    model.eval()
    x = randn(2, *shape, seed=7)
    one = ps.explain(model, x, "lrp_epsilon", target=1)
    other = ps.explain(model, x, "lrp_epsilon", target=3)
    attn = ps.explain(model, x, "lrp_epsilon", target=1, attention="attnlrp")
    for maps in (one, other, attn):
        assert torch.isfinite(maps).all() and maps.abs().sum() > 0
    assert not torch.allclose(one, other)
    assert not torch.allclose(one, attn)


def test_hf_eager_and_sdpa_attention_give_one_map():
    x = randn(2, 3, 32, 32, seed=8)
    for attention in ("cp", "attnlrp"):
        maps = [
            ps.explain(VITS[key]()[0].eval(), x, "lrp_epsilon", target=2, attention=attention)
            for key in ("hf_vit_sdpa", "hf_vit_eager")
        ]
        scale = float(maps[0].abs().max())
        torch.testing.assert_close(maps[0], maps[1], rtol=1e-3, atol=1e-4 * scale)


# --- agreement with lxt ----------------------------------------------------------------------

LXT_SCRIPT = Path(__file__).with_name("lxt_vit_reference.py")


def test_lrp_epsilon_agrees_with_lxt_on_torchvision_vit(tmp_path):
    """lxt's efficient CP-LRP for torchvision's ViT (its own patches: LayerNorm with the
    standard deviation detached, GELU by the identity rule, queries and keys detached in
    nn.MultiheadAttention; zennit's epsilon rule on every Linear and Conv). lxt patches torch's
    classes, so it runs in a child process.

    lxt works in the gradient x input framework: its relevance starts at the logit, and an
    additive constant (the position embedding) absorbs relevance as a bias does; ours starts
    at 1 and passes relevance through additions of constants (as zennit). So the comparison
    divides lxt's map by the logit and gives the model a zero position embedding."""
    pytest.importorskip("lxt")
    pytest.importorskip("zennit")
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None, image_size=32).double().eval()
    with torch.no_grad():
        nn.init.normal_(model.heads.head.weight, std=0.05)
        model.encoder.pos_embedding.zero_()
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    x = randn(3, 3, 32, 32, seed=9, dtype=torch.float64)
    targets = torch.tensor([0, 5, 9])
    paths = [tmp_path / f"{name}.pt" for name in ("state", "x", "targets", "out")]
    for path, value in zip(paths, (model.state_dict(), x, targets)):
        torch.save(value, path)
    done = subprocess.run(
        [sys.executable, str(LXT_SCRIPT), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reference = torch.load(paths[3])
    logits = model(x).gather(1, targets[:, None]).squeeze(1).detach()
    ours = ps.explain(model, x, "lrp_epsilon", target=targets)
    for mine, theirs, logit in zip(ours, reference, logits):
        pearson = torch.corrcoef(torch.stack([mine.flatten(), (theirs / logit).flatten()]))[0, 1]
        assert pearson >= 0.999


# --- what is still refused names the op and the module ---------------------------------------


class Wrapped(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.block = inner
        self.head = nn.Linear(WIDTH, 2)

    def forward(self, x):
        out = self.block(x.view(len(x), TOKENS, WIDTH))
        out = out[0] if isinstance(out, tuple) else out
        return self.head(out.mean(dim=1))


class KeyBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(WIDTH, HEADS, add_bias_kv=True, batch_first=True)

    def forward(self, t):
        return self.attn(t, t, t, need_weights=False)


class DroppedAttention(nn.Module):
    def forward(self, t):
        return F.scaled_dot_product_attention(t, t, t, dropout_p=0.1)


class Quadratic(nn.Module):
    def forward(self, t):
        return t @ t.transpose(-2, -1) @ t  # two signal operands, no softmax


class HandWrittenLinear(nn.Module):
    """``t @ W.T``: W.T requires grad and is no Parameter, but is not a signal tensor. Under
    AttnLRP's uniform rule it would take half of the relevance; it must be refused instead."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(WIDTH, WIDTH))

    def forward(self, t):
        return t @ self.weight.T


class GroupNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(1, TOKENS)

    def forward(self, t):
        return self.norm(t)


@pytest.mark.parametrize(
    "inner, match",
    [
        (KeyBias(), r"add_bias_kv=True.*module 'block.attn'"),
        (DroppedAttention(), r"dropout.*module 'block'"),
        (Quadratic(), r"BmmBackward0.*product of two signal tensors"),
        (GroupNormed(), r"F.group_norm.*module 'block.norm'"),
        (HandWrittenLinear(), r"MmBackward0.*linear op"),
    ],
    ids=["mha_key_bias", "attention_dropout", "quadratic", "group_norm", "weight_view"],
)
@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
def test_what_has_no_rule_is_refused_naming_op_and_module(inner, match, attention):
    model = Wrapped(inner).eval()
    x = randn(2, TOKENS * WIDTH, seed=10)
    before = snapshot(model)
    if attention == "attnlrp" and isinstance(inner, Quadratic):
        # AttnLRP's uniform rule is for every product of two signal tensors.
        maps = ps.explain(model, x, "lrp_epsilon", attention=attention)
        assert torch.isfinite(maps).all() and maps.abs().sum() > 0
        return
    with pytest.raises(UnsupportedActivationError, match=match):
        ps.explain(model, x, "lrp_epsilon", attention=attention)
    assert_unchanged(before, snapshot(model))


def test_attention_option_is_validated():
    with pytest.raises(
        SaliencyError, match=r"'attention' must be one of 'cp', 'attnlrp'.*'cp-lrp'"
    ):
        ps.explain(
            Attention("sdpa").eval(), randn(1, TOKENS * WIDTH), "lrp_zplus", attention="cp-lrp"
        )


class LayerScaled(nn.Module):
    """ConvNeXt's and CaiT's layer scale: the signal times a parameter, here reshaped first (a
    view that requires grad, as timm writes it) or used as it is."""

    def __init__(self, reshaped: bool):
        super().__init__()
        torch.manual_seed(11)
        self.reshaped = reshaped
        self.inner = nn.Linear(6, WIDTH)
        self.gamma = nn.Parameter(torch.rand(WIDTH) + 0.5)
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, x):
        gamma = self.gamma.reshape(1, -1) if self.reshaped else self.gamma
        return self.head(self.inner(x) * gamma)


def test_a_parameter_computed_into_shape_is_a_constant_scale():
    x = randn(3, 6, seed=12, dtype=torch.float64)
    plain = ps.explain(LayerScaled(False).double().eval(), x, "lrp_epsilon", target=1)
    reshaped = ps.explain(LayerScaled(True).double().eval(), x, "lrp_epsilon", target=1)
    torch.testing.assert_close(reshaped, plain, rtol=0, atol=0)
    assert plain.abs().sum() > 0


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
def test_a_sample_map_does_not_depend_on_the_batch(attention):
    """Swin adds a relative position bias gathered from a table (a view of a parameter, the
    shape of one sample's scores): a shift, whatever the batch size."""
    model, shape = VITS["swin_t"]()
    model.eval()
    x = randn(2, *shape, seed=13)
    whole = ps.explain(model, x, "lrp_epsilon", target=1, attention=attention)
    alone = ps.explain(model, x, "lrp_epsilon", target=1, attention=attention, batch_size=1)
    torch.testing.assert_close(alone, whole, rtol=1e-3, atol=1e-5 * float(whole.abs().max()))


class LearnedQuery(nn.Module):
    """Attention pooling with a learned query (timm's AttentionPoolLatent, Perceiver)."""

    def __init__(self, learned: str):
        super().__init__()
        torch.manual_seed(14)
        self.learned = learned
        self.memory = nn.Parameter(torch.randn(1, TOKENS, WIDTH))

    def forward(self, t):
        q = self.memory if self.learned == "query" else t
        v = self.memory.expand_as(t) if self.learned == "values" else t
        return F.scaled_dot_product_attention(q.expand_as(t), t, v)


@pytest.mark.parametrize(
    "learned, attention, match",
    [
        ("query", "attnlrp", "queries that do not come from the inputs"),
        ("values", "cp", "values that do not come from the inputs"),
    ],
)
def test_attention_with_learned_operands_is_refused_where_the_rule_would_misplace_relevance(
    learned, attention, match
):
    model = Wrapped(LearnedQuery(learned)).eval()
    with pytest.raises(UnsupportedActivationError, match=match):
        ps.explain(model, randn(2, TOKENS * WIDTH, seed=15), "lrp_epsilon", attention=attention)


def test_a_learned_query_is_a_constant_under_cp():
    model = Wrapped(LearnedQuery("query")).double().eval()
    maps = ps.explain(model, randn(2, TOKENS * WIDTH, seed=15, dtype=torch.float64), "lrp_epsilon")
    assert torch.isfinite(maps).all() and maps.abs().sum() > 0


def test_a_classifier_softmax_is_not_attention_under_attnlrp():
    model = nn.Sequential(nn.Linear(6, 4), nn.Softmax(dim=-1)).eval()
    with pytest.raises(UnsupportedActivationError, match="SoftmaxBackward"):
        ps.explain(model, randn(2, 6, seed=16), "lrp_epsilon", attention="attnlrp")


class FullyMasked(nn.Module):
    def forward(self, t):
        mask = torch.ones(TOKENS, TOKENS, dtype=torch.bool)
        mask[0] = False  # the first query sees no key: torch's attention gives it zeros
        return F.scaled_dot_product_attention(t, t, t, attn_mask=mask)


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
def test_a_fully_masked_row_gives_no_relevance_and_no_nan(attention):
    model = Wrapped(FullyMasked()).eval()
    maps = ps.explain(model, randn(2, TOKENS * WIDTH, seed=17), "lrp_epsilon", attention=attention)
    assert torch.isfinite(maps).all() and maps.abs().sum() > 0
