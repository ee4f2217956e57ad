"""Parameter randomization: a faithful map changes when the model's weights are re-initialised."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..engine.state import copy_model, eval_mode, rng_preserved
from ..engine.targets import resolve_targets
from ..errors import SaliencyError
from ..explainer import allow_grad, check_target, opaque_module
from ..multi import Plan, Request
from .common import (
    Comparer,
    cam_layer,
    check_choice,
    constant_cause,
    describe_blank,
    describe_constant,
    logits_of,
    method_requests,
    model_inputs,
    setup,
    to_cpu,
)
from .results import RandomizationResult
from .steps import Step, plan_steps, randomize

MODES = ("cascading", "independent")
ORDERS = ("top_down", "bottom_up")


def check_not_scripted(model: nn.Module) -> None:
    """Randomization re-initialises modules with reset_parameters() and orders them with
    module hooks; TorchScript modules offer neither."""
    found = opaque_module(model, compiled=False)
    if found is not None:
        raise SaliencyError(
            f"parameter randomization re-initialises layers with reset_parameters() and "
            f"finds their order with module hooks, but {found[0]} is a TorchScript module, "
            "which has neither. Audit the eager model (the nn.Module before "
            "torch.jit.script/trace); its maps are the scripted model's"
        )


def _saved(step: Step) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A copy of what randomizing ``step`` changes: its tensors and its reset modules' own
    buffers (running statistics)."""
    tensors = [p for _, p in step.tensors]
    tensors += [b for m in step.resets for b in m._buffers.values() if b is not None]
    return [(t, t.detach().clone()) for t in tensors]


def _restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for tensor, value in saved:
            tensor.copy_(value)


@contextlib.contextmanager
def seeded(seed: int, model: nn.Module) -> Iterator[None]:
    """Seed the generators ``reset_parameters`` draws from; restore every global state after.

    Only the CPU generator and those of the CUDA devices the model lives on are forked and
    seeded (``torch.manual_seed`` would also reseed every other GPU and leave it changed).
    """
    devices = sorted({t.get_device() for t in model.parameters() if t.is_cuda})
    # numpy's and Python's generators are seeded too (a reset_parameters may draw from them),
    # from the same seed, and put back afterwards with the torch ones.
    with torch.random.fork_rng(devices=devices), rng_preserved():
        torch.default_generator.manual_seed(seed)
        for index in devices:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        yield


def explain_step(plan: Plan, x: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
    """The maps of every audited method on the model's current weights (one shared pass per
    rule set); ``plan.model`` is the audit's randomized copy."""
    return plan(x, targets)


@allow_grad
def parameter_randomization(
    model: nn.Module,
    inputs: torch.Tensor,
    method: str | Sequence[str | Mapping[str, Any]],
    *,
    mode: str = "cascading",
    order: str = "top_down",
    layers: str | list[str] | None = None,
    similarity: str = "ssim",
    seed: int = 0,
    batch_size: int | None = None,
    layer: str | nn.Module | None = None,
    target: int | torch.Tensor | None = None,
    **method_options: Any,
) -> RandomizationResult | list[RandomizationResult]:
    """Compare each sample's map on the trained model with its maps on randomized copies.

    Args:
        model: a classifier returning class scores [N, classes]; it is not changed (the audit
            works on one deep copy).
        inputs: a float batch [N, C, H, W] (or [N, C, L], [N, D]).
        method: a name from :func:`pytest_saliency.methods`; or a list of names and
            ``{"name": ..., "layer": ..., **options}`` mappings, audited together: methods that
            share a rule set share one forward+backward per step, and a list of results comes
            back (``layer`` and ``**method_options`` then go inside each mapping).
        mode: "cascading" re-initialises layers cumulatively; "independent" one at a time,
            each on the trained weights.
        order: "top_down" (logits to input, as Adebayo et al. 2018) or "bottom_up".
        layers: None (one step per module with parameters the forward uses, in the order it
            uses them), "blocks" (the model's children; a child that holds more than half of the
            parameterised layers is opened, as VGG's ``features`` or a ViT's encoder) or a
            list of module names.
        similarity: a metric name from :func:`pytest_saliency.metrics`.
        seed: seeds the re-initialisation (step k uses ``seed + k``) and the bootstrap.
        batch_size: samples per pass, to bound memory.
        layer: the CAM layer (name or module of ``model``) for CAM methods.
        target: the explained class (None: the trained model's prediction), kept at every step.
        **method_options: the method's own options.

    Returns:
        A :class:`RandomizationResult` (a list of them for a list of methods); high similarity
        means the map ignores the weights.
    """
    requests = method_requests(method, layer, method_options)
    audited = [
        setup(model, inputs, r.method, r.layer, batch_size, r.options, similarity, seed)
        for r in requests
    ]
    model, inputs, batch_size, _, metric, seed, _ = audited[0]
    mode = check_choice("mode", mode, MODES)
    order = check_choice("order", order, ORDERS)
    target = check_target(target, inputs.shape[0])
    layers_arg = list(layers) if isinstance(layers, tuple) else layers
    check_not_scripted(model)
    work = copy_model(model)  # the only copy: every step re-initialises it in place
    x = model_inputs(work, inputs)
    planned = plan_steps(work, x, layers_arg)
    steps = planned.steps
    if order == "top_down":
        steps.reverse()
    logits = logits_of(work, x, batch_size)
    if torch.is_tensor(target):
        target = target.to(logits.device)
    targets = resolve_targets(target, logits)
    specs = [a[3] for a in audited]
    with eval_mode(work):
        terms = [spec.describe(work, x) if spec.describe else None for spec in specs]
    layers_of = [
        cam_layer(work, x, spec, a[6], r.options) for spec, a, r in zip(specs, audited, requests)
    ]
    shared = [
        Request(spec.name, r.options, cam) for spec, r, cam in zip(specs, requests, layers_of)
    ]

    plan = Plan(work, x, shared, batch_size=batch_size)  # checks and grouping done once

    def maps_now() -> list[torch.Tensor]:
        return explain_step(plan, x, targets)

    first = maps_now()
    maps = [{"original": to_cpu(m)} for m in first]
    # Methods whose maps have the same shape are scored together, in one batched call per step,
    # on the maps' device; each reference is prepared once.
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(first):
        groups.setdefault((tuple(m.shape), m.dtype), []).append(i)
    comparers = {key: Comparer(torch.cat([first[i] for i in idx]), metric)
                 for key, idx in groups.items()}  # fmt: skip
    del first
    n = x.shape[0]
    rows: list[list[torch.Tensor]] = [[] for _ in specs]
    blanks: list[dict] = [{} for _ in specs]
    # Which maps are constant, per method and model state: read off on the maps' device while
    # scoring, so the report of degenerate samples never reads every kept map again.
    flags: list[dict[str, torch.Tensor]] = [{} for _ in specs]
    for key, idx in groups.items():
        for i, flat in zip(idx, comparers[key].constant_reference.split(n)):
            flags[i]["original"] = flat
    for k, step in enumerate(steps):
        saved = _saved(step) if mode == "independent" else None
        with seeded(seed + k, work):
            randomize(step)
        now = maps_now()
        for key, idx in groups.items():
            found = comparers[key].score(torch.cat([now[i] for i in idx]))
            for i, score, blank, constant in zip(idx, *(t.split(n) for t in found)):
                rows[i].append(score)
                blanks[i][step.name] = blank
                flags[i][step.name] = constant
        for i, m in enumerate(now):
            maps[i][step.name] = to_cpu(m)
        del now
        if saved is not None:
            _restore(saved)
    results = []
    for i, (spec, request, cam) in enumerate(zip(specs, requests, layers_of)):
        scores = torch.stack(rows[i])
        constant = describe_constant(maps[i], scores, flags[i])
        # The layer's spatial size does not depend on the weights, so the randomized copy serves.
        cause = constant_cause(spec, cam, x) if constant else ""
        results.append(
            RandomizationResult(
                check="parameter_randomization",
                method=spec.name,
                options=dict(request.options),
                similarity=metric,
                scores=scores,
                maps=maps[i],
                inputs=to_cpu(inputs),
                targets=targets.cpu(),
                seed=seed,
                settings={
                    "mode": mode,
                    "order": order,
                    "layers": layers_arg,
                    "layer": cam.name if cam else None,
                    "layout": str(cam.layout) if cam else None,
                    **({"terms": terms[i]} if terms[i] is not None else {}),
                    "batch_size": batch_size,
                    "target": target,
                },
                cause=cause,
                constant=constant,
                blank=describe_blank(blanks[i]),
                mode=mode,
                order=order,
                layers=[s.name for s in steps],
                skipped=planned.skipped,
                coverage=planned.coverage,
                unused=planned.unused,
                fallback=[name for s in steps for name in s.fallback],
            )
        )
    return results if isinstance(method, (list, tuple)) else results[0]
