"""What `--resume` checks and restores once it has found an intact checkpoint.

A checkpoint another run wrote is refused (a later step than `--steps`, other fixed settings, other LoRA files,
another model, other training data), each refusal one line; what a resume may change is said. Then the LoRA sets
and the optimizer's state are loaded into this run's, and the optimizer takes the settings passed now.
distill/checkpoint.py owns the files and the comparisons these checks are made of; the trainer decides when to
resume, restores its progress, and reports a refusal (a CheckpointError here) as a TrainingError.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import (
    CheckpointError,
    changed_lora_files,
    load_optimizer_state,
    other_model,
    resume_changes,
    resume_conflicts,
)
from .config import DistillConfig, lr_at
from .data import Cache
from .lora import load_set


def check_resumable(path: Path, state: dict, config: DistillConfig, teacher_files: dict, model_now: dict,
                    cache: Cache) -> bool:
    """Refuse the checkpoint at `path` unless this run (`config`, the teacher's files, the model record
    `model_now`, `cache`) continues the one that wrote it. True when that run began before kohya's folder repeat
    counts were applied: it goes on drawing its batches without them."""
    if state["step"] > config.steps:  # training on would export the later weights stamped `steps`
        raise CheckpointError(f"{path} is at step {state['step']}; pass --steps {state['step']} or more (not "
                              f"{config.steps}) to continue that run, or export that checkpoint with "
                              f"`python -m distill.export {path}`")
    changed = resume_conflicts(state, config)
    if changed:
        raise CheckpointError(f"{path}: resuming with different {', '.join(changed)} would be another run")
    said = resume_changes(state, config)
    if said:  # stacklevel 3: where the trainer's resume was called, as its own warnings are
        warnings.warn(f"--resume: {', '.join(said)} (the values passed now apply from step "
                      f"{state['progress']['step'] + 1})", stacklevel=3)
    changed = changed_lora_files(state, teacher_files)
    if changed:
        raise CheckpointError(f"{path}: the files of {' and '.join(changed)} are not those that run trained with "
                              "(their sha256 differs); put those files back, or pass a new --output")
    other = other_model(state.get("model"), model_now)
    if other:
        raise CheckpointError(f"{path}: that run trained another model ({other}); pass its --model, or a new "
                              "--output to start a run on this one")
    if cache.repeats and state["cache"] in cache.fingerprints_before_repeats():
        warnings.warn(f"{path}: that run began without kohya's folder repeat counts and goes on without them; "
                      "a new --output applies them", stacklevel=3)
        return True
    if state["cache"] not in cache.fingerprints():
        raise CheckpointError(f"{path}: the cache ({cache.folder}) holds other training data than that run's "
                              "(images, captions, encoders or resolution); pass that run's --data and --cache, or "
                              "a new --output")
    return False


def load_training_state(path: Path, model: nn.Module, sets: list[str], optimizer: torch.optim.Optimizer,
                        names: list[str], tensors: dict[str, Tensor], state: dict) -> None:
    """The checkpoint's LoRA `sets` into `model` and its moments into `optimizer` (parameters `names`)."""
    try:
        for s in sets:
            prefix = f"lora.{s}."
            load_set(model, s, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        load_optimizer_state(optimizer, names, tensors, state["optimizer"])
    except (KeyError, ValueError) as e:  # what the checks above cannot see (other LoRA targets): one line
        raise CheckpointError(f"{path}: its LoRA does not fit this run ({str(e).strip(chr(34))}); resume with "
                              "that run's settings, or pass a new --output") from None


def apply_optimizer_config(optimizer: torch.optim.Optimizer, cfg: DistillConfig, last_step: int) -> None:
    """The config's AdamW settings replace a checkpoint's (which `load_state_dict` restores with the moments):
    a resume trains with what the user passes now, as log.jsonl and the export record. Each step then sets its
    lr from the schedule (config.lr_at: a function of the step), so no scheduler state needs restoring."""
    # the lr the schedule gives the checkpoint's last step: a changed --lr or schedule is reported, the decay not
    wanted = {"lr": lr_at(cfg, last_step), "weight_decay": cfg.weight_decay, "betas": (cfg.beta1, cfg.beta2),
              "eps": cfg.eps}
    # betas come back from state.json as a list
    before = {k: tuple(v) if isinstance(v, list) else v for k, v in optimizer.param_groups[0].items()}
    def said(v):  # 6 significant digits: the schedule's lr is a float sum (0.00025, not 0.0002500000000000001)
        return f"({', '.join(map(said, v))})" if isinstance(v, tuple) else f"{v:.6g}"

    changed = [f"{k} {said(before[k])} -> {said(v)}" for k, v in wanted.items() if before[k] != v]
    for group in optimizer.param_groups:
        group.update(wanted)
    if changed:
        warnings.warn(f"--resume: {', '.join(changed)} (the values passed now replace the checkpoint's)",
                      stacklevel=2)
