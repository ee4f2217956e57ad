"""Output sensitivity: a faithful map changes when a different class is explained."""

from __future__ import annotations

import contextlib

import torch

from ..errors import NonFiniteError
from .base import SIMILARITY_THRESHOLD, Audit, Check, Option, api, choice, register
from .common import compare, describe_blank, describe_constant, to_cpu
from .results import SensitivityResult

AGAINST = ("random", "least_likely", "second", "all")


def other_classes(
    logits: torch.Tensor, targets: torch.Tensor, against: str, seed: int
) -> torch.Tensor:
    """The class compared with each sample's target class, a LongTensor [N] on the CPU (-1 for
    ``against="all"``)."""
    from ..engine.targets import ClassLogit, other_units

    if against == "all":
        return torch.full((logits.shape[0],), -1, dtype=torch.long)
    return other_units(ClassLogit(), logits, targets.to(logits.device), against, seed)


def run(audit: Audit, *, against: str) -> list:
    """Maps for each sample's class and for another class, compared per sample."""
    from ..engine.targets import other_units

    x, metric, seed, batch_size = audit.x, audit.metric, audit.seed, audit.batch_size
    kind = audit.objective.target
    outputs = audit.outputs()
    selection = audit.targets_from(outputs)
    # Every other target a sample can be compared with (this raises where there is none).
    _, allowed = kind.alternatives(outputs, selection)
    targets = selection.cpu()
    if against == "all":
        others = torch.full((x.shape[0],), -1, dtype=torch.long)
        other_sel = None
    else:
        others = other_units(kind, outputs, selection, against, seed)
        other_sel = kind.alternative(others, outputs).cpu()
    alternative = lambda units: kind.alternative(units, outputs).cpu()  # noqa: E731
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
            found = _against_all(maps_for, x, targets, allowed, alternative, kind, metric,
                                 batch_size, group, stochastic[group[0]])  # fmt: skip
        else:
            found = _pair(maps_for, x, targets, other_sel, batch_size, group,
                          stochastic[group[0]])  # fmt: skip
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
    return audit.results(fields, {"against": against, "target": audit.target_setting})


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


def _against_all(maps_for, x, targets, allowed, alternative, kind, metric, batch_size, group,
                 stochastic):  # fmt: skip
    """Per method: mean similarity to every other target the sample has (``allowed`` [N, K]);
    ``other`` keeps the most similar map."""
    n, count = allowed.shape
    units = kind.units_of(targets)
    if stochastic:  # same noise for every unit, as in _pair
        per_method = [
            torch.stack(
                [maps_for(x, alternative(torch.full((n,), c, dtype=torch.long)), batch_size, [i])[0]
                 for c in range(count)]
            )
            for i in group
        ]  # fmt: skip
    else:
        # Every unit for every sample in one call, in chunks no larger than the 2N pair batch.
        every = alternative(torch.arange(count).repeat_interleave(n))
        repeated = x.repeat(count, *([1] * (x.dim() - 1)))
        with _numbered_in(n):
            found = maps_for(repeated, every, batch_size or 2 * n, group)
        per_method = [m.reshape(count, n, *m.shape[1:]) for m in found]
    if units is None:  # the target is no single unit (several labels): its own maps
        own_maps = [maps_for(x, targets, batch_size, [i])[0] for i in group]
    else:
        own_maps = [maps[units, torch.arange(n)] for maps in per_method]
    return [
        _all_scores(maps, own, allowed, kind.noun, metric)
        for maps, own in zip(per_method, own_maps)
    ]


def _all_scores(maps, target_maps, allowed, noun, metric):
    n = maps.shape[1]
    rows = torch.arange(n)
    count = allowed.shape[1]
    compared = [compare(target_maps, maps[c], metric) for c in range(count)]
    sims = torch.stack([score for score, _ in compared])
    excluded = ~allowed.T  # [K, N]: the sample's own target, and units it cannot be compared to
    blank = describe_blank(
        {f"{noun} {c}": mask & ~excluded[c] for c, (_, mask) in enumerate(compared)}
    )
    others_only = sims.masked_fill(excluded, 0.0)
    scores = others_only.sum(dim=0) / allowed.sum(dim=1)  # NaN stays NaN through the sum
    best = sims.masked_fill(excluded, -torch.inf).nan_to_num(nan=torch.inf).argmax(dim=0)
    return target_maps, maps[best, rows], scores, blank
