"""Rows to e4m3 with one power-of-two scale per row: the activation (and output-gradient) side of the fp8 GEMMs
(model/fp8_gemm.py), and of the frozen weights' storage (model/fp8.py `quantize_rows`).

    quant_rows(x (M, K), col_scale (K,) | None) -> q (M, K) e4m3, scale (M, 1) fp32:  x * col_scale ~ q * scale

Why powers of two, as for the weights (model/fp8.py): `x / scale` is then exact, so the only rounding is the
one to e4m3, and e4m3 is a float format, so a row keeps its ~2^-4 relative precision whatever its largest value
is (a power of two costs at most the top half-octave of headroom, which e4m3's exponent absorbs). It also makes
the kernel's bits equal the reference's for finite rows (a row holding an inf or a NaN is garbage either way, and
differently: the kernel's maximum skips a NaN, torch's cast saturates an inf; the trainer skips such a step by its
non-finite loss): no division, log or exp that could round differently. The scale is
built from the fp32 bits of the row's absolute maximum `a = m * 2^E` (1 <= m < 2): the smallest `2^k` with
`a / 2^k <= 448 = 1.75 * 2^8` is `k = E - 8`, plus one when `m > 1.75`.

`col_scale` multiplies each column before the row's maximum is taken: backward folds the weight's per-row scale
(per column of the output gradient) into the gradient this way, since a row-wise scaled GEMM scales only M and N.

The kernel makes two passes over a row (its maximum, then the rounding); the second pass reads from L2. The
rounding to e4m3 is done on the fp32 bits (round to nearest, ties to even, as torch's cast) rather than with
Triton's fp8 cast, so the interpreter runs exactly what the GPU runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._triton_utils import HAS_TRITON, tl, triton

E4M3 = torch.float8_e4m3fn
_MIN_K, _MAX_K = -126, 126  # scale exponents whose scale and inverse are both normal fp32 numbers


def _pow2(k: Tensor) -> Tensor:
    """2^k for int32 k in [-126, 126], built from its fp32 bits (exact)."""
    return ((k + 127) << 23).view(torch.float32)


def row_scale_exponent(absmax: Tensor) -> Tensor:
    """The smallest k with absmax <= 448 * 2^k (absmax fp32 >= 0), clamped to [-126, 126]; 0 for a zero row;
    int32."""
    bits = absmax.view(torch.int32)
    k = (bits >> 23) - 127 - 8 + ((bits & 0x7FFFFF) > 0x600000).to(torch.int32)
    return torch.where(bits == 0, 0, k.clamp(_MIN_K, _MAX_K))


def quant_rows_reference(x: Tensor, col_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x (M, K) in any float dtype (times col_scale (K,) fp32) -> e4m3 (M, K) and fp32 power-of-two scale (M, 1)."""
    v = x.float()
    if col_scale is not None:
        v = v * col_scale.float().view(1, -1)
    k = row_scale_exponent(v.abs().amax(dim=1, keepdim=True).contiguous())
    return (v * _pow2(-k)).to(E4M3), _pow2(k)


if HAS_TRITON:

    @triton.jit
    def _e4m3_bits(v):
        """fp32 values with |v| <= 448 (or inf / NaN) -> their e4m3fn codes, rounded to nearest even (int32)."""
        bits = v.to(tl.int32, bitcast=True)
        sign = ((bits >> 31) & 1) << 7
        a = bits & 0x7FFFFFFF
        e = a >> 23  # biased fp32 exponent
        m = a & 0x7FFFFF
        # normal e4m3 (fp32 exponent >= -6): keep 3 mantissa bits; a carry rolls into the exponent correctly
        code = ((e - 120) << 3) | (m >> 20)
        rem = m & 0xFFFFF
        normal = code + ((rem > 0x80000) | ((rem == 0x80000) & ((code & 1) == 1))).to(tl.int32)
        # subnormal e4m3 (steps of 2^-9): |v| * 2^9 = (m | 2^23) * 2^(e - 141), rounded to nearest even
        shift = tl.maximum(tl.minimum(141 - e, 26), 1)  # only subnormals use it: 21..26
        full = m | 0x800000
        q = full >> shift
        rest = full & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        sub = q + ((rest > half) | ((rest == half) & ((q & 1) == 1))).to(tl.int32)
        sub = tl.where(e == 0, 0, sub)  # fp32 zeros and subnormals
        code = tl.where(e >= 121, normal, sub)
        code = tl.where(e == 255, 0x7F, code)  # inf / NaN: e4m3fn has only NaN
        return code | sign

    @triton.jit
    def scale_exponent(bits):
        """row_scale_exponent on the int32 bits of the rows' fp32 absolute maxima."""
        k = (bits >> 23) - 135 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
        return tl.where(bits == 0, 0, tl.minimum(tl.maximum(k, -126), 126))

    @triton.jit
    def store_rows(y, live, row_live, s_ptrs, q_ptrs):
        """Rows of y (BLOCK_M, BLOCK_D) fp32 held in registers by a producer (`live`: its real elements): each
        row's power-of-two scale to s_ptrs (BLOCK_M,) and its e4m3 codes to q_ptrs, as _quant_rows_kernel does."""
        k = scale_exponent(tl.max(tl.where(live, tl.abs(y), 0.0), axis=1).to(tl.int32, bitcast=True))
        inv = ((127 - k) << 23).to(tl.float32, bitcast=True)
        tl.store(s_ptrs, ((k + 127) << 23).to(tl.float32, bitcast=True), mask=row_live)
        tl.store(q_ptrs, _e4m3_bits(y * inv[:, None]).to(tl.uint8), mask=live)

    @triton.jit
    def _row_chunk(x_row, col_ptr, start, K, HAS_COL: tl.constexpr, BLOCK: tl.constexpr):
        """Columns start .. start + BLOCK of a row in fp32 (times their column scales), padding 0."""
        offs = start + tl.arange(0, BLOCK)
        live = offs < K
        v = tl.load(x_row + offs, mask=live, other=0.0).to(tl.float32)
        if HAS_COL:
            v = v * tl.load(col_ptr + offs, mask=live, other=0.0)
        return v, offs, live

    @triton.jit
    def _quant_rows_kernel(x_ptr, col_ptr, q_ptr, s_ptr, K, stride_x, HAS_COL: tl.constexpr,
                           BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        peak = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, K, BLOCK):
            v, _, _ = _row_chunk(x_row, col_ptr, start, K, HAS_COL, BLOCK)
            peak = tl.maximum(peak, tl.abs(v))
        k = scale_exponent(tl.max(peak, axis=0).to(tl.int32, bitcast=True))
        inv = ((127 - k) << 23).to(tl.float32, bitcast=True)
        tl.store(s_ptr + row, ((k + 127) << 23).to(tl.float32, bitcast=True))
        for start in range(0, K, BLOCK):  # the second pass reads the row again, from L2
            v, offs, live = _row_chunk(x_row, col_ptr, start, K, HAS_COL, BLOCK)
            tl.store(q_ptr + row * K + offs, _e4m3_bits(v * inv).to(tl.uint8), mask=live)

    def quant_rows_triton(x: Tensor, col_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if x.stride(-1) != 1:
            x = x.contiguous()
        m, k = x.shape
        q = torch.empty((m, k), dtype=torch.uint8, device=x.device)
        scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
        col = col_scale.float().contiguous() if col_scale is not None else scale  # unread without HAS_COL
        if m:
            _quant_rows_kernel[(m,)](x, col, q, scale, k, x.stride(0), HAS_COL=col_scale is not None,
                                     BLOCK=1024, num_warps=4)
        return q.view(E4M3), scale
