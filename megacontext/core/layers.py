"""Building blocks shared by the small trainable networks (GistNet, LensNet).

Parameter names are part of the checkpoint format (``up``, ``down``), so keep them stable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SwiGLU(nn.Module):
    """Gated MLP ``down(silu(a) * b)`` with ``[a, b] = up(x)``: [..., w] -> [..., w]."""

    def __init__(self, width: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.up = nn.Linear(width, 2 * hidden)
        self.down = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.up(x).chunk(2, dim=-1)  # [..., hidden] each
        return self.drop(self.down(F.silu(a) * b))


def mean_pool_head(width: int, d_model: int) -> tuple[nn.Linear, nn.Linear]:
    """A GistNet trunk's output layers ``out`` [width -> d] and ``skip`` [d -> d] for ``skip(mean(x)) + out(g)``:
    ``out`` starts at zero and ``skip`` at the identity, so an untrained trunk is exactly mean pooling."""
    out, skip = nn.Linear(width, d_model), nn.Linear(d_model, d_model, bias=False)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    with torch.no_grad():
        skip.weight.copy_(torch.eye(d_model))
    return out, skip
