"""The one door model code uses for the fused ops: Triton on CUDA, the torch reference elsewhere.

`SCFM_KERNELS=torch|triton` forces one path (`triton` on CPU needs `TRITON_INTERPRET=1` set before this
package is imported; tests/conftest.py does that when no CUDA device exists). Triton is an optional
dependency: without it every call runs the reference. All ops are differentiable either way.

    rms_norm(x, weight, eps)                                  x (..., D), BFL casting
    rope(x, pe)                                               x (B, H, L, D), pe (B|1, 1, L, D/2, 2) fp32
    qk_norm_rope(q, k, q_scale, k_scale, pe | None, eps)      Flux: q, k (B, H, L, D), strided views are fine
    qk_norm_rope_joint(txt_q, txt_k, img_q, img_k,
                       txt_q_scale, txt_k_scale, img_q_scale, img_k_scale, pe, eps)
                                                              Flux double block: -> (B, H, L_txt + L_img, D),
                                                              text first
    qk_norm(q, k, q_scale, k_scale, eps)                      SD3.5: diffusers casting, no RoPE
    dequant_rows(q, scale, dtype)                             e4m3 (out, in) * fp32 scale (out, 1): model/fp8.py
    quant_rows(x, col_scale | None)                           x (M, K) -> e4m3 (M, K), pow-2 scale (M, 1): the
                                                              activations of model/fp8_gemm.py
    modulated_layer_norm(x, shift, scale, eps, quantize)      (1 + scale) * LayerNorm(x) + shift, x (B, L, D);
                                                              with `quantize`, fused with quant_rows of the
                                                              result where the kernel runs (else rows None)
    mlp_activation(h, kind, quantize)                         GELU (tanh) or SwiGLU of h (..., W), the same way
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from . import adanorm, mlp_act
from ._triton_utils import HAS_TRITON
from .adanorm import modulated_layer_norm_reference
from .dequant import dequant_rows_reference
from .mlp_act import mlp_activation_reference
from .qk_norm_rope import qk_norm_reference, qk_norm_rope_joint_reference, qk_norm_rope_reference
from .quant import quant_rows_reference
from .rmsnorm import rms_norm_reference
from .rope import rope_reference

if HAS_TRITON:
    from .adanorm import modulated_layer_norm_triton
    from .dequant import dequant_rows_triton
    from .mlp_act import mlp_activation_triton
    from .qk_norm_rope import qk_norm_rope_joint_triton, qk_norm_rope_triton, qk_norm_triton
    from .quant import quant_rows_triton
    from .rmsnorm import rms_norm_triton
    from .rope import rope_triton

__all__ = ["HAS_TRITON", "backend", "dequant_rows", "mlp_activation", "modulated_layer_norm", "qk_norm",
           "qk_norm_rope", "qk_norm_rope_joint", "quant_rows", "rms_norm", "rope"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_D = 8192  # one row must fit one tile of registers; wider rows (none in Flux / SD3.5) take the reference


def backend(x: Tensor) -> str:
    """'triton' or 'torch' for an op on x. The env var is read per call so tests and benches can flip it."""
    forced = os.environ.get("SCFM_KERNELS", "").strip().lower()
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not HAS_TRITON:
            raise RuntimeError("SCFM_KERNELS=triton but triton is not installed")
        return "triton"
    if forced:
        raise ValueError(f"SCFM_KERNELS must be 'torch' or 'triton', got {forced!r}")
    return "triton" if HAS_TRITON and x.is_cuda else "torch"


def _use_triton(x: Tensor, *tensors: Tensor | None) -> bool:
    if backend(x) != "triton":
        return False
    # Shapes and dtypes the kernels do not cover fall back silently: the reference is always correct.
    if x.dtype not in _DTYPES or x.shape[-1] > _MAX_D or x.shape[-1] == 0:
        return False
    # pe is a position table: the kernels return no gradient for it, so a pe that wants one takes the
    # reference.
    return not any(t is not None and t.ndim == 5 and t.requires_grad for t in tensors)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    if _use_triton(x):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def rope(x: Tensor, pe: Tensor) -> Tensor:
    if _use_triton(x, pe) and x.shape[-1] % 2 == 0:
        return rope_triton(x, pe)
    return rope_reference(x, pe)


def qk_norm_rope(
    q: Tensor, k: Tensor, q_scale: Tensor, k_scale: Tensor, pe: Tensor | None, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    if _use_triton(q, pe) and q.shape[-1] % 2 == 0:
        return qk_norm_rope_triton(q, k, q_scale, k_scale, pe, eps)
    return qk_norm_rope_reference(q, k, q_scale, k_scale, pe, eps)


def qk_norm_rope_joint(
    txt_q: Tensor, txt_k: Tensor, img_q: Tensor, img_k: Tensor,
    txt_q_scale: Tensor, txt_k_scale: Tensor, img_q_scale: Tensor, img_k_scale: Tensor,
    pe: Tensor, eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Both streams of a Flux double block: per-stream QK-norm, joint (text first) sequence, RoPE over it."""
    args = (txt_q, txt_k, img_q, img_k, txt_q_scale, txt_k_scale, img_q_scale, img_k_scale, pe, eps)
    if _use_triton(txt_q, pe) and txt_q.shape[-1] % 2 == 0:
        return qk_norm_rope_joint_triton(*args)
    return qk_norm_rope_joint_reference(*args)


def qk_norm(
    q: Tensor, k: Tensor, q_scale: Tensor, k_scale: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """SD3.5 QK-norm with diffusers' casting (variance in fp32; rounded to the weight dtype when it is
    half)."""
    if _use_triton(q):
        return qk_norm_triton(q, k, q_scale, k_scale, eps)
    return qk_norm_reference(q, k, q_scale, k_scale, eps)


def dequant_rows(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """An e4m3 weight (out, in) times its per-row scale (out, 1), in `dtype` (no gradient: frozen storage)."""
    if backend(q) == "triton" and dtype in _DTYPES[:3] and q.ndim == 2 and scale.numel() == q.shape[0]:
        return dequant_rows_triton(q, scale, dtype)
    return dequant_rows_reference(q, scale, dtype)


def quant_rows(x: Tensor, col_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Each row of x (M, K) (times col_scale (K,)) in e4m3 with a power-of-two fp32 scale (M, 1); no gradient.
    Under torch.compile the reference runs, so inductor fuses it into the op that produces x."""
    if backend(x) == "triton" and x.ndim == 2 and x.dtype in _DTYPES[:3] and not torch.compiler.is_compiling():
        return quant_rows_triton(x, col_scale)
    return quant_rows_reference(x, col_scale)


def modulated_layer_norm(x: Tensor, shift: Tensor, scale: Tensor, eps: float,
                         quantize: bool = False) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """adaLN: (1 + scale) * LayerNorm(x) + shift (no affine), and, with `quantize` (the reader is an fp8 GEMM),
    the result's e4m3 rows and scales from the same kernel where it runs (Triton; else None: the GEMM rounds y
    itself). Without `quantize`, or under torch.compile (inductor fuses the ops itself), the torch ops run."""
    if (quantize and backend(x) == "triton" and adanorm.fits(x, shift, scale)
            and not torch.compiler.is_compiling()):
        y, q, s = modulated_layer_norm_triton(x, shift, scale, eps)
        return y, (q, s)
    return modulated_layer_norm_reference(x, shift, scale, eps), None


def mlp_activation(h: Tensor, kind: str, quantize: bool = False) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """GELU (`kind` "gelu_tanh") or SwiGLU ("swiglu": silu of the first half times the second) of h, and, with
    `quantize`, the result's e4m3 rows and scales from the same kernel where it runs (as modulated_layer_norm)."""
    if quantize and backend(h) == "triton" and mlp_act.fits(h, kind) and not torch.compiler.is_compiling():
        y, q, s = mlp_activation_triton(h, kind)
        return y, (q, s)
    return mlp_activation_reference(h, kind), None
