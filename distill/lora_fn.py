"""The multi-set LoRA linear as one autograd function: y = x W^T + b + sum over groups of s * (x D^T) U^T.

Why not plain autograd ops: the straightforward composition (peft's `base(x) + up(down(x)) * s`, or an
in-place `out.narrow(...).add_(...)` per fused slice) writes a full-width delta, reads it back and rewrites
the output, and in backward autograd clones the whole output gradient once per in-place slice
(`CopySlices`). For Flux `linear1` (21504 wide) that traffic costs a large fraction of the GEMM itself. Here
each slice's up-projection is accumulated straight into the base output by the GEMM (`addmm_`, beta = 1),
and backward computes exactly the needed gradients: dx, d(down), d(up), and dW / db only if asked.

`groups` says which batch elements use which factor pair: `(rows, k)` with rows `None` (every element), a
`slice` (a contiguous run: views, no copies), a LongTensor of element indices (gather / scatter) or, without
grad only, a (B,) 0/1 float mask (every element, the delta times its mask: compiled blocks, distill/lora.py); the
pair is `factors[2k]` = down (S*r, in) and `factors[2k + 1]` = up (out, r), stored in any dtype and used in
the output's dtype. The rows of up that belong to slice i act on the i-th r-wide chunk of x D^T.

A frozen base weight may be e4m3 with a per-row scale (`model/fp8.py`): it is dequantized to the compute dtype
in forward and again in backward (for dx), so no dense copy outlives the call; with `fp8_compute` both of those
GEMMs run in fp8 instead (`model/fp8_gemm.py`) while the LoRA GEMMs stay in the compute dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.fp8 import base_input_grad, base_linear, linear


def is_mask(rows) -> bool:
    return isinstance(rows, Tensor) and rows.is_floating_point()


def rows_of(t: Tensor, rows) -> Tensor:
    if rows is None or is_mask(rows):
        return t
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def _spans(slices: tuple[int, ...], rank: int):
    """(output columns, chunk of x D^T) per slice."""
    start = 0
    for i, width in enumerate(slices):
        yield slice(start, start + width), slice(i * rank, (i + 1) * rank)
        start += width


def _add_up_(out2d: Tensor, h: Tensor, up: Tensor, scale: float, slices: tuple[int, ...], rank: int) -> None:
    """out2d[:, slice i] += scale * h[:, chunk i] @ up[slice i]^T, each inside one GEMM (beta = 1)."""
    for cols, chunk in _spans(slices, rank):
        out2d[:, cols].addmm_(h[:, chunk], up[cols].t(), alpha=scale)


def _added_up(out: Tensor, rows, h: Tensor, up: Tensor, scale: float, slices: tuple[int, ...], rank: int) -> Tensor:
    """out plus scale * h U^T on `rows`, out of place: what a compiled block runs (see `_forward`)."""
    delta = torch.cat([h[:, chunk] @ up[cols].t() for cols, chunk in _spans(slices, rank)], dim=1) * scale
    if rows is None:
        return out + delta.view(out.shape)
    if is_mask(rows):
        return out + delta.view(out.shape) * rows.view(-1, *[1] * (out.dim() - 1)).to(delta.dtype)
    index = torch.arange(out.shape[0], device=out.device)[rows] if isinstance(rows, slice) else rows
    return out.index_add(0, index, delta.view(len(index), *out.shape[1:]))


def _forward(x: Tensor, weight: Tensor, weight_scale: Tensor | None, bias: Tensor | None, scale: float,
             slices: tuple[int, ...], groups: tuple, fp8_compute: bool, factors: tuple[Tensor, ...]):
    """The layer's output, x in the compute dtype and each group's x D^T (what backward needs).

    Eager adds each up-projection into the base output in place, through views of it. Inside a compiled block the
    sum is out of place instead: torch.compile 2.11 loses every gradient of an autograd function whose forward
    writes into views of its output (the LoRA's and the input's: the block trains nothing; 2.13 is right), and
    inductor fuses the out-of-place sum anyway (bench/block_memory.py shows both)."""
    out = base_linear(x, weight, weight_scale, bias, fp8_compute).contiguous()  # rows are updated through views
    cdt, n_in, n_out = out.dtype, x.shape[-1], out.shape[-1]  # cdt: bf16 under autocast
    xc = x.to(cdt)
    rank = factors[1].shape[-1]
    compiling = torch.compiler.is_compiling()
    hs = []
    for rows, k in groups:
        down, up = factors[2 * k].to(cdt), factors[2 * k + 1].to(cdt)
        xr = rows_of(xc, rows).reshape(-1, n_in)  # (N, in), N = elements x tokens
        h = xr @ down.t()  # (N, S*r)
        if compiling or is_mask(rows):
            out = _added_up(out, rows, h, up, scale, slices, rank)
        elif rows is None or isinstance(rows, slice):
            _add_up_(rows_of(out, rows).view(-1, n_out), h, up, scale, slices, rank)
        else:  # scattered elements: their delta, then one index_add_ into the output
            delta = torch.zeros(h.shape[0], n_out, dtype=cdt, device=h.device)
            _add_up_(delta, h, up, scale, slices, rank)
            out.index_add_(0, rows, delta.view(len(rows), *out.shape[1:]))
        hs.append(h)
    return out, xc, rank, hs


class LoRALinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, weight_scale: Tensor | None, bias: Tensor | None, scale: float,
                slices: tuple[int, ...], groups: tuple, fp8_compute: bool, *factors: Tensor) -> Tensor:
        out, xc, rank, hs = _forward(x, weight, weight_scale, bias, scale, slices, groups, fp8_compute, factors)
        ctx.scale, ctx.slices, ctx.rank, ctx.groups, ctx.n_factors = scale, slices, rank, groups, len(factors)
        ctx.fp8_compute = fp8_compute
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(xc, weight, weight_scale, *factors, *hs)
        return out

    @staticmethod
    def backward(ctx, dy: Tensor):
        xc, weight, weight_scale, *rest = ctx.saved_tensors
        factors, hs = rest[:ctx.n_factors], rest[ctx.n_factors:]
        need = ctx.needs_input_grad
        scale, slices, rank = ctx.scale, ctx.slices, ctx.rank
        n_in, n_out, cdt = xc.shape[-1], dy.shape[-1], xc.dtype
        dy = dy.to(cdt)
        dx = None
        if need[0]:
            dx = base_input_grad(dy, weight, weight_scale, cdt, ctx.fp8_compute).contiguous().view(xc.shape)
        dw = (dy.reshape(-1, n_out).t() @ xc.reshape(-1, n_in)).to(ctx.dtypes[1]) if need[1] else None
        db = dy.reshape(-1, n_out).sum(0).to(ctx.dtypes[2]) if need[3] else None
        d_factors: list[Tensor | None] = [None] * ctx.n_factors
        for (rows, k), h in zip(ctx.groups, hs):
            need_down, need_up = need[8 + 2 * k], need[9 + 2 * k]
            if not (need[0] or need_down or need_up):
                continue
            down, up = factors[2 * k].to(cdt), factors[2 * k + 1].to(cdt)
            dyr = rows_of(dy, rows).reshape(-1, n_out)  # (N, out)
            if need[0] or need_down:  # gradient at x D^T, per slice: (N, r) chunks side by side
                g = torch.cat([dyr[:, cols] @ up[cols] for cols, _ in _spans(slices, rank)], dim=1) * scale
            if need[0]:
                if rows is None or isinstance(rows, slice):
                    rows_of(dx, rows).view(-1, n_in).addmm_(g, down)
                else:
                    dx.index_add_(0, rows, (g @ down).view(len(rows), *dx.shape[1:]))
            if need_down:
                d_down = g.t() @ rows_of(xc, rows).reshape(-1, n_in)  # (S*r, in)
                d_factors[2 * k] = d_down.to(factors[2 * k].dtype)
            if need_up:
                d_up = torch.cat([dyr[:, cols].t() @ h[:, chunk] for cols, chunk in _spans(slices, rank)])
                d_factors[2 * k + 1] = (d_up * scale).to(factors[2 * k + 1].dtype)  # (out, r)
        if dx is not None:
            dx = dx.to(ctx.dtypes[0])  # x may be fp32 under autocast; its gradient keeps its dtype
        return (dx, dw, None, db, None, None, None, None, *d_factors)


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, scale: float, slices: tuple[int, ...],
                groups: tuple, factors: tuple[Tensor, ...], weight_scale: Tensor | None = None,
                fp8_compute: bool = False) -> Tensor:
    """The base linear plus the LoRA of each group (see the module docstring); no groups: the base only.
    `weight_scale`: the per-row scale of an e4m3 `weight` (None for a plain one); `fp8_compute`: its GEMMs in fp8."""
    if not groups:
        return linear(x, weight, weight_scale, bias, fp8_compute)
    if not torch.is_grad_enabled():
        # no graph to record (the no-grad target calls): the math alone. torch.compile (2.13) also binds a
        # Function's arguments one place off when none of them requires grad. The test is the grad mode alone,
        # which dynamo guards on, not each tensor's requires_grad: under grad mode the Function always runs, so
        # a compiled block can never take this branch and lose the LoRA's gradients (the fp8 GEMM has none).
        return _forward(x, weight, weight_scale, bias, scale, slices, groups, fp8_compute, factors)[0]
    if any(is_mask(rows) for rows, _ in groups):
        raise ValueError("LoRA masks are for calls without grad; with grad give the rows (a slice or indices)")
    return LoRALinearFn.apply(x, weight, weight_scale, bias, scale, slices, groups, fp8_compute, *factors)
