"""The MLP activations that feed the blocks' second MLP GEMM, GELU (tanh) for FLUX.1 and SD3.5 and SwiGLU for
FLUX.2, with the fp8 GEMM's activation rounding (model/kernels/quant.py) fused into them, as model/kernels/adanorm.py
does for the adaLN producers.

    mlp_activation_triton(h (..., W), kind) -> y (..., W | W / 2), q (rows, W') e4m3, s (rows, 1) fp32, y ~ q * s
        kind "gelu_tanh": y = gelu(h, tanh approximation); "swiglu": y = silu(h[..., :W/2]) * h[..., W/2:]

Why: with fp8 compute the eager path wrote y, then quant_rows read it twice: 2 + 2 + 4 + 1 = 9 bytes per bf16
element of y (a SwiGLU reads 4 for each). One kernel reads h, writes y (a LoRA on the reader takes it) and q: 5.
The rows are wide (Flux-dev's MLP 12288, SD3.5-large's 9728), so a row is one tile of up to 16384 values over 16
warps, to keep the row in registers for its maximum. The single blocks' `linear2` reads [attention, activation]
side by side, a row this kernel does not write whole: those keep the GEMM's own rounding.

The kernel computes in fp32 and rounds once (torch's SwiGLU rounds silu's output first); its q and s are exactly
`quant_rows(y)` of the y it writes. GELU's 1 + tanh(z) is written 2 / (1 + e^-2z) (right at both saturations),
with the exp the interpreter and the GPU both have. Backward recomputes the fp32 reference under autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton_utils import HAS_TRITON, next_pow2, row_tile, tl, triton
from .quant import E4M3

KINDS = ("gelu_tanh", "swiglu")
MAX_WIDTH = 16384  # of y: one row per tile


def mlp_activation_reference(h: Tensor, kind: str) -> Tensor:
    """The modules' own ops (nn.GELU(approximate="tanh"), model/flux2.py SwiGLU), bit for bit."""
    if kind == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def mlp_activation_fp32(h: Tensor, kind: str, dtype: torch.dtype) -> Tensor:
    """What the kernel computes: in fp32 (fp64 stays fp64), rounded once to `dtype`."""
    return mlp_activation_reference(h.to(torch.promote_types(h.dtype, torch.float32)), kind).to(dtype)


def fits(h: Tensor, kind: str) -> bool:
    """The kernel's cases: a float16 / bfloat16 / float32 h whose y rows fit one tile (SwiGLU: an even width)."""
    width = h.shape[-1] // (2 if kind == "swiglu" else 1)
    return (kind in KINDS and h.ndim >= 2 and h.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and 0 < width <= MAX_WIDTH and not (kind == "swiglu" and h.shape[-1] % 2))


if HAS_TRITON:
    from ._triton_utils import reference_grads, round_to
    from .quant import store_rows

    @triton.jit
    def _act_kernel(h_ptr, y_ptr, q_ptr, s_ptr, n_rows, W, stride_h, SWIGLU: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_D: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        live = (rows < n_rows)[:, None] & (cols < W)[None, :]
        src = h_ptr + rows[:, None] * stride_h + cols[None, :]
        a = tl.load(src, mask=live, other=0.0).to(tl.float32)
        if SWIGLU:  # [gate | up]: W is y's width, half of h's
            up = tl.load(src + W, mask=live, other=0.0).to(tl.float32)
            y = a / (1.0 + tl.exp(-a)) * up
        else:
            z = 0.7978845608028654 * (a + 0.044715 * a * a * a)  # sqrt(2 / pi) (a + 0.044715 a^3)
            y = 0.5 * a * (2.0 / (1.0 + tl.exp(-2.0 * z)))  # 1 + tanh(z)
        out_ty = y_ptr.dtype.element_ty
        y = round_to(y, out_ty)  # the stored value, exactly, in fp32
        out = rows[:, None] * W + cols[None, :]
        tl.store(y_ptr + out, y.to(out_ty), mask=live)
        store_rows(y, live, rows < n_rows, s_ptr + rows, q_ptr + out)  # quant.py, from registers

    def _launch(h: Tensor, kind: str):
        h2 = h.reshape(-1, h.shape[-1])
        if h2.stride(-1) != 1:
            h2 = h2.contiguous()
        rows, width = h2.shape[0], h.shape[-1] // (2 if kind == "swiglu" else 1)
        y = torch.empty((rows, width), dtype=h.dtype, device=h.device)
        q = torch.empty((rows, width), dtype=torch.uint8, device=h.device)
        s = torch.empty((rows, 1), dtype=torch.float32, device=h.device)
        block_d = next_pow2(width)
        block_m, warps = row_tile(_act_kernel, rows, block_d)
        if rows:
            _act_kernel[(triton.cdiv(rows, block_m),)](
                h2, y, q, s, rows, width, h2.stride(0), SWIGLU=kind == "swiglu",
                BLOCK_M=block_m, BLOCK_D=block_d, num_warps=16 if block_m * block_d >= 16384 else warps)
        return y.view(*h.shape[:-1], width), q.view(E4M3), s

    class _ActFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h: Tensor, kind: str):
            y, q, s = _launch(h, kind)
            ctx.save_for_backward(h)
            ctx.kind = kind
            ctx.mark_non_differentiable(q, s)
            return y, q, s

        @staticmethod
        def backward(ctx, dy: Tensor, _dq, _ds):
            def fp32(h):
                return mlp_activation_fp32(h, ctx.kind, torch.float32)

            return (*reference_grads(fp32, ctx.saved_tensors, ctx.needs_input_grad[:1], dy), None)

    def mlp_activation_triton(h: Tensor, kind: str):
        """-> y and its rows for the fp8 GEMM, q and s (no gradient)."""
        return _ActFn.apply(h, kind)
