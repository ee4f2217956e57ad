"""LRP rules for the ops of transformers: normalisation layers and attention.

Relevance is carried as the backward quantity, as everywhere in the LRP engine (zennit's
convention): each rule function below returns the relevance of its inputs.

- **LayerNorm / RMSNorm** (CP-LRP, Ali et al. 2022; AttnLRP's identity rule for the
  normalisation, Achtibat et al. 2024): the normalising statistic (the standard deviation, the
  root mean square) is held constant, which leaves a linear map of the signal,
  ``y = gamma * (x - mean(x)) / sigma + beta``. Relevance goes through it by the epsilon rule
  of that map, ``R_x = x * J^T (R_y / stab(y))``: it is conserved up to what ``beta`` absorbs.
- **Attention, CP-LRP** (the default): the attention weights ``A = softmax(q k^T s + mask)``
  are constants, so ``out = A v`` is linear in the values; ``R_v = v * A^T (R / stab(out))``
  and the queries and keys get no relevance.
- **Attention, AttnLRP** (``attention="attnlrp"``): ``out = A v`` and ``q k^T`` are bilinear,
  and each of their two operands gets half of the epsilon-rule relevance of the product
  (the uniform rule, eq. 7 of the paper); the softmax gets its own rule,
  ``R_x = x * (R - softmax(x) * sum(R))`` (eq. 13), with masked scores (``-inf``) given none.

Products of two signal tensors that are not attention, and everything else these rules do not
name, stay refused by the op accounting.
"""

from __future__ import annotations

import math

import torch

from ..engine.accounting import rule_function
from .stabilizer import stabilize  # the CNN rules' (zennit's default epsilon, 1e-6)

# --- normalisation -------------------------------------------------------------------------


def norm_dims(x: torch.Tensor, normalized_shape) -> tuple[int, ...]:
    count = len(normalized_shape) if isinstance(normalized_shape, (tuple, list, torch.Size)) else 1
    return tuple(range(x.dim() - count, x.dim()))


@rule_function
class NormRule(torch.autograd.Function):
    """A LayerNorm (``center=True``) or an RMSNorm with its statistic held constant.

    Forward: the norm's own output (``compute()``). Backward: ``R_x = x * J^T (R / stab(y))``,
    ``J = diag(gamma / sigma) C``, with C the centring over the normalised axes (identity for
    RMSNorm)."""

    @staticmethod
    def forward(ctx, x, compute, dims, weight, center, eps):
        out = compute()
        with torch.no_grad():
            # The statistic, as the norm computed it (float32 for half inputs, as torch does).
            xf = x.detach().float() if x.dtype in (torch.float16, torch.bfloat16) else x.detach()
            if center:
                sigma = (xf.var(dim=dims, unbiased=False, keepdim=True) + eps).sqrt()
            else:
                sigma = (xf.pow(2).mean(dim=dims, keepdim=True) + eps).sqrt()
            ctx.scale = (1 / sigma).to(x.dtype) if weight is None else weight / sigma.to(x.dtype)
            ctx.denominator = stabilize(out.detach())
        ctx.dims, ctx.center = dims, center
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, r):
        (x,) = ctx.saved_tensors
        u = r / ctx.denominator * ctx.scale
        if ctx.center:
            u = u - u.mean(dim=ctx.dims, keepdim=True)
        return x * u, None, None, None, None, None


# --- attention -----------------------------------------------------------------------------


def attention_weights(q, k, mask, scale, is_causal):
    """``softmax(q k^T scale + mask)`` as scaled_dot_product_attention computes it (float)."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if is_causal:
        length, source = scores.shape[-2:]
        keep = torch.ones(length, source, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    # A row with every score masked has no weights (NaN): none, as torch's attention gives.
    return scores, torch.softmax(scores, dim=-1).nan_to_num(nan=0.0)


@rule_function
class AttentionCP(torch.autograd.Function):
    """``A v`` with the attention weights A constant (CP-LRP): relevance to the values only."""

    @staticmethod
    def forward(ctx, v, weights):
        out = weights.to(v.dtype) @ v
        ctx.weights = weights
        ctx.denominator = stabilize(out.detach())
        ctx.save_for_backward(v)
        return out

    @staticmethod
    def backward(ctx, r):
        (v,) = ctx.saved_tensors
        s = r / ctx.denominator
        grad = ctx.weights.to(s.dtype).transpose(-2, -1) @ s
        return v * grad.sum_to_size(v.shape), None


def _masked(relevance: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """No relevance for masked scores (-inf): 0 * -inf would be NaN."""
    return torch.where(torch.isfinite(scores), relevance, torch.zeros((), dtype=relevance.dtype))


def softmax_relevance(x, y, r, dim):
    """AttnLRP's softmax rule: ``R_x = x * (R - y * sum(R))`` along ``dim``."""
    rule = x * (r - y * r.sum(dim=dim, keepdim=True))
    return _masked(rule, x)


def bilinear_relevance(a, b, r, product):
    """The uniform rule for ``a @ b``: half the epsilon relevance of each term to each operand.

    ``product(a, b)`` is the op; the transposed products come from autograd, so batch
    broadcasting is handled as the op does it."""
    with torch.enable_grad():
        pa = a.detach().requires_grad_(True)
        pb = b.detach().requires_grad_(True)
        out = product(pa, pb)
        s = r / stabilize(out.detach())
        ga, gb = torch.autograd.grad(out, (pa, pb), s)
    return a * ga * 0.5, b * gb * 0.5


@rule_function
class AttentionLRP(torch.autograd.Function):
    """scaled_dot_product_attention under AttnLRP: uniform rule on ``A v`` and ``q k^T``,
    softmax rule between them. The bias or mask added to the scores is a constant shift."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, is_causal):
        with torch.no_grad():
            scores, weights = attention_weights(q, k, mask, scale, is_causal)
            out = weights @ v
        ctx.scores, ctx.weights = scores, weights
        ctx.save_for_backward(q, k, v)
        return out

    @staticmethod
    def backward(ctx, r):
        q, k, v = ctx.saved_tensors
        r_weights, r_v = bilinear_relevance(ctx.weights, v, r, torch.matmul)
        r_scores = softmax_relevance(ctx.scores, ctx.weights, r_weights, -1)
        # The constant scale and mask leave relevance where it is.
        r_q, r_kt = bilinear_relevance(q, k.transpose(-2, -1), r_scores, torch.matmul)
        return r_q, r_kt.transpose(-2, -1), r_v, None, None, None


@rule_function
class SoftmaxRule(torch.autograd.Function):
    """AttnLRP's softmax rule for an explicit ``softmax(x, dim)``."""

    @staticmethod
    def forward(ctx, x, compute, dim):
        out = compute()
        ctx.dim = dim
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx, r):
        x, y = ctx.saved_tensors
        return softmax_relevance(x, y.to(r.dtype), r, ctx.dim), None, None


@rule_function
class BilinearRule(torch.autograd.Function):
    """``a @ b`` of two signal tensors under AttnLRP's uniform rule."""

    @staticmethod
    def forward(ctx, a, b, compute, product):
        out = compute()
        ctx.product = product
        ctx.save_for_backward(a, b)
        return out

    @staticmethod
    def backward(ctx, r):
        a, b = ctx.saved_tensors
        ra, rb = bilinear_relevance(a, b, r, ctx.product)
        return ra, rb, None, None
