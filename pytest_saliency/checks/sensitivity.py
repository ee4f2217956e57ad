"""Output sensitivity: a faithful map changes when a different class is explained."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..engine.state import eval_mode
from ..engine.targets import resolve_targets
from ..errors import NonFiniteError, SaliencyError
from ..explainer import allow_grad, check_target
from ..multi import Request, explain_many
from .common import (
    cam_layer,
    check_choice,
    compare,
    constant_cause,
    describe_blank,
    describe_constant,
    logits_of,
    method_requests,
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


@allow_grad
def output_sensitivity(
    model: nn.Module,
    inputs: torch.Tensor,
    method: str | Sequence[str | Mapping[str, Any]],
    *,
    target: int | torch.Tensor | None = None,
    against: str = "random",
    similarity: str = "ssim",
    seed: int = 0,
    batch_size: int | None = None,
    layer: str | nn.Module | None = None,
    **method_options: Any,
) -> SensitivityResult | list[SensitivityResult]:
    """Compare each sample's map for its class with its map for another class.

    Args:
        model: a classifier returning class scores [N, classes]; it is not changed.
        inputs: a float batch [N, C, H, W] (or [N, C, L], [N, D]).
        method: a name from :func:`pytest_saliency.methods`; or a list of names and
            ``{"name": ..., "layer": ..., **options}`` mappings, audited together (methods that
            share a rule set share their passes) and returned as a list of results.
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
        A :class:`SensitivityResult` (a list for a list of methods); high similarity means the
        map ignores the class.
    """
    requests = method_requests(method, layer, method_options)
    audited = [
        setup(model, inputs, r.method, r.layer, batch_size, r.options, similarity, seed)
        for r in requests
    ]
    model, inputs, batch_size, _, metric, seed, _ = audited[0]
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
    specs = [a[3] for a in audited]
    with eval_mode(model):
        terms = [spec.describe(model, x) if spec.describe else None for spec in specs]
    layers_of = [
        cam_layer(model, x, spec, a[6], r.options) for spec, a, r in zip(specs, audited, requests)
    ]
    shared = [
        Request(spec.name, r.options, cam) for spec, r, cam in zip(specs, requests, layers_of)
    ]
    # A stochastic method draws its noise per call: separate calls of N samples give both
    # classes the same noise, so only the class differs between the two maps.
    stochastic = ["seed" in spec.defaults for spec in specs]

    def maps_for(batch, classes_, size, chosen) -> list[torch.Tensor]:
        picked = [shared[i] for i in chosen]
        found = explain_many(model, batch, picked, target=classes_, batch_size=size)
        return [to_cpu(m) for m in found]

    paired = [None] * len(specs)
    for group in (
        [i for i, s in enumerate(stochastic) if not s],
        [i for i, s in enumerate(stochastic) if s],
    ):
        if not group:
            continue
        if against == "all":
            found = _against_all(maps_for, x, targets, classes, metric, batch_size, group,
                                 stochastic[group[0]])  # fmt: skip
        else:
            found = _pair(maps_for, x, targets, others, batch_size, group, stochastic[group[0]])
        for i, item in zip(group, found):
            paired[i] = item
    results = []
    for i, (spec, request, cam) in enumerate(zip(specs, requests, layers_of)):
        if against == "all":
            target_maps, other_maps, scores, blank = paired[i]
        else:
            target_maps, other_maps = paired[i]
            scores, mask = compare(target_maps, other_maps, metric)
            blank = describe_blank({"other": mask})
        named = {"target": target_maps, "other": other_maps}
        constant = describe_constant(named, scores)
        results.append(
            SensitivityResult(
                check="output_sensitivity",
                method=spec.name,
                options=dict(request.options),
                similarity=metric,
                scores=scores,
                maps=named,
                inputs=to_cpu(inputs),
                targets=targets,
                seed=seed,
                settings={
                    "against": against,
                    "target": target,
                    "layer": cam.name if cam else None,
                    "layout": str(cam.layout) if cam else None,
                    **({"terms": terms[i]} if terms[i] is not None else {}),
                    "batch_size": batch_size,
                },
                cause=constant_cause(spec, cam, x) if constant else "",
                constant=constant,
                blank=blank,
                against=against,
                others=others,
            )
        )
    return results if isinstance(method, (list, tuple)) else results[0]


@contextlib.contextmanager
def _numbered_in(n: int):
    """Errors about samples of a batch of copies of the inputs name the inputs' own numbers."""
    try:
        yield
    except NonFiniteError as exc:
        raise exc.renumbered([s % n for s in exc.samples]) from None


def _pair(maps_for, x, targets, others, batch_size, group, stochastic):
    """Per method, maps for the targets and for the other classes (one 2N batch if possible)."""
    n = x.shape[0]
    if stochastic:
        pairs = []
        for i in group:
            (a,) = maps_for(x, targets, batch_size, [i])
            (b,) = maps_for(x, others, batch_size, [i])
            pairs.append((a, b))
        return pairs
    with _numbered_in(n):
        both = maps_for(torch.cat([x, x]), torch.cat([targets, others]), batch_size, group)
    return [(m[:n], m[n:]) for m in both]


def _against_all(maps_for, x, targets, classes, metric, batch_size, group, stochastic):
    """Per method: mean similarity to every other class; ``other`` keeps the most similar map."""
    n = x.shape[0]
    if stochastic:  # same noise for every class, as in _pair
        per_method = [
            torch.stack(
                [maps_for(x, torch.full_like(targets, c), batch_size, [i])[0]
                 for c in range(classes)]
            )
            for i in group
        ]  # fmt: skip
    else:
        # Every class for every sample in one call, in chunks no larger than the 2N pair batch.
        every = torch.arange(classes).repeat_interleave(n)
        repeated = x.repeat(classes, *([1] * (x.dim() - 1)))
        with _numbered_in(n):
            found = maps_for(repeated, every, batch_size or 2 * n, group)
        per_method = [m.reshape(classes, n, *m.shape[1:]) for m in found]
    return [_all_scores(maps, targets, classes, metric) for maps in per_method]


def _all_scores(maps, targets, classes, metric):
    n = maps.shape[1]
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
