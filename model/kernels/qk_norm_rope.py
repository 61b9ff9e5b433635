"""QK-RMSNorm followed by RoPE (Flux), and QK-RMSNorm alone (SD3.5): torch references, one fused Triton kernel
for q and k together (forward and backward), and the custom ops

    scfm::qk_norm_rope(q, k, q_scale, k_scale, pe?, eps, mode) -> (q, k)               one (joint) sequence
    scfm::qk_norm_rope_joint(txt_q, txt_k, img_q, img_k, 4 scales, pe, eps) -> (q, k)  Flux double block

q and k are read through their strides, so the views that `rearrange(qkv, "B L (K H D) -> K B H L D")` makes
cost no copy, and the outputs are written contiguous in (B, H, L, D), the layout SDPA consumes. The joint op
writes each stream straight into its slice of the joint (text first) buffer, which absorbs the two
`torch.cat`s of q and k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._triton_utils import (
    HAS_TRITON,
    MODE_DIFFUSERS,
    MODE_FLUX,
    next_pow2,
    norm_out_dtype,
    row_tile,
    tl,
    triton,
)
from .rmsnorm import rms_norm_diffusers_reference, rms_norm_reference
from .rope import check_pe, pe_rows, rope_reference


def qk_norm_rope_reference(
    q: Tensor, k: Tensor, q_scale: Tensor, k_scale: Tensor, pe: Tensor | None, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """q, k (B, H, L, D), possibly strided views of a qkv projection; pe as in `rope_reference` or None."""
    q = rms_norm_reference(q, q_scale, eps)
    k = rms_norm_reference(k, k_scale, eps)
    if pe is not None:
        q, k = rope_reference(q, pe), rope_reference(k, pe)
    return q, k


def qk_norm_reference(q: Tensor, k: Tensor, q_scale: Tensor, k_scale: Tensor, eps: float = 1e-6):
    """SD3.5 QK-norm with diffusers' casting (the parity target), no RoPE."""
    return rms_norm_diffusers_reference(q, q_scale, eps), rms_norm_diffusers_reference(k, k_scale, eps)


def qk_norm_rope_joint_reference(
    txt_q,
    txt_k,
    img_q,
    img_k,
    txt_q_scale,
    txt_k_scale,
    img_q_scale,
    img_k_scale,
    pe: Tensor,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Flux double block: norm each stream with its own scales, cat (text first) along L, then RoPE on the
    joint sequence; pe covers L_txt + L_img tokens."""
    tq, tk = qk_norm_rope_reference(txt_q, txt_k, txt_q_scale, txt_k_scale, None, eps)
    iq, ik = qk_norm_rope_reference(img_q, img_k, img_q_scale, img_k_scale, None, eps)
    q, k = torch.cat((tq, iq), dim=2), torch.cat((tk, ik), dim=2)  # (B, H, L_txt + L_img, D)
    return rope_reference(q, pe), rope_reference(k, pe)


def _check(q: Tensor, k: Tensor, pe: Tensor | None) -> None:
    if q.ndim != 4 or q.shape != k.shape or q.dtype != k.dtype:
        raise ValueError(f"q and k must be (B, H, L, D) of one shape and dtype, got {q.shape} and {k.shape}")
    if pe is not None:
        check_pe(q, pe)


if HAS_TRITON:
    from ._triton_utils import rotate_pairs, round_to, row_offsets
    from .rmsnorm import norm_backward, norm_scale
    from .rope import load_pe

    @triton.jit
    def _tile_fwd(
        x_ptr, w_ptr, y_ptr, pe_ptr, rows, cols, n_rows, H, L, D, eps,
        sx_b, sx_h, sx_l, sx_d, sy_b, sy_h, sy_l, sp_b, sp_l,
        MODE: tl.constexpr, HAS_PE: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        row_mask = rows < n_rows
        mask = row_mask[:, None] & (cols < D)[None, :]
        x_off = row_offsets(rows, H, L, sx_b, sx_h, sx_l)[:, None] + cols[None, :] * sx_d
        x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(ACC)  # (BLOCK_M, BLOCK_D)
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(ACC)
        y, _ = norm_scale(x, w, eps, D, MODE, x_ptr.dtype.element_ty, w_ptr.dtype.element_ty)
        out_ty = y_ptr.dtype.element_ty
        if HAS_PE:
            # The reference materialises the norm output in out_ty before RoPE reads it: same rounding point
            # here.
            pe = load_pe(pe_ptr, rows, row_mask, cols, H, L, D, sp_b, sp_l, BLOCK_M).to(ACC)
            y = rotate_pairs(round_to(y, out_ty), pe, False, BLOCK_M, BLOCK_D)
        y_off = row_offsets(rows, H, L, sy_b, sy_h, sy_l)[:, None] + cols[None, :]
        tl.store(y_ptr + y_off, round_to(y, out_ty).to(out_ty), mask=mask)

    @triton.jit
    def _qk_fwd_kernel(
        q_ptr, k_ptr, qw_ptr, kw_ptr, qo_ptr, ko_ptr, pe_ptr, n_rows, H, L, D, eps,
        sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, so_b, so_h, so_l, sp_b, sp_l,
        MODE: tl.constexpr, HAS_PE: tl.constexpr, FP64: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # grid (row tiles, 2): axis 1 picks q or k, so both tensors go in one launch.
        ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        if tl.program_id(1) == 0:
            _tile_fwd(q_ptr, qw_ptr, qo_ptr, pe_ptr, rows, cols, n_rows, H, L, D, eps, sq_b, sq_h, sq_l, sq_d,
                      so_b, so_h, so_l, sp_b, sp_l, MODE, HAS_PE, ACC, BLOCK_M, BLOCK_D)  # fmt: skip
        else:
            _tile_fwd(k_ptr, kw_ptr, ko_ptr, pe_ptr, rows, cols, n_rows, H, L, D, eps, sk_b, sk_h, sk_l, sk_d,
                      so_b, so_h, so_l, sp_b, sp_l, MODE, HAS_PE, ACC, BLOCK_M, BLOCK_D)  # fmt: skip

    @triton.jit
    def _tile_bwd(
        dy_ptr, x_ptr, w_ptr, dx_ptr, dw_ptr, pe_ptr, rows, cols, n_rows, H, L, D, eps,
        sdy_b, sdy_h, sdy_l, sdy_d, sx_b, sx_h, sx_l, sx_d, sdx_b, sdx_h, sdx_l, sp_b, sp_l,
        MODE: tl.constexpr, HAS_PE: tl.constexpr, NEED_DW: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        row_mask = rows < n_rows
        mask = row_mask[:, None] & (cols < D)[None, :]
        dy_off = row_offsets(rows, H, L, sdy_b, sdy_h, sdy_l)[:, None] + cols[None, :] * sdy_d
        x_off = row_offsets(rows, H, L, sx_b, sx_h, sx_l)[:, None] + cols[None, :] * sx_d
        dy = tl.load(dy_ptr + dy_off, mask=mask, other=0.0).to(ACC)
        x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(ACC)
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(ACC)
        if HAS_PE:  # un-rotate first: the gradient w.r.t. the norm output
            pe = load_pe(pe_ptr, rows, row_mask, cols, H, L, D, sp_b, sp_l, BLOCK_M).to(ACC)
            dy = rotate_pairs(dy, pe, True, BLOCK_M, BLOCK_D)
        dx, dyn = norm_backward(dy, x, w, eps, D, MODE, x_ptr.dtype.element_ty, w_ptr.dtype.element_ty)
        dx_off = row_offsets(rows, H, L, sdx_b, sdx_h, sdx_l)[:, None] + cols[None, :]
        dx_ty = dx_ptr.dtype.element_ty
        tl.store(dx_ptr + dx_off, round_to(dx, dx_ty).to(dx_ty), mask=mask)
        if NEED_DW:  # one partial row per program; torch sums them (deterministic, no atomics)
            tl.store(dw_ptr + tl.program_id(0) * D + cols, tl.sum(dyn, axis=0), mask=cols < D)

    @triton.jit
    def _qk_bwd_kernel(
        dqo_ptr, dko_ptr, q_ptr, k_ptr, qw_ptr, kw_ptr, dq_ptr, dk_ptr, dw_ptr, pe_ptr, n_rows, H, L, D, eps,
        sdqo_b, sdqo_h, sdqo_l, sdqo_d, sdko_b, sdko_h, sdko_l, sdko_d,
        sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sd_b, sd_h, sd_l, sp_b, sp_l,
        MODE: tl.constexpr, HAS_PE: tl.constexpr, NEED_DW: tl.constexpr, FP64: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        if tl.program_id(1) == 0:
            _tile_bwd(dqo_ptr, q_ptr, qw_ptr, dq_ptr, dw_ptr, pe_ptr, rows, cols, n_rows, H, L, D, eps,
                      sdqo_b, sdqo_h, sdqo_l, sdqo_d, sq_b, sq_h, sq_l, sq_d, sd_b, sd_h, sd_l,
                      sp_b, sp_l, MODE, HAS_PE, NEED_DW, ACC, BLOCK_M, BLOCK_D)  # fmt: skip
        else:  # k's partial dScale rows sit after q's
            dkw_ptr = dw_ptr + tl.num_programs(0) * D
            _tile_bwd(dko_ptr, k_ptr, kw_ptr, dk_ptr, dkw_ptr, pe_ptr, rows, cols, n_rows, H, L, D, eps,
                      sdko_b, sdko_h, sdko_l, sdko_d, sk_b, sk_h, sk_l, sk_d, sd_b, sd_h, sd_l,
                      sp_b, sp_l, MODE, HAS_PE, NEED_DW, ACC, BLOCK_M, BLOCK_D)  # fmt: skip

    def _pe_args(q: Tensor, pe: Tensor | None):
        return (q, (0, 0)) if pe is None else pe_rows(pe)  # q is a dummy pointer when no RoPE

    def _launch_fwd(q, k, q_scale, k_scale, pe, eps, mode, q_out, k_out) -> None:
        """Writes into q_out / k_out, (B, H, L, D) views with equal strides (possibly slices of a joint
        buffer)."""
        B, H, L, D = q.shape
        n_rows, block_d = B * H * L, next_pow2(D)
        block_m, warps = row_tile(_qk_fwd_kernel, n_rows, block_d)
        pe_t, sp = _pe_args(q, pe)
        if n_rows:
            _qk_fwd_kernel[(triton.cdiv(n_rows, block_m), 2)](
                q, k, q_scale, k_scale, q_out, k_out, pe_t, n_rows, H, L, D, eps,
                *q.stride(), *k.stride(), *q_out.stride()[:3], *sp,
                MODE=mode, HAS_PE=pe is not None, FP64=q.dtype == torch.float64,
                BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
            )  # fmt: skip

    def _launch_bwd(dq_out, dk_out, q, k, q_scale, k_scale, pe, eps, mode, need_dw):
        """Returns dq, dk (contiguous, input dtype) and dScale for q and k (empty when need_dw is False)."""
        B, H, L, D = q.shape
        n_rows, block_d = B * H * L, next_pow2(D)
        block_m, warps = row_tile(_qk_bwd_kernel, n_rows, block_d)
        grid = triton.cdiv(n_rows, block_m)
        dq, dk = (
            torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
        )
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        partial = torch.zeros(
            (2, grid if need_dw else 0, D), dtype=acc, device=q.device
        )  # (q|k, programs, D)
        pe_t, sp = _pe_args(q, pe)
        if n_rows:
            _qk_bwd_kernel[(grid, 2)](
                dq_out, dk_out, q, k, q_scale, k_scale, dq, dk, partial, pe_t, n_rows, H, L, D, eps,
                *dq_out.stride(), *dk_out.stride(), *q.stride(), *k.stride(), *dq.stride()[:3], *sp,
                MODE=mode, HAS_PE=pe is not None, NEED_DW=need_dw, FP64=q.dtype == torch.float64,
                BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
            )  # fmt: skip
        if not need_dw:
            return dq, dk, q_scale.new_empty(0), k_scale.new_empty(0)
        return dq, dk, partial[0].sum(0).to(q_scale.dtype), partial[1].sum(0).to(k_scale.dtype)

    def _out(q: Tensor, q_scale: Tensor, mode: int, length: int) -> Tensor:
        B, H, _, D = q.shape
        return q.new_empty((B, H, length, D), dtype=norm_out_dtype(q.dtype, q_scale.dtype, mode))

    # ------------------------------------------------------------ single stream (or already-joint sequence)

    @torch.library.custom_op("scfm::qk_norm_rope", mutates_args=())
    def qk_norm_rope_op(
        q: Tensor, k: Tensor, q_scale: Tensor, k_scale: Tensor, pe: Tensor | None, eps: float, mode: int
    ) -> tuple[Tensor, Tensor]:
        _check(q, k, pe)
        q_out, k_out = _out(q, q_scale, mode, q.shape[2]), _out(k, k_scale, mode, k.shape[2])
        _launch_fwd(q, k, q_scale, k_scale, pe, eps, mode, q_out, k_out)
        return q_out, k_out

    @qk_norm_rope_op.register_fake
    def _(q, k, q_scale, k_scale, pe, eps, mode):
        _check(q, k, pe)
        return _out(q, q_scale, mode, q.shape[2]), _out(k, k_scale, mode, k.shape[2])

    @torch.library.custom_op("scfm::qk_norm_rope_backward", mutates_args=())
    def qk_norm_rope_backward_op(
        dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, q_scale: Tensor, k_scale: Tensor,
        pe: Tensor | None, eps: float, mode: int, need_dw: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        return _launch_bwd(dq_out, dk_out, q, k, q_scale, k_scale, pe, eps, mode, need_dw)

    @qk_norm_rope_backward_op.register_fake
    def _(dq_out, dk_out, q, k, q_scale, k_scale, pe, eps, mode, need_dw):
        n = q_scale.shape if need_dw else (0,)
        return q.new_empty(q.shape), k.new_empty(k.shape), q_scale.new_empty(n), k_scale.new_empty(n)

    def _setup_context(ctx, inputs, output):
        q, k, q_scale, k_scale, pe, eps, mode = inputs
        ctx.save_for_backward(q, k, q_scale, k_scale, pe)
        ctx.eps, ctx.mode = eps, mode

    def _backward(ctx, dq_out, dk_out):
        q, k, q_scale, k_scale, pe = ctx.saved_tensors
        need_dw = (
            ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        )  # frozen scales (LoRA): skip dScale entirely
        dq, dk, dqs, dks = qk_norm_rope_backward_op(
            dq_out, dk_out, q, k, q_scale, k_scale, pe, ctx.eps, ctx.mode, need_dw
        )
        dqs = dqs if ctx.needs_input_grad[2] else None
        dks = dks if ctx.needs_input_grad[3] else None
        return dq, dk, dqs, dks, None, None, None

    qk_norm_rope_op.register_autograd(_backward, setup_context=_setup_context)

    # --------------------------------------------------- Flux double block: two streams into one joint buffer

    @torch.library.custom_op("scfm::qk_norm_rope_joint", mutates_args=())
    def qk_norm_rope_joint_op(
        txt_q: Tensor, txt_k: Tensor, img_q: Tensor, img_k: Tensor, txt_q_scale: Tensor, txt_k_scale: Tensor,
        img_q_scale: Tensor, img_k_scale: Tensor, pe: Tensor, eps: float,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        L_txt, L = txt_q.shape[2], txt_q.shape[2] + img_q.shape[2]
        q_out, k_out = _out(txt_q, txt_q_scale, MODE_FLUX, L), _out(txt_k, txt_k_scale, MODE_FLUX, L)
        _check(txt_q, txt_k, pe[:, :, :L_txt])
        _check(img_q, img_k, pe[:, :, L_txt:])
        # Each stream lands in its slice of the joint (B, H, L_txt + L_img, D) buffer: no torch.cat.
        _launch_fwd(txt_q, txt_k, txt_q_scale, txt_k_scale, pe[:, :, :L_txt], eps, MODE_FLUX,
                    q_out[:, :, :L_txt], k_out[:, :, :L_txt])  # fmt: skip
        _launch_fwd(img_q, img_k, img_q_scale, img_k_scale, pe[:, :, L_txt:], eps, MODE_FLUX,
                    q_out[:, :, L_txt:], k_out[:, :, L_txt:])  # fmt: skip
        return q_out, k_out

    @qk_norm_rope_joint_op.register_fake
    def _(txt_q, txt_k, img_q, img_k, txt_q_scale, txt_k_scale, img_q_scale, img_k_scale, pe, eps):
        L = txt_q.shape[2] + img_q.shape[2]
        _check(txt_q, txt_k, pe[:, :, : txt_q.shape[2]])
        _check(img_q, img_k, pe[:, :, txt_q.shape[2] :])
        return _out(txt_q, txt_q_scale, MODE_FLUX, L), _out(txt_k, txt_k_scale, MODE_FLUX, L)

    def _setup_joint(ctx, inputs, output):
        *tensors, eps = inputs
        ctx.save_for_backward(*tensors)
        ctx.eps = eps

    def _backward_joint(ctx, dq_out, dk_out):
        txt_q, txt_k, img_q, img_k, tqs, tks, iqs, iks, pe = ctx.saved_tensors
        need = ctx.needs_input_grad
        L_txt = txt_q.shape[2]
        # The slices of the joint gradient are strided views; the backward kernel reads them in place.
        t = qk_norm_rope_backward_op(dq_out[:, :, :L_txt], dk_out[:, :, :L_txt], txt_q, txt_k, tqs, tks,
                                     pe[:, :, :L_txt], ctx.eps, MODE_FLUX, need[4] or need[5])  # fmt: skip
        i = qk_norm_rope_backward_op(dq_out[:, :, L_txt:], dk_out[:, :, L_txt:], img_q, img_k, iqs, iks,
                                     pe[:, :, L_txt:], ctx.eps, MODE_FLUX, need[6] or need[7])  # fmt: skip
        scales = [g if n else None for g, n in zip((t[2], t[3], i[2], i[3]), need[4:8])]
        return t[0], t[1], i[0], i[1], *scales, None, None

    qk_norm_rope_joint_op.register_autograd(_backward_joint, setup_context=_setup_joint)


def qk_norm_rope_triton(q, k, q_scale, k_scale, pe, eps: float = 1e-6):
    return torch.ops.scfm.qk_norm_rope(q, k, q_scale, k_scale, pe, eps, MODE_FLUX)


def qk_norm_triton(q, k, q_scale, k_scale, eps: float = 1e-6):
    return torch.ops.scfm.qk_norm_rope(q, k, q_scale, k_scale, None, eps, MODE_DIFFUSERS)


def qk_norm_rope_joint_triton(txt_q, txt_k, img_q, img_k, txt_q_scale, txt_k_scale, img_q_scale, img_k_scale,
                              pe, eps: float = 1e-6):  # fmt: skip
    return torch.ops.scfm.qk_norm_rope_joint(
        txt_q, txt_k, img_q, img_k, txt_q_scale, txt_k_scale, img_q_scale, img_k_scale, pe, eps
    )
