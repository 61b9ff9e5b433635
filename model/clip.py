"""CLIP text transformer: OpenAI CLIP-L (Flux, SD3) and OpenCLIP bigG (SD3), with transformers' names.

Parameter names are transformers' `CLIPTextModelWithProjection` keys
(`text_model.encoder.layers.{i}.self_attn.q_proj.weight`, ..., `text_projection.weight`), so HF folders and
ComfyUI's `clip_l` / `clip_g` files load without a key map. The OpenCLIP-native layout is converted in
`weights/text.py`.

The forward returns everything the two pipelines take: Flux the pooled output (EOS position, final LayerNorm
applied, not projected), SD3 the penultimate hidden states (input of the last layer, no final LayerNorm) and
the projected pooled output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass(frozen=True)
class CLIPConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # OpenAI: x*sigmoid(1.702x); OpenCLIP H / bigG: exact erf GELU
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = 768  # None: no text_projection (Flux's CLIP-L ships without one)
    # Pooling position rule, as transformers: 2 (the value in old hub configs) pools at argmax(input_ids),
    # which is the EOS for real tokenisation since EOS has the highest id; otherwise the first position equal
    # to it.
    eos_token_id: int = 49407

    def __post_init__(self):
        check_tower(self)


def check_tower(config) -> None:
    """What a text or vision tower's config must satisfy (model/clip_vision.py shares the layers)."""
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"hidden_size {config.hidden_size} is not divisible by "
                         f"num_attention_heads {config.num_attention_heads}")
    if config.hidden_act not in _ACTIVATIONS:
        raise ValueError(f"hidden_act must be one of {_ACTIVATIONS}, got {config.hidden_act!r}")


CLIP_CONFIGS: dict[str, CLIPConfig] = {
    "clip-l": CLIPConfig(),  # openai/clip-vit-large-patch14 text tower
    # laion CLIP-ViT-bigG-14, SD3's text_encoder_2
    "clip-bigg": CLIPConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                            num_attention_heads=20, hidden_act="gelu", projection_dim=1280),
    "tiny": CLIPConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, projection_dim=32, eos_token_id=999),
}


class CLIPOutput(NamedTuple):
    last_hidden_state: Tensor  # (B, L, D), after the final LayerNorm
    penultimate_hidden_state: Tensor  # (B, L, D), transformers' hidden_states[-2]: no final LayerNorm
    pooled_output: Tensor  # (B, D), last_hidden_state at the EOS position
    text_embeds: Tensor | None  # (B, P), text_projection(pooled_output), None without a projection


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        L = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:L]  # (B, L, D)


# The attention, MLP and encoder layers below serve the vision tower too (model/clip_vision.py): transformers'
# text and vision layers have the same names and math, the vision tower only attends without the causal mask.
# `config` is a CLIPConfig or a CLIPVisionConfig; only the fields both share are read.


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPConfig, causal: bool = True):
        super().__init__()
        self.causal = causal
        D = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, D // config.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(D, D), nn.Linear(D, D)
        self.v_proj, self.out_proj = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, Dh)
        k = self.k_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        # Text: causal, and no padding mask: the pipelines pass none, and with causal attention the tokens
        # before EOS never see the padding anyway. Vision: every patch sees every other.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, L, Dh)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.quick = config.hidden_act == "quick_gelu"

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        x = x * torch.sigmoid(1.702 * x) if self.quick else F.gelu(x)
        return self.fc2(x)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPConfig, causal: bool = True):
        super().__init__()
        self.self_attn = CLIPAttention(config, causal)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPConfig, causal: bool = True):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(config, causal) for _ in range(config.num_hidden_layers)])


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


def eos_positions(input_ids: Tensor, eos_token_id: int) -> Tensor:
    """(B,) pooling positions under transformers' two rules (see CLIPConfig.eos_token_id)."""
    ids = input_ids.to(torch.int)  # int32 as the reference (ONNX has no int64 argmax); same positions
    if eos_token_id == 2:
        return ids.argmax(dim=-1)
    # First match: with CLIP-L the padding is EOS too, so the last match would be the wrong one.
    return (ids == eos_token_id).int().argmax(dim=-1)


class CLIPTextEncoder(nn.Module):
    """`forward(input_ids (B, L <= max_position_embeddings)) -> CLIPOutput`."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        if config.projection_dim is not None:
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, input_ids: Tensor) -> CLIPOutput:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}; tokenize with truncation")
        x = self.text_model.embeddings(input_ids)  # (B, L, D)
        penultimate = x
        for layer in self.text_model.encoder.layers:
            penultimate = x
            x = layer(x)
        last = self.text_model.final_layer_norm(x)
        eos = eos_positions(input_ids, self.config.eos_token_id).to(last.device)  # (B,)
        pooled = last[torch.arange(last.shape[0], device=last.device), eos]  # (B, D)
        embeds = self.text_projection(pooled) if self.config.projection_dim is not None else None
        return CLIPOutput(last, penultimate, pooled, embeds)
