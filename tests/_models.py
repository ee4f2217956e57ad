"""Small seeded models and model-state snapshots shared by the engine and method tests."""

from __future__ import annotations

import functools
import hashlib

import torch
import torch.nn.functional as F
from torch import nn

# Ways a model can apply its ReLUs; every style computes the same function with the same weights.
RELU_STYLES = ("module", "inplace", "reused", "functional")


def _functional_relus():
    """One of each functional spelling, in order of use."""
    return [
        torch.relu,
        F.relu,
        torch.Tensor.relu,
        lambda x: F.relu(x, inplace=True),
        lambda x: x.relu_(),
    ]


class SmallCNN(nn.Module):
    """conv-act-conv-act-pool-conv-act-avgpool-fc-act-fc-act-fc, five activation sites.

    ``style`` picks how the activations are applied: separate ``nn.ReLU`` modules, in-place
    modules, one module reused five times, every functional spelling, or a GELU (module or
    functional) at the second site.
    """

    def __init__(self, style: str = "module", classes: int = 5, in_channels: int = 3):
        super().__init__()
        self.style = style
        self.conv1 = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc1 = nn.Linear(6 * 4, 12)
        self.fc2 = nn.Linear(12, 10)
        self.fc3 = nn.Linear(10, classes)
        if style == "module":
            self.acts = nn.ModuleList(nn.ReLU() for _ in range(5))
        elif style == "inplace":
            self.acts = nn.ModuleList(nn.ReLU(inplace=True) for _ in range(5))
        elif style == "reused":
            self.relu = nn.ReLU(inplace=True)
        elif style == "gelu_module":
            self.acts = nn.ModuleList([nn.ReLU(), nn.GELU(), nn.ReLU(), nn.ReLU(), nn.ReLU()])
        elif style not in ("functional", "gelu_functional"):
            raise ValueError(style)

    def act(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.style == "reused":
            return self.relu(x)
        if self.style == "functional":
            return _functional_relus()[i](x)
        if self.style == "gelu_functional":
            return F.gelu(x) if i == 1 else F.relu(x)
        return self.acts[i](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(0, self.conv1(x))
        x = self.pool(self.act(1, self.conv2(x)))
        x = self.act(2, self.conv3(x))
        x = F.adaptive_avg_pool2d(x, 2).flatten(1)
        x = self.act(3, self.fc1(x))
        x = self.act(4, self.fc2(x))
        return self.fc3(x)


def small_cnn(style: str = "module", seed: int = 0, classes: int = 5) -> SmallCNN:
    """A SmallCNN whose weights depend on ``seed`` only (not on ``style``)."""
    reference = SmallCNN("module", classes)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (1.5 / p[0].numel() ** 0.5))
    model = SmallCNN(style, classes)
    model.load_state_dict(reference.state_dict(), strict=False)
    return model.eval()


def mlp(seed: int = 0, dims: tuple[int, ...] = (6, 8, 7, 3)) -> nn.Sequential:
    """Linear-ReLU-...-Linear with seeded weights."""
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return model.eval()


def conv1d_net(seed: int = 0) -> nn.Sequential:
    torch_gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 4, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch_gen) * 0.5)
    return model.eval()


class Lambda(nn.Module):
    """A module around a function: a model written with functional calls."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def snapshot(model: nn.Module) -> dict:
    """Everything about ``model`` that explaining it must leave as it was."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    hooks = {}
    for name, module in model.named_modules():
        for attr in _HOOK_DICTS:
            hooks[(name, attr)] = dict(getattr(module, attr, {}))
    from torch.nn.modules import module as module_mod

    global_hooks = {
        attr: dict(getattr(module_mod, attr))
        for attr in dir(module_mod)
        if attr.startswith("_global_") and isinstance(getattr(module_mod, attr), dict)
    }
    return {
        "state": digest.hexdigest(),
        "training": [(n, m.training) for n, m in model.named_modules()],
        "hooks": hooks,
        "global_hooks": global_hooks,
        "requires_grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "grads": [
            (n, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()
        ],
        "attributes": [(n, sorted(vars(m))) for n, m in model.named_modules()],
    }


def assert_unchanged(before: dict, after: dict) -> None:
    for key in ("state", "training", "hooks", "global_hooks", "requires_grad", "attributes"):
        assert before[key] == after[key], f"model {key} changed"
    for (name, g0), (_, g1) in zip(before["grads"], after["grads"]):
        assert (g0 is None) == (g1 is None), f"parameter {name}'s .grad changed"
        if g0 is not None:
            assert torch.equal(g0, g1), f"parameter {name}'s .grad changed"


@functools.cache
def torchvision_model(name: str) -> nn.Module:
    """A torchvision model (weights=None), built once per session; tests never change it."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # weights=None models draw their init from the global RNG
        return getattr(torchvision.models, name)(weights=None).eval()
