"""How a training step is made fast: fp8 GEMMs for the frozen base, compiled blocks, and the number of blocks
that keep their activations (`--fp8_compute`, `--compile`, `--unchecked_blocks auto`).

Each is an option of the trainer that changes no result beyond its own rounding (fp8) or kernel order
(compile), so each can be checked alone. `--unchecked_blocks auto` measures instead of guessing: the first
batch's loss and backward run once, every block checkpointed, for the peak without any kept activations, and a
forward of the student with autograd's saved tensors counted (and dropped) gives what each block would keep
(distill/memory_plan.py); the plan is the largest count under `--max_memory`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from model.fp8 import enable_fp8_compute_
from model.layers import named_blocks

from .config import DistillConfig
from .lora import lora_layers


class SpeedError(ValueError):
    """A speed option that cannot run here, as one line (the trainer reports it as a TrainingError)."""


def prepare(model: nn.Module, config: DistillConfig, device: torch.device) -> None:
    """fp8 compute on the e4m3 layers and compiled blocks, once every LoRA set, shard and swap exists."""
    if config.fp8_compute:
        try:
            enable_fp8_compute_(model, device)
        except ValueError as e:
            raise SpeedError(str(e)) from None
    if config.compile:
        try:
            model.compile_blocks()
        except ValueError as e:  # an unknown SCFM_COMPILE_BACKEND
            raise SpeedError(str(e)) from None


def _block_gradients(model: nn.Module) -> dict[str, list[bool]]:
    """Per transformer block holding LoRA layers: whether each has a non-zero gradient on its live up factor.
    The up factors are asked: at the first step every down gradient is zero by design (up starts at zero), while
    a block that lost its graph leaves None or, as torch 2.11 did (distill/lora_fn.py `_forward`), zeros. Meta
    tensors hold no values: a gradient there counts as present."""
    blocks = [name for name, _ in named_blocks(model)]
    out: dict[str, list[bool]] = {}
    for name, layer in lora_layers(model).items():
        block = next((b for b in blocks if name.startswith(f"{b}.")), None)
        if block is not None and "live" in layer.lora_up:
            g = layer.lora_up["live"].grad
            out.setdefault(block, []).append(g is not None and (g.is_meta or bool(g.any())))
    return out


def block_lora_gradients(model: nn.Module) -> tuple[int, int]:
    """(how many, of how many) LoRA layers inside the blocks have a non-zero gradient (see _block_gradients)."""
    flags = [f for block in _block_gradients(model).values() for f in block]
    return sum(flags), len(flags)


def check_block_gradients(model: nn.Module) -> None:
    """After the first backward of a compiled model: the live LoRA of every block got gradients. A compiler that
    drops them (all blocks, or one kind of block) would train only the rest while every number looks fine. Asked
    per block, not per layer: a layer whose gradient is zero in eager too (an output the loss never reads) must
    not stop a run."""
    missing = [block for block, flags in _block_gradients(model).items() if not any(flags)]
    if missing:
        raise SpeedError(f"--compile: the LoRA of {len(missing)} transformer blocks (first: {missing[0]}) received "
                         f"no gradient (torch {torch.__version__}); train without --compile and report this torch "
                         "version")


def plan_unchecked(model: nn.Module, config: DistillConfig, device: torch.device, step: Callable[[], None],
                   forward: Callable[[], object], optimizer_bytes: int) -> tuple[int, dict]:
    """How many of the first blocks keep their activations under config.max_memory (default: 90% of the free
    device memory). `step`: the first batch's loss and backward (gradients cleared after); `forward`: the
    student's forward on it; `optimizer_bytes`: state the first update will add (AdamW: two moments)."""
    from .memory_plan import default_max_memory, parse_memory
    from .memory_plan import plan_unchecked as plan

    try:
        budget = parse_memory(config.max_memory) if config.max_memory else default_max_memory(device)
    except ValueError as e:
        raise SpeedError(f"--unchecked_blocks auto: {e}") from None
    n, figures = plan(model, step, forward, budget - optimizer_bytes, device)
    n = min(n, len(named_blocks(model)) - config.blocks_to_swap)  # swapped blocks stay checkpointed
    model.enable_gradient_checkpointing(model.gradient_checkpointing, n)
    figures = {**figures, "max_memory": budget, "optimizer_bytes": optimizer_bytes}
    if figures["base_peak"] + optimizer_bytes > budget:
        warnings.warn(f"--unchecked_blocks auto: with every block checkpointed the step already peaks near "
                      f"{(figures['base_peak'] + optimizer_bytes) / 1e9:.2f} GB, over --max_memory "
                      f"{budget / 1e9:.2f} GB: no block is left unchecked; raise --max_memory, or lower "
                      "--batch_size / --micro_batch (or add --blocks_to_swap)", stacklevel=2)
    return n, figures


def largest_bucket_batch(buckets: list[tuple[int, int]], indices: list[int]) -> list[int]:
    """A batch as long as `indices` from the bucket of most pixels: the plan must hold for the largest step, not
    the one the first batch happens to draw (the 512-px recipe's 384x640 bucket has 6% fewer tokens than
    512x512). Items repeat when that bucket holds fewer than a batch, as its batches do (data.BucketBatches)."""
    largest = max(set(buckets), key=lambda wh: (wh[0] * wh[1], wh))  # a tie: the same one every time
    items = [i for i, wh in enumerate(buckets) if wh == largest]
    return [items[j % len(items)] for j in range(len(indices))]


def plan_on_first_batch(trainer, step: int, indices: list[int], positions: range) -> None:
    """The trainer's --unchecked_blocks auto: planned before the first step on a batch of the largest bucket (the
    probe's gradients are cleared; its draws are pure functions of the step, so the step is unchanged)."""
    indices = largest_bucket_batch(trainer.cache.buckets, indices)

    def probe() -> None:
        trainer._micro_loss(step, indices, positions)
        trainer.optimizer.zero_grad(set_to_none=True)

    live = sum(p.numel() * p.element_size() for _, p in trainer.params)
    n, figures = plan_unchecked(trainer.model, trainer.config, trainer.device, probe,
                                lambda: trainer._loss(step, indices, positions), 2 * live)
    if trainer.rank == 0:
        gb = {k: round(v / 1e9, 2) for k, v in figures.items() if isinstance(v, int)}
        print(f"unchecked_blocks auto: {n} of {len(named_blocks(trainer.model))} blocks keep their activations "
              f"({gb} GB)", flush=True)
