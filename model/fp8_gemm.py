"""fp8 tensor-core GEMMs for the frozen base, behind the `fp8_compute` switch (train, generate, make_dataset, evaluate).

With fp8 storage alone (model/fp8.py) every call dequantizes the e4m3 weight to bf16 and runs a bf16 GEMM. Here
the GEMM itself reads e4m3: the activation rows are rounded to e4m3 on the fly with one power-of-two scale per
token (model/kernels/quant.py), and `torch._scaled_mm` multiplies with row-wise scales (per token, per output
channel), accumulating in fp32, on GPUs with fp8 tensor cores (sm89 Ada, sm90 Hopper and later): twice the bf16
rate on an H100 / H200, and a quarter of the weight bytes a dequantizing call moves.

The base model is frozen in SCFM, so the weight needs no gradient and backward needs only the input gradient
dx = dy W. The weight's scale is per output row, which is the contracted dimension of that GEMM, so it is folded
into dy's columns before dy's rows are rounded (`quant_rows(dy, col_scale=weight_scale)`); the weight then goes in
as it is stored, transposed. The LoRA path stays in the compute dtype (distill/lora_fn.py).

On any other device (the CPU) the same rounding runs and the product is computed in fp32 from the rounded values:
e4m3 x e4m3 products are exact in fp32, so this emulation differs from the GPU only by the order of the fp32
accumulation, and CPU tests check the numerics of the real path. A CUDA GPU without fp8 GEMMs is refused.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from . import kernels

MIN_CAPABILITY = (8, 9)  # Ada; Hopper is (9, 0)
# Hopper's fast accumulation for the forward GEMM (torchao's float8 recipe uses it for the output GEMM only, not
# for gradients): the tensor cores' partial sums are promoted to fp32 less often. Off: measured first (bench/).
FAST_ACCUM_FORWARD = False
# The blocks' adaLN and MLP-activation producers round their output's rows for the GEMM that reads it, in the kernel
# that writes it (model/kernels/adanorm.py, mlp_act.py; eager CUDA only). Off: every GEMM rounds its own input
# (bench/flux_forward.py's "+unfused" trial measures the difference).
FUSED_PRODUCERS = True
_GEMM_OUT = (torch.bfloat16, torch.float16)  # what torch._scaled_mm writes with row-wise scales


def gemm_supported(device: torch.device | str) -> bool:
    """True where `torch._scaled_mm` runs fp8 on tensor cores; False on other CUDA GPUs and on other devices."""
    device = torch.device(device)
    # ROCm GPUs also say "cuda", and MI300 reports (9, 4); their fp8 is e4m3fnuz, not the e4m3fn we store
    return (device.type == "cuda" and torch.version.hip is None
            and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY)


def check_device(device: torch.device | str, flag: str = "--fp8_compute") -> None:
    """One-line refusal for a CUDA GPU without fp8 GEMMs (elsewhere the CPU emulation runs)."""
    device = torch.device(device)
    if device.type == "cuda" and not gemm_supported(device):
        if torch.version.hip is not None:
            raise ValueError(f"{flag} runs NVIDIA's fp8 GEMMs (e4m3fn); on ROCm drop {flag} (fp8 storage alone, "
                             "--fp8_base / --fp8, works here)")
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"{flag} needs fp8 tensor cores (sm89 / sm90 or newer); {torch.cuda.get_device_name(device)}"
                         f" is sm{major}{minor}: drop {flag} (fp8 storage alone, --fp8_base / --fp8, works here)")


def _no_autocast(device: torch.device):
    if device.type != "meta" and torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def scaled_mm(a: Tensor, a_scale: Tensor, b_t: Tensor, b_scale: Tensor, bias: Tensor | None,
              out_dtype: torch.dtype, fast_accum: bool = False) -> Tensor:
    """(a * a_scale) @ (b_t * b_scale^T) + bias in `out_dtype`: a (M, K) e4m3 row-major, b_t (K, N) e4m3 (column-
    major on CUDA: a transposed row-major (N, K)), a_scale (M, 1), b_scale (N, 1) fp32; fp32 accumulation
    (`fast_accum`: Hopper's faster one, promoted to fp32 less often; CUDA only, the emulation sums in fp32)."""
    if bias is not None:
        bias = bias.to(out_dtype)
    if a.is_cuda:
        # row-wise scaled GEMMs write bf16 / fp16 only (torch refuses fp32): bf16 out, then the bias in out_dtype
        direct = out_dtype in _GEMM_OUT
        out = torch._scaled_mm(a, b_t, scale_a=a_scale, scale_b=b_scale.view(1, -1), bias=bias if direct else None,
                               out_dtype=out_dtype if direct else torch.bfloat16, use_fast_accum=fast_accum)
        if direct:
            return out
        out = out.to(out_dtype)
        return out if bias is None else out + bias
    with _no_autocast(a.device):  # the emulation: products exact in fp32, then the scales in the epilogue's order
        out = (a.float() @ b_t.float()) * a_scale * b_scale.view(1, -1)
        if bias is not None:
            out = out + bias.float()
    return out.to(out_dtype)


_ROWS = "_scfm_fp8_rows"


def reads_rows(layer: object) -> bool:
    """Whether `layer` runs an fp8 GEMM on its input (an e4m3 layer with fp8 compute on, LoRA-wrapped or not): its
    producer may then hand it the rounded rows (`attach_rows`)."""
    return (FUSED_PRODUCERS and bool(getattr(layer, "fp8_compute", False))
            and getattr(layer, "weight_scale", None) is not None)


def attach_rows(x: Tensor, rows: tuple[Tensor, Tensor] | None) -> Tensor:
    """Hang x's e4m3 rows (M, K) and scales (M, 1), computed by the kernel that wrote x, on x for the next fp8
    GEMM to read it (`forward` takes them once; an in-place change to x since voids them); None: x as it is."""
    if rows is not None:
        setattr(x, _ROWS, (*rows, _version(x)))
    return x


def _version(x: Tensor) -> int | None:
    """x's in-place change counter; inference tensors keep none (the reader comes straight after the producer)."""
    return None if x.is_inference() else x._version


def _take_rows(x: Tensor) -> tuple[Tensor, Tensor] | None:
    if torch.compiler.is_compiling():
        return None
    rows = x.__dict__.pop(_ROWS, None)  # once: the rows must not live on in a tensor saved for backward
    if rows is None or rows[2] != _version(x):
        return None
    return rows[0], rows[1]


def forward(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """x (..., in) @ (q * scale)^T + bias: q (out, in) e4m3, scale (out, 1); x's rows rounded to e4m3 per token
    (or taken from its producer, `attach_rows`)."""
    x2 = x.reshape(-1, x.shape[-1])
    rows = _take_rows(x)
    xq, xs = rows if rows is not None else kernels.quant_rows(x2)
    out = scaled_mm(xq, xs, q.t(), scale, bias, out_dtype, FAST_ACCUM_FORWARD)
    return out.view(*x.shape[:-1], q.shape[0])


def input_grad(dy: Tensor, q: Tensor, scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """dy (..., out) @ (q * scale): the weight's row scale folded into dy's columns, then dy rounded per row."""
    dy2 = dy.reshape(-1, dy.shape[-1])
    dq, ds = kernels.quant_rows(dy2, scale.view(-1))
    # _scaled_mm wants its second operand column-major: q (out, in) row-major, transposed, copied, viewed back
    b_t = q.t().contiguous().t() if dy.is_cuda else q
    ones = torch.ones(q.shape[1], 1, dtype=torch.float32, device=q.device)
    return scaled_mm(dq, ds, b_t, ones, None, out_dtype).view(*dy.shape[:-1], q.shape[1])
