"""Euler sampling over a sigma grid, and guidance as small wrappers around a velocity function.

A velocity function is `velocity(x, sigma, cond, guidance) -> v` with sigma a (B,) float32 tensor in [0, 1]; the
family's wrapper (elsewhere) owns latent packing, timestep scaling and dtype rounding, so nothing here knows which
model runs. The flow convention is diffusers': x_sigma = sigma * noise + (1 - sigma) * x0 and v = noise - x0, so an
Euler step is x += (sigma_next - sigma) * v.

Guidance variants compose: `true_cfg(velocity, negative, scale)` and `sd3_cfg(velocity, uncond, scale)` return a new
velocity function; Flux's guidance embedding is just the `guidance` value handed through to the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Velocity = Callable[[Tensor, Tensor, Any, "Tensor | None"], Tensor]
# callback(step, num_steps, x): called after each step with the new latents; `step` counts from 1.
Callback = Callable[[int, int, Tensor], None]


def add_noise(x0: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
    """The flow-matching forward process sigma * noise + (1 - sigma) * x0 (diffusers' `scale_noise`).

    A (B,) sigma broadcasts over the batch; it is cast to x0's dtype first, as diffusers does.
    """
    sigma = torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device)
    sigma = sigma.reshape(sigma.shape + (1,) * (x0.ndim - sigma.ndim))  # (B,) -> (B, 1, ..., 1)
    return sigma * noise + (1.0 - sigma) * x0


def euler_step(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """x + (sigma_next - sigma) * v, rounded like diffusers' `FlowMatchEulerDiscreteScheduler.step`.

    diffusers upcasts the sample to fp32 but multiplies dt (a 0-dim fp32 tensor) by v in v's dtype (a 0-dim tensor
    does not promote a bf16 one), adds in fp32 and casts the result to v's dtype. Doing the same keeps a bf16 run
    bit-identical to diffusers'.
    """
    dt = (sigma_next.float() - sigma.float()).reshape(())
    return (x.float() + dt * v).to(v.dtype)


def euler(velocity: Velocity, x: Tensor, sigmas: Tensor, cond: Any = None, guidance: Tensor | None = None, *,
          callback: Callback | None = None) -> Tensor:
    """Integrate from sigmas[0] to sigmas[-1] with one velocity call per step.

    x: (B, ...) noise at sigmas[0]; sigmas: the (N + 1,) grid from `sampling.schedules`. `cond` and `guidance` are
    passed to `velocity` unchanged.
    """
    sigmas = sigmas.to(device=x.device, dtype=torch.float32)
    num_steps = len(sigmas) - 1
    for i in range(num_steps):
        sigma = sigmas[i].expand(x.shape[0])  # (B,)
        v = velocity(x, sigma, cond, guidance)
        x = euler_step(x, v, sigmas[i], sigmas[i + 1])
        if callback is not None:
            callback(i + 1, num_steps, x)
    return x


# ----------------------------------------------------------------------------------------------------------------
# guidance


def flux_guidance(scale: float, batch: int, device: torch.device | str | None = None) -> Tensor:
    """Flux-dev's distilled guidance: the value handed to the model's guidance embedding, (B,) float32 like
    FluxPipeline's `full([1], scale).expand(B)`."""
    return torch.full((1,), float(scale), dtype=torch.float32, device=device).expand(batch)


def cat_cond(a: Any, b: Any) -> Any:
    """Concatenate two conditionings along the batch: tensors by `torch.cat`, dicts / tuples / lists leaf by leaf,
    None stays None."""
    if a is None and b is None:
        return None
    if isinstance(a, Tensor):
        return torch.cat([a, b], dim=0)
    if isinstance(a, dict):
        return {k: cat_cond(a[k], b[k]) for k in a}
    if isinstance(a, (tuple, list)):
        return type(a)(cat_cond(x, y) for x, y in zip(a, b, strict=True))
    raise TypeError(f"cat_cond: cannot batch a {type(a).__name__}; use tensors, dicts, tuples or lists")


def true_cfg(velocity: Velocity, negative: Any, scale: float) -> Velocity:
    """FluxPipeline's true CFG: neg + scale * (pos - neg), the negative prompt in a second, separate call.

    Like diffusers, guidance is on only for scale > 1; otherwise the plain velocity is returned.
    """
    if scale <= 1:
        return velocity

    def guided(x: Tensor, sigma: Tensor, cond: Any, guidance: Tensor | None) -> Tensor:
        pos = velocity(x, sigma, cond, guidance)
        neg = velocity(x, sigma, negative, guidance)
        return neg + scale * (pos - neg)

    return guided


def sd3_cfg(velocity: Velocity, uncond: Any, scale: float) -> Velocity:
    """StableDiffusion3Pipeline's CFG: one batched call on [uncond, cond], then u + scale * (c - u).

    On only for scale > 1, as in diffusers. SCFM writes guidance as cond + w * (cond - uncond): that is
    scale = 1 + w (`cfg_scale_from_w`).
    """
    if scale <= 1:
        return velocity

    def guided(x: Tensor, sigma: Tensor, cond: Any, guidance: Tensor | None) -> Tensor:
        both = velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), cat_cond(uncond, cond), guidance)
        u, c = both.chunk(2)  # (2B, ...) -> 2 x (B, ...): uncond first, as diffusers orders the batch
        return u + scale * (c - u)

    return guided


def cfg_scale_from_w(w: float) -> float:
    """SCFM's cond + w (cond - uncond) equals diffusers' uncond + s (cond - uncond) with s = 1 + w."""
    return 1.0 + w
