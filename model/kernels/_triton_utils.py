"""Shared Triton pieces: the guarded import, row-tile addressing, bf16 rounding, tile sizes.

Triton is optional. `HAS_TRITON` is False when it is missing, and every op file then defines only its torch
reference. `TRITON_INTERPRET=1` is read when `@triton.jit` decorates a kernel, i.e. when this package is
imported, so whoever wants the interpreter (tests/conftest.py, bench on CPU) must set it before the first
import.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs, macOS: the torch references cover everything
    triton = None
    tl = None
    HAS_TRITON = False

# Casting modes of the normalized value before the scale multiply (kernels get this as a constexpr).
MODE_FLUX = 0  # BFL / diffusers-with-half-weight: round x*rstd to the *input* dtype, then * scale
MODE_DIFFUSERS = 1  # diffusers RMSNorm: round to the *weight* dtype only when it is fp16/bf16, else stay fp32

_HALF = (torch.float16, torch.bfloat16)


def norm_out_dtype(x_dtype: torch.dtype, w_dtype: torch.dtype, mode: int) -> torch.dtype:
    """Output dtype of the references, which is what type promotion gives for their op order."""
    if mode == MODE_FLUX:
        return torch.promote_types(x_dtype, w_dtype)
    if w_dtype in _HALF:
        return w_dtype
    return torch.promote_types(torch.promote_types(x_dtype, torch.float32), w_dtype)


def as_4d(x: torch.Tensor) -> torch.Tensor:
    """View (..., D) as (B, H, L, D) so one strided kernel serves every rank; >4-D inputs fold the extra
    dims."""
    while x.ndim < 4:
        x = x.unsqueeze(0)
    if x.ndim > 4:
        x = x.reshape(-1, *x.shape[-3:])  # copies only when the leading dims cannot be merged as a view
    return x


def reference_grads(fn, inputs, needs, dy: torch.Tensor) -> list:
    """Backward of a forward-only kernel whose torch reference is `fn`: the gradients of fn(*inputs) against dy
    for the inputs that `needs` marks (None for the others), fn recomputed under autograd."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(n) for t, n in zip(inputs, needs)]
        wanted = [t for t, n in zip(leaves, needs) if n]
        grads = iter(torch.autograd.grad(fn(*leaves), wanted, dy.float()))
    return [next(grads) if n else None for n in needs]


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def is_interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def row_tile(kernel, n_rows: int, block_d: int) -> tuple[int, int]:
    """(BLOCK_M, num_warps). On a GPU ~4K elements per program keeps 32 values per thread with 4 warps; the
    interpreter's cost grows with programs x ops (1024 rows: ~1.5 s one row per program, 11 ms as one program),
    so it gets 4x larger tiles."""
    budget = 16384 if is_interpreted(kernel) else 4096
    block_m = max(1, min(budget // block_d, next_pow2(n_rows)))
    return block_m, (8 if block_m * block_d >= 8192 else 4)


if HAS_TRITON:

    @triton.jit
    def row_offsets(rows, H, L, stride_b, stride_h, stride_l):
        """Element offsets of rows in a strided (B, H, L, D) tensor, rows numbered (b, l, h) with h fastest: a
        tile then covers all heads of a few tokens, which share one RoPE row (one table read per token, not
        per head) and, in a qkv projection output, sit next to each other in memory. int64: qkv views exceed
        2^31."""
        h_idx = rows % H
        bl = rows // H
        return (
            (bl // L).to(tl.int64) * stride_b
            + h_idx.to(tl.int64) * stride_h
            + (bl % L).to(tl.int64) * stride_l
        )

    @triton.jit
    def round_to(x, DTYPE: tl.constexpr):
        """Round x to DTYPE's precision but keep x's dtype. bf16 uses integer round-to-nearest-even on the
        fp32 bits because the interpreter's fp32->bf16 cast truncates (GPUs round), and this is exact on
        both."""
        if DTYPE == tl.bfloat16:
            xf = x.to(tl.float32)
            bits = xf.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            rounded = bits.to(tl.float32, bitcast=True)
            return tl.where(xf == xf, rounded, xf).to(x.dtype)  # leave NaN payloads alone
        else:
            return x.to(DTYPE).to(x.dtype)

    @triton.jit
    def rotate_pairs(x, pe, CONJ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """Rotate interleaved pairs (x[2j], x[2j+1]) by pe's (cos, sin) pairs, both (BLOCK_M, BLOCK_D) in
        fp32. CONJ uses -sin: the inverse rotation, which is the backward of the forward one."""
        x0, x1 = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_D // 2, 2)))
        cos, sin = tl.split(tl.reshape(pe, (BLOCK_M, BLOCK_D // 2, 2)))
        if CONJ:
            sin = -sin
        return tl.reshape(tl.join(x0 * cos - x1 * sin, x1 * cos + x0 * sin), (BLOCK_M, BLOCK_D))
