"""The stabilizer every LRP rule divides by (zennit's): ``z + epsilon * sign(z)``."""

from __future__ import annotations

import torch

NORM_STABILIZER = 1e-6  # zennit's default for Norm, ZPlus and AlphaBeta


def stabilize(z: torch.Tensor, epsilon: float = NORM_STABILIZER) -> torch.Tensor:
    """``z + epsilon * sign(z)`` with ``sign(0) = +1`` (zennit's stabilizer)."""
    # Bitwise equal to ``where(z >= 0, z + eps, z - eps)`` in fewer full-size passes: the
    # offset is 1 * 2eps - eps = eps or 0 * 2eps - eps = -eps, both exact. The comparison
    # writes 1.0 / 0.0 straight into a float tensor: no bool tensor, no conversion pass.
    offset = torch.ge(z, 0, out=torch.empty_like(z))
    return offset.mul_(2 * epsilon).sub_(epsilon).add_(z)
