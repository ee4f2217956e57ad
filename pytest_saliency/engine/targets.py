"""Which class each sample is explained for."""

from __future__ import annotations

from collections.abc import Mapping

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


def _described(value: object, depth: int = 0) -> str:
    """What a model returned, in a few words: ``Tensor[4, 10]``, ``a tuple of (Tensor[4, 10],
    Tensor[4, 10])``, ``a dict with 'out': Tensor[4, 21, 8, 8]``."""
    if isinstance(value, torch.Tensor):
        return f"Tensor{list(value.shape)}"
    if depth > 0:
        return type(value).__name__
    if isinstance(value, Mapping):
        items = ", ".join(f"{k!r}: {_described(v, 1)}" for k, v in list(value.items())[:6])
        return f"a {type(value).__name__} with {items or 'no keys'}"
    if isinstance(value, (tuple, list)):
        items = ", ".join(_described(v, 1) for v in value[:6])
        return f"a {type(value).__name__} of ({items})"
    return f"a {type(value).__name__}"


def select_logits(output: object, model_name: str) -> torch.Tensor:
    """The class scores in what the model returned: the tensor itself, or the entry or
    attribute named ``logits`` (a transformers ``ModelOutput``, torchvision's
    ``InceptionOutputs``). Nothing is guessed by position: a plain tuple or another dict is
    an error that says what the model returned."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    raise SaliencyError(
        f"model {model_name} returned {_described(output)}; saliency methods need the class "
        "scores [N, classes]: a tensor, or an entry or attribute named 'logits' (as transformers' "
        "ModelOutput and torchvision's InceptionOutputs have). Which element holds them is not "
        "guessed: wrap the model so it returns them (e.g. a module whose forward returns "
        "model(x)[0])"
    )


def check_logits(output: object, model_name: str, n: int) -> torch.Tensor:
    """The model's output as class scores [N, classes] (see :func:`select_logits`), or a
    clear error."""
    output = select_logits(output, model_name)
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
