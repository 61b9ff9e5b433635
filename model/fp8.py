"""Frozen Linear weights stored as float8 (e4m3) with one power-of-two scale per output row.

Half the memory of bf16 (Flux-dev's blocks: 23.7 -> 11.9 GB), which is what lets a Flux LoRA train on a 24 GB
card (kohya's `--fp8_base`, musubi's `--fp8_scaled`). Each call dequantizes the weight to the compute dtype
(bf16 under autocast) and runs the usual GEMM, so any GPU and the CPU run it; only storage changes.

With `fp8_compute` on (`enable_fp8_compute_`), the GEMMs read the e4m3 weight directly on GPUs with fp8 tensor
cores instead (model/fp8_gemm.py): activations are rounded to e4m3 per token, and the LoRA path stays in bf16.

Why a scale per row: e4m3 keeps 3 mantissa bits over 2^-9 .. 448, so a row is scaled into that range before
rounding and every element keeps ~2^-4 relative precision. Why a power of two: the scale is then exact in
every float dtype, so `weight.to(bf16) * scale` is the exact dequantized value. `model.to(torch.bfloat16)`
casts the other tensors and leaves the e4m3 storage alone (`Float8Weight._apply`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fp8_gemm, kernels
from .kernels.quant import quant_rows_reference
from .layers import BLOCK_LISTS, WideLinear

E4M3 = torch.float8_e4m3fn
_AUTOCAST_DEVICES = ("cuda", "cpu", "xpu", "mps")


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(out, in) weight -> e4m3 (out, in) and fp32 scale (out, 1), the smallest power of two that brings the row's
    largest value to <= 448 (zero rows: 1): weight ~ q * scale. The same rounding as the activations of fp8
    compute (model/kernels/quant.py), from the fp32 bits: no log2 whose rounding could pick the wrong power."""
    return quant_rows_reference(weight.detach())


def dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """q * scale in `dtype`: exact, since e4m3 values and power-of-two scales are exact in any float dtype.
    One fused Triton pass on CUDA (model/kernels/dequant.py)."""
    return kernels.dequant_rows(q, scale, dtype)


def dense(weight: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The weight a GEMM reads: a plain one as it is (autocast casts it), an e4m3 one dequantized to `dtype`."""
    return weight if scale is None else dequantize(weight, scale, dtype)


def linear(x: Tensor, weight: Tensor, scale: Tensor | None, bias: Tensor | None, fp8_compute: bool = False) -> Tensor:
    """F.linear on a plain or an e4m3 weight (`scale` None: plain). For e4m3, backward keeps only the e4m3
    storage, not a dense copy; `fp8_compute`: the GEMMs run in fp8 (model/fp8_gemm.py)."""
    if scale is None:
        return F.linear(x, weight, bias)
    if not torch.is_grad_enabled():
        return base_linear(x, weight, scale, bias, fp8_compute)  # no graph (torch.compile: see distill/lora_fn.py)
    return _Float8LinearFn.apply(x, weight, scale, bias, fp8_compute)


def base_linear(x: Tensor, weight: Tensor, scale: Tensor | None, bias: Tensor | None, fp8_compute: bool) -> Tensor:
    """The frozen base's output inside an autograd function (no graph): an fp8 GEMM when `fp8_compute` and the
    weight is e4m3, else F.linear on the weight as the compute dtype sees it."""
    if scale is not None and fp8_compute:
        return fp8_gemm.forward(x, weight, scale, bias, compute_dtype(x))
    return F.linear(x, dense(weight, scale, compute_dtype(x)), bias)


def base_input_grad(dy: Tensor, weight: Tensor, scale: Tensor | None, dtype: torch.dtype, fp8_compute: bool) -> Tensor:
    """dy @ W in `dtype`, the input gradient of `base_linear` (W frozen)."""
    if scale is not None and fp8_compute:
        return fp8_gemm.input_grad(dy, weight, scale, dtype)
    return dy.to(dtype) @ dense(weight, scale, dtype).to(dtype)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a Linear on `x` computes in here: autocast's when it is on for x's device, else x's."""
    kind = x.device.type
    # a fixed list, not torch.amp.is_autocast_available: torch.compile (2.11) cannot trace that one and would
    # break the compiled block's graph at every Linear
    if kind in _AUTOCAST_DEVICES and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


class Float8Weight:
    """Mixin for modules whose `weight` may be e4m3 with a `weight_scale` buffer (None: a plain weight).

    `_apply` keeps the storage: `model.to(dtype)` casts every other floating tensor, while the e4m3 weight and
    its fp32 scale only follow device moves (never cast to the new dtype and back).
    """

    weight: Tensor
    weight_scale: Tensor | None
    fp8_compute = False  # set per layer by enable_fp8_compute_

    def _apply(self, fn: Callable, recurse: bool = True):
        if getattr(self, "weight_scale", None) is None:
            return super()._apply(fn, recurse)
        weight, scale = self._parameters.pop("weight"), self._buffers.pop("weight_scale")
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"], self._buffers["weight_scale"] = weight, scale
        device = fn(torch.empty(0, device=weight.device)).device  # where `fn` sends tensors
        weight.data = weight.data.to(device)
        self._buffers["weight_scale"] = scale.to(device)
        return self


class Float8Linear(Float8Weight, nn.Linear):
    """An nn.Linear (same names: `weight`, `bias`, plus `weight_scale`) whose frozen weight is e4m3."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: torch.device | str | None = None) -> Float8Linear:
        device = linear.weight.device if device is None else torch.device(device)
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        q, scale = quantize_rows(linear.weight.to(device))
        new.weight = nn.Parameter(q, requires_grad=False)
        new.register_buffer("weight_scale", scale)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.weight_scale, self.bias, self.fp8_compute)


class _Float8LinearFn(torch.autograd.Function):
    """F.linear on the dequantized weight, saving the e4m3 storage (not the dense copy) for backward: a frozen
    layer without a LoRA (SD3's context-stream MLPs) would otherwise hold its weight in bf16 until backward."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None, fp8_compute: bool) -> Tensor:
        out = base_linear(x, q, scale, bias, fp8_compute)
        ctx.save_for_backward(q, scale)
        ctx.x_dtype, ctx.bias_dtype, ctx.fp8_compute = x.dtype, None if bias is None else bias.dtype, fp8_compute
        return out

    @staticmethod
    def backward(ctx, dy: Tensor):
        q, scale = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            dx = base_input_grad(dy, q, scale, dy.dtype, ctx.fp8_compute).to(ctx.x_dtype)
        db = dy.reshape(-1, dy.shape[-1]).sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[3] else None
        return dx, None, None, db, None


def is_block_linear(name: str) -> bool:
    """The transformer blocks' Linears (Flux double / single, SD3 joint): nearly all the weights. Embedders
    and the final layer are a few MB and feed or read every token, so they keep the compute dtype."""
    return name.split(".", 1)[0] in BLOCK_LISTS


def quantize_linears_(model: nn.Module, device: torch.device | str | None = None,
                      include: Callable[[str], bool] = is_block_linear) -> int:
    """Replace each plain nn.Linear whose name passes `include` by a Float8Linear on `device`, one layer at a
    time (a bf16 model on the CPU never needs to fit on the GPU whole). Returns the bytes saved against the
    weights' previous dtype. Quantize before `inject_lora`: the LoRA layers take the e4m3 weight as it is."""
    saved = 0
    # names, not modules: each replaced layer's full-precision weight is freed before the next is quantized
    names = [n for n, m in model.named_modules() if type(m) in (nn.Linear, WideLinear) and include(n)]
    if not names:
        raise ValueError(f"no Linear of {type(model).__name__} matches; nothing to store in fp8")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        saved += linear.weight.numel() * (linear.weight.element_size() - 1) - 4 * linear.out_features
        setattr(parent, child, Float8Linear.from_linear(linear, device))
        del linear
    return saved


def fp8_bytes(model: nn.Module) -> int:
    """Bytes held in e4m3 weights (0 for a model without any)."""
    return sum(p.numel() for p in model.parameters() if p.dtype == E4M3)


def enable_fp8_compute_(model: nn.Module, device: torch.device | str, enabled: bool = True) -> int:
    """Run the GEMMs of every e4m3 layer of `model` in fp8 (model/fp8_gemm.py); returns how many layers. Refused
    in one line on a CUDA GPU without fp8 GEMMs, and for a model without e4m3 weights (quantize it first)."""
    if enabled:
        fp8_gemm.check_device(device)
    layers = [m for m in model.modules()
              if isinstance(m, Float8Weight) and getattr(m, "weight_scale", None) is not None]
    if not layers and enabled:
        raise ValueError(f"{type(model).__name__} has no fp8 weights: fp8 compute runs on e4m3 storage "
                         "(quantize_linears_, or load with fp8)")
    for m in layers:
        m.fp8_compute = enabled
    return len(layers)
