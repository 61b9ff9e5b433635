"""How a training step is made fast: fp8 GEMMs for the frozen base, compiled blocks, and the number of blocks
that keep their activations (`--fp8_compute`, `--compile`, `--unchecked_blocks auto`).

Each is an option of the trainer that changes no result beyond its own rounding (fp8) or kernel order
(compile), so each can be checked alone. `--unchecked_blocks auto` measures instead of guessing: the first
batch's loss and backward run once, every block checkpointed, for the peak without any kept activations, and a
forward of the student with autograd's saved tensors counted (and dropped) gives what each block would keep
(distill/memory_plan.py); the plan is the largest count under `--max_memory`.
"""

from __future__ import annotations

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
        model.compile_blocks()


def block_lora_gradients(model: nn.Module) -> tuple[int, int]:
    """(how many, of how many) LoRA layers inside the blocks have a non-zero gradient on their live up factor.
    The up factors are asked: at the first step every down gradient is zero by design (up starts at zero), while
    a block that lost its graph leaves None or, as torch 2.11 did (distill/lora_fn.py `_forward`), zeros. Meta
    tensors hold no values: a gradient there counts as present."""
    blocks = tuple(f"{name}." for name, _ in named_blocks(model))
    grads = [layer.lora_up["live"].grad for name, layer in lora_layers(model).items()
             if name.startswith(blocks) and "live" in layer.lora_up]
    return sum(g is not None and (g.is_meta or bool(g.any())) for g in grads), len(grads)


def check_block_gradients(model: nn.Module) -> None:
    """After the first backward of a compiled model: the live LoRA inside the blocks got gradients. A compiler
    that drops them would train only the embedders while every number looks fine."""
    got, total = block_lora_gradients(model)
    if total and not got:
        raise SpeedError(f"--compile: no LoRA inside the transformer blocks received a gradient (torch "
                         f"{torch.__version__}); train without --compile and report this torch version")


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
    return n, {**figures, "max_memory": budget, "optimizer_bytes": optimizer_bytes}


def plan_on_first_batch(trainer, step: int, indices: list[int], positions: range) -> None:
    """The trainer's --unchecked_blocks auto: planned on its first batch before that step runs as usual (the
    probe's gradients are cleared; its draws are pure functions of the step, so the step is unchanged)."""
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
