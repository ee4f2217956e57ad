"""Data randomization (Adebayo et al. 2018, section 5): a faithful map depends on what the
model learned, so the maps of the trained model and of the same architecture trained on
permuted labels differ.

The twin is the user's (``randomized_model``): trained the same way on the same inputs with
the labels shuffled, so it fits noise. Both models explain the same class per sample (the
trained model's prediction unless a target is given) with the same method, layer and options.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SaliencyError
from ..explainer import check_devices, check_model
from .base import SIMILARITY_THRESHOLD, Audit, Check, api, register
from .common import (
    compare,
    describe_blank,
    describe_constant,
    model_inputs,
    to_cpu,
)
from .results import DataRandomizationResult


def check_twin(model: nn.Module, twin: object, label: str = "randomized_model") -> nn.Module:
    """``twin`` is a module of ``model``'s architecture: the same parameter and buffer names,
    shapes and dtypes, on the same device; the first difference is named otherwise."""
    if not isinstance(twin, nn.Module):
        raise SaliencyError(
            f"{label} must be a torch.nn.Module (the same architecture trained on "
            f"permuted labels), got {type(twin).__name__}"
        )
    twin = check_model(twin)
    check_devices(twin)
    if twin is model:
        raise SaliencyError(
            f"{label} is the trained model itself; pass the copy trained on permuted labels "
            "(same architecture, labels shuffled before training)"
        )
    ours, theirs = model.state_dict(), twin.state_dict()
    for name, tensor in ours.items():
        if name not in theirs:
            raise SaliencyError(
                f"{label} is not the model's architecture: it has no {name!r} "
                f"(the model's {name} has shape {list(tensor.shape)}); data randomization "
                "compares the same architecture trained on permuted labels"
            )
        other = theirs[name]
        if other.shape != tensor.shape or other.dtype != tensor.dtype:
            raise SaliencyError(
                f"{label} is not the model's architecture: {name!r} has shape "
                f"{list(other.shape)} ({other.dtype}) there and {list(tensor.shape)} "
                f"({tensor.dtype}) in the model"
            )
        if other.device != tensor.device:
            raise SaliencyError(
                f"{label} is on {other.device} and the model on {tensor.device}; "
                "move both to one device"
            )
    extra = [name for name in theirs if name not in ours]
    if extra:
        raise SaliencyError(
            f"{label} is not the model's architecture: it has {extra[0]!r}, which "
            "the model does not have"
        )
    return twin


def _run(audit: Audit, twin: nn.Module) -> list:
    twin = check_twin(audit.model, twin)
    x = model_inputs(audit.model, audit.inputs)
    targets = audit.targets_from(audit.outputs())
    terms = audit.terms()
    trained = audit.explainer()
    # The CAM layer found on the trained model is read on the twin by its name.
    permuted = audit.explainer(twin, labels=[cam.name if cam else None for cam in trained.layers])
    from ..engine.targets import Binary, ClassLogit

    # What the twin predicts, to spot a collapsed twin: for class targets only.
    kind = audit.objective.target
    predicted = (
        audit.outputs(twin).argmax(dim=1).cpu()
        if isinstance(kind, ClassLogit)
        else (audit.outputs(twin)[:, 0] > kind.threshold).long().cpu()  # the twin's own
        if isinstance(kind, Binary)
        else torch.empty(0, dtype=torch.long)
    )
    first = [to_cpu(m) for m in trained(x, targets)]
    second = [to_cpu(m) for m in permuted(x, targets)]
    fields = []
    for i, (a, b) in enumerate(zip(first, second)):
        scores, mask = compare(a, b, audit.metric)
        named = {"trained": a, "permuted": b}
        constant = describe_constant(named, scores)
        fields.append(
            trained.fields(
                i,
                scores,
                named,
                targets,
                terms,
                constant,
                blank=describe_blank({"permuted": mask}),
                twin_predictions=predicted,
            )
        )
    return audit.results(fields, {"target": audit.target_setting})


CHECK = register(
    Check(
        name="data_randomization",
        summary="Compare each sample's map on the trained model with its map on the same "
        "architecture trained on permuted labels (Adebayo et al. 2018, section 5).",
        states=(
            "Two models: the trained one and its permuted-label twin; a faithful map depends "
            "on what the model learned, so high similarity fails."
        ),
        run=_run,
        options=(),
        threshold=SIMILARITY_THRESHOLD,
        result=DataRandomizationResult,
        assert_name="assert_data_randomization_sensitive",
        models=("model", "randomized_model"),
        model_keys={"randomized_model": "model"},
        model_help={
            "randomized_model": "the same architecture (parameter names and shapes) trained "
            "the same way on permuted labels",
        },
    )
)

data_randomization = api(CHECK)
