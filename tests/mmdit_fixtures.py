"""Tiny diffusers SD3 / SD3.5 oracles and inputs shared by the MMDiT tests (docs/models.md §9 rows 6-9)."""

from __future__ import annotations

import torch
from conftest import randomize_

from model.mmdit import MMDIT_CONFIGS, MMDiT, MMDiTConfig
from weights.keymaps import to_official
from weights.keymaps.mmdit import mmdit_rules

# Row 6: SD3.0 style (no QK-norm, no dual blocks) with 4 latent channels, so nothing silently assumes 16.
SD3_TINY = MMDiTConfig(in_channels=4, out_channels=4, hidden_size=32, num_heads=2, depth=3,
                       adm_in_channels=24, context_in_dim=32, pos_embed_max_size=16, qk_norm=None)
# Row 7: SD3.5 style (RMS QK-norm, dual blocks 0 and 1, pre-only last block).
SD35_TINY = MMDIT_CONFIGS["tiny"]
VARIANTS = {"sd3": SD3_TINY, "sd3.5": SD35_TINY}

# The same two models spelled in diffusers' own config terms, written out rather than derived from ours, so a
# mistake in our config conversion cannot hide in both sides of a comparison.
_COMMON = dict(sample_size=16, patch_size=2, num_layers=3, attention_head_dim=16, num_attention_heads=2,
               joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=24)
DIFFUSERS_KWARGS = {
    "sd3": dict(_COMMON, in_channels=4, out_channels=4, pos_embed_max_size=16),
    "sd3.5": dict(_COMMON, in_channels=16, out_channels=16, pos_embed_max_size=8, qk_norm="rms_norm",
                  dual_attention_layers=(0, 1)),
}


def tiny_diffusers_mmdit(variant: str = "sd3.5", sigma: float = 0.02, seed: int = 0):
    """Every parameter and the pos_embed table random (docs/models.md §1)."""
    from diffusers import SD3Transformer2DModel

    return randomize_(SD3Transformer2DModel(**DIFFUSERS_KWARGS[variant]), sigma, seed).eval()


def ours_from(ref, cfg: MMDiTConfig, rules=None) -> MMDiT:
    """Our model holding the diffusers model's weights, mapped through our table (or the `rules` given)."""
    rules = rules or mmdit_rules(cfg.depth, cfg.dual_attention_layers, cfg.qk_norm is not None)
    model = MMDiT(cfg)
    model.load_state_dict(dict(to_official(rules, ref.state_dict().__getitem__)))
    return model.eval()


def tiny_inputs(cfg: MMDiTConfig, batch: int = 2, seed: int = 1, latent: tuple[int, int] = (8, 12)) -> dict:
    """B=2, latent 8x12 -> a 4x6 patch grid (a non-square, off-centre crop of the table), 5 text tokens.
    Timesteps are fp32 on the 0-1000 scale, as StableDiffusion3Pipeline passes them in every dtype."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(batch, cfg.in_channels, *latent, generator=g),
        timesteps=torch.tensor([812.5, 250.0])[:batch],
        y=torch.randn(batch, cfg.adm_in_channels, generator=g),
        context=torch.randn(batch, 5, cfg.context_in_dim, generator=g),
    )


@torch.no_grad()
def run_diffusers(model, inp: dict, dtype: torch.dtype = torch.float32, skip_layers=None) -> torch.Tensor:
    model = model.to(dtype)
    return model(
        hidden_states=inp["x"].to(dtype), encoder_hidden_states=inp["context"].to(dtype),
        pooled_projections=inp["y"].to(dtype), timestep=inp["timesteps"], skip_layers=skip_layers,
    ).sample


@torch.no_grad()
def run_ours(model, inp: dict, dtype: torch.dtype = torch.float32, skip_layers=None) -> torch.Tensor:
    model = model.to(dtype)
    return model(inp["x"].to(dtype), inp["timesteps"], inp["y"].to(dtype), inp["context"].to(dtype),
                 skip_layers=skip_layers)
