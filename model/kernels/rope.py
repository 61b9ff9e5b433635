"""Rotary position embedding on interleaved pairs (x[2j], x[2j+1]), Flux's layout: the torch reference (the
spec), the Triton kernel, and the `scfm::rope` custom op. Backward is the same kernel with -sin (the inverse
rotation)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._triton_utils import HAS_TRITON, next_pow2, row_tile, tl, triton


def rope_reference(x: Tensor, pe: Tensor) -> Tensor:
    """x (B, H, L, D); pe (B or 1, 1, L, D/2, 2) fp32 holding (cos, sin). Computed in fp32, cast back."""
    compute = torch.promote_types(x.dtype, torch.float32)  # fp64 stays fp64 for gradcheck and the fp64 oracle
    xf = x.to(compute).unflatten(-1, (-1, 2))  # (B, H, L, D/2, 2)
    x0, x1 = xf.unbind(-1)
    cos, sin = pe.to(compute).unbind(-1)  # (B or 1, 1, L, D/2)
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return out.flatten(-2).to(x.dtype)


def check_pe(x: Tensor, pe: Tensor) -> None:
    B, _, L, D = x.shape
    if pe.ndim != 5 or pe.shape[1] != 1 or pe.shape[0] not in (1, B) or tuple(pe.shape[2:]) != (L, D // 2, 2):
        raise ValueError(f"pe must be (B or 1, 1, L, D/2, 2) for x {tuple(x.shape)}, got {tuple(pe.shape)}")
    if D % 2:
        raise ValueError(f"RoPE needs an even head dim, got {D}")


def pe_rows(pe: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """-> (pe, (batch stride, token stride)). The kernels read a token's D floats (cos, sin, cos, sin, ...) as
    one contiguous run, which compiles to 128-bit loads; Flux's table (and any L-slice of it) already is
    one."""
    if pe.stride(-1) != 1 or pe.stride(-2) != 2:
        pe = pe.contiguous()
    return pe, (pe.stride(0) if pe.shape[0] > 1 else 0, pe.stride(2))  # batch stride 0: one table for all


if HAS_TRITON:
    from ._triton_utils import rotate_pairs, round_to, row_offsets

    @triton.jit
    def load_pe(pe_ptr, rows, row_mask, cols, H, L, D, sp_b, sp_l, BLOCK_M: tl.constexpr):
        """(cos, sin) for each column of a (BLOCK_M, BLOCK_D) tile: column c holds pair c // 2, entry c % 2.
        Rows are (b, l, h) with h fastest (see row_offsets), so the heads of one token share one table row."""
        bl = rows // H
        off = ((bl // L).to(tl.int64) * sp_b + (bl % L).to(tl.int64) * sp_l)[:, None] + cols[None, :]
        return tl.load(pe_ptr + off, mask=row_mask[:, None] & (cols < D)[None, :], other=0.0)

    @triton.jit
    def _rope_kernel(
        x_ptr, pe_ptr, y_ptr, n_rows, H, L, D,
        sx_b, sx_h, sx_l, sx_d, sp_b, sp_l, sy_b, sy_h, sy_l,
        CONJ: tl.constexpr, FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & (cols < D)[None, :]
        x_off = row_offsets(rows, H, L, sx_b, sx_h, sx_l)[:, None] + cols[None, :] * sx_d
        x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(ACC)  # (BLOCK_M, BLOCK_D)
        pe = load_pe(pe_ptr, rows, row_mask, cols, H, L, D, sp_b, sp_l, BLOCK_M).to(ACC)
        y = rotate_pairs(x, pe, CONJ, BLOCK_M, BLOCK_D)
        y_off = row_offsets(rows, H, L, sy_b, sy_h, sy_l)[:, None] + cols[None, :]
        out_ty = y_ptr.dtype.element_ty
        tl.store(y_ptr + y_off, round_to(y, out_ty).to(out_ty), mask=mask)

    def _launch(x: Tensor, pe: Tensor, conj: bool) -> Tensor:
        B, H, L, D = x.shape
        pe, pe_sb_sl = pe_rows(pe)
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # (B, H, L, D) contiguous
        n_rows, block_d = B * H * L, next_pow2(D)
        block_m, warps = row_tile(_rope_kernel, n_rows, block_d)
        if n_rows:
            _rope_kernel[(triton.cdiv(n_rows, block_m),)](
                x, pe, y, n_rows, H, L, D, *x.stride(), *pe_sb_sl, *y.stride()[:3],
                CONJ=conj, FP64=x.dtype == torch.float64, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
            )  # fmt: skip
        return y

    @torch.library.custom_op("scfm::rope", mutates_args=())
    def rope_op(x: Tensor, pe: Tensor, conj: bool) -> Tensor:
        """x (B, H, L, D) any strides; pe (B or 1, 1, L, D/2, 2). conj=True applies the inverse rotation."""
        check_pe(x, pe)
        return _launch(x, pe, conj)

    @rope_op.register_fake
    def _(x, pe, conj):
        check_pe(x, pe)
        return x.new_empty(x.shape)

    def _setup_context(ctx, inputs, output):
        _, pe, conj = inputs
        ctx.save_for_backward(pe)
        ctx.conj = conj

    def _backward(ctx, dy):
        # The rotation is orthogonal, so its vector-Jacobian product is the opposite rotation. pe is a table
        # of positions, never trained: the dispatcher routes a pe that requires grad to the reference.
        (pe,) = ctx.saved_tensors
        return rope_op(dy, pe, not ctx.conj), None, None

    rope_op.register_autograd(_backward, setup_context=_setup_context)


def rope_triton(x: Tensor, pe: Tensor) -> Tensor:
    return torch.ops.scfm.rope(x, pe, False)
