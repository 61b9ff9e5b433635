"""What a compiled block keeps for backward against an eager one: one Flux-dev double and one single block with
a training step's LoRA (rank 64, bf16, 512 px, batch 8, no checkpointing), eager and compiled
(model/layers.py compile_blocks).

    python bench/block_memory.py --device cuda [--fp8_compute]
    python bench/block_memory.py                 # CPU: a narrow model, fp32 (checks the script)

Per variant: the bytes autograd saved during the forward (saved-tensor hooks, each storage once), the memory the
forward left allocated (CUDA), the forward and backward time, and the LoRA gradients' largest relative difference
from eager. `--unchecked_blocks auto` (distill/memory_plan.py) plans with the eager count; this shows what the
compiled blocks keep instead.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import built_in  # noqa: E402  (bench/timing.py, beside this file)

from distill.lora import LoRAConfig, inject_lora, lora_layers  # noqa: E402
from model.flux import FLUX_CONFIGS, Flux  # noqa: E402
from model.fp8 import enable_fp8_compute_, quantize_linears_  # noqa: E402
from model.layers import image_ids, text_ids  # noqa: E402


def build(device: str, dtype: torch.dtype, fp8_compute: bool) -> tuple[Flux, dict]:
    if device == "cuda":
        cfg, side, n_txt, batch, rank = FLUX_CONFIGS["flux-dev"], 32, 256, 8, 64
    else:
        cfg, side, n_txt, batch, rank = FLUX_CONFIGS["tiny"], 4, 5, 2, 4
    cfg = dataclasses.replace(cfg, depth=1, depth_single_blocks=1)
    torch.manual_seed(0)
    with built_in(device, dtype):
        model = Flux(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    if fp8_compute:
        quantize_linears_(model)
        enable_fp8_compute_(model, device)
    inject_lora(model, LoRAConfig(rank=rank, alpha=rank, sets=("live",)), torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in layer.lora_up.values():
                p.normal_(0, 1e-3)
    g = torch.Generator().manual_seed(1)
    inputs = {"img": torch.randn(batch, side * side, cfg.in_channels, generator=g),
              "txt": torch.randn(batch, n_txt, cfg.context_in_dim, generator=g),
              "y": torch.randn(batch, cfg.vec_in_dim, generator=g), "timesteps": torch.full((batch,), 0.75),
              "guidance": torch.full((batch,), 3.5) if cfg.guidance_embed else None}
    inputs = {k: None if v is None else v.to(device, dtype) for k, v in inputs.items()}
    inputs |= {"img_ids": image_ids(2 * side, 2 * side, device), "txt_ids": text_ids(n_txt, device)}
    return model, inputs


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(model: Flux, inputs: dict, device: str) -> dict:
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    for _ in range(2):  # warm-up (compiles), then the measured step
        saved.clear()
        model.zero_grad(set_to_none=True)
        _sync(device)
        before = torch.cuda.memory_allocated() if device == "cuda" else 0
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**inputs)
        _sync(device)
        t1 = time.perf_counter()
        held = (torch.cuda.memory_allocated() if device == "cuda" else 0) - before - out.nbytes
        out.float().pow(2).mean().backward()
        _sync(device)
        t2 = time.perf_counter()
    grads = {n: layer.lora_down["live"].grad.float() for n, layer in lora_layers(model).items()
             if layer.lora_down["live"].grad is not None}
    return {"saved": sum(saved.values()), "held": held, "fwd": t1 - t0, "bwd": t2 - t1, "grads": grads,
            "layers": len(lora_layers(model))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--fp8_compute", action="store_true")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    eager, inputs = build(args.device, dtype, args.fp8_compute)
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()
    print(f"# one double + one single block, fp8 compute {args.fp8_compute}, {dtype}, torch {torch.__version__}")
    print(f"{'variant':<10}{'saved GB':>10}{'held GB':>10}{'fwd ms':>9}{'bwd ms':>9}{'LoRA grads':>12}"
          f"{'max rel diff':>14}")
    ref = None
    for name, model in (("eager", eager), ("compiled", compiled)):
        r = measure(model, inputs, args.device)
        ref = ref or r["grads"]
        diff = max(((r["grads"][k] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item()
                   for k, g in ref.items() if k in r["grads"]) if r["grads"] else float("nan")
        print(f"{name:<10}{r['saved'] / 1e9:>10.3f}{r['held'] / 1e9:>10.3f}{1e3 * r['fwd']:>9.1f}"
              f"{1e3 * r['bwd']:>9.1f}{len(r['grads']):>6} / {r['layers']:<4}{diff:>12.2e}", flush=True)


if __name__ == "__main__":
    main()
