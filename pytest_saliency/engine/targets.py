"""Which class each sample is explained for."""

from __future__ import annotations

import torch

from ..errors import ModelError, NonFiniteError, SaliencyError, non_finite_samples


def call_model(model: torch.nn.Module, inputs: torch.Tensor) -> object:
    """``model(inputs)``; a failure inside the user's model becomes an error that says which
    call failed and on what (the original exception stays chained for the traceback)."""
    try:
        return model(inputs)
    except SaliencyError:
        raise
    except Exception as exc:
        raise ModelError(
            f"model {type(model).__name__} failed on inputs of shape {tuple(inputs.shape)} "
            f"({inputs.dtype}, {inputs.device}): {type(exc).__name__}: {exc}. Check that the "
            "inputs have the shape, channels, dtype and device the model expects"
        ) from exc


def check_logits(output: object, model_name: str, n: int) -> torch.Tensor:
    """The model's output as class scores [N, classes], or a clear error."""
    if not isinstance(output, torch.Tensor):
        raise SaliencyError(
            f"model {model_name} returned {type(output).__name__}, not a tensor; saliency methods "
            "need class scores of shape [N, classes] (wrap the model so it returns the logits)"
        )
    if output.dim() != 2 or output.shape[0] != n:
        raise SaliencyError(
            f"model {model_name} returned a tensor of shape {tuple(output.shape)}; saliency "
            f"methods need class scores of shape [N={n}, classes]"
        )
    bad = non_finite_samples(output)
    if bad:
        raise NonFiniteError(
            bad,
            (
                f"model {model_name} returned NaN or inf scores for {{which}}; the "
                "explained class and its gradient are undefined there. Check the model on these "
                "inputs (an overflow, a division by zero, a float16 model)"
            ),
        )
    return output


def resolve_targets(target: object, logits: torch.Tensor) -> torch.Tensor:
    """A LongTensor [N] of class indices on the logits' device, checked against the class count."""
    n, classes = logits.shape
    if target is None:
        return logits.detach().argmax(dim=1)
    if isinstance(target, bool):
        raise SaliencyError(f"target must be None, an int or a LongTensor [N], got {target!r}")
    if isinstance(target, int):
        if not 0 <= target < classes:
            raise SaliencyError(
                f"target {target} is out of range: the model has {classes} classes, so "
                f"targets must be in [0, {classes - 1}]"
            )
        targets = torch.full((n,), target, dtype=torch.long)
    else:
        try:
            targets = torch.as_tensor(target)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise SaliencyError(
                f"target must be None, an int or a LongTensor [N], got {type(target).__name__}"
            ) from exc
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise SaliencyError(
                f"target must hold integer class indices, got dtype {targets.dtype}"
            )
        if targets.dim() == 0:
            targets = targets.expand(n)
        if targets.dim() != 1 or targets.shape[0] != n:
            raise SaliencyError(
                f"target has shape {tuple(targets.shape)}; expected one class per sample, "
                f"shape [{n}]"
            )
        targets = targets.long()
    bad = (targets < 0) | (targets >= classes)
    if bool(bad.any()):
        idx = int(bad.nonzero()[0])
        raise SaliencyError(
            f"target {int(targets[idx])} (sample {idx}) is out of range: the model has {classes} "
            f"classes, so targets must be in [0, {classes - 1}]"
        )
    return targets.to(logits.device)
