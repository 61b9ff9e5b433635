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
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import Traffic, built_in, trials  # noqa: E402  (bench/timing.py, beside this file)

from distill.ema import EMAConfig, ema_step  # noqa: E402
from distill.lora import LoRAConfig, LoRALinear, inject_lora, lora_layers, set_tensors, weight_set  # noqa: E402
from distill.memory_plan import step_peak  # noqa: E402
from distill.scfm import SCFMConfig, cfg_velocity, element_generators, sample_draw, scfm_loss  # noqa: E402
from distill.speed import block_lora_gradients  # noqa: E402
from model.block_swap import BlockSwap, swappable  # noqa: E402
from model.flux import FLUX_CONFIGS, FluxConfig  # noqa: E402
from model.flux2 import FLUX2_CONFIGS  # noqa: E402
from model.fp8 import enable_fp8_compute_, quantize_linears_  # noqa: E402
from model.layers import named_blocks  # noqa: E402
from sampling.velocity import FluxVelocity  # noqa: E402
from weights.families import family_of, get_family  # noqa: E402

# name -> (family, config, latent side (x0's: FLUX.2's is already 2x2-patchified), text tokens, batch, rank)
CASES = {
    "small": ("flux", FluxConfig(in_channels=64, out_channels=64, vec_in_dim=64, context_in_dim=128, hidden_size=128,
                                 num_heads=2, depth=1, depth_single_blocks=2, axes_dim=(8, 28, 28)), 32, 64, 4, 16),
    # layer widths where the LoRA layer's memory traffic counts, as at full size, still seconds on a CPU
    "wide": ("flux", FluxConfig(in_channels=64, out_channels=64, vec_in_dim=64, context_in_dim=128, hidden_size=512,
                                num_heads=4, depth=1, depth_single_blocks=2, axes_dim=(16, 56, 56)), 32, 64, 4, 16),
    "flux-dev": ("flux", FLUX_CONFIGS["flux-dev"], 64, 256, 8, 64),  # 512 px, T5 length 256
    "klein-4b": ("flux2", FLUX2_CONFIGS["klein-4b"], 32, 512, 8, 64),  # 512 px, Qwen3 length 512
    "klein-9b": ("flux2", FLUX2_CONFIGS["klein-9b"], 32, 512, 8, 64),
}
KLEIN_CFG = 3.0  # klein base's baked-in CFG: c + w (c - u), w = g - 1 for its guidance scale g = 4


def px(case: str) -> int:
    """Image side: 16 px per token side in both families (the VAE's 8 x 2x2 patches)."""
    family, cfg, side, *_ = CASES[case]
    return side * 16 // get_family(family).token_side(cfg)


def scfm_for(model) -> SCFMConfig:
    """The trainer's SCFM config: FLUX.1's drawn guidance input; for a CFG family (klein) the CFG baked in."""
    family = family_of(model)
    if family.guidance != "cfg":
        return SCFMConfig()
    return SCFMConfig(guidance_max=None, cfg_scale=KLEIN_CFG, dynamic_shift=family.dynamic_shift)


def velocity_for(model):
    return family_of(model).part("velocity")(model)  # FluxVelocity, Flux2Velocity


def build(case: str, device: torch.device, dtype: torch.dtype, sets: tuple[str, ...], fp8: bool = False):
    """The model, x0, cond and the negative prompt's cond (None unless the family bakes CFG in)."""
    name, cfg, side, tokens, batch, rank = CASES[case]
    family = get_family(name)
    torch.manual_seed(0)
    with built_in(device, dtype):
        model = family.model_class(cfg)  # random weights, built on the device in the training dtype
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    if fp8:
        quantize_linears_(model)
    # the teacher is the base model: a zero set, whose LoRA work every call skips (as the trainer runs it)
    inject_lora(model, LoRAConfig(rank=rank, alpha=rank, sets=sets, targets=family.part("lora_targets")),
                torch.Generator().manual_seed(0))
    model.enable_gradient_checkpointing(device.type != "cpu")  # meta counts what the CUDA run does
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(batch, family.latent_channels(cfg), side, side, generator=g).to(device)
    cond = {"txt": torch.randn(batch, tokens, cfg.context_in_dim, generator=g).to(device, dtype)}
    if hasattr(cfg, "vec_in_dim"):  # FLUX.1's pooled CLIP vector; FLUX.2 has none
        cond["y"] = torch.randn(batch, cfg.vec_in_dim, generator=g).to(device, dtype)
    uncond = None  # the trainer's negative: the empty prompt embedded once, a view per element
    if family.guidance == "cfg":
        empty = torch.randn(1, tokens, cfg.context_in_dim, generator=g).to(device, dtype)
        uncond = {"txt": empty.expand(batch, -1, -1)}
    for layer in lora_layers(model).values():  # distinct, non-zero sets so every call does real work
        for name in sets:
            with torch.no_grad():
                layer.lora_up[name].normal_(0, 1e-3)
    return model, x0, cond, uncond


def draw_for(model, x0: torch.Tensor, step: int):
    side = family_of(model).token_side(model.config)  # latent pixels per token side: FLUX.1 2, FLUX.2 1
    tokens = (x0.shape[-2] // side) * (x0.shape[-1] // side)
    return sample_draw(scfm_for(model), element_generators(0, step, range(x0.shape[0])), x0.shape[1:], tokens)


GRADS: list[float] = []  # per step: the share of the blocks' LoRA layers with a non-zero gradient (1)


def note_block_grads(model) -> None:
    got, total = block_lora_gradients(model)  # the trainer's check of compiled runs (distill/speed.py)
    GRADS.append(got / max(total, 1))


def ours(model, x0, cond, opt, step: int, uncond=None) -> torch.Tensor:
    out = scfm_loss(velocity_for(model), model, x0, cond, draw_for(model, x0, step), scfm_for(model), uncond)
    out.loss.backward()
    note_block_grads(model)
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 10.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    ema_step(model, EMAConfig(), step + 1)
    return out.loss.detach()


class Swapped:
    """The released design: one live LoRA; other sets are plain tensors copied into it around each call."""

    def __init__(self, model):
        self.live = set_tensors(model, "live")
        # the same starting values as ours' sets; only `live` is ever selected in the forward
        self.store = {name: set_tensors(model, name) for name in ("fast_ema", "slow_ema")}
        self.backup = [t.detach().clone() for t in self.live]

    def load(self, name: str) -> None:
        for dst, src in zip(self.live, self.store[name]):
            dst.data.copy_(src)


def released(model, x0, cond, opt, step: int, swap: Swapped) -> torch.Tensor:
    velocity, draw = FluxVelocity(model), draw_for(model, x0, step)
    dev = x0.device
    sig = draw.sigmas.to(dev, torch.float32)  # (B, 3)
    dt = draw.dt.to(dev, torch.float32)
    sigma = sig[:, 0].view(-1, 1, 1, 1)
    x = ((1 - sigma) * x0 + sigma * draw.noise.to(dev)).to(x0.dtype)
    g = draw.guidance.to(dev)
    teacher = draw.teacher  # on the host: the rows are known without a device sync
    for dst, src in zip(swap.backup, swap.live):
        dst.copy_(src.data)
    with torch.no_grad():
        v0 = torch.empty_like(x)
        for name, rows in (("teacher", teacher.nonzero()[:, 0].to(dev)),
                           ("fast_ema", (~teacher).nonzero()[:, 0].to(dev))):
            if not len(rows):
                continue
            # the teacher (base model) runs with the adapter off; the fast EMA is copied in, in place
            if name == "fast_ema":
                swap.load(name)
            with weight_set(model, "teacher") if name == "teacher" else contextlib.nullcontext():
                part = {k: v[rows] for k, v in cond.items()}
                v0[rows] = velocity(x[rows], sig[rows, 0], part, g[rows]).to(x.dtype)
        x1 = x - dt[:, 0].view(-1, 1, 1, 1) * v0
        swap.load("slow_ema")
        v1 = velocity(x1, sig[:, 1], cond, g)
        travelled = dt[:, 0].view(-1, 1, 1, 1) * v0.float() + dt[:, 1].view(-1, 1, 1, 1) * v1.float()
        target = travelled / draw.big_dt.to(dev, torch.float32).view(-1, 1, 1, 1)
    for dst, src in zip(swap.live, swap.backup):
        dst.data.copy_(src)  # restore the live weights before the student step
    with weight_set(model, "live"):
        pred = velocity(x, sig[:, 0], cond, g)
    loss = (pred.float() - target).pow(2).flatten(1).mean(1).mean()
    loss.backward()
    note_block_grads(model)
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 10.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, decay in (("fast_ema", 0.99), ("slow_ema", 0.999)):
            torch._foreach_lerp_(swap.store[name], [t.detach() for t in swap.live], 1 - decay)
    return loss.detach()


def peft_style(self: LoRALinear, x: torch.Tensor, groups, scale: float) -> torch.Tensor:
    """peft's LoRA linear (`result + lora_B(lora_A(x)) * scaling`), one output per slice as diffusers' separate
    q / k / v / mlp modules give; the scale is applied to the narrow tensor, which makes up for the concat."""
    out = F.linear(x, self.weight, self.bias)
    for rows, name in groups:
        if rows is not None:
            raise ValueError("the released design selects one set for the whole batch")
        down, up = self.lora_down[name].to(x.dtype), self.lora_up[name].to(x.dtype)
        h = F.linear(x, down) * scale
        out = out + torch.cat([F.linear(h_i, u_i) for h_i, u_i in
                               zip(h.chunk(len(self.slices), -1), up.split(self.slices))], dim=-1)
    return out


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
