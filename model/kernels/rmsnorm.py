"""RMSNorm over the last dimension: the torch reference (the spec, and the CPU path), the Triton kernels, and
the `scfm::rms_norm` custom op with its autograd formula.

The Triton math lives in `norm_scale` / `norm_backward` so the fused QK-norm + RoPE kernel reuses it verbatim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._triton_utils import (
    HAS_TRITON,
    MODE_DIFFUSERS,
    MODE_FLUX,
    as_4d,
    next_pow2,
    norm_out_dtype,
    row_tile,
    tl,
    triton,
)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    # Statistics in fp32, then round to the input dtype *before* the scale multiply: BFL's RMSNorm and
    # diffusers' RMSNorm (for a bf16/fp16 weight) both do exactly this, and bf16 parity depends on that
    # rounding point. fp64 inputs stay fp64 (promote, not .float()) so gradcheck and the fp64 oracle of the
    # tests mean something.
    x_dtype = x.dtype
    xf = x.to(torch.promote_types(x_dtype, torch.float32))
    rrms = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rrms).to(x_dtype) * weight


def rms_norm_diffusers_reference(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """diffusers `RMSNorm` (SD3.5's QK-norm parity target): variance in fp32, `x * rsqrt` promotes to fp32,
    the result is rounded to the weight dtype only when the weight is fp16/bf16; an fp32 weight gives an fp32
    output."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    h = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        h = h.to(weight.dtype)
    return h * weight


if HAS_TRITON:
    from ._triton_utils import round_to, row_offsets

    @triton.jit
    def norm_scale(x, w, eps, D, MODE: tl.constexpr, X_DTYPE: tl.constexpr, W_DTYPE: tl.constexpr):
        """x (BLOCK_M, BLOCK_D) and w (BLOCK_D,) already in the compute dtype, padding zeros. Returns (y,
        n_rounded): y = round(x * rstd) * w with the reference's rounding point, unrounded to the out
        dtype."""
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        n = x * rstd[:, None]
        if MODE == 0:
            n = round_to(n, X_DTYPE)
        elif W_DTYPE == tl.bfloat16 or W_DTYPE == tl.float16:
            n = round_to(n, W_DTYPE)
        return n * w[None, :], n

    @triton.jit
    def norm_backward(dy, x, w, eps, D, MODE: tl.constexpr, X_DTYPE: tl.constexpr, W_DTYPE: tl.constexpr):
        """dy = dL/dy (BLOCK_M, BLOCK_D). Returns (dx, dy * n_rounded), the latter summed over rows for
        dScale. rstd is recomputed: backward loads the whole row of x anyway, so saving it buys nothing in
        bandwidth. dx = rstd * (g - n * mean(g * n)) with g = dy * w and n = x * rstd; the rounding of n is a
        straight-through step, exactly as autograd treats the reference's `.to(dtype)`."""
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        n = x * rstd[:, None]
        g = dy * w[None, :]
        dx = (g - n * (tl.sum(g * n, axis=1) / D)[:, None]) * rstd[:, None]
        if MODE == 0:
            n = round_to(n, X_DTYPE)
        elif W_DTYPE == tl.bfloat16 or W_DTYPE == tl.float16:
            n = round_to(n, W_DTYPE)
        return dx, dy * n

    @triton.jit
    def _rms_norm_fwd_kernel(
        x_ptr, w_ptr, y_ptr, n_rows, H, L, D, eps,
        sx_b, sx_h, sx_l, sx_d, sy_b, sy_h, sy_l,
        MODE: tl.constexpr, FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # fp64 in -> fp64 math, or gradcheck's perturbations vanish in fp32 rounding
        ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
        x_off = row_offsets(rows, H, L, sx_b, sx_h, sx_l)[:, None] + cols[None, :] * sx_d
        x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(ACC)  # (BLOCK_M, BLOCK_D); never bf16 math
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(ACC)
        y, _ = norm_scale(x, w, eps, D, MODE, x_ptr.dtype.element_ty, w_ptr.dtype.element_ty)
        y_off = row_offsets(rows, H, L, sy_b, sy_h, sy_l)[:, None] + cols[None, :]
        out_ty = y_ptr.dtype.element_ty
        tl.store(y_ptr + y_off, round_to(y, out_ty).to(out_ty), mask=mask)

    @triton.jit
    def _rms_norm_bwd_kernel(
        dy_ptr, x_ptr, w_ptr, dx_ptr, dw_ptr, n_rows, H, L, D, eps,
        sdy_b, sdy_h, sdy_l, sdy_d, sx_b, sx_h, sx_l, sx_d, sdx_b, sdx_h, sdx_l,
        MODE: tl.constexpr, FP64: tl.constexpr, NEED_DW: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
        dy_off = row_offsets(rows, H, L, sdy_b, sdy_h, sdy_l)[:, None] + cols[None, :] * sdy_d
        x_off = row_offsets(rows, H, L, sx_b, sx_h, sx_l)[:, None] + cols[None, :] * sx_d
        dy = tl.load(dy_ptr + dy_off, mask=mask, other=0.0).to(ACC)
        x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(ACC)
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(ACC)
        dx, dyn = norm_backward(dy, x, w, eps, D, MODE, x_ptr.dtype.element_ty, w_ptr.dtype.element_ty)
        dx_off = row_offsets(rows, H, L, sdx_b, sdx_h, sdx_l)[:, None] + cols[None, :]
        dx_ty = dx_ptr.dtype.element_ty
        tl.store(dx_ptr + dx_off, round_to(dx, dx_ty).to(dx_ty), mask=mask)
        if NEED_DW:
            # One partial row per program, summed by torch afterwards: deterministic, no atomics (Liger,
            # flash-attn).
            tl.store(dw_ptr + pid * D + cols, tl.sum(dyn, axis=0), mask=cols < D)

    def _launch_fwd(x: Tensor, weight: Tensor, eps: float, mode: int) -> Tensor:
        x4 = as_4d(x)  # (B, H, L, D), any strides
        B, H, L, D = x4.shape
        y = torch.empty(x.shape, dtype=norm_out_dtype(x.dtype, weight.dtype, mode), device=x.device)
        y4 = as_4d(y)
        n_rows, block_d = B * H * L, next_pow2(D)
        block_m, warps = row_tile(_rms_norm_fwd_kernel, n_rows, block_d)
        if n_rows:
            _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
                x4, weight, y4, n_rows, H, L, D, eps, *x4.stride(), *y4.stride()[:3],
                MODE=mode, FP64=x.dtype == torch.float64, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
            )  # fmt: skip
        return y

    def _launch_bwd(dy: Tensor, x: Tensor, weight: Tensor, eps: float, mode: int, need_dw: bool):
        x4, dy4 = as_4d(x), as_4d(dy)
        B, H, L, D = x4.shape
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        dx4 = as_4d(dx)
        n_rows, block_d = B * H * L, next_pow2(D)
        block_m, warps = row_tile(_rms_norm_bwd_kernel, n_rows, block_d)
        grid = triton.cdiv(n_rows, block_m)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        partial = torch.zeros((grid if need_dw else 0, D), dtype=acc, device=x.device)  # (programs, D)
        if n_rows:
            _rms_norm_bwd_kernel[(grid,)](
                dy4, x4, weight, dx4, partial, n_rows, H, L, D, eps,
                *dy4.stride(), *x4.stride(), *dx4.stride()[:3],
                MODE=mode, FP64=x.dtype == torch.float64, NEED_DW=need_dw,
                BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
            )  # fmt: skip
        dw = partial.sum(0).to(weight.dtype) if need_dw else weight.new_empty(0)
        return dx, dw

    @torch.library.custom_op("scfm::rms_norm", mutates_args=())
    def rms_norm_op(x: Tensor, weight: Tensor, eps: float, mode: int) -> Tensor:
        """x (..., D) any strides, weight (D,); returns a contiguous (..., D) in the reference's dtype."""
        return _launch_fwd(x, weight, eps, mode)

    @rms_norm_op.register_fake
    def _(x, weight, eps, mode):
        return x.new_empty(x.shape, dtype=norm_out_dtype(x.dtype, weight.dtype, mode))

    @torch.library.custom_op("scfm::rms_norm_backward", mutates_args=())
    def rms_norm_backward_op(
        dy: Tensor, x: Tensor, weight: Tensor, eps: float, mode: int, need_dw: bool
    ) -> tuple[Tensor, Tensor]:
        """Returns (dx, dScale); dScale is an empty tensor when need_dw is False (frozen LoRA base scales)."""
        return _launch_bwd(dy, x, weight, eps, mode, need_dw)

    @rms_norm_backward_op.register_fake
    def _(dy, x, weight, eps, mode, need_dw):
        return x.new_empty(x.shape), weight.new_empty(weight.shape if need_dw else (0,))

    def _setup_context(ctx, inputs, output):
        x, weight, eps, mode = inputs
        ctx.save_for_backward(x, weight)
        ctx.eps, ctx.mode = eps, mode

    def _backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need_dw = ctx.needs_input_grad[1]  # the frozen-scale fast path: no dScale pass, no partial buffer
        dx, dw = rms_norm_backward_op(dy, x, weight, ctx.eps, ctx.mode, need_dw)
        return dx, (dw if need_dw else None), None, None

    # register_autograd builds the autograd.Function for the op, which keeps compile and opcheck happy.
    rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def rms_norm_triton(x: Tensor, weight: Tensor, eps: float = 1e-6, mode: int = MODE_FLUX) -> Tensor:
    return torch.ops.scfm.rms_norm(x, weight, eps, mode)


__all__ = [
    "MODE_DIFFUSERS",
    "MODE_FLUX",
    "rms_norm_reference",
    "rms_norm_diffusers_reference",
    "rms_norm_triton",
]
