"""One forward pass with recorders, one backward pass under a rule set."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.utils.checkpoint
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import NonFiniteError, SaliencyError
from .layouts import function_name
from .rules import RuleSet
from .state import removable_hooks
from .targets import DEFAULT, Objective, call_model


@dataclass
class Record:
    """What one pass kept, for one chunk of samples.

    ``taps[name]`` lists ``(activation, gradient)`` per call of the tapped module (a module can
    run several times in one forward). Each activation is the module's output exactly as it
    left the module: the tap hands a copy on to the rest of the forward, so a later in-place op
    (``ReLU(inplace=True)``) changes the copy, not the kept tensor. ``input_grad`` is None when
    the pass was asked not to compute it (the backward then stops at the tapped outputs).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor
    input_grad: torch.Tensor | None
    taps: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)


class Tap(NamedTuple):
    """What a pass records: a module's output (``point="output"``), its first input
    (``"input"``), or the input of the ``pool[1]``-th call of the function ``pool[0]``
    (``"pool"``, a functional global pooling); with its activation, or the gradient only."""

    module: nn.Module | None
    keep_activation: bool = True
    point: str = "output"
    pool: tuple[str, int] | None = None
    label: str = ""  # how errors name it (the CAM layer as the user wrote it)


def _input_tap(name: str, label: str, store: dict[str, list], versions: list):
    def hook(module, args):
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].requires_grad:
            return None
        store.setdefault(name, []).append((args[0], True))
        versions.append((label, args[0], args[0]._version))
        return (args[0].clone(), *args[1:])  # the module reads a copy: see _tap

    return hook


class _PoolTaps(TorchFunctionMode):
    """Records the input of chosen calls of a function (by name and call count) and hands the
    call a copy, as a module tap does."""

    def __init__(
        self, taps: list[tuple[str, tuple[str, int], str]], store: dict[str, list],
        versions: list,
    ) -> None:  # fmt: skip
        super().__init__()
        self.wanted = {pool: (name, label) for name, pool, label in taps}
        self.store = store
        self.versions = versions
        self.counts: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fname = function_name(func)
        call = self.counts.get(fname, 0)
        self.counts[fname] = call + 1
        wanted = self.wanted.get((fname, call))
        if wanted is not None and args and isinstance(args[0], torch.Tensor):
            name, label = wanted
            self.store.setdefault(name, []).append((args[0], True))
            self.versions.append((label, args[0], args[0]._version))
            args = (args[0].clone(), *args[1:])
        return func(*args, **kwargs)


def _tap(name: str, keep_activation: bool, by_hook: bool, store: dict[str, list], handles: list):
    def hook(module, args, output):
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None
        if by_hook and not keep_activation:
            # Gradient only, on a backward that runs through here anyway: a tensor hook on
            # this version of ``output`` receives the gradient at the module's output even if
            # an in-place op changes the tensor later, and nothing is copied.
            slot: list = [None]
            store.setdefault(name, []).append((slot, False))
            handles.append(output.register_hook(lambda grad: slot.__setitem__(0, grad)))
            return None
        store.setdefault(name, []).append((output, keep_activation))
        # The rest of the forward gets a copy: in-place ops downstream then leave ``output``
        # (and its place in the graph) as the module produced it, so the gradient w.r.t. it is
        # the gradient at the module's output and the tensor itself is the activation.
        return output.clone()

    return hook


def check_connected(logits: torch.Tensor, model_name: str) -> None:
    """The output must carry an autograd graph: every method differentiates it."""
    if not logits.requires_grad:
        raise SaliencyError(
            f"the output of model {model_name} has no autograd graph (it does not require "
            "grad): the model detaches its result, converts it through numpy, or runs under "
            "torch.no_grad()/inference_mode internally, so no gradient can reach the inputs. "
            "Remove the detach/no_grad from the model's forward (or wrap the model so that the "
            "returned scores stay connected to the inputs)"
        )


def forward_backward(
    model: nn.Module,
    inputs: torch.Tensor,
    target: object,
    rules: RuleSet,
    *,
    taps: Mapping[str, Tap] | None = None,
    method: str = "",
    input_grad: bool = True,
    objective: Objective = DEFAULT,
) -> Record:
    """Forward ``inputs`` with ``rules`` installed, backward from each sample's target score.

    ``taps`` maps a name to a :class:`Tap`. ``objective`` says which tensor of the model's
    output is scored and how (default: class logits); ``target`` is a selection its target kind
    resolves (for class logits: None = predicted class, an int, a LongTensor [N]). With
    ``input_grad=False`` the backward only runs down to the tapped outputs (all a CAM readout
    needs).
    """
    x = inputs.detach().clone().requires_grad_(True)
    store: dict[str, list] = {}
    with torch.enable_grad(), removable_hooks() as tensor_hooks:
        pools: list = []
        versions: list = []  # tapped inputs, which the forward may still change in place
        with removable_hooks() as handles:
            for name, tap in (taps or {}).items():
                if tap.point == "pool":
                    pools.append((name, tap.pool, tap.label))
                elif tap.point == "input":
                    hook = _input_tap(name, tap.label, store, versions)
                    handles.append(tap.module.register_forward_pre_hook(hook))
                else:
                    hook = _tap(name, tap.keep_activation, input_grad, store, tensor_hooks)
                    handles.append(tap.module.register_forward_hook(hook))
            pooling = _PoolTaps(pools, store, versions) if pools else contextlib.nullcontext()
            with rules.applied(model, method, x) as trace, pooling:
                output = call_model(model, x)
        for label, tensor, version in versions:
            if tensor._version != version:
                raise SaliencyError(
                    f"the tensor read as layer {label!r} was changed in place later "
                    "in the forward pass (e.g. h += f(h)), so it is no longer the map that was "
                    "read; name a module's output instead (its output is copied before any "
                    "in-place op can change it)"
                )
        logits = objective.scores(output, type(model).__name__, x.shape[0])
        check_connected(logits, type(model).__name__)
        if trace is not None:
            trace.account(logits)
        targets = objective.target.resolve(logits, target)
        tapped = [o for calls in store.values() for o, _ in calls if isinstance(o, torch.Tensor)]
        wrt = ([x] if input_grad else []) + tapped
        grads: Sequence[torch.Tensor | None] = []
        if wrt:
            score = objective.target.score(logits, targets).sum()
            try:
                grads = torch.autograd.grad(score, wrt, allow_unused=True)
            except torch.utils.checkpoint.CheckpointError as exc:
                raise SaliencyError(
                    f"the backward pass of method {method or 'gradient'!r} through model "
                    f"{type(model).__name__} failed: activation checkpointing "
                    "(torch.utils.checkpoint, DenseNet's memory_efficient=True) recomputes the "
                    "forward during the backward, outside the method's rules. Turn "
                    f"checkpointing off for the audit ({exc})"
                ) from exc
    grad = None
    if input_grad:
        if grads[0] is None:
            raise SaliencyError(
                f"the output of model {type(model).__name__} does not depend on its inputs in "
                "the autograd graph (the model detaches the input, converts it through numpy "
                "or ignores it), so its gradient would read as zero everywhere. Keep the "
                "forward differentiable from the inputs to the returned scores"
            )
        grad = grads[0]
        grads = grads[1:]
    found = iter(grads)
    recorded = {}
    for name, calls in store.items():
        recorded[name] = []
        for out, keep in calls:
            # No gradient: the output does not reach the target score. Kept activations get a
            # zero gradient beside them; a gradient-only tap says None.
            g = out[0] if isinstance(out, list) else next(found)
            if g is None and keep:
                g = torch.zeros_like(out)
            recorded[name].append((out.detach() if keep else None, g))
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
        try:
            parts.append(run(inputs[start:stop], None if targets is None else targets[start:stop]))
        except NonFiniteError as exc:
            raise exc.renumbered(
                [s + start for s in exc.samples]
            ) from None  # sample numbers of the caller's batch
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return type(parts[0])(torch.cat(list(p)) for p in zip(*parts))
