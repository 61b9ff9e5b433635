"""Sigma grids for flow-matching samplers: sigmas in [0, 1], N + 1 values from (about) 1 down to exactly 0.

Two named grids, each with a fixed or a dynamic (resolution-dependent) shift:
- `diffusers`: what `FlowMatchEulerDiscreteScheduler.set_timesteps` produces inside each family's diffusers
  pipeline. FluxPipeline passes `linspace(1, 1/N, N)`; StableDiffusion3Pipeline lets the scheduler take
  `linspace(sigma_max, sigma_min, N)` of its *already shifted* training grid, so with shift 3 the last nonzero
  sigma is shifted twice (0.008929 rather than 0.002994). A terminal 0 is appended.
- `scfm`: the grid SCFM trains on, `linspace(1, 0, N + 1)` shifted, with s[0] = 1 - 1e-5 (never exactly pure noise).

The shift: `shift(sigma) = s * sigma / (1 + (s - 1) * sigma)`. Flux's dynamic shift is the same map with
s = exp(mu), mu linear in the packed image sequence length (0.5 at 256 tokens, 1.15 at 4096, extrapolated beyond).
The `diffusers` grid is bit-identical to the scheduler's; `scfm` is computed in float64. Both return float32.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

GRIDS = ("diffusers", "scfm")
PIPELINES = ("FluxPipeline", "StableDiffusion3Pipeline")  # whose `diffusers` grid (see ScheduleConfig)
SCFM_FIRST_SIGMA = 1 - 1e-5
_NUM_TRAIN_TIMESTEPS = 1000  # diffusers' training grid: sigmas k / 1000 for k = 1..1000


@dataclass(frozen=True)
class ScheduleConfig:
    grid: str = "diffusers"  # "diffusers" or "scfm"
    # Which diffusers pipeline's grid `diffusers` reproduces: "FluxPipeline" (linspace(1, 1/N, N)) or
    # "StableDiffusion3Pipeline" (the scheduler's own linspace over its shifted training grid).
    pipeline: str = "FluxPipeline"
    shift: float = 1.0  # fixed shift, used when dynamic is False
    dynamic: bool = False  # resolution-dependent shift: s = exp(mu(image_seq_len))
    base_shift: float = 0.5  # mu at base_seq_len tokens
    max_shift: float = 1.15  # mu at max_seq_len tokens
    base_seq_len: int = 256
    max_seq_len: int = 4096
    # How a dynamic shift's mu is found: "linear" (FLUX.1: linear in the image tokens, from base_shift at
    # base_seq_len to max_shift at max_seq_len) or "empirical" (FLUX.2: `empirical_mu`, of the tokens and steps)
    mu: str = "linear"

    def __post_init__(self):
        if self.grid not in GRIDS:
            raise ValueError(f"ScheduleConfig: grid must be one of {GRIDS}, got {self.grid!r}")
        if self.pipeline not in PIPELINES:
            raise ValueError(f"ScheduleConfig: pipeline must be one of {PIPELINES}, got {self.pipeline!r}")
        if not self.dynamic and not self.shift > 0:
            raise ValueError(f"ScheduleConfig: shift must be positive, got {self.shift}")
        if self.mu not in ("linear", "empirical"):
            raise ValueError(f"ScheduleConfig: mu must be 'linear' or 'empirical', got {self.mu!r}")
        if self.max_seq_len == self.base_seq_len:
            raise ValueError("ScheduleConfig: max_seq_len must differ from base_seq_len")


# Each released model's diffusers default (the scheduler config shipped with it).
SCHEDULES: dict[str, ScheduleConfig] = {
    "flux-dev": ScheduleConfig(pipeline="FluxPipeline", dynamic=True),
    "flux-schnell": ScheduleConfig(pipeline="FluxPipeline", shift=1.0),
    "sd3.5": ScheduleConfig(pipeline="StableDiffusion3Pipeline", shift=3.0),
    # Flux2KleinPipeline (base and distilled): FLUX.1-dev's scheduler config, fed its empirical mu
    "flux2-klein": ScheduleConfig(pipeline="FluxPipeline", dynamic=True, mu="empirical"),
}


def schedule_for(model: str, grid: str = "diffusers", shift: float | str | None = None) -> ScheduleConfig:
    """A released model's default schedule (SCHEDULES) on `grid`; `shift` overrides it: a number (fixed) or
    "dynamic"."""
    if model not in SCHEDULES:
        raise ValueError(f"unknown model {model!r}; expected one of {sorted(SCHEDULES)}")
    config = dataclasses.replace(SCHEDULES[model], grid=grid)
    if shift is None:
        return config
    if isinstance(shift, str):
        if shift.strip().lower() == "dynamic":
            return dataclasses.replace(config, dynamic=True)
        try:
            shift = float(shift)
        except ValueError:
            raise ValueError(f"shift must be a number or 'dynamic', got {shift!r}") from None
    return dataclasses.replace(config, dynamic=False, shift=float(shift))


def dynamic_mu(image_seq_len: int, config: ScheduleConfig = SCHEDULES["flux-dev"]) -> float:
    """Flux's mu: linear in the packed image sequence length ((H/16) * (W/16) tokens for an H x W image)."""
    m = (config.max_shift - config.base_shift) / (config.max_seq_len - config.base_seq_len)
    return image_seq_len * m + (config.base_shift - m * config.base_seq_len)


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """s * sigma / (1 + (s - 1) * sigma). Also the exponential time shift with s = exp(mu), written so sigma = 0
    maps to 0 without dividing by zero."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _exp_shift(sigmas: Tensor, e: float) -> Tensor:
    """diffusers' exponential time shift e / (e + (1/sigma - 1)), rounded as numpy rounds it: e is cast to the
    grid's dtype first, and the division is a true one (torch's `scalar / tensor` multiplies by a reciprocal,
    rounding twice)."""
    e = torch.tensor(e, dtype=sigmas.dtype)
    return torch.div(e, e + (1 / sigmas - 1))


def empirical_mu(image_seq_len: int, steps: int) -> float:
    """FLUX.2's mu (BFL `get_schedule`, diffusers `compute_empirical_mu`; docs/flux2.md §4): past 4300 image
    tokens linear in them alone; below, linear in the step count between a 10-step and a 200-step line."""
    a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m200, m10 = a2 * image_seq_len + b2, a1 * image_seq_len + b1
    a = (m200 - m10) / 190.0
    b = m200 - 200.0 * a  # in this order: a seed then means diffusers' grid to the last bit
    return float(a * steps + b)


def effective_shift(config: ScheduleConfig, image_seq_len: int | None = None, steps: int | None = None) -> float:
    if not config.dynamic:
        return config.shift
    if image_seq_len is None:
        raise ValueError("a dynamic shift needs image_seq_len (packed image tokens, (H/16) * (W/16))")
    if config.mu == "empirical":
        if steps is None:
            raise ValueError("FLUX.2's empirical shift needs the step count too")
        return math.exp(empirical_mu(image_seq_len, steps))
    return math.exp(dynamic_mu(image_seq_len, config))


def scfm_grid(steps: int, shift: float, first_sigma: float = SCFM_FIRST_SIGMA) -> Tensor:
    """SCFM's grid in float64: linspace(1, 0, steps + 1) shifted by `shift` (exp(mu) for Flux's dynamic shift),
    s[0] = first_sigma. The one grid both sides use: the trainer draws its sub-grids from it
    (distill/scfm.py `sample_draw`) and `get_sigmas` samples on its float32 rounding, so a LoRA is sampled on
    the grid it was trained on."""
    sigmas = shift_sigmas(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)
    sigmas[0] = first_sigma
    return sigmas


def get_sigmas(config: ScheduleConfig | str, steps: int, image_seq_len: int | None = None,
               device: torch.device | str | None = None) -> Tensor:
    """The (steps + 1,) float32 sigma grid, from ~1 down to 0. `config` is a ScheduleConfig or a SCHEDULES name."""
    if isinstance(config, str):
        config = schedule_for(config)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    s = effective_shift(config, image_seq_len, steps)  # exp(mu) when dynamic
    if config.grid == "scfm":
        return scfm_grid(steps, s).to(dtype=torch.float32, device=device)
    # The diffusers grid repeats the scheduler's arithmetic (numpy linspace, the same dtypes, the same operation
    # order) so the sigmas are bit-identical to diffusers', not just close: a seed then means the same image.
    if config.pipeline == "FluxPipeline":
        # FluxPipeline passes np.linspace(1, 1/N, N); the scheduler casts it to float32 and shifts in float32.
        base = torch.from_numpy(np.linspace(1.0, 1.0 / steps, steps).astype(np.float32))
        sigmas = _exp_shift(base, s) if config.dynamic else shift_sigmas(base, s)
    else:
        # StableDiffusion3Pipeline lets the scheduler space N values over its training grid, whose end 1/1000 was
        # already shifted (in float32) when the shift is fixed; those values are shifted again in float64.
        sigma_min = torch.tensor(1.0, dtype=torch.float32) / _NUM_TRAIN_TIMESTEPS
        if not config.dynamic:
            sigma_min = shift_sigmas(sigma_min, config.shift)
        base = torch.from_numpy(np.linspace(1.0 * _NUM_TRAIN_TIMESTEPS, sigma_min.item() * _NUM_TRAIN_TIMESTEPS, steps))
        base = base / _NUM_TRAIN_TIMESTEPS
        sigmas = _exp_shift(base, s) if config.dynamic else shift_sigmas(base, s)
    sigmas = torch.cat([sigmas.float(), torch.zeros(1)])
    return sigmas.to(device=device)
