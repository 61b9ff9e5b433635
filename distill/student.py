"""The student: the base model made ready to train, before the trainer builds its optimizer around it.

This file owns which family a model is (`model_family`), the run's LoRA (`lora_config`) and the order in which
a model is prepared (`prepare_student`): fp8 storage, the dtype cast, LoRA injection, gradient checkpointing,
the teacher LoRA and the EMA sets it seeds, FSDP sharding, block swap and the speed options. That order is
the point: each step needs the ones before it (see the comments). What it refuses is a `StudentError`, one
line, which the trainer reports as a TrainingError.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from model.block_swap import BlockSwap
from model.fp8 import fp8_bytes, quantize_linears_
from model.layers import named_blocks
from weights.families import family_of, get_family, names
from weights.family import Family
from weights.io import DTYPES

from . import speed
from .config import DistillConfig
from .lora import LoRAConfig, copy_set, inject_lora, load_set
from .run_setup import teacher_set
from .sharding import is_sharded, loads_on_cpu, shard_model


class StudentError(ValueError):
    """A model SCFM cannot train, or settings this model cannot be prepared with, as one line."""


def lora_config(cfg: DistillConfig) -> LoRAConfig:
    """The run's LoRA: its family's target table (docs/method.md §6 in official names, distill/lora_targets.py);
    the flow-matching objective holds the live set alone (no EMA sets, no teacher)."""
    targets = get_family(cfg.lora.targets).part("lora_targets")
    live_only = {"sets": ("live",), "zero_sets": ()} if cfg.scfm.objective == "flow_matching" else {}
    return LoRAConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=targets, **live_only)


def family_refusal(config: DistillConfig, family: Family, guidance_embed: Callable[[], bool]) -> str | None:
    """What `family` refuses of the run's settings, as one line (None: nothing): another family's LoRA targets, a
    baked-in CFG for a family guided otherwise. `guidance_embed()` (whether the model has a guidance input) is
    asked only for that message: train.py reads it from the headers, the trainer from the loaded model."""
    if get_family(config.lora.targets) is not family:
        return (f"targets {config.lora.targets!r} are for another model; this one is {family.title}: pass "
                f"--targets {family.name}")
    if config.scfm.cfg_scale and family.guidance != "cfg":  # FLUX.1: dev has a guidance input, schnell none
        return (f"cfg_scale bakes in classifier-free guidance, which {family.display} does not train with "
                f"({family.display}-dev has a guidance input; this model has {'one' if guidance_embed() else 'none'}"
                "); pass --cfg_scale 0")
    return None


def model_family(model: nn.Module) -> Family:
    try:
        return family_of(model)
    except TypeError:
        raise StudentError(f"SCFM trains a transformer of a family scfm knows ({', '.join(names())}), not a "
                           f"{type(model).__name__}") from None


def prepare_student(model: nn.Module, config: DistillConfig, family: Family, device: torch.device,
                    world: int) -> tuple[nn.Module, list[str]]:
    """`model` with the run's LoRA sets, placed and wrapped for training on `device` (of `world` processes);
    also the names of its LoRA layers."""
    home = torch.device("cpu") if loads_on_cpu(config) else device
    if config.fp8_storage and not fp8_bytes(model):  # the loaders quantize as they read; a model built in
        quantize_linears_(model, home)  # memory (tiny) gets its block Linears quantized here
    # the base is cast before injection: LoRA and EMA tensors are created fp32 and must stay so (e4m3
    # storage is kept by its own `_apply`)
    model = model.to(device=home, dtype=DTYPES[config.dtype])
    layer_names = inject_lora(model, lora_config(config), torch.Generator().manual_seed(config.seed))
    model.to(home)
    n_blocks = len(named_blocks(model))
    if max(config.unchecked_blocks, 0) + config.blocks_to_swap > n_blocks:
        raise StudentError(f"unchecked_blocks {config.unchecked_blocks} + blocks_to_swap "
                           f"{config.blocks_to_swap} exceed this model's {n_blocks} blocks (a swapped block "
                           "must be checkpointed: its weights would stay on the GPU for backward)")
    # unchecked_blocks auto (-1) is planned on the first batch (distill/speed.py)
    model.enable_gradient_checkpointing(config.gradient_checkpointing, max(config.unchecked_blocks, 0))
    if config.lora.teacher_lora:  # any layout weights.lora reads, fitted to this run's rank and alpha
        load_set(model, "teacher", teacher_set(model, config.lora.teacher_lora, family))
        for ema in ("fast_ema", "slow_ema"):  # docs/method.md §3: EMAs start from the teacher LoRA
            copy_set(model, ema, "teacher")
    if is_sharded(config.fsdp):  # after every set exists: sets created later would not be sharded
        shard_model(model, device.type, world)
    if config.blocks_to_swap:  # after every set exists: the sets move to the device with the kept blocks
        try:
            BlockSwap(model, config.blocks_to_swap, device)
        except ValueError as e:
            raise StudentError(str(e)) from None
    try:
        speed.prepare(model, config, device)  # fp8 compute, compiled blocks
    except speed.SpeedError as e:
        raise StudentError(str(e)) from None
    return model, layer_names
