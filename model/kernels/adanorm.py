"""The adaLN producer of the blocks' wide GEMMs, `(1 + scale) * LayerNorm(x) + shift`, with the fp8 GEMM's
activation rounding (model/kernels/quant.py) fused into it.

    modulated_layer_norm_triton(x (B, L, D), shift, scale (B | 1, 1, D), eps)
        -> y (B, L, D), q (B*L, D) e4m3, s (B*L, 1) fp32 with y's rows ~ q * s

Why fuse: with fp8 compute (model/fp8_gemm.py) the qkv / linear1 / MLP-input GEMMs read e4m3 activations, so the
eager path ran LayerNorm, a multiply and an add (each a full pass, writing the row out), then the quantization's
two reads of it: 33 bytes moved per element of an fp32 activation (training under autocast), 17 of a bf16 one.
One kernel reads x once and writes y (a LoRA on the reader takes it) and q: 9 bytes, or 5. The GEMM takes the
rows `fp8_gemm.attach_rows` hangs on y instead of rounding y again.

The kernel computes in fp32 and rounds once, where the torch ops round after each (the LayerNorm output and the
product to the compute dtype); the differences stay within those roundings (tests/test_fp8_producers.py). Its q
and s are exactly `quant_rows(y)` of the y it writes, so the GEMM sees what the unfused path would give it for that
y. Backward recomputes the fp32 reference under autograd (a LayerNorm's backward needs its statistics; recomputing
them is one pass over x, which the checkpointed step re-reads anyway).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton_utils import HAS_TRITON, next_pow2, row_tile, tl, triton
from .quant import E4M3


def modulated_layer_norm_reference(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """The blocks' own ops (model/layers.py ModulationOut.modulate on nn.LayerNorm without affine), bit for bit."""
    return (1 + scale) * F.layer_norm(x, (x.shape[-1],), eps=eps) + shift


def modulated_layer_norm_fp32(x: Tensor, shift: Tensor, scale: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """What the kernel computes: every step in fp32 (fp64 stays fp64), rounded once to `dtype`."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    y = (1 + scale.to(acc)) * F.layer_norm(xf, (x.shape[-1],), eps=eps) + shift.to(acc)
    return y.to(dtype)


def out_dtype(x: Tensor, shift: Tensor) -> torch.dtype:
    """The reference's output dtype: LayerNorm's, promoted with the modulation's. CUDA's autocast runs layer_norm
    in fp32 (the CPU's keeps a half input half)."""
    half = x.dtype in (torch.float16, torch.bfloat16)
    norm = torch.float32 if half and x.is_cuda and torch.is_autocast_enabled("cuda") else x.dtype
    return torch.promote_types(norm, shift.dtype)


def fits(x: Tensor, shift: Tensor, scale: Tensor) -> bool:
    """The shapes the kernel covers: x (B, L, D) with D <= 8192, shift and scale one row per batch element."""
    floats = (torch.float16, torch.bfloat16, torch.float32)
    if x.ndim != 3 or x.shape[-1] > 8192 or x.dtype not in floats or shift.dtype not in floats:
        return False
    b, _, d = x.shape
    return all(t.shape in ((b, 1, d), (1, 1, d)) and t.dtype == shift.dtype for t in (shift, scale))


if HAS_TRITON:
    from ._triton_utils import reference_grads, round_to
    from .quant import store_rows

    @triton.jit
    def _adanorm_kernel(x_ptr, shift_ptr, scale_ptr, y_ptr, q_ptr, s_ptr, n_rows, L, D, eps, stride_xb, stride_xl,
                        stride_mb, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # b * L + l
        b, pos = rows // L, rows % L
        cols = tl.arange(0, BLOCK_D)
        live = (rows < n_rows)[:, None] & (cols < D)[None, :]
        x = tl.load(x_ptr + (b * stride_xb + pos * stride_xl)[:, None] + cols[None, :], mask=live,
                    other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        centred = tl.where(live, x - mean[:, None], 0.0)
        rstd = tl.math.rsqrt(tl.sum(centred * centred, axis=1) / D + eps)
        mod = (b * stride_mb)[:, None] + cols[None, :]
        scale = tl.load(scale_ptr + mod, mask=live, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + mod, mask=live, other=0.0).to(tl.float32)
        out_ty = y_ptr.dtype.element_ty
        y = round_to(centred * rstd[:, None] * (1.0 + scale) + shift, out_ty)  # the stored value, exactly
        out = rows[:, None] * D + cols[None, :]
        tl.store(y_ptr + out, y.to(out_ty), mask=live)
        store_rows(y, live, rows < n_rows, s_ptr + rows, q_ptr + out)  # quant.py, from registers

    def _launch(x: Tensor, shift: Tensor, scale: Tensor, eps: float, dtype: torch.dtype):
        if x.stride(-1) != 1:
            x = x.contiguous()
        b, n, d = x.shape
        y = torch.empty((b, n, d), dtype=dtype, device=x.device)
        q = torch.empty((b * n, d), dtype=torch.uint8, device=x.device)
        s = torch.empty((b * n, 1), dtype=torch.float32, device=x.device)
        shift, scale = shift.expand(b, 1, d).contiguous(), scale.expand(b, 1, d).contiguous()
        block_d = next_pow2(d)
        block_m, warps = row_tile(_adanorm_kernel, b * n, block_d)
        if b * n:
            _adanorm_kernel[(triton.cdiv(b * n, block_m),)](
                x, shift, scale, y, q, s, b * n, n, d, eps, x.stride(0), x.stride(1), d,
                BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
        return y, q.view(E4M3), s

    class _AdaNormFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: Tensor, shift: Tensor, scale: Tensor, eps: float, dtype: torch.dtype):
            y, q, s = _launch(x, shift, scale, eps, dtype)
            ctx.save_for_backward(x, shift, scale)
            ctx.eps = eps
            ctx.mark_non_differentiable(q, s)
            return y, q, s

        @staticmethod
        def backward(ctx, dy: Tensor, _dq, _ds):
            def fp32(x, shift, scale):
                return modulated_layer_norm_fp32(x, shift, scale, ctx.eps, torch.float32)

            return (*reference_grads(fp32, ctx.saved_tensors, ctx.needs_input_grad[:3], dy), None, None)

    def modulated_layer_norm_triton(x: Tensor, shift: Tensor, scale: Tensor, eps: float):
        """-> y and its rows for the fp8 GEMM, q and s (no gradient)."""
        return _AdaNormFn.apply(x, shift, scale, eps, out_dtype(x, shift))
