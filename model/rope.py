"""N-axis rotary tables (Flux: axes (t, h, w) of widths 16 | 56 | 56 for head dim 128).

The table is built once per forward and shared by all 57 blocks; applying it lives in the kernels dispatcher.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def rope_table(pos: Tensor, dim: int, theta: float) -> Tensor:
    """pos (B, L) -> (B, L, dim/2, 2) holding (cos, sin) of pos * theta^(-2j/dim).

    Angles in float64 (exact integer positions, exact frequencies, like BFL and diffusers on CPU), stored in fp32.
    """
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / theta**scale  # (dim/2,)
    angles = pos.to(torch.float64)[..., None] * omega  # (B, L, dim/2)
    return torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1).float()


class EmbedND(nn.Module):
    """ids (B, L, n_axes) or (L, n_axes) -> pe (B or 1, 1, L, sum(axes_dim)/2, 2)."""

    def __init__(self, theta: float, axes_dim: tuple[int, ...]):
        super().__init__()
        self.theta = theta
        self.axes_dim = tuple(axes_dim)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.ndim == 2:
            ids = ids[None]  # (1, L, n_axes): one table broadcast over the batch
        if ids.shape[-1] != len(self.axes_dim):
            raise ValueError(f"ids have {ids.shape[-1]} axes, the model expects {len(self.axes_dim)}")
        pe = torch.cat([rope_table(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], dim=-2)
        return pe[:, None]  # (B, 1, L, D/2, 2): the head axis broadcasts
