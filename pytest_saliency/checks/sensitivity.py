"""Output sensitivity: a faithful map changes when a different class is explained."""

from __future__ import annotations

import contextlib

import torch

from ..errors import NonFiniteError, SaliencyError
from .base import SIMILARITY_THRESHOLD, Audit, Check, Option, api, choice, register
from .common import compare, describe_blank, describe_constant, to_cpu
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


def run(audit: Audit, *, against: str) -> list:
    """Maps for each sample's class and for another class, compared per sample."""
    x, metric, seed, batch_size = audit.x, audit.metric, audit.seed, audit.batch_size
    logits = audit.logits()
    n, classes = logits.shape
    if classes < 2:
        raise SaliencyError(
            f"output sensitivity compares maps of two classes, but the model has {classes} "
            f"output; against={against!r} needs at least 2 classes (valid against: "
            f"{', '.join(repr(a) for a in AGAINST)}, all need 2+ outputs)"
        )
    targets = audit.targets_from(logits).cpu()
    others = other_classes(logits, targets, against, seed)
    terms = audit.terms()
    explainer = audit.explainer()
    # A stochastic method draws its noise per call: separate calls of N samples give both
    # classes the same noise, so only the class differs between the two maps. The controls
    # (explainers m and up) join the deterministic group.
    m = len(audit.specs)
    stochastic = ["seed" in spec.defaults for spec in audit.specs] + [False] * (audit.count - m)

    def maps_for(batch, classes_, size, chosen) -> list[torch.Tensor]:
        found = explainer(batch, classes_.to(x.device), chosen, batch_size=size)
        return [to_cpu(m) for m in found]

    paired = [None] * audit.count
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
    fields = []
    for i in range(audit.count):
        if against == "all":
            target_maps, other_maps, scores, blank = paired[i]
        else:
            target_maps, other_maps = paired[i]
            scores, mask = compare(target_maps, other_maps, metric)
            blank = describe_blank({"other": mask})
        named = {"target": target_maps, "other": other_maps}
        constant = describe_constant(named, scores)
        fields.append(
            explainer.fields(
                i,
                scores,
                named,
                targets,
                terms,
                constant,
                blank=blank,
                against=against,
                others=others,
            )
        )
    return audit.results(fields, {"against": against, "target": audit.target})


CHECK = register(
    Check(
        name="output_sensitivity",
        summary="Compare each sample's map for its class with its map for another class.",
        states=(
            "One model state (the trained model), two classes per sample: a faithful map "
            "changes with the explained class, so high similarity fails (Adebayo et al. 2018; "
            "Khakzar et al. 2020)."
        ),
        run=run,
        options=(
            Option(
                "against",
                "random",
                choice("against", AGAINST),
                "the other class: 'random' (uniform over the other classes, seeded), "
                "'least_likely', 'second' (highest-scoring other class) or 'all' (mean "
                "similarity over every other class)",
            ),
        ),  # fmt: skip
        threshold=SIMILARITY_THRESHOLD,
        result=SensitivityResult,
        assert_name="assert_output_sensitive",
    )
)

output_sensitivity = api(CHECK)


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
