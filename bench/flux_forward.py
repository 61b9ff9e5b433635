"""Our Flux forward against diffusers' FluxTransformer2DModel: same weights, same inputs, one process.

    python bench/flux_forward.py                       # CPU rows: tiny and wide, fp32
    python bench/flux_forward.py --device cuda         # adds full flux-dev shapes in bf16 (1024 px)

Prints the median time of each, the ratio ours / diffusers (target <= 1.0) and the max relative error.
diffusers is a benchmark oracle only; no runtime module imports it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import built_in, median_time  # noqa: E402  (bench/timing.py, beside this file)

from model.flux import Flux, FluxConfig  # noqa: E402
from model.layers import image_ids, text_ids  # noqa: E402
from weights.keymaps import to_official  # noqa: E402
from weights.keymaps.flux import flux_rules  # noqa: E402

# name -> (config, image tokens (h, w in packed tokens), text tokens, batch, devices, dtype)
CASES = {
    "tiny": (FluxConfig(in_channels=16, out_channels=16, vec_in_dim=24, context_in_dim=32, hidden_size=32,
                        num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6)), (4, 6), 5, 2,
             ("cpu", "cuda"), torch.float32),
    "wide": (FluxConfig(depth=1, depth_single_blocks=2), (32, 32), 256, 1, ("cpu", "cuda"), torch.float32),
    "flux-dev-1024": (FluxConfig(), (64, 64), 512, 1, ("cuda",), torch.bfloat16),
}


def diffusers_twin(cfg: FluxConfig):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        num_single_layers=cfg.depth_single_blocks, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_in_dim,
        pooled_projection_dim=cfg.vec_in_dim, guidance_embeds=cfg.guidance_embed, axes_dims_rope=cfg.axes_dim,
    )


@torch.inference_mode()
def run_case(name: str, device: str, iters: int) -> dict:
    cfg, (h, w), n_txt, batch, _, dtype = CASES[name]
    torch.manual_seed(0)
    with built_in(device, dtype):
        ref = diffusers_twin(cfg).eval()
        for p in ref.parameters():  # non-degenerate weights at a trained-network scale
            p.normal_(0, 0.02)
        ours = Flux(cfg).eval()
    rules = flux_rules(cfg.depth, cfg.depth_single_blocks, cfg.guidance_embed)
    ours.load_state_dict(dict(to_official(rules, ref.state_dict().__getitem__)))

    g = torch.Generator(device).manual_seed(1)
    img = torch.randn(batch, h * w, cfg.in_channels, generator=g, device=device, dtype=dtype)
    txt = torch.randn(batch, n_txt, cfg.context_in_dim, generator=g, device=device, dtype=dtype)
    y = torch.randn(batch, cfg.vec_in_dim, generator=g, device=device, dtype=dtype)
    t = torch.full((batch,), 0.75, device=device, dtype=dtype)
    guid = torch.full((batch,), 3.5, device=device, dtype=dtype) if cfg.guidance_embed else None
    iids, tids = image_ids(2 * h, 2 * w, device), text_ids(n_txt, device)

    def run_ref():
        return ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t, img_ids=iids,
                   txt_ids=tids, guidance=guid).sample

    def run_ours():
        return ours(img, iids, txt, tids, t, y, guid)

    out_ref, out_ours = run_ref().float(), run_ours().float()
    err = ((out_ours - out_ref).abs().max() / out_ref.abs().max()).item()
    warmup = 2 if name != "tiny" else 5
    # alternate the two so drift in machine load hits both equally
    t_ref, t_ours = [], []
    for _ in range(iters):
        t_ref.append(median_time(run_ref, device, 0 if t_ref else warmup, 1))
        t_ours.append(median_time(run_ours, device, 0 if t_ours else warmup, 1))
    ms_ref, ms_ours = 1e3 * statistics.median(t_ref), 1e3 * statistics.median(t_ours)
    return dict(case=name, device=device, dtype=str(dtype).removeprefix("torch."), ours_ms=ms_ours,
                diffusers_ms=ms_ref, ratio=ms_ours / ms_ref, max_rel_err=err)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"# Flux forward, ours vs diffusers, {device_name}, torch {torch.__version__}")
    print(f"{'case':<15}{'dtype':<10}{'ours ms':>10}{'diffusers ms':>14}{'ratio':>8}{'max rel err':>13}")
    for name in args.cases:
        if args.device not in CASES[name][4]:
            continue
        r = run_case(name, args.device, args.iters)
        print(f"{r['case']:<15}{r['dtype']:<10}{r['ours_ms']:>10.2f}{r['diffusers_ms']:>14.2f}{r['ratio']:>8.3f}"
              f"{r['max_rel_err']:>13.2e}")


if __name__ == "__main__":
    main()
