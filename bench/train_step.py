"""One SCFM training step: ours against the released trainer's design, same model, batch and draws, one run.

    python bench/train_step.py                  # CPU, a small Flux (seconds)
    python bench/train_step.py --device cuda    # full Flux-dev shapes: random bf16 weights, 512 px, batch 8,
                                                # rank 64, gradient checkpointing, cached-embedding shapes
    python bench/train_step.py --device meta --case klein-4b [--fp8] [--blocks_to_swap N]   # or klein-9b

FLUX.2 klein cases (512 px, batch 8, rank 64, 512 Qwen3 tokens): FLUX2_TARGETS, the latent already 2x2-patchified
(one token per latent pixel), and klein base's CFG baked into every call (cfg_scale 3, g = 4) against an empty-prompt
negative, as the trainer's --cfg_scale does: each call is two (cond, uncond). Our variants only (released* is FLUX.1's).

ours:      every LoRA set is its own tensors; the first jump of teacher and self elements is one batched call
           with per-element set selection (distill/scfm.py).
released:  one LoRA; around each no-grad call the fast / slow EMA weights are copied into it in place
           (param.data.copy_) and the live weights restored after; three separate no-grad calls (teacher
           elements with the adapter off, self elements, slow EMA on all), then the student step. Its LoRA
           layers compute peft's formula, `base(x) + up(down(x) * scale)` with one separate output per slice
           (what the released trainer runs through peft).
released*: the same step design on our LoRA layer (distill/lora_fn.py: the up-projection accumulated into
           the base GEMM's output, explicit backward), to tell the step design's share from the layer's.
ours-fp8:  with --fp8: ours on e4m3 block weights (model/fp8.py, the trainer's --fp8_base), for its memory
           and the cost of dequantizing each weight per call; reported against ours.
ours-swap: with --blocks_to_swap N: ours with the last N blocks' weights in host memory, each copied to the
           device for its call (model/block_swap.py, the trainer's --blocks_to_swap); with --fp8 also
           ours-fp8-swap. Reported against ours, with the bytes copied per step. On meta: the memory held only.
ours-unchecked: with --unchecked_blocks N: ours with the first N blocks not checkpointed (the trainer's
           --unchecked_blocks): less recomputation for more activation memory. Reported against ours.
ours-fp8c: with --fp8_compute: ours with the blocks' GEMMs in fp8 on e4m3 weights (model/fp8_gemm.py, the
           trainer's --fp8_compute); the CPU emulates them (slower there: it is for the numerics).
ours-compile, ours-fp8c-compile: with --compile: each block compiled once (the trainer's --compile).
ours-fast: with --fast: fp8 compute + compile + --unchecked_blocks (a count, or `auto` with --max_memory: the
           trainer's planner, distill/memory_plan.py). Reported against ours and against released.

A compiled variant first runs every timed step once untimed (each distinct per-element set split of a step is
its own compiled variant of a block), reported as its warm-up; every variant's loss column is that first pass.

Each variant runs in its own process so peak memory is its own: CUDA max allocated, or peak RSS on CPU.
Prints seconds per step (median), the share of the blocks' LoRA layers whose live up factor got a non-zero
gradient (a compiled step that drops them is fast and wrong), peak memory, the memory held between steps (model tensors,
every LoRA set and the optimiser state: on meta too), and the ratios ours / released and ours / released* (target < 1).
On meta the peak is memory_plan.step_peak of the counted step run again (the storages alive before it and the most
alive during it); meta's attention is the math one, whose L x L scores put it above a flash-attention peak.
On a shared CPU, `--rounds 3` interleaves the variants so that a drift in machine speed hits all of them alike.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path
from queue import Empty

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scfm_step import (  # noqa: E402  (bench/scfm_step.py, beside this file: the step this script times)
    CASES,
    GRADS,
    KLEIN_CFG,
    Swapped,
    build,
    ours,
    peft_style,
    px,
    released,
    velocity_for,
)
from timing import Traffic, trials  # noqa: E402  (bench/timing.py, beside this file)

from distill.lora import LoRALinear, weight_set  # noqa: E402
from distill.memory_plan import step_peak  # noqa: E402
from distill.scfm import cfg_velocity  # noqa: E402
from model.block_swap import BlockSwap, swappable  # noqa: E402
from model.fp8 import enable_fp8_compute_  # noqa: E402
from model.layers import named_blocks  # noqa: E402


def _addmm_flops(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    """addmm_ (our LoRA layer's up-projection, beta = 1) is missing from the FLOP counter's table."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def resident(model, opt) -> int:
    """Bytes held between steps: the model's tensors (base, every LoRA set) and the optimiser state."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def swapped_bytes(model, n: int) -> tuple[int, int]:
    """Bytes of the frozen tensors of the last n blocks, and of the largest of them."""
    sizes = [sum(t.nbytes for t in swappable(block).values()) for _, block in named_blocks(model)[-n:]]
    return sum(sizes), max(sizes)


def plan_unchecked_for(model, x0, cond, uncond, opt, max_memory: str, dev: torch.device) -> int:
    """--unchecked_blocks auto: the trainer's planner on this step (one fully checkpointed step is measured)."""
    from distill.memory_plan import parse_memory, plan_unchecked

    def forward():  # the student's call as the step makes it (with CFG baked in: cond and uncond)
        velocity = velocity_for(model) if uncond is None else cfg_velocity(velocity_for(model), KLEIN_CFG, uncond)
        with weight_set(model, "live"):
            velocity(x0, torch.full((x0.shape[0],), 0.5, device=dev), cond, torch.full((x0.shape[0],), 3.5, device=dev))

    # the plan's step runs on a fresh optimizer; every later step also holds AdamW's two moments
    moments = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    n, figures = plan_unchecked(model, lambda: ours(model, x0, cond, opt, 0, uncond), forward,
                                parse_memory(max_memory) - moments, dev)
    print(f"unchecked_blocks auto under {max_memory}: {n} ({figures})", flush=True)
    return n


def measure(variant: str, case: str, device: str, dtype: str, iters: int, threads: int, swap_n: int,
            unchecked_n: str, max_memory: str, queue, switches: dict) -> None:
    with trials(**switches) if variant.startswith("ours") else contextlib.nullcontext():
        _measure(variant, case, device, dtype, iters, threads, swap_n, unchecked_n, max_memory, queue)


def _measure(variant: str, case: str, device: str, dtype: str, iters: int, threads: int, swap_n: int,
             unchecked_n: str, max_memory: str, queue) -> None:
    if threads:
        torch.set_num_threads(threads)
    dev, dt = torch.device(device), {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    fast = variant == "ours-fast"
    model, x0, cond, uncond = build(case, dev, dt, ("live", "fast_ema", "slow_ema"), fp8="fp8" in variant or fast)
    if "fp8c" in variant or fast:
        enable_fp8_compute_(model, dev)
    compiled = "compile" in variant or fast
    if compiled:
        model.compile_blocks()
    if variant in ("ours-unchecked", "ours-fast"):  # exemptions from checkpointing: it is on (CPU too)
        model.enable_gradient_checkpointing(True, 0 if unchecked_n == "auto" else int(unchecked_n))
    swap = None
    if "swap" in variant and dev.type != "meta":  # meta holds no data to keep in host memory: counted below
        swap = BlockSwap(model, swap_n, dev)
    if variant == "released":
        LoRALinear._with_lora = peft_style  # this process only: each variant runs in its own
    if variant.startswith("ours"):
        step_fn = functools.partial(ours, uncond=uncond)
    else:
        swapped_sets = Swapped(model)

        def step_fn(m, x, c, o, s):
            return released(m, x, c, o, s, swapped_sets)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    if variant in ("ours-unchecked", "ours-fast") and unchecked_n == "auto":
        n = plan_unchecked_for(model, x0, cond, uncond, opt, max_memory, dev)
        model.enable_gradient_checkpointing(model.gradient_checkpointing, n)
    if dev.type == "meta":  # shapes only: count one step's memory traffic and FLOPs after a warm-up step
        step_fn(model, x0, cond, opt, 0)
        traffic = Traffic()
        flops = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_flops})
        with traffic, flops:
            step_fn(model, x0, cond, opt, 1)
        # the same step again for its peak: inside the counting modes (the FLOP counter's) it reads far too high
        peak = step_peak(model, lambda: step_fn(model, x0, cond, opt, 1), dev)
        held = resident(model, opt)
        if "swap" in variant:  # the device keeps all but the swapped blocks, plus two blocks' copies at a time
            total, largest = swapped_bytes(model, swap_n)
            held, peak = held + 2 * largest - total, peak + 2 * largest - total
        queue.put({"bytes": traffic.bytes, "flops": flops.get_total_flops(), "resident": held, "peak": peak})
        return
    def timed(step: int) -> tuple[float, float]:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step_fn(model, x0, cond, opt, step).item()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, loss

    # the first step warms up (allocator, kernels) and is not timed; a compiled variant warms up on every step
    warm = [timed(step) for step in range(iters + 1 if compiled else 1)]
    losses = [loss for _, loss in warm]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(1, iters + 1):
        seconds, loss = timed(step)
        times.append(seconds)
        if not compiled:
            losses.append(loss)
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    held = resident(model, opt)
    if swap is not None:  # what the device holds; per step: the bytes copied from host memory
        held -= sum(f.nbytes for f in swap.flat.values())
        per_step = swap.copies / (iters + 1) * sum(f.nbytes for f in swap.flat.values()) / len(swap.flat)
        print(f"{variant}: {swap.copies / (iters + 1):.0f} block copies per step, {per_step / 1e9:.1f} GB; "
              f"{swap.late} uses of {swap.late + swap.prefetched} waited for their copy", flush=True)
    queue.put({"times": times, "peak": peak, "resident": held, "losses": losses,
               "warmup": sum(t for t, _ in warm), "grads": min(GRADS)})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "meta"],
                   help="meta: no compute; counts one step's bytes moved and FLOPs at the CUDA shapes")
    p.add_argument("--case", choices=list(CASES), help="default: small on CPU, flux-dev on CUDA and meta")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="default: fp32 on CPU, bf16 on CUDA and meta")
    p.add_argument("--iters", type=int, default=2, help="timed steps per variant (after one warm-up step)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per variant (0: torch's default)")
    p.add_argument("--fp8", action="store_true", help="also run ours on e4m3 block weights (--fp8_base)")
    p.add_argument("--blocks_to_swap", type=int, default=0, metavar="N",
                   help="also run ours with the last N blocks swapped (and ours-fp8-swap with --fp8)")
    p.add_argument("--unchecked_blocks", default="0", metavar="N|auto",
                   help="also run ours with the first N blocks not checkpointed (auto: planned under --max_memory)")
    p.add_argument("--max_memory", default="40GB", help="the peak --unchecked_blocks auto plans for")
    p.add_argument("--fp8_compute", action="store_true", help="also run ours with fp8 GEMMs (ours-fp8c)")
    p.add_argument("--compile", action="store_true", help="also run ours with compiled blocks (ours-compile; "
                   "ours-fp8c-compile with --fp8_compute)")
    p.add_argument("--fast", action="store_true", help="also run ours-fast: fp8 compute + compile + "
                   "--unchecked_blocks")
    p.add_argument("--fast_accum", action="store_true", help="trial: our variants' forward fp8 GEMMs with "
                   "Hopper's fast accumulation (fp8_gemm.FAST_ACCUM_FORWARD)")
    p.add_argument("--cudnn", action="store_true", help="trial: our variants with torch's cuDNN attention first in "
                   "SDPA's priority (the released design keeps torch's default)")
    p.add_argument("--unfused", action="store_true", help="trial: our fp8-compute variants' GEMMs round their own "
                   "inputs instead of taking the adaLN producers' rows (fp8_gemm.FUSED_PRODUCERS off)")
    p.add_argument("--only", nargs="*", metavar="VARIANT", help="run just these variants (ours is always run)")
    p.add_argument("--skip", nargs="*", default=(), metavar="VARIANT",
                   help="variants not to run (e.g. released released*: one device call for the memory variants)")
    p.add_argument("--rounds", type=int, default=1, help="fresh processes per variant, interleaved; the median "
                   "is over every timed step of every round")
    args = p.parse_args(argv)
    case = args.case or ("small" if args.device == "cpu" else "flux-dev")
    dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    ctx = mp.get_context("spawn")  # a fresh process per variant: its peak memory is its own
    variants = ("released", "released*", "ours") + ("ours-fp8",) * args.fp8
    variants += ("ours-swap",) * bool(args.blocks_to_swap) + ("ours-fp8-swap",) * (args.fp8 and args.blocks_to_swap > 0)
    variants += ("ours-unchecked",) * (args.unchecked_blocks != "0")
    variants += ("ours-fp8c",) * args.fp8_compute + ("ours-compile",) * args.compile
    variants += ("ours-fp8c-compile",) * (args.compile and args.fp8_compute) + ("ours-fast",) * args.fast
    if args.only:
        variants = ("ours", *dict.fromkeys(v for v in args.only if v != "ours"))
    variants = tuple(v for v in variants if v not in args.skip)
    if CASES[case][0] != "flux" and any(v.startswith("released") for v in variants):
        print(f"released, released*: FLUX.1's released trainer design, not run on {case}", flush=True)
        variants = tuple(v for v in variants if not v.startswith("released"))
    if "ours" not in variants:
        raise SystemExit("every variant is reported against ours: do not skip it")
    runs: dict[str, list] = {v: [] for v in variants}
    for _ in range(args.rounds):  # rounds interleave the variants, so a drift in machine speed hits all alike
        for variant, got in runs.items():
            queue = ctx.Queue()
            proc = ctx.Process(target=measure,
                               args=(variant, case, args.device, dtype, args.iters, args.threads,
                                     args.blocks_to_swap, args.unchecked_blocks, args.max_memory, queue,
                                     {"fast_accum": args.fast_accum, "cudnn": args.cudnn, "unfused": args.unfused}))
            proc.start()
            while True:  # a child that dies never answers: report it instead of waiting forever
                try:
                    got.append(queue.get(timeout=5))
                    if "times" in got[-1]:  # each variant's figures as soon as they exist (a later one may hang)
                        r = got[-1]
                        print(f"{variant}: {statistics.median(r['times']):.3f} s/step, peak "
                              f"{r['peak'] / 2**30:.2f} GiB, warm-up {r['warmup']:.1f} s, block LoRA with "
                              f"gradients {r['grads']:.0%}", flush=True)
                    break
                except Empty:
                    if not proc.is_alive():
                        print(f"{variant}: the measuring process died (exit code {proc.exitcode})", flush=True)
                        break
            proc.join()
    runs = {v: got for v, got in runs.items() if got}
    if "ours" not in runs:
        raise SystemExit("ours did not run: nothing to report against")
    variants = tuple(runs)
    *_, batch, rank = CASES[case]
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    on = [k for k in ("fast_accum", "cudnn", "unfused") if getattr(args, k)]
    print(f"SCFM step, {case} ({px(case)} px, batch {batch}, rank {rank}, {dtype}) on {name}"
          + (f"; our variants with the trials: {', '.join(on)}" if on else ""))
    if args.device == "meta":  # one counted step per variant (the counts do not vary between rounds)
        table = {v: {"GB moved": got[0]["bytes"] / 1e9, "TFLOP": got[0]["flops"] / 1e12,
                     "held GiB": got[0]["resident"] / 2**30, "peak GiB": got[0]["peak"] / 2**30}
                 for v, got in runs.items()}
    else:  # s/step: the median over every timed step of every round; peak: the largest
        table = {v: {"s/step": statistics.median(t for g in got for t in g["times"]),
                     "peak GiB": max(g["peak"] for g in got) / 2**30,
                     "held GiB": got[0]["resident"] / 2**30,
                     "warm-up s": max(g["warmup"] for g in got),
                     "grads %": 100 * min(g["grads"] for g in got)} for v, got in runs.items()}
    losses = "" if args.device == "meta" else "   losses (same draws: should agree)"
    print(f"{'variant':<15}" + "".join(f"{k:>10}" for k in table["ours"]) + losses)
    for variant, cols in table.items():
        line = "".join(f"{x:>10.3f}" for x in cols.values())
        if losses:
            line += "   " + ", ".join(f"{x:.5f}" for x in runs[variant][0]["losses"])
        print(f"{variant:<15}{line}")
    pairs = [("ours", "released"), ("ours", "released*")] + [(v, "ours") for v in variants if v.startswith("ours-")]
    pairs += [(v, "released") for v in variants if v in ("ours-fast", "ours-fp8c-compile")]
    for variant, ref in (pair for pair in pairs if pair[1] in table):
        ratios = ", ".join(f"{k} {table[variant][k] / table[ref][k]:.2f}" for k in table[variant]
                           if k not in ("warm-up s", "grads %"))
        print(f"{variant} / {ref}: {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
