"""One velocity interface per model family: `velocity(x, sigma, cond, guidance) -> v`.

x is the unpacked latent (B, 16, h, w) in the model's normalised latent space, sigma a (B,) tensor in [0, 1], v has
x's shape. The family's wrapper owns packing, the timestep scale and the timestep rounding diffusers applies, so
samplers, the trainer and dataset generation never touch those details.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from model.flux import Flux
from model.flux2 import flux2_image_ids, flux2_text_ids
from model.fp8 import E4M3
from model.layers import image_ids, pack, text_ids, unpack
from model.mmdit import MMDiT
from weights.families import family_of


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations enter the model in: its first parameter's, skipping e4m3 weight storage
    (model/fp8.py), which is dequantized per layer and never an activation dtype."""
    return next(p.dtype for p in model.parameters() if p.dtype != E4M3)


class FluxVelocity:
    """Flux: cond is a dict with `txt` (B, T, context_in_dim) and `y` (B, vec_in_dim); guidance (B,) or None."""

    def __init__(self, model: Flux):
        self.model = model

    @property
    def dtype(self) -> torch.dtype:
        return model_dtype(self.model)

    def timestep_and_guidance(self, sigma: Tensor, guidance: Tensor | None, batch: int,
                              device: torch.device) -> tuple[Tensor, Tensor | None]:
        """What the model takes for sigma (B,) and guidance: FluxPipeline (and Flux2KleinPipeline) hand it
        (sigma * 1000).to(dtype) / 1000 and the model multiplies by 1000 again in its dtype: in bf16 that is two
        roundings of the timestep, reproduced here so a seed gives diffusers' image. Guidance only for a model
        with a guidance input (FLUX.1-dev; not schnell, the demo or klein)."""
        t = (sigma.float() * 1000).to(self.dtype) / 1000
        if not self.model.config.guidance_embed:
            return t, None
        if guidance is None:
            raise ValueError(f"this {self.model.config.FAMILY} model is guidance-distilled (dev): pass a guidance "
                             "value such as 3.5")
        return t, guidance.expand(batch).to(device)

    def __call__(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor], guidance: Tensor | None = None) -> Tensor:
        b, _, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Flux latents need even height and width (2x2 packing), got {h}x{w}")
        dtype = self.dtype
        txt, y = cond["txt"], cond["y"]
        t, guidance = self.timestep_and_guidance(sigma, guidance, b, x.device)
        v = self.model(pack(x).to(dtype), image_ids(h, w, x.device), txt.to(dtype), text_ids(txt.shape[1], x.device),
                       t, y.to(dtype), guidance)  # (B, h/2 * w/2, 64)
        return unpack(v, h, w)


class Flux2Velocity(FluxVelocity):
    """FLUX.2: x is the normalised, 2x2-patchified latent (B, 128, h, w) (model/vae.py `normalize_latents`): one
    token per position, raster order, ids (0, row, col, 0); cond is a dict with `txt` (B, T, 3 * Qwen3 width)."""

    def __call__(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor], guidance: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        dtype, txt = self.dtype, cond["txt"]
        t, guidance = self.timestep_and_guidance(sigma, guidance, b, x.device)
        v = self.model(x.flatten(2).transpose(1, 2).to(dtype), flux2_image_ids(h, w, x.device), txt.to(dtype),
                       flux2_text_ids(txt.shape[1], x.device), t, guidance)  # (B, h * w, c)
        return v.transpose(1, 2).reshape(b, c, h, w)


class MMDiTVelocity:
    """SD3 / SD3.5: cond is a dict with `context` (B, T, 4096) and `pooled` (B, 2048). There is no guidance input:
    classifier-free guidance is a sampler wrapper (`samplers.sd3_cfg`, `sampling.sd3.sd3_guidance`).

    `skip_layers`: blocks left out of every call (the skip-layer-guidance pass); `skipping(layers)` makes one.
    """

    def __init__(self, model: MMDiT, skip_layers: Sequence[int] | None = None):
        self.model = model
        self.skip_layers = list(skip_layers) if skip_layers else None

    @property
    def dtype(self) -> torch.dtype:
        return model_dtype(self.model)

    def skipping(self, layers: Sequence[int]) -> MMDiTVelocity:
        return MMDiTVelocity(self.model, layers)

    def __call__(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor], guidance: Tensor | None = None) -> Tensor:
        if guidance is not None:
            raise ValueError("SD3 has no guidance embedding; use classifier-free guidance (samplers.sd3_cfg)")
        dtype = self.dtype
        # StableDiffusion3Pipeline passes scheduler.timesteps = float32 sigma * 1000, unrounded in every dtype
        # (the model computes its sinusoid in fp32), so the fp32 product here is exactly its timestep.
        t = sigma.float() * 1000
        return self.model(x.to(dtype), t, cond["pooled"].to(dtype), cond["context"].to(dtype),
                          skip_layers=self.skip_layers)  # (B, C, h, w)


def velocity_for(model: nn.Module) -> Any:
    """The velocity wrapper of a loaded model: its family's (weights/families, part "velocity")."""
    return family_of(model).part("velocity")(model)
