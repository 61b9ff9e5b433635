"""Exponential moving averages of the live LoRA, held as weight sets of the same layers (distill/lora.py).

After every optimiser step: fast <- 0.99 fast + 0.01 live, slow <- 0.999 slow + 0.001 live
(docs/method.md §4). The SD3.5 recipe also restarts both EMAs from live every `restart_every` updates, at
the released trainer's timing (see `ema_step`).
EMA sets are fp32: at decay 0.999 an update moves a weight by 1e-3 of the difference, which bf16
(8 mantissa bits) would mostly round away.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .lora import copy_set, set_tensors


@dataclass(frozen=True)
class EMAConfig:
    fast_decay: float = 0.99
    slow_decay: float = 0.999
    restart_every: int = 0  # steps between restarts from live; 0 = never (Flux). SD3.5 recipe: 2000
    source: str = "live"

    def __post_init__(self):
        for d in (self.fast_decay, self.slow_decay):
            if not 0.0 <= d < 1.0:
                raise ValueError(f"EMA decays must lie in [0, 1), got {d}")
        if self.restart_every < 0:
            raise ValueError(f"restart_every must be >= 0, got {self.restart_every}")

    def decays(self) -> dict[str, float]:
        return {"fast_ema": self.fast_decay, "slow_ema": self.slow_decay}


@torch.no_grad()
def ema_update(model: nn.Module, target: str, decay: float, source: str = "live") -> None:
    """target <- decay * target + (1 - decay) * source, over every LoRA layer, in fp32."""
    dst, src = set_tensors(model, target), set_tensors(model, source)
    if any(t.dtype != torch.float32 for t in dst):
        raise TypeError(f"EMA set {target!r} must be fp32")
    src = [t.detach().float() for t in src]  # no-op for the fp32 live set; upcasts a low-precision one
    # lerp(target, source, 1 - decay) is the EMA update in one fused pass over all tensors
    torch._foreach_lerp_(dst, src, 1.0 - decay)


def ema_restart(
    model: nn.Module, targets: tuple[str, ...] = ("fast_ema", "slow_ema"), source: str = "live"
) -> None:
    for target in targets:
        copy_set(model, target, source)


def ema_step(model: nn.Module, config: EMAConfig, step: int) -> None:
    """Call after optimiser update `step` (1-based, skipped steps not counted): update both EMAs, or restart
    them from live when it is time.

    Restarts come after updates R+1, 2R+1, ... (u > 1 and (u - 1) % R == 0), *instead of* that update's EMA
    step: the released trainer checks its step counter before incrementing it, so its restarts land one
    update later than "every R updates" reads (docs/method.md §4).
    """
    r = config.restart_every
    if r and step > 1 and (step - 1) % r == 0:
        ema_restart(model, tuple(config.decays()), config.source)
        return
    for target, decay in config.decays().items():
        ema_update(model, target, decay, config.source)
