"""FLUX.2: BFL (official) <-> diffusers `Flux2Transformer2DModel` names (docs/flux2.md §1.2).

No Linear has a bias; the modulations are global (three top-level layers instead of one per block); the single
blocks' `linear1` stays fused in diffusers too (`attn.to_qkv_mlp_proj`), so only the double blocks' qkv split.
"""

from __future__ import annotations

from torch import Tensor

from . import Rule, double_single_rules, tables
from .flux import double_attention, single_norms_and_final_layer

W = (("weight", "weight"),)

# (block kind, official module, diffusers module(s), kind, (official param, diffusers param) pairs)
_MODULES: list[tuple[str, str, tuple[str, ...], str, tuple[tuple[str, str], ...]]] = [
    ("", "img_in", ("x_embedder",), "same", W),
    ("", "txt_in", ("context_embedder",), "same", W),
    ("", "time_in.in_layer", ("time_guidance_embed.timestep_embedder.linear_1",), "same", W),
    ("", "time_in.out_layer", ("time_guidance_embed.timestep_embedder.linear_2",), "same", W),
    ("guidance", "guidance_in.in_layer", ("time_guidance_embed.guidance_embedder.linear_1",), "same", W),
    ("guidance", "guidance_in.out_layer", ("time_guidance_embed.guidance_embedder.linear_2",), "same", W),
    ("", "double_stream_modulation_img.lin", ("double_stream_modulation_img.linear",), "same", W),
    ("", "double_stream_modulation_txt.lin", ("double_stream_modulation_txt.linear",), "same", W),
    ("", "single_stream_modulation.lin", ("single_stream_modulation.linear",), "same", W),
    *double_attention(W),
    ("double", "double_blocks.{i}.img_mlp.0", ("transformer_blocks.{i}.ff.linear_in",), "same", W),
    ("double", "double_blocks.{i}.img_mlp.2", ("transformer_blocks.{i}.ff.linear_out",), "same", W),
    ("double", "double_blocks.{i}.txt_mlp.0", ("transformer_blocks.{i}.ff_context.linear_in",), "same", W),
    ("double", "double_blocks.{i}.txt_mlp.2", ("transformer_blocks.{i}.ff_context.linear_out",), "same", W),
    ("single", "single_blocks.{i}.linear1", ("single_transformer_blocks.{i}.attn.to_qkv_mlp_proj",), "same", W),
    ("single", "single_blocks.{i}.linear2", ("single_transformer_blocks.{i}.attn.to_out",), "same", W),
    *single_norms_and_final_layer(W),
]

# The table at parameter granularity (checkpoints) and at module granularity (LoRA key mapping).
TABLE, MODULE_TABLE = tables(_MODULES)


def flux2_rules(depth: int, depth_single_blocks: int, guidance_embed: bool, *, modules: bool = False) -> list[Rule]:
    return double_single_rules(MODULE_TABLE if modules else TABLE, depth, depth_single_blocks, guidance_embed)


def flux2_split_sizes(rule: Rule, t: Tensor) -> list[int]:
    """Every fused FLUX.2 tensor is a double block's qkv: three equal row blocks."""
    return [t.shape[0] // 3] * 3
