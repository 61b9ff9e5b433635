"""The Qwen3 decoder as FLUX.2 [klein]'s text encoder, with Hugging Face parameter names so `text_encoder/`
folders and ComfyUI's `qwen_3_4b.safetensors` load as they are (docs/flux2.md §2.2).

Only what the klein pipeline reads is built: the embeddings and the decoder layers up to the last tapped one
(`hidden_states[27]` is the output of layers 0..26, before the final norm), so Qwen3-4B's last 9 layers, its final
norm and its LM head are never loaded. `forward` returns the tapped hidden states of every position, pads included,
stacked per token ([layer 9 | layer 18 | layer 27]: the transformer's context, (B, L, 3 * hidden)).

Per layer: x += o_proj(attention(input_layernorm(x))), then x += down(silu(gate(h)) * up(h)) with
h = post_attention_layernorm(x). Attention is grouped-query (kv head j serves q heads j*G..(j+1)*G-1), q and k get a
per-head RMSNorm before RoPE, RoPE is the half-split kind (not FLUX's interleaved pairs), causal, and padded keys
are masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import PresetConfig


@dataclass(frozen=True)
class Qwen3Config(PresetConfig):
    """Hugging Face `Qwen3Config` field names (Qwen3-4B by default)."""

    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36  # the checkpoint's; the model builds max(taps) of them
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128  # not hidden / heads: Qwen3-4B's q_proj maps 2560 -> 4096
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    taps: tuple[int, ...] = (9, 18, 27)  # hidden_states indices klein stacks (hidden_states[0]: the embeddings)

    def __post_init__(self):
        object.__setattr__(self, "taps", tuple(self.taps))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.num_attention_heads} attention heads are not a multiple of "
                             f"{self.num_key_value_heads} key / value heads")
        if not self.taps or min(self.taps) < 0 or max(self.taps) > self.num_hidden_layers:
            raise ValueError(f"taps {self.taps} must lie in 0..{self.num_hidden_layers} (0: the embeddings)")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even (RoPE rotates halves)")


QWEN3_CONFIGS: dict[str, Qwen3Config] = {
    "qwen3-4b": Qwen3Config(),
    "qwen3-8b": Qwen3Config(hidden_size=4096, intermediate_size=12288),
    # the parity plan's tiny model (docs/flux2.md §7): 28 layers so that the taps are real, head_dim 16 != 48/4
    "tiny": Qwen3Config(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=28,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}
Qwen3Config.PRESETS = QWEN3_CONFIGS
Qwen3Config.FAMILY = "Qwen3"


class RMSNorm(nn.Module):
    """In fp32, cast back to the input dtype, then times the weight (Hugging Face's order of operations)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope(positions: Tensor, dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(cos, sin), each (L, dim), of the half-split rotary embedding: frequencies theta^(-2i/dim) repeated twice."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        b, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, n, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, n, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        groups = self.heads // self.kv_heads  # kv head j serves q heads j*G .. j*G + G-1
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale head_dim^-1/2
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3TextEncoder(nn.Module):
    """Parameters under `model.` as in Hugging Face's Qwen3ForCausalLM / Qwen3Model files."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(DecoderLayer(config) for _ in range(max(config.taps)))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids (B, L) long, attention_mask (B, L) 1 for tokens, 0 for pads -> (B, L, len(taps) * hidden):
        each position's tapped hidden states side by side, pads included."""
        b, n = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope(torch.arange(n, device=x.device), self.config.head_dim, self.config.rope_theta, x.dtype)
        allowed = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()  # causal
        if attention_mask is not None:  # and no padded key (right padding: every row keeps key 0)
            allowed = allowed[None] & attention_mask.bool()[:, None, :]
        mask = allowed[:, None] if allowed.ndim == 3 else allowed  # (B, 1, L, L) or (L, L)
        taps = {0: x}  # hidden_states[0], as transformers counts them: the embeddings
        for i, layer in enumerate(self.model.layers, start=1):
            x = layer(x, cos, sin, mask)
            if i in self.config.taps:
                taps[i] = x
        return torch.cat([taps[t] for t in self.config.taps], dim=-1)
