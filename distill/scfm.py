"""The SCFM objective (docs/method.md §2-§5): schedule sampler, shortcut target and loss, as pure functions.

Everything here talks to the network only through a velocity function

    velocity(x, sigma, cond, guidance) -> v        x (B, ...), sigma (B,) in [0, 1], guidance (B,) or None

and chooses LoRA weight sets with `distill.lora.weight_set(s)` on the model that function calls. No
family-specific scaling happens here (Flux's x1000 or SD3.5's sigma*1000 belong to the velocity function).

Random draws are keyed by (seed, step, position of the element in the global batch): each element has its own
generator, so the draws do not depend on how the batch is split over processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sampling.schedules import SCFM_FIRST_SIGMA, dynamic_mu, empirical_mu, scfm_grid

from .lora import weight_set, weight_sets

Velocity = Callable[[Tensor, Tensor, object, "Tensor | None"], Tensor]


@dataclass(frozen=True)
class SCFMConfig:
    t_skip: int = 2  # grid steps per student step
    teacher_steps_min: int = 32
    teacher_steps_max: int = 32
    teacher_ratio: float = 0.4  # share of teacher elements (first jump with the teacher weights)
    non_shortcut_ratio: float = 0.0  # share of elements that keep the plain flow-matching target eps - x0
    dynamic_shift_prob: float = 0.1  # the pipeline's resolution-dependent shift; otherwise a fixed U[min, max)
    # which one (the family's, weights/family.py): "linear" FLUX.1's mu of the image tokens; "empirical" FLUX.2's,
    # of the image tokens and the element's grid size (what klein's pipeline samples that many steps with)
    dynamic_shift: str = "linear"
    shift_min: float = 2.5
    shift_max: float = 4.5
    sigma_max: float = SCFM_FIRST_SIGMA  # s[0]: never pure noise
    guidance_max: float | None = 7.5  # Flux-dev: g ~ U[0, guidance_max) per element; None: no guidance input
    cfg_scale: float | None = None  # SD3.5: every call is c + w (c - u) with an empty negative; None: off

    def __post_init__(self):
        if self.t_skip < 2 or self.t_skip % 2:
            raise ValueError(f"t_skip must be even and >= 2 (two jumps of t_skip/2 steps), got {self.t_skip}")
        if not self.teacher_grid_sizes():
            lo, hi = self.teacher_steps_min, self.teacher_steps_max
            raise ValueError(f"no teacher grid size between {lo} and {hi}")
        if not self.self_grid_sizes():
            raise ValueError(f"teacher_steps_min {self.teacher_steps_min} leaves no self grid size")
        if any(n % self.t_skip for n in self.teacher_grid_sizes()):
            raise ValueError("teacher grid sizes must be multiples of t_skip")
        if self.dynamic_shift not in ("linear", "empirical"):
            raise ValueError(f"dynamic_shift must be 'linear' or 'empirical', got {self.dynamic_shift!r}")
        if not self.shift_min <= self.shift_max:
            raise ValueError(f"shift_min {self.shift_min} > shift_max {self.shift_max}")

    def teacher_grid_sizes(self) -> tuple[int, ...]:
        return tuple(range(max(self.teacher_steps_min, self.t_skip), self.teacher_steps_max + 1, self.t_skip))

    def self_grid_sizes(self) -> tuple[int, ...]:
        """2^1 .. 2^(log2(teacher_steps_min) - 1) that t_skip divides: {2, 4, 8, 16} by default."""
        top = int(math.log2(self.teacher_steps_min))
        return tuple(n for n in (2**e for e in range(1, top)) if n % self.t_skip == 0)


SCFM_CONFIGS: dict[str, SCFMConfig] = {
    "flux-dev": SCFMConfig(),
    "flux-schnell": SCFMConfig(guidance_max=None),
    "sd3.5": SCFMConfig(dynamic_shift_prob=0.0, guidance_max=None, cfg_scale=3.5),
}


# ----- keyed randomness and the schedule sampler ------------------------------------------------------------


def element_generators(seed: int, step: int, positions: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per element, seeded by a hash of (seed, step, global position)."""
    gens = []
    for p in positions:
        digest = hashlib.blake2b(f"scfm/{seed}/{step}/{p}".encode(), digest_size=8).digest()
        gens.append(torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1))  # 63 bits
    return gens


@dataclass(frozen=True)
class Draw:
    """Everything random about one training batch; (B,) per element unless noted."""

    teacher: Tensor  # bool: teacher element (first jump with the teacher weights)
    steps: Tensor  # long: grid size N
    dynamic: Tensor  # bool: the family's dynamic shift instead of the fixed one
    shift: Tensor  # float64: the fixed shift k (drawn for every element, used where not dynamic)
    start: Tensor  # long: start index i, a multiple of t_skip
    sigmas: Tensor  # (B, t_skip + 1) float64: s[i], ..., s[i + t_skip]
    shortcut: Tensor  # bool: shortcut target (False: plain eps - x0)
    guidance: Tensor | None  # float32, or None for models without a guidance input
    noise: Tensor  # (B, ...) float32

    @property
    def sigma(self) -> Tensor:  # (B,) float64
        return self.sigmas[:, 0]

    @property
    def dt(self) -> Tensor:  # (B, t_skip) float64 sub-steps
        return self.sigmas[:, :-1] - self.sigmas[:, 1:]

    @property
    def big_dt(self) -> Tensor:  # (B,) float64 student step Dt = s[i] - s[i + t_skip]
        return self.sigmas[:, 0] - self.sigmas[:, -1]

    def take(self, index: Tensor) -> Draw:
        """The elements `index` (B',) long, in that order."""
        return dataclasses.replace(self, **{f.name: _take(getattr(self, f.name), index)
                                            for f in dataclasses.fields(self)})


def sample_draw(
    config: SCFMConfig,
    generators: Sequence[torch.Generator],
    sample_shape: Sequence[int],
    image_tokens: int,
    positions: Sequence[int] | None = None,
    global_batch: int | None = None,
) -> Draw:
    """Per element: role, grid, shift, start, guidance, then noise of `sample_shape`, from its own generator.

    `positions` (default 0..B-1) are the elements' places in the global batch of `global_batch` (default B):
    the first ceil(global_batch * non_shortcut_ratio) places keep the plain flow-matching target.
    """
    b = len(generators)
    positions = list(range(b)) if positions is None else list(positions)
    global_batch = b if global_batch is None else global_batch
    n_plain = math.ceil(global_batch * config.non_shortcut_ratio)
    teacher_sizes, self_sizes = config.teacher_grid_sizes(), config.self_grid_sizes()
    rows = []
    for g in generators:
        # a fixed number of draws per element, whatever their outcome, so every field has its own stream
        u = torch.rand(6, generator=g, dtype=torch.float64).tolist()
        u_role, u_size, u_dyn, u_shift, u_start, u_guid = u
        teacher = u_role < config.teacher_ratio
        sizes = teacher_sizes if teacher else self_sizes
        n = sizes[int(u_size * len(sizes))]
        dynamic = u_dyn < config.dynamic_shift_prob
        shift = config.shift_min + (config.shift_max - config.shift_min) * u_shift
        starts = range(0, n - config.t_skip + 1, config.t_skip)
        start = starts[int(u_start * len(starts))]
        # the sampler's grid (sampling/schedules.py): a LoRA is trained on the grid `generate` samples it on
        used = shift
        if dynamic:
            linear = config.dynamic_shift == "linear"
            used = math.exp(dynamic_mu(image_tokens) if linear else empirical_mu(image_tokens, n))
        grid = scfm_grid(n, used, config.sigma_max)
        guidance = None if config.guidance_max is None else config.guidance_max * u_guid
        rows.append((teacher, n, dynamic, shift, start, grid[start:start + config.t_skip + 1], guidance))
    noise = torch.stack([torch.randn(tuple(sample_shape), generator=g) for g in generators])  # (B, ...)
    teacher, n, dynamic, shift, start, sigmas, guidance = zip(*rows)
    return Draw(
        teacher=torch.tensor(teacher), steps=torch.tensor(n), dynamic=torch.tensor(dynamic),
        shift=torch.tensor(shift, dtype=torch.float64), start=torch.tensor(start), sigmas=torch.stack(sigmas),
        shortcut=torch.tensor([p >= n_plain for p in positions]),
        guidance=None if config.guidance_max is None else torch.tensor(guidance, dtype=torch.float32),
        noise=noise,
    )


# ----- the shortcut target and the loss ---------------------------------------------------------------------


def cfg_velocity(velocity: Velocity, scale: float, uncond: object) -> Velocity:
    """v = v_c + w (v_c - v_u): the SD3.5 recipe's CFG (scale 1 + w in the usual convention), two calls."""

    def guided(x: Tensor, sigma: Tensor, cond: object, guidance: Tensor | None) -> Tensor:
        v_cond = velocity(x, sigma, cond, guidance)
        v_uncond = velocity(x, sigma, uncond, guidance)
        return v_cond + scale * (v_cond - v_uncond)

    return guided


def _take(obj, index: Tensor):
    """Batch elements `index` of a tensor, or of every tensor in a dict / list / tuple (conditioning, whose
    tensors are all per element: (B, ...))."""
    if obj is None:
        return None
    if isinstance(obj, Tensor):
        if obj.ndim == 0 or obj.shape[0] != len(index):
            raise ValueError(f"conditioning tensors must be per element (batch {len(index)}, ...); got "
                             f"{tuple(obj.shape)}: pass shared inputs (positions) to the velocity, not in cond")
        return obj.index_select(0, index.to(obj.device))
    if isinstance(obj, dict):
        return {k: _take(v, index) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_take(v, index) for v in obj)
    raise TypeError(f"cannot select batch elements of {type(obj).__name__}")


def _per_element(t: Tensor, like: Tensor) -> Tensor:
    return t.view(-1, *([1] * (like.ndim - 1)))  # (B,) -> (B, 1, ...)


@torch.no_grad()
def shortcut_target(
    velocity: Velocity, model: nn.Module, x_sigma: Tensor, draw: Draw, cond: object
) -> Tensor:
    """(x_sigma - x_end) / Dt over t_skip Euler sub-steps, in fp32 (B, ...).

    First t_skip/2 sub-steps: teacher elements use `teacher`, self elements `fast_ema`, in one batched call
    per sub-step. Remaining sub-steps: `slow_ema` for all.
    """
    device = x_sigma.device
    sigmas = draw.sigmas.to(device=device, dtype=torch.float32)  # (B, K + 1)
    dt = draw.dt.to(device=device, dtype=torch.float32)  # (B, K), differenced in fp64 before the cast
    guidance = None if draw.guidance is None else draw.guidance.to(device)
    first = ["teacher" if t else "fast_ema" for t in draw.teacher.tolist()]
    x_start = x_sigma.float()
    travelled = torch.zeros_like(x_start)  # sum_j dt_j v_j, fp32 whatever the model dtype
    k = dt.shape[1]
    for j in range(k):
        chooser = weight_sets(model, first, device=device) if j < k // 2 else weight_set(model, "slow_ema")
        with chooser:
            x_j = (x_start - travelled).to(x_sigma.dtype)  # x_sigma minus the sub-steps so far
            v = velocity(x_j, sigmas[:, j], cond, guidance)
        travelled += _per_element(dt[:, j], x_start) * v.float()
    return travelled / _per_element(draw.big_dt.to(device=device, dtype=torch.float32), x_start)


@dataclass(frozen=True)
class LossOutput:
    loss: Tensor  # () fp32, with gradient into the live LoRA
    per_element: Tensor  # (B,) fp32 detached
    target: Tensor  # (B, ...) fp32


def scfm_loss(velocity: Velocity, model: nn.Module, x0: Tensor, cond: object, draw: Draw, config: SCFMConfig,
              uncond: object = None) -> LossOutput:
    """Student (live set, with gradient) against the target: per-element MSE, uniform mean over the batch."""
    order = torch.argsort((~draw.teacher).to(torch.uint8), stable=True)  # (B,) teacher elements first
    if not torch.equal(order, torch.arange(len(order))):
        # The first jump picks a weight set per element; in this order each set is one contiguous run, which
        # the LoRA layers read and write as views (no gather / scatter per layer). Results come back in the
        # caller's order.
        out = scfm_loss(velocity, model, _take(x0, order), _take(cond, order), draw.take(order), config,
                        _take(uncond, order))
        back = torch.argsort(order).to(out.target.device)
        return LossOutput(out.loss, out.per_element[back], out.target[back])
    if config.cfg_scale is not None:
        if uncond is None:
            raise ValueError("cfg_scale is set: pass uncond (the empty negative prompt's conditioning)")
        velocity = cfg_velocity(velocity, config.cfg_scale, uncond)
    noise = draw.noise.to(device=x0.device, dtype=torch.float32)
    sigma = _per_element(draw.sigma.to(device=x0.device, dtype=torch.float32), noise)
    x_sigma = ((1.0 - sigma) * x0.float() + sigma * noise).to(x0.dtype)  # (B, ...)
    plain = noise - x0.float()  # the flow-matching velocity eps - x0
    if draw.shortcut.any():
        target = shortcut_target(velocity, model, x_sigma, draw, cond)
        target = torch.where(_per_element(draw.shortcut.to(x0.device), target), target, plain)
    else:
        target = plain
    guidance = None if draw.guidance is None else draw.guidance.to(x0.device)
    with weight_set(model, "live"):
        pred = velocity(x_sigma, sigma.flatten(), cond, guidance)
    per_element = (pred.float() - target).pow(2).flatten(1).mean(dim=1)  # (B,)
    return LossOutput(per_element.mean(), per_element.detach(), target)
