"""Loading a Flux transformer with an SCFM LoRA for fp8 sampling, two ways, each in a fresh process:

- `after`: read in bf16 on the CPU, merge the LoRA there, then quantize onto the device (what `generate --fp8
  --lora` did before the loaders took `loras=`);
- `while`: `load_flux(..., fp8=True, loras=[...])`, which merges each weight in fp32 as it is read, on the device,
  then quantizes it: no bf16 copy of the model exists on either side.

    python bench/load_loras.py                                # CPU: a 0.6 B Flux (1.3 GB in bf16), rank-64 LoRA
    python bench/load_loras.py --device cuda --preset flux-dev --workdir /big/disk   # 24 GB file, written once

Columns: seconds, peak anonymous CPU memory (RssAnon sampled every 5 ms: the checkpoint's memory-mapped file pages
are not counted, the OS can drop them; merged pages of a private mapping are) and, on CUDA, peak GPU memory.
Random weights and LoRA, written to `--workdir` (a temporary folder by default). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import built_in  # noqa: E402  (bench/timing.py, beside this file)

from model.flux import FLUX_CONFIGS, Flux  # noqa: E402

PRESETS = {
    "medium": dataclasses.replace(FLUX_CONFIGS["flux-dev"], hidden_size=1536, num_heads=12, depth=4,
                                  depth_single_blocks=8, axes_dim=(16, 56, 56)),
    "flux-dev": FLUX_CONFIGS["flux-dev"],
}


def anonymous_gib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 2**20


def make_files(preset: str, rank: int, folder: Path) -> tuple[Path, Path]:
    from distill.lora import LoRAConfig, inject_lora, load_set, set_state_dict
    from weights import save_transformer
    from weights.lora import LoRA
    from weights.lora_write import write_lora

    model_path, lora_path = folder / f"{preset}.safetensors", folder / f"{preset}-r{rank}.safetensors"
    if model_path.exists() and lora_path.exists():
        return model_path, lora_path
    with built_in("cpu", torch.bfloat16):
        model = Flux(PRESETS[preset]).requires_grad_(False)
    save_transformer(model, model_path, overwrite=True)
    inject_lora(model, LoRAConfig(rank=rank, alpha=rank))
    g = torch.Generator().manual_seed(0)
    live = set_state_dict(model, "live")
    load_set(model, "live", {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in live.items()})
    write_lora(LoRA.from_set_state(set_state_dict(model, "live"), rank), lora_path, "ours")
    return model_path, lora_path


def run_variant(variant: str, model_path: str, lora_path: str, device: str) -> dict:
    from model.fp8 import quantize_linears_
    from weights import load_flux
    from weights.lora_merge import apply_loras

    peak = [anonymous_gib()]

    def poll():
        while True:
            peak[0] = max(peak[0], anonymous_gib())
            time.sleep(0.005)

    threading.Thread(target=poll, daemon=True).start()
    start = time.perf_counter()
    if variant == "after":
        model = load_flux(model_path, dtype=torch.bfloat16)
        apply_loras(model, [lora_path], restorable=False)
        quantize_linears_(model, device)
        model.to(device)
    else:
        model = load_flux(model_path, dtype=torch.bfloat16, device=device, fp8=True, loras=[lora_path])
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    gpu = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"seconds": seconds, "cpu_gib": max(peak[0], anonymous_gib()), "gpu_gib": gpu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default="medium", choices=sorted(PRESETS))
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per variant, alternating")
    p.add_argument("--workdir", type=Path, default=None, help="where the random files go (default: a temp dir)")
    p.add_argument("--variant", choices=["after", "while"], help=argparse.SUPPRESS)  # a child process
    p.add_argument("--files", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, *args.files, args.device)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.workdir or Path(tmp)
        files = [str(f) for f in make_files(args.preset, args.rank, folder)]
        rows = {"after": [], "while": []}
        for _ in range(args.rounds):
            for variant, runs in rows.items():
                cmd = [sys.executable, __file__, "--variant", variant, "--files", *files, "--device", args.device]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                runs.append(json.loads(out.splitlines()[-1]))
    print(f"{args.preset}, rank {args.rank}, {args.device}, best of {args.rounds} fresh processes")
    print(f"{'variant':8} {'seconds':>8} {'CPU GiB':>8} {'GPU GiB':>8}")
    best = {}
    for variant, runs in rows.items():
        best[variant] = b = {k: None if v is None else min(r[k] for r in runs) for k, v in runs[0].items()}
        gpu = "-" if b["gpu_gib"] is None else f"{b['gpu_gib']:.2f}"
        print(f"{variant:8} {b['seconds']:8.1f} {b['cpu_gib']:8.2f} {gpu:>8}")
    print(f"while / after: time {best['while']['seconds'] / best['after']['seconds']:.2f}, "
          f"peak CPU memory {best['while']['cpu_gib'] / best['after']['cpu_gib']:.2f}")


if __name__ == "__main__":
    main()
