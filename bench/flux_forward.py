"""Our Flux forward against diffusers' FluxTransformer2DModel: same weights, same inputs, one process.

    python bench/flux_forward.py                       # CPU rows: tiny and wide, fp32
    python bench/flux_forward.py --device cuda         # adds full flux-dev shapes in bf16 (1024 px)
    python bench/flux_forward.py --device cuda --cases flux-dev-1024 --variants all

Variants (--variants, default: ours): ours (eager), ours+compile (compile_blocks: each block compiled once,
model/layers.py), ours+fp8 (the blocks' weights in e4m3, fp8 tensor-core GEMMs with per-token activation scales:
model/fp8_gemm.py; the CPU emulates them), ours+fp8+compile; trials on CUDA: +fastacc (Hopper's fast
accumulation in the forward fp8 GEMMs, fp8_gemm.FAST_ACCUM_FORWARD), +cudnn (torch's cuDNN attention first in
SDPA's priority, instead of its FlashAttention-2) and +unfused (each fp8 GEMM rounds its own input; ours+fp8 takes
the adaLN producers' rows from model/kernels/adanorm.py: the pair measures that kernel). diffusers (eager) is
always run, and diffusers+compile with `all` (its own `compile_repeated_blocks` where it has one, else
torch.compile).
Prints the median time of each, its ratio against diffusers eager, the max relative error against diffusers and,
for fp8, the relative error against our bf16 output (the price of fp8 compute). The first call of a compiled
variant is reported as its warm-up. diffusers is a benchmark oracle only; no runtime module imports it.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import built_in, median_time, trials  # noqa: E402  (bench/timing.py, beside this file)

from model.flux import Flux, FluxConfig  # noqa: E402
from model.fp8 import enable_fp8_compute_, quantize_linears_  # noqa: E402
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


VARIANTS = ("ours", "ours+compile", "ours+fp8", "ours+fp8+compile")
TRIALS = ("ours+cudnn", "ours+fp8+unfused", "ours+fp8+fastacc", "ours+fp8+fastacc+compile",
          "ours+fp8+fastacc+cudnn+compile")


def features(variant: str):
    """A variant's trial switches (bench/timing.py `trials`), for its calls and its compiled code's trace."""
    parts = variant.split("+")
    return trials(fast_accum="fastacc" in parts, cudnn="cudnn" in parts, unfused="unfused" in parts)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def run_case(name: str, device: str, iters: int, variants: tuple[str, ...], compile_diffusers: bool) -> list[dict]:
    cfg, (h, w), n_txt, batch, _, dtype = CASES[name]
    torch.manual_seed(0)
    with built_in(device, dtype):
        ref = diffusers_twin(cfg).eval()
        for p in ref.parameters():  # non-degenerate weights at a trained-network scale
            p.normal_(0, 0.02)
        ours = Flux(cfg).eval()
    rules = flux_rules(cfg.depth, cfg.depth_single_blocks, cfg.guidance_embed)
    ours.load_state_dict(dict(to_official(rules, ref.state_dict().__getitem__)))
    models = {"ours": ours}
    if any("fp8" in v for v in variants):
        models["fp8"] = copy.deepcopy(ours)
        quantize_linears_(models["fp8"])
        enable_fp8_compute_(models["fp8"], device)

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

    def runner(model):
        return lambda: model(img, iids, txt, tids, t, y, guid)

    out_ref = run_ref().float()
    out_bf16 = runner(ours)().float()
    warmup = 2 if name != "tiny" else 5
    # diffusers first (the reference of every ratio), then eager rows: compiling is in place, for good
    order = ["diffusers"] + [v for v in variants if "compile" not in v]
    order += [v for v in variants if "compile" in v] + ["diffusers+compile"] * compile_diffusers
    rows, base = [], None

    def measure(variant: str) -> dict | None:
        nonlocal ref
        model = ref if variant.startswith("diffusers") else models["fp8" if "fp8" in variant else "ours"]
        warm = 0.0
        if variant.endswith("compile"):
            _sync(device)
            t0 = time.perf_counter()
            try:
                if model is ref:
                    if hasattr(ref, "compile_repeated_blocks"):
                        ref.compile_repeated_blocks(fullgraph=True)
                    else:
                        ref = torch.compile(ref)
                else:  # blocks of one class share compiled code, and the attention backend is not among its
                    torch._dynamo.reset()  # guards: each variant traces its own, warm-up included
                    model.compile_blocks()
                (run_ref if variant.startswith("diffusers") else runner(model))()
            except Exception as e:  # noqa: BLE001  (a benchmark row, not a result: report and go on)
                print(f"{name} {variant}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
                return None
            _sync(device)
            warm = time.perf_counter() - t0
        fn = run_ref if variant.startswith("diffusers") else runner(model)
        out = fn().float()
        return dict(case=name, variant=variant, warmup_s=warm, dtype=str(dtype).removeprefix("torch."),
                    err=((out - out_ref).abs().max() / out_ref.abs().max()).item(),
                    err_bf16=((out - out_bf16).abs().max() / out_bf16.abs().max()).item(),
                    ms=1e3 * statistics.median(median_time(fn, device, warmup if i == 0 else 0, 1)
                                               for i in range(iters)))

    for variant in order:  # each measured as soon as it is ready and printed: a slow compile loses no row
        with features(variant):
            row = measure(variant)
        if row is None:
            continue
        if variant == "diffusers":  # first in the order: every ratio's reference
            base = row["ms"]
        row["ratio"] = row["ms"] / base
        print_row(row)
        rows.append(row)
    return rows


def print_row(r: dict) -> None:
    print(f"{r['case']:<15}{r['variant']:<32}{r['dtype']:<10}{r['ms']:>10.2f}{r['ratio']:>13.3f}"
          f"{r['warmup_s']:>11.1f}{r['err']:>11.2e}{r['err_bf16']:>11.2e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    ap.add_argument("--variants", nargs="*", default=["ours"], choices=[*VARIANTS, *TRIALS, "all"],
                    help="our rows (diffusers eager is always measured; `all` adds every row and diffusers+compile, "
                         "and the trials on CUDA)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    variants = VARIANTS + TRIALS * (args.device == "cuda") if "all" in args.variants else tuple(args.variants)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"# Flux forward, ours vs diffusers, {device_name}, torch {torch.__version__}")
    print(f"{'case':<15}{'variant':<32}{'dtype':<10}{'ms':>10}{'/ diffusers':>13}{'warm-up s':>11}"
          f"{'rel err':>11}{'vs bf16':>11}")
    for name in args.cases:
        if args.device not in CASES[name][4]:
            continue
        run_case(name, args.device, args.iters, variants, "all" in args.variants)  # prints each row when ready


if __name__ == "__main__":
    main()
