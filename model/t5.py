"""T5 v1.1 encoder (the Flux / SD3 text encoder `T5EncoderModel`), with transformers' parameter names.

The parameter names are the checkpoint keys (`shared.weight`,
`encoder.block.{i}.layer.0.SelfAttention.q.weight`, ...), so a transformers folder or ComfyUI's
`t5xxl_fp16.safetensors` loads without a key map.

Differences from a textbook transformer, all of which the checkpoints depend on:
- no 1/sqrt(d) attention scaling (T5 folds it into the initialisation);
- one relative position bias, computed by block 0 from bucketed key-query distances and reused by every block;
- RMSNorm without mean subtraction or bias;
- gated tanh-GELU feed-forward, no biases anywhere;
- fp16 activations are clamped after each sub-layer, since fp16 T5-XXL overflows to inf without it;
- loaded in fp16 (weights/text.py load_t5), every feed-forward output projection `wo` stays fp32, as
  transformers' from_pretrained(dtype=float16) keeps it (`_keep_in_fp32_modules`): its input is cast to fp32
  and its fp32 output promotes the residual stream to fp32 from block 0's feed-forward on, so the clamp no
  longer fires and the norms round to fp16 only on their way into the fp16 layers. A model cast whole to fp16
  (`.half()`) runs all in fp16 with the clamp, as transformers' `.half()` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .kernels.rmsnorm import rms_norm_diffusers_reference


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128  # 32,100 sentencepiece pieces padded to a multiple of 128
    d_model: int = 4096
    d_kv: int = 64  # per-head width; num_heads * d_kv need not equal d_model
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32  # split in half: keys before / after the query
    relative_attention_max_distance: int = 128  # distances beyond this share the last bucket
    layer_norm_epsilon: float = 1e-6

    def __post_init__(self):
        if self.relative_attention_num_buckets % 4:
            raise ValueError("relative_attention_num_buckets must be divisible by 4")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"T5Config.{name} must be positive")


T5_CONFIGS: dict[str, T5Config] = {
    "t5-v1.1-xxl": T5Config(),  # google/t5-v1_1-xxl encoder, 4.76 B parameters
    "tiny": T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_heads=4),
}


def relative_position_bucket(relative_position: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bidirectional T5 buckets of `key_pos - query_pos`: half the buckets per direction, the first half of
    those exact distances, the rest logarithmically spaced up to `max_distance`."""
    num_buckets //= 2
    bucket = (relative_position > 0).long() * num_buckets
    distance = relative_position.abs()
    max_exact = num_buckets // 2
    # Same operation order as the reference (log, divide, scale, truncate) so bucket edges land on the same
    # integers; distance 0 gives log(0) = -inf here, which the `where` below discards.
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    log_bucket = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < max_exact, distance, log_bucket)


def _clamp_fp16(x: Tensor) -> Tensor:
    # transformers clamps fp16 activations to the finite range (a little below it once an inf appeared), so
    # fp16 checkpoints give finite outputs; we reproduce it exactly because the clamp changes the numbers.
    if x.dtype != torch.float16:
        return x
    fmax = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), fmax - 1000, fmax)
    return torch.clamp(x, min=-limit, max=limit)


class T5LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # T5's RMSNorm: variance in fp32, normalised value rounded to the weight dtype before the scale multiply
        # when the weight is fp16/bf16 (an fp32 weight keeps it fp32). With x and weight in one dtype that is
        # exactly the shared kernel; an fp16 model whose `wo` is fp32 feeds fp32 x to fp16 weights, and there the
        # rounding goes to the weight's dtype (diffusers' RMSNorm rule, the same as transformers' T5LayerNorm).
        if x.dtype == self.weight.dtype:
            return kernels.rms_norm(x, self.weight, self.eps)
        return rms_norm_diffusers_reference(x, self.weight, self.eps)


class T5Attention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.num_heads, self.head_dim = config.num_heads, config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.num_buckets, config.num_heads)

    def position_bias(self, length: int, device: torch.device) -> Tensor:
        position = torch.arange(length, device=device)
        relative = position[None, :] - position[:, None]  # (Lq, Lk): key position minus query position
        buckets = relative_position_bucket(relative, self.num_buckets, self.max_distance)
        bias = self.relative_attention_bias(buckets)  # (Lq, Lk, H)
        return bias.permute(2, 0, 1).unsqueeze(0)  # (1, H, Lq, Lk)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        k = self.k(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        # scale=1: T5 has no 1/sqrt(D) factor; the position bias (and padding mask) is the additive mask.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # (B, H, L, D)
        return self.o(out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # "gated-gelu" in T5 v1.1 is the tanh approximation (transformers' gelu_new), not exact erf GELU.
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        # An fp32 `wo` in an fp16 model (how load_t5 loads fp16, as transformers does) takes its input in fp32:
        # wo's output is where fp16 T5-XXL overflows. transformers casts to wo's dtype whenever the two differ
        # (int8 weights excepted; fp8 ones here).
        if h.dtype != self.wo.weight.dtype and self.wo.weight.dtype in (torch.float32, torch.float16, torch.bfloat16):
            h = h.to(self.wo.weight.dtype)
        return self.wo(h)


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        # A ModuleList, not named attributes, because the checkpoint keys are `layer.0.*` and `layer.1.*`.
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, has_relative_attention_bias),
                                    T5LayerFF(config)])

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = _clamp_fp16(self.layer[0](x, bias))
        return _clamp_fp16(self.layer[1](x))


class T5Stack(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.block = nn.ModuleList([T5Block(config, has_relative_attention_bias=i == 0)
                                    for i in range(config.num_layers)])
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)


class T5Encoder(nn.Module):
    """`forward(input_ids (B, L), attention_mask (B, L) or None) -> last_hidden_state (B, L, d_model)`.

    The Flux and SD3 pipelines pass no mask: pad tokens take part in attention, so outputs depend on the
    padded length, and the prompt encoders reproduce that by padding to the pipeline's length and passing no
    mask.
    """

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)  # unscaled, unlike the 2019 T5
        self.encoder = T5Stack(config)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
        x = self.shared(input_ids)  # (B, L, D)
        first = self.encoder.block[0].layer[0].SelfAttention
        bias = first.position_bias(input_ids.shape[1], input_ids.device).to(x.dtype)  # (1, H, L, L)
        if attention_mask is not None:
            # Masked keys get the dtype's lowest value (not -inf) so a fully padded row stays finite, as in
            # transformers.
            keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
            bias = torch.where(keep, bias, torch.finfo(x.dtype).min)  # (B, H, L, L)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)
