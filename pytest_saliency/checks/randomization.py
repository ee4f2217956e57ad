"""Parameter randomization: a faithful map changes when the model's weights are re-initialised."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import progress
from ..engine.state import copy_model, rng_preserved
from ..errors import SaliencyError
from ..explainer import opaque_module
from .base import (
    SIMILARITY_THRESHOLD,
    Audit,
    Check,
    Option,
    api,
    choice,
    int_at_least,
    layers_value,
    number_in,
    register,
)
from .common import (
    Comparer,
    describe_blank,
    describe_constant,
    model_inputs,
    to_cpu,
)
from .results import RandomizationResult
from .steps import Step, plan_steps, randomize

MODES = ("cascading", "independent")
ORDERS = ("top_down", "bottom_up")
AGGREGATES = ("worst", "mean", "last")
NOISE_SALT = 0x5E0015E


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


def explain_step(explainer, batch: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
    """The maps of every audited method and control on the model's current weights (one
    shared pass per rule set); ``explainer.model`` is the audit's randomized copy."""
    return explainer(batch, targets)


def model_copy(audit: Audit) -> nn.Module:
    """The audit's one working copy of the model (every step re-initialises it in place)."""
    check_not_scripted(audit.model)
    return copy_model(audit.model)


def noisy_batch(x: torch.Tensor, samples: int, magnitude: float, seed: int) -> torch.Tensor:
    """``samples`` copies of ``x`` [N, ...] stacked as [samples * N, ...]: the first
    ``samples - 1`` with Gaussian noise of standard deviation ``magnitude * (max - min)`` of
    each sample, the last one clean (quantus' SmoothMPRT). Drawn on the CPU from ``seed`` (salted
    with :data:`NOISE_SALT`)."""
    n = x.shape[0]
    dims = tuple(range(1, x.dim()))
    flat = x.detach().to("cpu", torch.float64)
    spread = flat.amax(dim=dims, keepdim=True) - flat.amin(dim=dims, keepdim=True)
    # Salted: step 0 re-initialises from ``seed`` itself, and the noise must not share its bits.
    generator = torch.Generator().manual_seed((seed ^ NOISE_SALT) % 2**63)
    draws = torch.randn((samples - 1, *x.shape), generator=generator, dtype=torch.float64)
    noisy = torch.cat([flat + draws * (magnitude * spread), flat[None]]).reshape(
        samples * n, *x.shape[1:]
    )
    return noisy.to(device=x.device, dtype=x.dtype)


def run_steps(audit: Audit, *, mode: str, order: str, layers: Any, aggregate: str,
              smooth: tuple | None = None) -> list:  # fmt: skip
    """Each sample's map on the trained model against its maps after each randomization step.

    ``smooth = (samples, magnitude)`` explains ``samples`` noisy copies of each input (one
    batch per state) and compares the mean maps (smooth MPRT)."""
    metric, seed = audit.metric, audit.seed
    layers_arg = list(layers) if isinstance(layers, tuple) else layers
    work = model_copy(audit)
    x = model_inputs(work, audit.inputs)
    planned = plan_steps(work, x, layers_arg)
    steps = planned.steps
    if order == "top_down":
        steps.reverse()
    targets = audit.targets_from(audit.outputs(work))
    terms = audit.terms(work)
    explainer = audit.explainer(work)  # checks and grouping done once
    n = x.shape[0]
    batch, batch_targets = x, targets
    if smooth is not None:
        batch = noisy_batch(x, smooth[0], smooth[1], seed)
        batch_targets = targets.repeat(smooth[0], *([1] * (targets.dim() - 1)))

    def maps_now() -> list[torch.Tensor]:
        found = explain_step(explainer, batch, batch_targets)
        if smooth is None:
            return found
        return [m.reshape(smooth[0], n, *m.shape[1:]).mean(dim=0) for m in found]

    first = maps_now()
    count = len(first)
    maps = [{"original": to_cpu(m)} for m in first]
    # Explainers whose maps have the same shape are scored together, in one batched call per
    # step; each reference is prepared once.
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(first):
        groups.setdefault((tuple(m.shape), m.dtype), []).append(i)
    comparers = {key: Comparer(torch.cat([first[i] for i in idx]), metric)
                 for key, idx in groups.items()}  # fmt: skip
    del first
    rows: list[list[torch.Tensor]] = [[] for _ in range(count)]
    blanks: list[dict] = [{} for _ in range(count)]
    # Which maps are constant, per explainer and model state: read off while scoring, so the
    # report of degenerate samples never reads every kept map again.
    flags: list[dict[str, torch.Tensor]] = [{} for _ in range(count)]
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
        progress.step(k + 1, len(steps), step.name)
    fields = []
    for i in range(count):
        scores = torch.stack(rows[i])
        constant = describe_constant(maps[i], scores, flags[i])
        fields.append(
            explainer.fields(
                i,
                scores,
                maps[i],
                targets,
                terms,
                constant,
                blank=describe_blank(blanks[i]),
                mode=mode,
                order=order,
                aggregate=aggregate,
                layers=[s.name for s in steps],
                skipped=planned.skipped,
                coverage=planned.coverage,
                unused=planned.unused,
                fallback=[name for s in steps for name in s.fallback],
            )
        )
    settings = {"mode": mode, "order": order, "layers": layers_arg, "aggregate": aggregate,
                "target": audit.target_setting}  # fmt: skip
    if smooth is not None:
        settings.update(noise_samples=smooth[0], noise_magnitude=smooth[1])
    return audit.results(fields, settings)


def _run(audit: Audit, **options: Any) -> list:
    return run_steps(audit, **options)


def _run_smooth(audit: Audit, *, noise_samples: int, noise_magnitude: float, **options: Any
                ) -> list:  # fmt: skip
    return run_steps(audit, smooth=(noise_samples, noise_magnitude), **options)


def step_options(order: str, aggregate: str) -> tuple[Option, ...]:
    return (
        Option("mode", "cascading", choice("mode", MODES),
               "'cascading' re-initialises layers cumulatively; 'independent' one at a time, "
               "each on the trained weights"),
        Option("order", order, choice("order", ORDERS),
               "'top_down' (logits to input, as Adebayo et al. 2018) or 'bottom_up'"),
        Option("layers", None, layers_value,
               "None (one step per module with parameters the forward uses, in the order it "
               "uses them), 'blocks' (the model's children; a child holding more than half of "
               "the parameterised layers is opened) or a list of module names"),
        Option("aggregate", aggregate, choice("aggregate", AGGREGATES),
               "the score the verdict reads: 'worst' (the most similar step's mean), 'mean' "
               "(the mean over steps: quantus' return_average_correlation) or 'last' (the last "
               "step: quantus' return_last_correlation, the fully randomized model when "
               "cascading)"),
    )  # fmt: skip


STATES = (
    "The trained model and its copy after each randomization step (the seed re-initialises "
    "step k with seed + k); a faithful map changes with the weights, so high similarity "
    "fails. The model is never changed: the audit works on one deep copy."
)

CHECK = register(
    Check(
        name="parameter_randomization",
        summary="Compare each sample's map on the trained model with its maps on randomized "
        "copies (Adebayo et al. 2018).",
        states=STATES,
        run=_run,
        options=step_options("top_down", "worst"),
        threshold=SIMILARITY_THRESHOLD,
        result=RandomizationResult,
        assert_name="assert_randomization_sensitive",
    )
)

SMOOTH = register(
    Check(
        name="smooth_randomization",
        summary="Smooth MPRT (Hedstrom et al. 2024): parameter randomization on maps averaged "
        "over noisy copies of each input.",
        states=STATES + " Each map is the mean over noise_samples copies of the input (the last "
        "one clean), so gradient noise does not pass for sensitivity to the weights; the same "
        "noise draws serve every model state. Bottom-up, the first step re-initialises only the "
        "input layer, which leaves most maps alike: the score is the mean over the steps "
        "(quantus' return_average_correlation), not the worst step.",
        run=_run_smooth,
        options=step_options("bottom_up", "mean")
        + (
            Option(
                "noise_samples",
                50,
                int_at_least("noise_samples", 1),
                "noisy copies per input, the clean input included (quantus' nr_samples)",
            ),
            Option(
                "noise_magnitude",
                0.1,
                number_in("noise_magnitude", 0.0, 10.0),
                "the noise's standard deviation as a fraction of each input's value range "
                "(quantus' noise_magnitude)",
            ),
        ),  # fmt: skip
        threshold=SIMILARITY_THRESHOLD,
        result=RandomizationResult,
        assert_name="assert_smooth_randomization_sensitive",
        similarity="spearman_abs",
    )
)

parameter_randomization = api(CHECK)
smooth_randomization = api(SMOOTH)
