"""Pieces shared by the Flux (FLUX.1, FLUX.2) and MMDiT transformers: embeddings, norms, modulation, attention, latent packing.

Parameter names follow the official checkpoints (BFL for Flux), so those files load with no key map.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import fp8_gemm, kernels

# The ModuleLists that hold the transformer blocks (Flux double / single, SD3 joint): nearly all the weights, one
# unit for fp8 storage (model/fp8.py) and for sharding (distill/sharding.py)
BLOCK_LISTS = ("double_blocks", "single_blocks", "joint_blocks")


def named_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, block) in the order a forward pass runs them (Flux: double then single; SD3: joint)."""
    return [(f"{name}.{j}", block) for name in BLOCK_LISTS for j, block in enumerate(getattr(model, name, ()))]


class BlockRunner:
    """How Flux and MMDiT run each block: optionally checkpointed (recomputed in backward), optionally through a
    block swap (`model/block_swap.py`) that brings the block's weights from host memory for the call."""

    gradient_checkpointing = False
    unchecked_blocks = 0  # with checkpointing: how many of the first blocks keep their activations instead
    block_swap = None  # a BlockSwap, set by it

    def enable_gradient_checkpointing(self, enabled: bool = True, unchecked_blocks: int = 0):
        """Recompute each block's activations in backward: memory per block instead of per model. The first
        `unchecked_blocks` blocks keep theirs, which saves their recomputation where memory allows."""
        self.gradient_checkpointing, self.unchecked_blocks = enabled, unchecked_blocks
        return self

    def compile_blocks(self, mode: str | None = None, backend: str | None = None) -> int:
        """Regional compilation (as diffusers' `compile_repeated_blocks`): each block is compiled in place with
        static shapes, and blocks of one class share the compiled code, so a 57-block Flux compiles two graphs
        (per variant) instead of one huge one; embedders, the final layer and the Python around blocks stay eager.
        Checkpointing, block swap and LoRA sets wrap or run inside the compiled blocks. Returns the block count.
        `backend`: torch.compile's (default inductor; `SCFM_COMPILE_BACKEND` overrides it: the CPU tests use
        aot_eager, which traces and partitions the same graphs without generating C++ for each)."""
        import torch._dynamo

        # The guarded variants of one block kind: grad on / off, each LoRA set selection a step uses (teacher,
        # live, per-element masks), fp8 on / off; dynamo's default of 8 would drop the rest back to eager.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        blocks = named_blocks(self)
        backend = os.environ.get("SCFM_COMPILE_BACKEND") or backend or "inductor"
        if backend not in torch._dynamo.list_backends(exclude_tags=()):  # else a traceback at the first call
            raise ValueError(f"--compile: no torch.compile backend {backend!r} (SCFM_COMPILE_BACKEND); unset it for "
                             "inductor, or name one of torch._dynamo.list_backends()")
        for _, block in blocks:
            block.compile(dynamic=False, mode=mode, backend=backend)
        return len(blocks)

    def _checkpointed(self, block: nn.Module) -> bool:
        if not (self.gradient_checkpointing and torch.is_grad_enabled()):
            return False
        # the block list is only walked when some blocks are exempt (not on every call of every forward)
        return not self.unchecked_blocks or not any(block is b for _, b in named_blocks(self)[:self.unchecked_blocks])

    def _run(self, block: nn.Module, *args: Tensor):
        fn = block if self.block_swap is None else partial(self.block_swap, block)
        if self._checkpointed(block):
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding [cos, sin] of `time_factor * t` (B,) -> (B, dim).

    The multiply by 1000 happens in t's own dtype, as in BFL and diffusers: in bf16, sigma = 0.8125 becomes 812 (not
    812.5) before the sinusoids, and bf16 parity with diffusers depends on reproducing that rounding.
    """
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb.to(t.dtype) if t.is_floating_point() else emb


class WideLinear(nn.Linear):
    """nn.Linear for the wide projections (fused qkv, Flux `linear1`, MLP inputs). On the CPU, without
    autograd, in fp32, a layer at least two panels wide runs its GEMM in 3072-column panels written straight
    into one output: MKL's sgemm is 4-17% slower on the whole width (9216-27648 columns) than panel by
    panel, at every token count measured (16-4096), with bit-identical outputs at those widths (other shapes
    may round differently in the last bit; tests/test_wide_linear.py holds them to fp32 tolerance)
    (bench/flux2_forward.py: 0.98x diffusers instead of 1.00-1.01x for a klein-4B block pair). Everything else,
    training included, is F.linear; the parameters and their names are nn.Linear's."""

    PANEL = 3072

    def forward(self, x: Tensor) -> Tensor:
        n = self.out_features
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad
                                                  or (self.bias is not None and self.bias.requires_grad))
        # compiled blocks (compile_blocks) get the one GEMM: inductor picks its own tiling, and out= views are
        # no graph for it to fuse
        if (x.device.type != "cpu" or x.dtype != torch.float32 or self.weight.dtype != torch.float32
                or n < 2 * self.PANEL or needs_grad or torch.compiler.is_compiling()):
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, x.shape[-1])
        out = x2.new_empty(x2.shape[0], n)
        for start in range(0, n, self.PANEL):
            cols = slice(start, start + self.PANEL)
            if self.bias is None:
                torch.mm(x2, self.weight[cols].t(), out=out[:, cols])
            else:  # addmm, as F.linear: the bias starts the accumulation, so the sums round alike
                torch.addmm(self.bias[cols], x2, self.weight[cols].t(), out=out[:, cols])
        return out.view(*x.shape[:-1], n)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, bias: bool = True):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=bias)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMSNorm with a learned `scale` (BFL's name). Math lives in the kernels dispatcher."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return kernels.rms_norm(x, self.scale, self.eps)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, pe: Tensor | None) -> tuple[Tensor, Tensor]:
        """Normalise q, k (B, H, L, D) and rotate them by `pe`, in one fused op where the kernels allow."""
        return kernels.qk_norm_rope(q, k, self.query_norm.scale, self.key_norm.scale, pe, self.query_norm.eps)


@dataclass
class ModulationOut:
    shift: Tensor
    scale: Tensor
    gate: Tensor

    def modulate(self, x: Tensor) -> Tensor:
        return (1 + self.scale) * x + self.shift

    def modulate_norm(self, norm: nn.LayerNorm, x: Tensor, reader: nn.Module) -> Tensor:
        """self.modulate(norm(x)) for the Linear `reader` (see `modulate_norm`)."""
        return modulate_norm(norm, x, self.shift, self.scale, reader)


def activate(act: nn.Module, h: Tensor, reader: nn.Module) -> Tensor:
    """act(h) for the Linear `reader`: a tanh GELU or a SwiGLU (a module with `kind = "swiglu"`) whose reader runs
    fp8 GEMMs is one kernel that also rounds the rows for it (model/kernels/mlp_act.py, CUDA); else act(h)."""
    kind = "gelu_tanh" if isinstance(act, nn.GELU) and act.approximate == "tanh" else getattr(act, "kind", None)
    if kind is None or not fp8_gemm.reads_rows(reader):
        return act(h)
    return fp8_gemm.attach_rows(*kernels.mlp_activation(h, kind, quantize=True))


class MLP(nn.Sequential):
    """Linear, activation, Linear under the official indices 0, 1, 2 (BFL's `img_mlp.0` / `img_mlp.2`); the
    activation rounds the second Linear's fp8 rows when it can (`activate`)."""

    def forward(self, x: Tensor) -> Tensor:
        return self[2](activate(self[1], self[0](x), self[2]))


def modulate_norm(norm: nn.LayerNorm, x: Tensor, shift: Tensor, scale: Tensor, reader: nn.Module) -> Tensor:
    """(1 + scale) * norm(x) + shift (`norm` without affine), read by the Linear `reader`: when that runs fp8
    GEMMs, one kernel that also rounds the rows for it (model/kernels/adanorm.py, CUDA); elsewhere exactly the
    modules' own ops."""
    return fp8_gemm.attach_rows(*kernels.modulated_layer_norm(x, shift, scale, norm.eps, fp8_gemm.reads_rows(reader)))


class Modulation(nn.Module):
    """adaLN-Zero modulation: Linear(SiLU(vec)) chunked into (shift, scale, gate), twice for double blocks."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)  # each (B, 1, D)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.multiplier == 6 else None


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q, k, v (B, H, L, D) -> (B, L, H*D) through torch's fused SDPA."""
    x = F.scaled_dot_product_attention(q, k, v)
    return rearrange(x, "B H L D -> B L (H D)")


# --- latent packing (Flux): 2x2 latent patches become one token -------------------------------------------------


def pack(latents: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4); channel order inside a token is (c, ph, pw), as diffusers and BFL."""
    return rearrange(latents, "B C (H ph) (W pw) -> B (H W) (C ph pw)", ph=2, pw=2)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """(B, H/2 * W/2, C*4) -> (B, C, H, W); height and width are in latent pixels."""
    return rearrange(tokens, "B (H W) (C ph pw) -> B C (H ph) (W pw)", H=height // 2, W=width // 2, ph=2, pw=2)


def image_ids(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """Position ids (H/2 * W/2, 3) = (0, row, col) for packed tokens, row-major; height/width in latent pixels."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 3)


def text_ids(length: int, device: torch.device | str | None = None) -> Tensor:
    """Text tokens all sit at position 0 on every axis."""
    return torch.zeros(length, 3, device=device)
