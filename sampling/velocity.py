"""One velocity interface per model family: `velocity(x, sigma, cond, guidance) -> v`.

x is the unpacked latent (B, 16, h, w) in the model's normalised latent space, sigma a (B,) tensor in [0, 1], v has
x's shape. The family's wrapper owns packing, the timestep scale and the timestep rounding diffusers applies, so
samplers, the trainer and dataset generation never touch those details.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from model.flux import Flux
from model.layers import image_ids, pack, text_ids, unpack


class FluxVelocity:
    """Flux: cond is a dict with `txt` (B, T, context_in_dim) and `y` (B, vec_in_dim); guidance (B,) or None."""

    family = "flux"

    def __init__(self, model: Flux):
        self.model = model

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def __call__(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor], guidance: Tensor | None = None) -> Tensor:
        b, _, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Flux latents need even height and width (2x2 packing), got {h}x{w}")
        dtype = self.dtype
        txt, y = cond["txt"], cond["y"]
        # FluxPipeline hands the model (sigma * 1000).to(dtype) / 1000 and the model multiplies by 1000 again in its
        # dtype: in bf16 that is two roundings of the timestep, reproduced here so a seed gives diffusers' image.
        t = (sigma.float() * 1000).to(dtype) / 1000
        if not self.model.config.guidance_embed:
            guidance = None  # schnell and the demo model have no guidance input
        elif guidance is None:
            raise ValueError("this Flux model is guidance-distilled (dev): pass a guidance value such as 3.5")
        v = self.model(
            pack(x).to(dtype), image_ids(h, w, x.device), txt.to(dtype), text_ids(txt.shape[1], x.device), t,
            y.to(dtype), None if guidance is None else guidance.expand(b).to(x.device),
        )  # (B, h/2 * w/2, 64)
        return unpack(v, h, w)


def velocity_for(model: nn.Module) -> Any:
    """The velocity wrapper of a loaded model."""
    if isinstance(model, Flux):
        return FluxVelocity(model)
    raise TypeError(f"no velocity interface for {type(model).__name__}")
