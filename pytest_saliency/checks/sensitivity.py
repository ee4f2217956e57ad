"""Output sensitivity: a faithful map changes when a different class is explained."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..engine.targets import resolve_targets
from ..errors import SaliencyError
from ..explain import check_target, explain
from .common import (
    cam_layer,
    check_choice,
    compare,
    constant_cause,
    describe_blank,
    describe_constant,
    logits_of,
    model_inputs,
    setup,
    to_cpu,
)
from .results import SensitivityResult

AGAINST = ("random", "least_likely", "second", "all")


def other_classes(
    logits: torch.Tensor, targets: torch.Tensor, against: str, seed: int
) -> torch.Tensor:
    """The class compared with each sample's target, a LongTensor [N] on the CPU."""
    scores = logits.detach().double().cpu()
    targets = targets.cpu()
    n, classes = scores.shape
    rows = torch.arange(n)
    if against == "random":
        # Uniform over the other classes: draw from classes - 1 slots and skip the target's.
        generator = torch.Generator().manual_seed(seed)
        draw = torch.randint(0, classes - 1, (n,), generator=generator)
        return draw + (draw >= targets).long()
    if against == "second":
        scores[rows, targets] = -torch.inf
        return scores.argmax(dim=1)
    if against == "least_likely":
        scores[rows, targets] = torch.inf
        return scores.argmin(dim=1)
    return torch.full((n,), -1, dtype=torch.long)


def output_sensitivity(
    model: nn.Module,
    inputs: torch.Tensor,
    method: str,
    *,
    target: int | torch.Tensor | None = None,
    against: str = "random",
    similarity: str = "ssim",
    seed: int = 0,
    batch_size: int | None = None,
    layer: str | nn.Module | None = None,
    **method_options: Any,
) -> SensitivityResult:
    """Compare each sample's map for its class with its map for another class.

    Args:
        model: a classifier returning class scores [N, classes]; it is not changed.
        inputs: a float batch [N, C, H, W] (or [N, C, L], [N, D]).
        method: a name from :func:`pytest_saliency.methods`.
        target: the explained class: None (predicted), an int or a LongTensor [N].
        against: the other class: "random" (uniform over the other classes, seeded),
            "least_likely", "second" (highest-scoring other class) or "all" (mean
            similarity over every other class).
        similarity: a metric name from :func:`pytest_saliency.metrics`.
        seed: seeds the random class choice and the bootstrap interval.
        batch_size: samples per pass, to bound memory.
        layer: the CAM layer (name or module) for CAM methods.
        **method_options: the method's own options.

    Returns:
        A :class:`SensitivityResult`; high similarity means the map ignores the class.
    """
    model, inputs, batch_size, spec, metric, seed, layer_label = setup(
        model, inputs, method, layer, batch_size, method_options, similarity, seed
    )
    against = check_choice("against", against, AGAINST)
    target = check_target(target, inputs.shape[0])
    x = model_inputs(model, inputs)
    logits = logits_of(model, x, batch_size)
    n, classes = logits.shape
    if classes < 2:
        raise SaliencyError(
            f"output sensitivity compares maps of two classes, but the model has {classes} "
            f"output; against={against!r} needs at least 2 classes (valid against: "
            f"{', '.join(repr(a) for a in AGAINST)}, all need 2+ outputs)"
        )
    targets = resolve_targets(
        target.to(logits.device) if torch.is_tensor(target) else target, logits
    )
    targets = targets.cpu()
    others = other_classes(logits, targets, against, seed)
    layer_name = cam_layer(model, x, spec, layer_label)

    def maps_for(batch: torch.Tensor, classes_: torch.Tensor, size: int | None) -> torch.Tensor:
        return explain(
            model,
            batch,
            spec.name,
            target=classes_,
            layer=layer_name,
            batch_size=size,
            **method_options,
        )

    if against == "all":
        target_maps, other_maps, scores, blank = _against_all(
            maps_for, x, targets, classes, metric, spec, batch_size
        )
    else:
        target_maps, other_maps = _pair(maps_for, x, targets, others, spec, batch_size)
        scores, mask = compare(target_maps, other_maps, metric)
        blank = describe_blank({"other": mask})
    named = {"target": target_maps, "other": other_maps}
    constant = describe_constant(named, scores)
    return SensitivityResult(
        check="output_sensitivity",
        method=spec.name,
        options=dict(method_options),
        similarity=metric,
        scores=scores,
        maps=named,
        inputs=to_cpu(inputs),
        targets=targets,
        seed=seed,
        settings={
            "against": against,
            "target": target,
            "layer": layer_name,
            "batch_size": batch_size,
        },
        cause=constant_cause(model, x, spec, layer_name) if constant else "",
        constant=constant,
        blank=blank,
        against=against,
        others=others,
    )


def _pair(maps_for, x, targets, others, spec, batch_size):
    """Maps for the targets and for the other classes, from one 2N batch where possible."""
    n = x.shape[0]
    if "seed" in spec.defaults:
        # A stochastic method draws its noise per batch: two calls of N samples give both
        # classes the same noise, so only the class differs between the two maps.
        return (to_cpu(maps_for(x, targets, batch_size)), to_cpu(maps_for(x, others, batch_size)))
    both = maps_for(torch.cat([x, x]), torch.cat([targets, others]), batch_size)
    return to_cpu(both[:n]), to_cpu(both[n:])


def _against_all(maps_for, x, targets, classes, metric, spec, batch_size):
    """Mean similarity to every other class; ``other`` keeps each sample's most similar map."""
    n = x.shape[0]
    if "seed" in spec.defaults:  # same noise for every class, as in _pair
        maps = torch.stack(
            [to_cpu(maps_for(x, torch.full_like(targets, c), batch_size)) for c in range(classes)]
        )
    else:
        # Every class for every sample in one call, in chunks no larger than the 2N pair batch.
        every = torch.arange(classes).repeat_interleave(n)
        repeated = x.repeat(classes, *([1] * (x.dim() - 1)))
        maps = to_cpu(maps_for(repeated, every, batch_size or 2 * n))
        maps = maps.reshape(classes, n, *maps.shape[1:])
    rows = torch.arange(n)
    target_maps = maps[targets, rows]
    compared = [compare(target_maps, maps[c], metric) for c in range(classes)]
    sims = torch.stack([score for score, _ in compared])
    own = torch.zeros(classes, n, dtype=torch.bool)
    own[targets, rows] = True
    blank = describe_blank({f"class {c}": mask & ~own[c] for c, (_, mask) in enumerate(compared)})
    others_only = sims.masked_fill(own, 0.0)
    scores = others_only.sum(dim=0) / (classes - 1)  # NaN stays NaN through the sum
    best = sims.masked_fill(own, -torch.inf).nan_to_num(nan=torch.inf).argmax(dim=0)
    return target_maps, maps[best, rows], scores, blank
