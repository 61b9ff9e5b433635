"""Tiny diffusers Flux oracles, inputs and a comparison helper shared by the Flux tests."""

from __future__ import annotations

import torch

from conftest import randomize_
from model.flux import FLUX_CONFIGS, FluxConfig
from model.layers import image_ids, text_ids


def tiny_diffusers_flux(guidance: bool = True, sigma: float = 0.02, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),
    )
    return randomize_(model, sigma, seed).eval()


def tiny_config(guidance: bool = True) -> FluxConfig:
    cfg = FLUX_CONFIGS["tiny"]
    return cfg if guidance else FluxConfig(**{**cfg.to_dict(), "guidance_embed": False})


def tiny_inputs(guidance: bool = True, batch: int = 2, seed: int = 1) -> dict:
    """B=2, latent 4x8x12 -> 24 packed tokens of 16 channels, 5 text tokens (reference.md §9 row 1)."""
    g = torch.Generator().manual_seed(seed)
    t_len = 5
    return dict(
        img=torch.randn(batch, 24, 16, generator=g), img_ids=image_ids(8, 12), txt=torch.randn(batch, t_len, 32, generator=g),
        txt_ids=text_ids(t_len), timesteps=torch.tensor([0.8125, 0.25])[:batch], y=torch.randn(batch, 24, generator=g),
        guidance=torch.tensor([3.5, 4.0])[:batch] if guidance else None,
    )


@torch.no_grad()
def run_diffusers(model, inp: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    model = model.to(dtype)
    g = inp["guidance"]
    return model(
        hidden_states=inp["img"].to(dtype), encoder_hidden_states=inp["txt"].to(dtype),
        pooled_projections=inp["y"].to(dtype), timestep=inp["timesteps"].to(dtype), img_ids=inp["img_ids"],
        txt_ids=inp["txt_ids"], guidance=None if g is None else g.to(dtype),
    ).sample


@torch.no_grad()
def run_ours(model, inp: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    model = model.to(dtype)
    return model(
        inp["img"].to(dtype), inp["img_ids"], inp["txt"].to(dtype), inp["txt_ids"], inp["timesteps"],
        inp["y"].to(dtype), inp["guidance"],
    )


def assert_fp32_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * scale)


def assert_bf16_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err = (ours.float() - ref.float()).abs().max().item()
    assert err <= 3e-2 * ref.float().abs().max().item(), f"bf16 error {err} vs max|ref| {ref.abs().max().item()}"
