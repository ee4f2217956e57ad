"""Null controls: two explainers that cannot be faithful, scored by every check beside the method.

- ``noise``: a fresh uniform [0, 1) map at every call, independent of the input, the model and
  the class (seeded by the audit's seed, so runs repeat). A check that fresh randomness passes
  rewards change, not faithfulness (Binder et al. 2023).
- ``edge``: the Sobel gradient magnitude of the input: per channel, scikit-image's
  ``filters.sobel`` (``sqrt((g_rows^2 + g_cols^2) / 2)``, each derivative the [1, 0, -1]
  kernel along its axis times the [1, 2, 1] / 4 smoothing across it, edges replicated), then
  the mean over channels, [N, H, W]; for [N, C, L] inputs the 1-D magnitude
  ``|x[i + 1] - x[i - 1]|`` (skimage's ``sobel`` of a 1-D signal). It depends on the input
  only, so it never changes with the class or the weights. [N, D] inputs have no edges: no
  edge control.

Neither runs the model: the controls cost no passes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

CONTROLS = ("noise", "edge")
_SALT = 0x5A11E7C  # so the noise does not replay the seed's other draws


def edge_map(x: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """The edge control of a batch [N, C, H, W] ([N, C, L]) as float32 maps [N, H, W] ([N, L]),
    ``chunk`` samples at a time (in float64, on the CPU)."""
    if x.shape[0] > chunk:
        return torch.cat([edge_map(part, chunk) for part in x.split(chunk)])
    x = x.detach().to("cpu", torch.float64)
    n, c = x.shape[:2]
    if x.dim() == 4:
        flat = F.pad(x.reshape(n * c, 1, *x.shape[2:]), (1, 1, 1, 1), mode="replicate")
        smooth = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype) / 4
        edge = torch.tensor([1.0, 0.0, -1.0], dtype=x.dtype)
        rows = F.conv2d(flat, (edge[:, None] * smooth[None, :])[None, None])
        cols = F.conv2d(flat, (smooth[:, None] * edge[None, :])[None, None])
        magnitude = torch.sqrt((rows**2 + cols**2) / 2)
    else:
        flat = F.pad(x.reshape(n * c, 1, x.shape[2]), (1, 1), mode="replicate")
        kernel = torch.tensor([1.0, 0.0, -1.0], dtype=x.dtype)
        magnitude = F.conv1d(flat, kernel[None, None]).abs()
    return magnitude.reshape(n, c, *x.shape[2:]).mean(dim=1).float()


class Controls:
    """The audit's null controls; ``controls(batch, which, shape)`` gives their maps for a batch
    (CPU float32), in the order of ``which`` (indices into :attr:`names`)."""

    def __init__(self, seed: int, x: torch.Tensor) -> None:
        self.names = CONTROLS if x.dim() >= 3 else CONTROLS[:1]
        self._generator = torch.Generator().manual_seed((seed ^ _SALT) % 2**63)
        self._x = x.detach()
        self._x_edges: torch.Tensor | None = None
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (batch, its edges)

    def _edges(self, batch: torch.Tensor) -> torch.Tensor:
        """Edges of ``batch``, computed once: for the audit's inputs, for copies of them
        stacked (two classes, every class), and for a batch explained at every step (the noisy
        copies of smooth MPRT)."""
        if self._last is not None and self._last[0] is batch:
            return self._last[1]
        x, n = self._x, self._x.shape[0]
        if (
            batch.shape[1:] == x.shape[1:]
            and batch.shape[0] % n == 0
            and all(torch.equal(part, x.to(part.device)) for part in batch.split(n))
        ):
            if self._x_edges is None:
                self._x_edges = edge_map(x)
            found = self._x_edges.repeat(batch.shape[0] // n, *[1] * (x.dim() - 2))
        else:
            found = edge_map(batch)
        self._last = (batch, found)
        return found

    def __call__(self, batch: torch.Tensor, which: Sequence[int], shape=None) -> list[torch.Tensor]:
        shape = tuple(shape) if shape is not None else (batch.shape[0], *batch.shape[2:])
        if batch.dim() == 2:
            shape = tuple(batch.shape)
        out = []
        for k in which:
            if self.names[k] == "noise":
                out.append(torch.rand(shape, generator=self._generator))
            else:
                out.append(self._edges(batch))
        return out
