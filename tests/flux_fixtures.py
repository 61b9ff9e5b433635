"""Tiny diffusers Flux oracles (the transformer, and a whole saved pipeline), inputs and a comparison helper shared
by the Flux tests."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import randomize_, tiny_diffusers_vae

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


def save_as_bfl(ref, path: Path) -> Path:
    """The tiny diffusers Flux `ref`'s weights as a BFL checkpoint (what our loaders read), at `path`."""
    from safetensors.torch import save_file

    from weights.keymaps import to_official
    from weights.keymaps.flux import flux_rules

    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(dict(to_official(flux_rules(2, 2, True), sd.__getitem__)), path)
    return path


def tiny_config(guidance: bool = True) -> FluxConfig:
    cfg = FLUX_CONFIGS["tiny"]
    return cfg if guidance else FluxConfig(**{**cfg.to_dict(), "guidance_embed": False})


def tiny_inputs(guidance: bool = True, batch: int = 2, seed: int = 1) -> dict:
    """B=2, latent 4x8x12 -> 24 packed tokens of 16 channels, 5 text tokens (docs/models.md §9 row 1)."""
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


def save_tiny_flux_pipeline(root: Path, guidance: bool, clip, t5):
    """A tiny random diffusers FluxPipeline (CLIP-L config `clip`, T5 config `t5`, a 3-level VAE, the scheduler of
    dev or schnell), saved by `save_pretrained` into root / "flux": (that folder, the pipeline)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from text_fixtures import hf_clip, hf_clip_tokenizer, hf_t5, train_spm
    from transformers import T5Tokenizer

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=t5.d_model, pooled_projection_dim=clip.hidden_size,
        guidance_embeds=guidance, axes_dims_rope=(4, 6, 6),
    )
    vae = tiny_diffusers_vae(0.3611, 0.1159)
    randomize_(transformer, 0.1, seed=3)
    scheduler = (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
                 if guidance else FlowMatchEulerDiscreteScheduler(shift=1.0))
    train_spm(root / "spm")
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=hf_clip(clip, 0.1, seed=1, bos=49406),
        tokenizer=hf_clip_tokenizer(), text_encoder_2=hf_t5(t5, 0.1, seed=2),
        tokenizer_2=T5Tokenizer.from_pretrained(str(root / "spm")), transformer=transformer,
    )
    pipe.save_pretrained(root / "flux")
    return root / "flux", pipe
