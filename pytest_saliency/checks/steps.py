"""The steps of parameter randomization: which parameter tensors each step re-initialises, in
the order the forward uses them, and how.

**Order.** A dry forward runs under a torch-function mode that notes the first call each
parameter tensor is an argument of (``F.linear(x, w, b)``, ``x + self.pos_embed``,
``F.multi_head_attention_forward(..., in_proj_weight, ..., out_proj.weight, ...)``). A step
sits where its earliest parameter is first used. Module hooks would miss what is used without
calling its module: ``nn.MultiheadAttention`` reads ``out_proj.weight`` inside the attention
function, and bare parameters (position embeddings, class tokens, layer-scale gains) belong to
no module call at all.

**Coverage.** Every parameter tensor the forward uses belongs to a step unless the user named
the layers. A module is re-initialised by its own ``reset_parameters()`` (or torch's
``_reset_parameters()``, as in ``nn.MultiheadAttention``); a parameter with neither, or one its
module's reset left untouched, is drawn by the fallback: ``N(0, s^2)`` with ``s`` the tensor's
root mean square (0.02 for an all-zero tensor, the usual init of tokens and embeddings). The
fallback keeps the tensor's magnitude, so activations stay in range, and drops everything
learned: signs, structure and mean. Parameters the forward never uses (an auxiliary head in eval
mode) cannot change a map, so they are not steps; they are reported as unused.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..engine.layers import without_compile_prefix
from ..engine.uses import parameter_uses
from ..errors import SaliencyError, unknown

ZERO_SCALE = 0.02


@dataclass
class Step:
    """One randomization step: a name, the modules reset by their own method, and every
    parameter tensor (qualified name, tensor) the step re-initialises."""

    name: str
    resets: list[nn.Module]
    tensors: list[tuple[str, nn.Parameter]]
    fallback: list[str] = field(default_factory=list)  # names drawn by the fallback, so far
    first_use: tuple[int, int] = (0, 0)


@dataclass
class StepPlan:
    """The steps (input to logits) and what the audit did not re-initialise."""

    steps: list[Step]
    coverage: float  # re-initialised / used parameter elements
    skipped: list[str]  # used parameters no step re-initialises (compressed to modules)
    unused: list[str]  # parameters the forward never used (compressed to modules)


def reset_method(module: nn.Module):
    for name in ("reset_parameters", "_reset_parameters"):
        method = getattr(module, name, None)
        if callable(method):
            return method
    return None


def _own(module: nn.Module, prefix: str) -> list[tuple[str, nn.Parameter]]:
    return [
        (f"{prefix}.{n}" if prefix else n, p)
        for n, p in module._parameters.items()
        if p is not None
    ]


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


class _Builder:
    """Steps over one model, each parameter tensor claimed by one step at most."""

    def __init__(self, model: nn.Module, label: str) -> None:
        self.model = model
        self.label = label
        self.claimed: set[int] = set()

    def _claim(self, tensors):
        out = []
        for name, p in tensors:
            if id(p) not in self.claimed:
                self.claimed.add(id(p))
                out.append((name, p))
        return out

    def module_steps(self, prefix: str, module: nn.Module) -> list[Step]:
        """One step for ``module``'s own parameters if it can reset itself, else one step per
        own parameter (the fallback)."""
        own = self._claim(_own(module, prefix))
        if not own:
            return []
        if reset_method(module) is not None:
            return [Step(prefix or self.label, [module], own)]
        return [Step(name, [], [(name, p)]) for name, p in own]

    def block_step(self, prefix: str, root: nn.Module) -> Step | None:
        """One step re-initialising every parameter inside ``root``."""
        resets, tensors = [], []
        for sub_name, sub in root.named_modules():
            own = self._claim(_own(sub, _qualified(prefix, sub_name)))
            if own and reset_method(sub) is not None:
                resets.append(sub)
            tensors.extend(own)
        return Step(prefix, resets, tensors) if tensors else None


def _holds_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _layers_in(module: nn.Module) -> int:
    """How many modules inside ``module`` (itself included) hold parameters of their own."""
    return sum(1 for m in module.modules() if any(True for _ in m.parameters(recurse=False)))


def _blocks(builder: _Builder, prefix: str, module: nn.Module, total: int) -> list[Step]:
    """``module``'s children as blocks, where a child that holds more than half of the model's
    parameterised layers (VGG's ``features``, a ViT's encoder) is opened in turn; an opened
    module's own parameters are steps of their own."""
    steps = [Step(n, [], [(n, p)]) for n, p in builder._claim(_own(module, prefix))]
    for name, child in module.named_children():
        if not _holds_parameters(child):
            continue
        full = _qualified(prefix, name)
        parts = sum(1 for c in child.children() if _holds_parameters(c))
        if parts >= 2 and 2 * _layers_in(child) > total:
            steps.extend(_blocks(builder, full, child, total))
            continue
        step = builder.block_step(full, child)
        if step is not None:
            steps.append(step)
    return steps


def _named_roots(named: dict[str, nn.Module], layers) -> list[tuple[str, nn.Module]]:
    if not layers:
        raise SaliencyError(
            "layers is an empty list; give module names from model.named_modules(), "
            "'blocks', or None for every parameter the forward uses"
        )
    names = [n for n in named if n]
    roots: list[tuple[str, nn.Module]] = []
    for name in layers:
        if isinstance(name, str) and name not in named:
            name = without_compile_prefix(name)
        if not isinstance(name, str) or name not in named or name == "":
            raise unknown("layer", name, names)
        if name in (n for n, _ in roots):
            raise SaliencyError(f"layer {name!r} is listed twice in layers={list(layers)!r}")
        if not _holds_parameters(named[name]):
            with_params = [n for n in names if _holds_parameters(named[n])]
            raise SaliencyError(
                f"layer {name!r} ({type(named[name]).__name__}) has no parameters to randomize; "
                f"modules with parameters: {', '.join(repr(n) for n in with_params[:40])}"
            )
        roots.append((name, named[name]))
    return roots


def compress(model: nn.Module, names: set[str]) -> list[str]:
    """Parameter names, with every module whose parameters are all in ``names`` (and that is
    not inside another such module) named once instead; in registration order."""
    out: list[str] = []
    covered: set[str] = set()
    for prefix, module in model.named_modules():
        mine = [_qualified(prefix, n) for n, _ in module.named_parameters()]
        if not mine or any(n in covered for n in mine):
            continue
        if prefix and all(n in names for n in mine):
            out.append(prefix)
            covered.update(mine)
    for name, _ in model.named_parameters():
        if name in names and name not in covered:
            out.append(name)
    return out


def plan_steps(model: nn.Module, x: torch.Tensor, layers: object) -> StepPlan:
    """The randomization steps in forward-use order (input to logits), with their coverage."""
    uses = parameter_uses(model, x)
    named = dict(model.named_modules())
    label = type(model).__name__  # the model's own parameters, in a report
    builder = _Builder(model, label)
    if layers is None:
        steps = [s for n, m in named.items() for s in builder.module_steps(n, m)]
    elif layers == "blocks":
        steps = _blocks(builder, "", model, _layers_in(model))
    elif isinstance(layers, (list, tuple)):
        steps = []
        for name, root in _named_roots(named, layers):
            step = builder.block_step(name, root)
            if step is None:  # every parameter inside is also inside an earlier layer
                raise SaliencyError(
                    f"layer {name!r} holds no parameter that an earlier entry of "
                    f"layers={list(layers)!r} does not already re-initialise"
                )
            steps.append(step)
    else:
        raise SaliencyError(
            "layers must be None (every parameter the forward uses), 'blocks' (the model's "
            f"children, the one holding most layers opened) or a list of module names, got "
            f"{layers!r}"
        )
    never = len(uses) + 1
    kept = []
    for step in steps:
        used = [uses[id(p)] for _, p in step.tensors if id(p) in uses]
        if used:
            step.first_use = min(used)
            kept.append(step)
        elif layers is not None and not isinstance(layers, str):
            raise SaliencyError(
                f"layer {step.name!r} is never used by {label}'s forward on these inputs "
                "(eval mode), so re-initialising it cannot change a map; pick layers the "
                "forward uses"
            )
    kept.sort(key=lambda s: s.first_use if s.first_use else (never, 0))
    parameters = dict(model.named_parameters())
    used_names = {n for n, p in parameters.items() if id(p) in uses}
    reinit = {id(p) for s in kept for _, p in s.tensors}
    used_size = sum(parameters[n].numel() for n in used_names)
    covered = sum(parameters[n].numel() for n in used_names if id(parameters[n]) in reinit)
    if not kept:
        raise SaliencyError(
            f"{label}'s forward uses none of its parameters on these inputs, so parameter "
            "randomization cannot change a map"
        )
    return StepPlan(
        steps=kept,
        coverage=covered / used_size if used_size else 1.0,
        skipped=compress(model, {n for n in used_names if id(parameters[n]) not in reinit}),
        unused=compress(model, set(parameters) - used_names),
    )


def _fallback(p: torch.Tensor) -> torch.Tensor:
    """``N(0, s^2)``, ``s`` the tensor's root mean square (``ZERO_SCALE`` when it is 0), drawn
    on the CPU generator so that a seed gives the same draw on every device."""
    scale = float(p.detach().double().pow(2).mean().sqrt()) if p.numel() else 0.0
    draw = torch.randn(p.shape, dtype=torch.float64)
    return (draw * (scale if scale > 0 else ZERO_SCALE)).to(p.dtype)


def _is_constant(t: torch.Tensor) -> bool:
    flat = t.detach().reshape(-1)
    return flat.numel() <= 1 or bool((flat == flat[0]).all())


def _others(step: Step) -> Iterator[torch.Tensor]:
    """Tensors a reset method might touch that are not the step's: the reset modules' child
    parameters and buffers outside the step (``MultiheadAttention._reset_parameters`` also
    zeroes ``out_proj.bias``)."""
    mine = {id(p) for _, p in step.tensors}
    own_buffers = {id(b) for m in step.resets for b in m._buffers.values() if b is not None}
    seen: set[int] = set()
    for module in step.resets:
        for t in [*module.parameters(), *module.buffers()]:
            if id(t) not in mine and id(t) not in own_buffers and id(t) not in seen:
                seen.add(id(t))
                yield t


def randomize(step: Step) -> None:
    """Re-initialise exactly the step's tensors (and the reset modules' own buffers), under a
    seeded generator the caller provides."""
    with torch.no_grad():
        others = [(t, t.detach().clone()) for t in _others(step)]
        owned = {id(p) for m in step.resets for p in m._parameters.values() if p is not None}
        before = {id(p): p.detach().clone() for _, p in step.tensors if id(p) in owned}
        for module in step.resets:
            reset_method(module)()
            # Running statistics are trained state too; BatchNorm resets them in
            # reset_parameters, a custom norm layer might not.
            if callable(getattr(module, "reset_running_stats", None)):
                module.reset_running_stats()
        for t, value in others:
            t.copy_(value)
        for name, p in step.tensors:
            old = before.get(id(p))
            # A reset that left a structured tensor as it was did not re-initialise it.
            if old is None or (torch.equal(old, p) and not _is_constant(p)):
                p.copy_(_fallback(p))
                if name not in step.fallback:
                    step.fallback.append(name)
