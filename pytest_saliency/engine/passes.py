"""One forward pass with recorders, one backward pass under a rule set."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .rules import RuleSet
from .state import removable_hooks
from .targets import check_logits, resolve_targets


@dataclass
class Record:
    """What one pass kept, for one chunk of samples.

    ``taps[name]`` lists ``(activation, gradient)`` per call of the tapped module (a module can
    run several times in one forward). Activations are copies taken at the module's output, so
    a later in-place op (``ReLU(inplace=True)``) cannot change them; gradients are taken at the
    same point.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor
    input_grad: torch.Tensor
    taps: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)


def _tap(name: str, keep_activation: bool, store: dict, handles: list):
    def hook(module, args, output):
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None
        slot: list = [output.detach().clone() if keep_activation else None, None]
        store.setdefault(name, []).append(slot)

        def grad_hook(grad):
            slot[1] = grad.detach()

        # The hook sits on this version of the tensor, so a later in-place op on it does not
        # change which gradient arrives: it is the gradient at the module's output.
        handles.append(output.register_hook(grad_hook))
        return None

    return hook


def forward_backward(
    model: nn.Module,
    inputs: torch.Tensor,
    target: object,
    rules: RuleSet,
    *,
    taps: Mapping[str, tuple[nn.Module, bool]] | None = None,
    method: str = "",
) -> Record:
    """Forward ``inputs`` with ``rules`` installed, backward from each sample's target logit.

    ``taps`` maps a name to ``(module, keep_activation)``. ``target`` is anything
    :func:`resolve_targets` accepts (None = predicted class).
    """
    x = inputs.detach().clone().requires_grad_(True)
    store: dict[str, list] = {}
    with torch.enable_grad(), removable_hooks() as handles:
        for name, (module, keep) in (taps or {}).items():
            handles.append(module.register_forward_hook(_tap(name, keep, store, handles)))
        with rules.applied(model, method):
            output = model(x)
        logits = check_logits(output, type(model).__name__, x.shape[0])
        targets = resolve_targets(target, logits)
        score = logits.gather(1, targets[:, None]).sum()
        (grad,) = torch.autograd.grad(score, x, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(x)
    recorded = {
        name: [(a, g if g is not None else torch.zeros_like(a) if a is not None else None)
               for a, g in slots]
        for name, slots in store.items()
    }  # fmt: skip
    return Record(x.detach(), targets, logits.detach(), grad, recorded)


def chunked(
    run: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor | Sequence[torch.Tensor]],
    inputs: torch.Tensor,
    targets: torch.Tensor | None,
    batch_size: int | None,
):
    """Apply ``run(inputs_chunk, targets_chunk)`` over chunks of ``batch_size`` and concatenate."""
    n = inputs.shape[0]
    if batch_size is None or batch_size >= n:
        return run(inputs, targets)
    parts = []
    for start in range(0, n, batch_size):
        stop = start + batch_size
        parts.append(run(inputs[start:stop], None if targets is None else targets[start:stop]))
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return type(parts[0])(torch.cat(list(p)) for p in zip(*parts))
