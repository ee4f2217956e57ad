"""A small vision transformer trained on the scikit-learn digits (1 x 32 x 32).

Patch 4 (an 8 x 8 grid of 64 patches), a class token and learned position embeddings, four
pre-norm blocks of width 48 with 4-head self-attention and a GELU MLP, a class-token head: the
layout of ViT/DeiT at a size that trains in well under a minute on 2 CPU cores.

Audited with the methods that apply to transformers: the plain-gradient ones, Grad-CAM and
Grad-CAM++ (their default layer is the last block's first norm, ``blocks.3.norm1``: after the
last attention the patch tokens no longer reach the class token), FullGrad and the LRP rules
(LayerNorm and attention by CP-LRP, or AttnLRP). Guided backprop, deconvnet and RectGrad
refuse the model: their rules are for ReLUs.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from digits.data import digits_data

# The same 1 x 32 x 32 digits as DigitsNet: its size, audit batch and accuracy helpers.
from digits.model import (  # noqa: F401 (re-exported for the suite and the smoke tests)
    INPUT_SIZE,
    audit_batch,
    audit_labels,
    held_out_accuracy,
)
from digits.training import fit, load_or_train, training_labels
from torch import nn

CONFIG = {
    "arch": "DigitsViT-p4-w48-d4-h4-v1",
    "size": INPUT_SIZE,
    "epochs": 12,
    "lr": 2e-3,
    "batch_size": 64,
    "weight_decay": 1e-4,
    "seed": 0,
    "threads": 1,  # CPU threads while training: the weights depend on it (see `fit`)
}


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(q, k, v)
        return self.proj(mixed.transpose(1, 2).reshape(n, t, c))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DigitsViT(nn.Module):
    def __init__(self, width: int = 48, depth: int = 4, heads: int = 4, patch: int = 4,
                 num_classes: int = 10) -> None:  # fmt: skip
        super().__init__()
        grid = INPUT_SIZE // patch
        self.patch_embed = nn.Conv2d(1, width, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + 1, width) * 0.02)
        self.blocks = nn.Sequential(*[Block(width, heads, 2 * width) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(len(tokens), -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def train(seed: int = CONFIG["seed"], labels: str = "true") -> nn.Module:
    """Train a fresh `DigitsViT` on the training split; deterministic for a given seed
    (``labels="permuted"``: the permuted-label twin, trained the same way on shuffled labels)."""
    data = digits_data(INPUT_SIZE, 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsViT()
    return fit(
        model, data.train_x, training_labels(data.train_y, labels), seed=seed,
        epochs=CONFIG["epochs"], lr=CONFIG["lr"], batch_size=CONFIG["batch_size"],
        weight_decay=CONFIG["weight_decay"],
        threads=CONFIG["threads"],
    )  # fmt: skip


def trained_model(cache_dir: str | os.PathLike[str] | None = None) -> nn.Module:
    """The default-config model, loaded from the checkpoint cache or trained and cached."""
    return load_or_train("digitsvit", CONFIG, DigitsViT, train, cache_dir)


def permuted_model(cache_dir: str | os.PathLike[str] | None = None) -> nn.Module:
    """The permuted-label twin: `DigitsViT` trained the same way on shuffled labels, cached."""
    config = {**CONFIG, "labels": "permuted"}
    return load_or_train("digitsvit", config, DigitsViT, lambda: train(labels="permuted"),
                         cache_dir)  # fmt: skip
