"""Our MMDiT forward against diffusers' SD3Transformer2DModel: same weights, same inputs, one process.

    python bench/mmdit_forward.py                 # CPU rows: tiny and a two-block sd3.5-medium slice, fp32
    python bench/mmdit_forward.py --device cuda   # adds full sd3.5-large and sd3.5-medium, bf16, 1024 px

Prints the median time of each, the ratio ours / diffusers (target <= 1.0) and the max relative error.
diffusers is a benchmark oracle only; no runtime module imports it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import built_in, twin_main, twin_row  # noqa: E402  (bench/timing.py, beside this file)

from model.mmdit import MMDIT_CONFIGS, MMDiT, MMDiTConfig  # noqa: E402
from weights.families.sd3 import config_to_diffusers  # noqa: E402
from weights.keymaps import to_official  # noqa: E402
from weights.keymaps.mmdit import mmdit_rules  # noqa: E402

# name -> (config, latent (H, W), text tokens, batch, devices, dtype). 77 CLIP + 256 T5 tokens is the
# pipeline's default context; 1024 px is a 128 x 128 latent, 4096 image tokens.
CASES = {
    "tiny": (MMDIT_CONFIGS["tiny"], (8, 12), 5, 2, ("cpu", "cuda"), torch.float32),
    "medium-2blocks": (MMDiTConfig(**{**MMDIT_CONFIGS["sd3.5-medium"].to_dict(), "depth": 2,
                                      "dual_attention_layers": (0,)}), (32, 32), 154, 1, ("cpu", "cuda"),
                       torch.float32),
    "sd3.5-medium-1024": (MMDIT_CONFIGS["sd3.5-medium"], (128, 128), 333, 1, ("cuda",), torch.bfloat16),
    "sd3.5-large-1024": (MMDIT_CONFIGS["sd3.5-large"], (128, 128), 333, 1, ("cuda",), torch.bfloat16),
}


def diffusers_twin(cfg: MMDiTConfig):
    from diffusers import SD3Transformer2DModel

    kwargs = config_to_diffusers(cfg)
    kwargs.pop("_class_name")
    return SD3Transformer2DModel(**kwargs)


@torch.inference_mode()
def run_case(name: str, device: str, iters: int) -> dict:
    cfg, (lat_h, lat_w), n_txt, batch, _, dtype = CASES[name]
    torch.manual_seed(0)
    with built_in(device, dtype):
        ref = diffusers_twin(cfg).eval()
        for pname, p in ref.named_parameters():  # non-degenerate weights at a trained-network scale
            p.normal_(1.0 if p.ndim == 1 and "norm" in pname else 0.0, 0.02)
        ours = MMDiT(cfg).eval()
    rules = mmdit_rules(cfg.depth, cfg.dual_attention_layers, cfg.qk_norm is not None)
    ours.load_state_dict(dict(to_official(rules, ref.state_dict().__getitem__)))

    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, lat_h, lat_w, generator=g, device=device, dtype=dtype)
    ctx = torch.randn(batch, n_txt, cfg.context_in_dim, generator=g, device=device, dtype=dtype)
    y = torch.randn(batch, cfg.adm_in_channels, generator=g, device=device, dtype=dtype)
    t = torch.full((batch,), 750.0, device=device)  # fp32 on the 0-1000 scale, as the pipeline passes it

    def run_ref():
        return ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample

    def run_ours():
        return ours(x, t, y, ctx)

    return twin_row(name, device, dtype, run_ref, run_ours, iters)


if __name__ == "__main__":
    twin_main(__doc__, "MMDiT forward", CASES, run_case)
