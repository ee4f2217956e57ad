"""Efficient MPRT (Hedström et al. 2024; quantus 0.6 ``EfficientMPRT``): the rise in a map's
complexity from the trained model to the fully randomized one.

Complexity is the discrete entropy of the map's histogram (``bins`` equal-width bins between
the map's minimum and maximum, natural log), and each sample's score is the relative rise
``(H(randomized) - H(trained)) / H(trained)``. A faithful method's maps lose their structure
when every weight is re-initialised, so their entropy rises: higher is better. Two model
states only, so it costs two explanations: the cheap check for every CI run.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import MIN_RISE, Audit, Check, Option, api, int_at_least, register
from .common import describe_constant, is_constant, model_inputs, to_cpu
from .randomization import model_copy, seeded
from .results import ComplexityResult
from .steps import plan_steps, randomize


def discrete_entropy(maps: torch.Tensor, bins: int) -> torch.Tensor:
    """Entropy [N] (float64) of each map's histogram of ``bins`` equal-width bins between its
    minimum and maximum (numpy's ``histogram`` binning; a constant map fills one bin: 0)."""
    rows = maps.detach().to("cpu").reshape(maps.shape[0], -1).numpy()
    out = []
    for row in rows:
        try:
            counts, _ = np.histogram(row, bins=bins)
        except ValueError:  # a range too small for float32 bins (a map constant up to jitter)
            counts, _ = np.histogram(row.astype(np.float64), bins=bins)
        p = counts[counts > 0] / counts.sum()
        out.append(float(-(p * np.log(p)).sum()))
    return torch.tensor(out, dtype=torch.float64)


def rise(original: torch.Tensor, randomized: torch.Tensor) -> torch.Tensor:
    """``(randomized - original) / original`` per sample; NaN where the original is 0."""
    scores = (randomized - original) / original
    scores[original == 0] = math.nan
    return scores


def rises(before: torch.Tensor, after: torch.Tensor, bins: int):
    """(rise [N] float32, H trained [N], H randomized [N], blank [N] bool) of two map sets.

    A constant trained map has no structure to lose: NaN (degenerate). A randomized map the
    engine calls constant (within float tolerance) next to a structured one has entropy 0 (its
    float jitter is not complexity), a rise of -1, and is marked blank."""
    h0, h1 = discrete_entropy(before, bins), discrete_entropy(after, bins)
    flat = is_constant(before)
    blank = is_constant(after) & ~flat
    h1[blank] = 0.0
    scores = rise(h0, h1)
    scores[flat] = math.nan
    return scores.float(), h0, h1, blank


def _run(audit: Audit, *, bins: int) -> list:
    work = model_copy(audit)
    x = model_inputs(work, audit.inputs)
    terms = audit.terms(work)
    explainer = audit.explainer(work)
    targets = None
    if audit.target is None and all(spec.compute is None for spec in audit.specs):
        # Predicted classes from the first explanation's own forward: no extra forward.
        original = [to_cpu(m) for m in explainer(x, None)]
        targets = explainer.last_targets
    if targets is None:
        targets = audit.targets_from(audit.outputs(work))
        original = [to_cpu(m) for m in explainer(x, targets)]
    planned = plan_steps(work, x, None)
    # Bottom-up and cascading, as quantus: every step, in the order the forward uses them.
    for k, step in enumerate(planned.steps):
        with seeded(audit.seed + k, work):
            randomize(step)
    randomized = [to_cpu(m) for m in explainer(x, targets)]
    fields = []
    for i, (before, after) in enumerate(zip(original, randomized)):
        scores, h0, h1, blank_after = rises(before, after, bins)
        named = {"original": before, "randomized": after}
        constant = describe_constant(named, scores)
        fields.append(
            explainer.fields(
                i,
                scores,
                named,
                targets,
                terms,
                constant,
                blank={int(k): ["randomized"] for k in blank_after.nonzero().flatten()},
                entropies={"original": h0, "randomized": h1},
                bins=bins,
                coverage=planned.coverage,
                skipped=planned.skipped,
                unused=planned.unused,
                fallback=[name for s in planned.steps for name in s.fallback],
            )
        )
    return audit.results(fields, {"bins": bins, "target": audit.target_setting})


CHECK = register(
    Check(
        name="efficient_randomization",
        summary="Efficient MPRT (Hedström et al. 2024): the relative rise in map entropy from "
        "the trained to the fully randomized model.",
        states=(
            "Two model states: the trained model and a copy with every parameter the forward "
            "uses re-initialised (bottom-up, cascading; step k seeded with seed + k). A "
            "faithful map gets more complex, so a low rise fails."
        ),
        run=_run,
        options=(
            Option(
                "bins",
                100,
                int_at_least("bins", 2),
                "histogram bins of the discrete entropy (quantus' n_bins default)",
            ),
        ),  # fmt: skip
        threshold=MIN_RISE,
        result=ComplexityResult,
        assert_name="assert_efficient_randomization_sensitive",
        similarity=None,
        measure="entropy_rise",
    )
)

efficient_randomization = api(CHECK)
