"""Our FLUX.2 forward against diffusers' Flux2Transformer2DModel: same weights, same inputs, one process.

    python bench/flux2_forward.py                 # CPU rows: tiny and a two-block klein-4B slice, fp32
    python bench/flux2_forward.py --device cuda   # adds full klein 4B and 9B, bf16, 1024 px

Prints the median time of each, the ratio ours / diffusers (target <= 1.0) and the max relative error.
diffusers is a benchmark oracle only; no runtime module imports it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import built_in, twin_main, twin_row  # noqa: E402  (bench/timing.py, beside this file)

from model.flux2 import FLUX2_CONFIGS, Flux2, Flux2Config, flux2_image_ids, flux2_text_ids  # noqa: E402
from weights.families.flux2 import FLUX2, config_to_diffusers  # noqa: E402
from weights.keymaps import to_official  # noqa: E402

# name -> (config, latent tokens (H, W), text tokens, batch, devices, dtype). klein's text is always 512 tokens;
# 1024 px is a 64 x 64 token latent (the VAE's 8x, then the pipeline's 2x2 patchify).
KLEIN_4B = FLUX2_CONFIGS["klein-4b"]
CASES = {
    "tiny": (FLUX2_CONFIGS["tiny"], (6, 8), 7, 2, ("cpu", "cuda"), torch.float32),
    "klein4b-2blocks": (Flux2Config(**{**KLEIN_4B.to_dict(), "depth": 1, "depth_single_blocks": 1}), (16, 16), 128,
                        1, ("cpu", "cuda"), torch.float32),
    "klein-4b-1024": (KLEIN_4B, (64, 64), 512, 1, ("cuda",), torch.bfloat16),
    "klein-9b-1024": (FLUX2_CONFIGS["klein-9b"], (64, 64), 512, 1, ("cuda",), torch.bfloat16),
}


@torch.inference_mode()
def run_case(name: str, device: str, iters: int) -> dict:
    from diffusers import Flux2Transformer2DModel

    cfg, (h, w), n_txt, batch, _, dtype = CASES[name]
    torch.manual_seed(0)
    with built_in(device, dtype):
        ref = Flux2Transformer2DModel(**{k: v for k, v in config_to_diffusers(cfg).items() if k[0] != "_"}).eval()
        for pname, p in ref.named_parameters():  # non-degenerate weights at a trained-network scale
            p.normal_(1.0 if p.ndim == 1 and "norm" in pname else 0.0, 0.02)
        ours = Flux2(cfg).eval()
    ours.load_state_dict(dict(to_official(FLUX2.rules(cfg), ref.state_dict().__getitem__)))

    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(batch, h * w, cfg.in_channels, generator=g, device=device, dtype=dtype)
    ctx = torch.randn(batch, n_txt, cfg.context_in_dim, generator=g, device=device, dtype=dtype)
    img_ids, txt_ids = flux2_image_ids(h, w, device), flux2_text_ids(n_txt, device)
    t = torch.full((batch,), 0.75, device=device)
    guidance = torch.full((batch,), 4.0, device=device) if cfg.guidance_embed else None

    def run_ref():
        return ref(hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_ids=img_ids, txt_ids=txt_ids,
                   guidance=guidance, return_dict=False)[0]

    def run_ours():
        return ours(x, img_ids, ctx, txt_ids, t, guidance)

    return twin_row(name, device, dtype, run_ref, run_ours, iters)


if __name__ == "__main__":
    twin_main(__doc__, "FLUX.2 forward", CASES, run_case)
