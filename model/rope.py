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

    def joint(self, txt_ids: Tensor, img_ids: Tensor) -> Tensor:
        """The table of the joint [txt, img] sequence; ids (L, n) shared by the batch or (B, L, n)."""
        if img_ids.ndim == 2 and txt_ids.ndim == 3:
            img_ids = img_ids.expand(txt_ids.shape[0], -1, -1)
        if txt_ids.ndim == 2 and img_ids.ndim == 3:
            txt_ids = txt_ids.expand(img_ids.shape[0], -1, -1)
        return self(torch.cat((txt_ids, img_ids), dim=-2))  # (B|1, 1, T + L, D/2, 2)


def check_axes(hidden_size: int, num_heads: int, axes_dim: tuple[int, ...]) -> None:
    """A config's attention shape: heads divide the width, and the RoPE axes (pairs) fill the head dim."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if sum(axes_dim) != hidden_size // num_heads:
        raise ValueError(f"sum(axes_dim) = {sum(axes_dim)} must equal the head dim {hidden_size // num_heads}")
    if any(d % 2 for d in axes_dim):
        raise ValueError(f"every axes_dim entry must be even (RoPE rotates pairs), got {axes_dim}")
