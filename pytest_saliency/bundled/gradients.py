"""Plain-autograd methods: gradient, input x gradient, integrated gradients, smoothgrad."""

from __future__ import annotations

import torch

from ..errors import SaliencyError
from .registry import PLAIN, Method, check_number, input_map, register

register(Method(
    name="gradient",
    family="plain",
    positive=False,
    defaults={},
    reference="Simonyan et al. 2014",
    readout=lambda rec, ctx, opts: input_map(rec.input_grad),
))  # fmt: skip

register(Method(
    name="input_x_gradient",
    family="plain",
    positive=False,
    defaults={},
    reference="Shrikumar et al. 2016",
    readout=lambda rec, ctx, opts: input_map(rec.inputs * rec.input_grad),
))  # fmt: skip


def _integrated_gradients(ctx, inputs, target, opts):
    steps = opts["steps"]
    baseline = torch.as_tensor(opts["baseline"], dtype=inputs.dtype, device=inputs.device)
    try:
        baseline = baseline.expand_as(inputs)
    except RuntimeError as exc:
        raise SaliencyError(
            f"option 'baseline' has shape {tuple(baseline.shape)}, which does not broadcast to "
            f"the inputs' shape {tuple(inputs.shape)}; pass a number or a tensor that does"
        ) from exc
    targets = ctx.predict(inputs, target)
    alphas = torch.linspace(0, 1, steps, dtype=inputs.dtype, device=inputs.device)
    weights = torch.ones(steps, dtype=inputs.dtype, device=inputs.device)
    weights[0] = weights[-1] = 0.5  # trapezoid rule on [0, 1]
    weights = weights / (steps - 1)
    total = torch.zeros_like(inputs)
    # One pass per path point over the whole batch keeps batch_size's meaning (samples per pass).
    for alpha, weight in zip(alphas, weights):
        point = baseline + alpha * (inputs - baseline)
        total += weight * ctx.run(PLAIN, point, targets, lambda rec: rec.input_grad)
    return input_map((inputs - baseline) * total)


def _validate_ig(opts):
    check_number(opts, "steps", 2, 1_000_000, integer=True)
    if not isinstance(opts["baseline"], (int, float, torch.Tensor)) or isinstance(
        opts["baseline"], bool
    ):
        raise SaliencyError(
            f"option 'baseline' must be a number or a tensor, got {opts['baseline']!r}"
        )
    baseline = torch.as_tensor(opts["baseline"])
    if baseline.dtype == torch.bool or baseline.is_complex() or baseline.device.type == "meta":
        raise SaliencyError(
            f"option 'baseline' must hold real numbers, got a {baseline.dtype} tensor on "
            f"{baseline.device}"
        )
    if not bool(torch.isfinite(baseline).all()):
        raise SaliencyError(
            "option 'baseline' holds NaN or inf; the path from it to the inputs must be finite"
        )


register(Method(
    name="integrated_gradients",
    family="plain",
    positive=False,
    defaults={"steps": 32, "baseline": 0.0},
    reference="Sundararajan et al. 2017",
    compute=_integrated_gradients,
    validate=_validate_ig,
))  # fmt: skip


def _smoothgrad(ctx, inputs, target, opts):
    samples = opts["samples"]
    targets = ctx.predict(inputs, target)
    flat = inputs.reshape(inputs.shape[0], -1)
    spread = (flat.max(dim=1).values - flat.min(dim=1).values) * opts["noise"]
    spread = spread.reshape((-1,) + (1,) * (inputs.dim() - 1))
    # Noise comes from a local CPU generator for the whole batch at once, so the maps do not
    # depend on batch_size, on the device, or on the global RNG (which is left untouched).
    generator = torch.Generator().manual_seed(int(opts["seed"]))
    total = torch.zeros_like(inputs)
    for _ in range(samples):
        noise = torch.randn(inputs.shape, generator=generator, dtype=torch.float32)
        noisy = inputs + spread * noise.to(device=inputs.device, dtype=inputs.dtype)
        total += ctx.run(PLAIN, noisy, targets, lambda rec: rec.input_grad)
    return input_map(total / samples)


def _validate_smoothgrad(opts):
    check_number(opts, "samples", 1, 1_000_000, integer=True)
    check_number(opts, "noise", 0.0, 10.0)
    check_number(opts, "seed", 0, 2**63 - 1, integer=True)


register(Method(
    name="smoothgrad",
    family="plain",
    positive=False,
    defaults={"samples": 16, "noise": 0.15, "seed": 0},
    reference="Smilkov et al. 2017",
    compute=_smoothgrad,
    validate=_validate_smoothgrad,
))  # fmt: skip
