"""One LoRA layer at Flux-dev widths: ours (distill/lora_fn.py) against peft on diffusers' module split.

    python bench/lora_layer.py                  # CPU: fp32, 256 rows (about a minute)
    python bench/lora_layer.py --device cuda    # bf16 base, fp32 LoRA under autocast (the trainer's setup),
                                                # 10240 rows = batch 8 x 1280 tokens (512 px, T5 length 256)
    python bench/lora_layer.py --device meta    # the CUDA shapes without running anything: bytes only, with
                                                # bf16 LoRA weights on both sides (no autocast on meta; this
                                                # spares peft its cast of x to the LoRA's fp32)

Each case is a layer our Flux fuses and the released trainer (diffusers + peft) runs as separate modules:
double-block qkv = to_q, to_k, to_v; single-block linear1 = to_q, to_k, to_v, proj_mlp; the MLP layers are
single modules on both sides. Ours is one base GEMM plus one LoRA per slice, each up-projection accumulated
into the base output inside its GEMM; peft adds `lora_B(lora_A(x)) * scaling` to each module's output.

Rows: the no-grad forward (the SCFM target calls) and forward + backward with the base frozen (the student),
each with its base-only time, so a LoRA's overhead is `(lora - base) / base`. Ratio = ours / peft. Beside the
times, the bytes each side's operators read and write (views excluded; counted once per tensor argument and
result): at these widths the LoRA's extra work is memory traffic, so this count, exact on any device, says
what the GPU time will show, and a CPU, where GEMM arithmetic hides that traffic, cannot.
peft is a benchmark oracle only; no runtime module imports it.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import Traffic, median_time  # noqa: E402  (bench/timing.py, beside this file)

from distill.lora import LoRAConfig, inject_lora, lora_layers  # noqa: E402

D = 3072  # Flux-dev hidden size
# name -> (in, output widths of diffusers' separate modules = our fused layer's slices, our fused kind)
CASES = {
    "double qkv": (D, (D, D, D), "qkv"),
    "single linear1": (D, (D, D, D, 4 * D), "qkv_mlp"),
    "mlp.0": (D, (4 * D,), ""),
    "mlp.2": (4 * D, (D,), ""),
}


class Separate(nn.Module):
    """diffusers' split: one Linear per output, run one after the other."""

    def __init__(self, n_in: int, widths: tuple[int, ...]):
        super().__init__()
        self.parts = nn.ModuleList(nn.Linear(n_in, w) for w in widths)

    def forward(self, x):
        return [p(x) for p in self.parts]


class Fused(nn.Module):
    def __init__(self, n_in: int, widths: tuple[int, ...]):
        super().__init__()
        self.layer = nn.Linear(n_in, sum(widths))

    def forward(self, x):
        return [self.layer(x)]


def build(case: str, side: str, lora: bool, rank: int, device: str, dtype: torch.dtype,
          lora_dtype: torch.dtype) -> nn.Module:
    n_in, widths, kind = CASES[case]
    torch.manual_seed(0)
    with torch.device(device):
        module = (Fused if side == "ours" else Separate)(n_in, widths).to(dtype)
    if lora and side == "ours":
        target = "layer" + (f":{kind}" if kind else "")
        inject_lora(module, LoRAConfig(rank=rank, alpha=rank, targets=(target,), sets=("live",), zero_sets=()))
        layer = lora_layers(module)["layer"]
        ups = [layer.lora_up["live"]]
        for p in (layer.lora_down["live"], layer.lora_up["live"]):
            p.data = p.data.to(lora_dtype)
    elif lora:
        from peft import LoraConfig, inject_adapter_in_model

        cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=[f"parts.{i}" for i in range(len(widths))],
                         init_lora_weights="gaussian")
        module = inject_adapter_in_model(cfg, module)
        module.requires_grad_(False)
        for n, p in module.named_parameters():  # fp32 trainable LoRA, as diffusers' training scripts cast it
            if "lora_" in n:
                p.data = p.data.to(lora_dtype)
                p.requires_grad_(True)
        ups = [p for n, p in module.named_parameters() if "lora_B" in n]
    else:
        module.requires_grad_(False)
        ups = []
    with torch.no_grad():
        for p in ups:  # non-zero up matrices: both sides do all their work either way
            p.normal_(0, 1e-3)
    return module


def timed(module: nn.Module, x: torch.Tensor, widths: tuple[int, ...], train: bool, device: str, autocast: bool,
          iters: int) -> tuple[float, int]:
    dy = [torch.randn(*x.shape[:-1], w, device=x.device, dtype=x.dtype) for w in widths]
    if isinstance(module, Fused):
        dy = [torch.cat(dy, -1)]  # one gradient for the fused output, made once, outside the timed calls

    def run():
        with torch.autocast("cuda" if device == "meta" else device, dtype=torch.bfloat16, enabled=autocast):
            if not train:
                with torch.no_grad():
                    return module(x)
            outs = module(x)
        torch.autograd.backward(outs, dy)

    traffic = Traffic()
    run()  # allocator and kernel warm-up happen here, outside the count
    with traffic:
        run()
    sec = float("nan") if device == "meta" else median_time(run, device, warmup=1, iters=iters)
    return sec, traffic.bytes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "meta"])
    p.add_argument("--rows", type=int, help="tokens x batch (default: 256 on CPU, 10240 on CUDA)")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--iters", type=int, help="timed calls per row (default: 5 on CPU, 20 on CUDA)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda, gpu_shapes = args.device == "cuda", args.device in ("cuda", "meta")
    rows, iters = args.rows or (10240 if gpu_shapes else 256), args.iters or (20 if cuda else 5)
    base_dtype = torch.bfloat16 if gpu_shapes else torch.float32
    lora_dtype = torch.bfloat16 if args.device == "meta" else torch.float32
    name = torch.cuda.get_device_name() if cuda else args.device
    setup = {"cuda": "bf16 base, fp32 LoRA, autocast", "meta": "bf16 base and LoRA", "cpu": "fp32"}[args.device]
    print(f"LoRA layer at Flux-dev widths, {rows} rows, rank {args.rank}, {setup}, on {name}")
    print(f"{'layer':<16}{'pass':<10}{'ours':>9}{'base':>9}{'peft':>9}{'base':>9}{'ratio':>7}"
          f"   GB moved: {'ours':>7}{'base':>7}{'peft':>7}{'base':>7}{'ratio':>7}")
    for case, (n_in, widths, _) in CASES.items():
        x = torch.randn(rows, n_in, device=args.device, dtype=base_dtype)
        for train in (False, True):
            xi = x.detach().requires_grad_(train)
            ms, gb = {}, {}
            for side in ("ours", "peft"):
                for lora in (True, False):
                    module = build(case, side, lora, args.rank, args.device, base_dtype, lora_dtype)
                    sec, moved = timed(module, xi, widths, train, args.device, cuda, iters)
                    ms[side, lora], gb[side, lora] = 1000 * sec, moved / 1e9
                    del module
            times = [ms["ours", True], ms["ours", False], ms["peft", True], ms["peft", False],
                     ms["ours", True] / ms["peft", True]]
            moved = [gb["ours", True], gb["ours", False], gb["peft", True], gb["peft", False],
                     gb["ours", True] / gb["peft", True]]
            cells = "".join(f"{'-':>{w}}" if math.isnan(v) else f"{v:>{w}.2f}" for v, w in zip(times, (9,) * 4 + (7,)))
            print(f"{case:<16}{'fwd+bwd' if train else 'no-grad':<10}{cells}           "
                  + "".join(f"{v:>7.2f}" for v in moved))
    return 0


if __name__ == "__main__":
    sys.exit(main())
