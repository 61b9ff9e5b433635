"""Flux: BFL (official) <-> diffusers `FluxTransformer2DModel` names (docs/models.md §2.4)."""

from __future__ import annotations

from torch import Tensor

from . import Rule, double_single_rules, tables

WB = (("weight", "weight"), ("bias", "bias"))
NORM = (("scale", "weight"),)

def double_attention(params) -> list:
    """The double blocks' attention rows, FLUX.1's and FLUX.2's alike (`params`: the Linears' parameters;
    FLUX.2's have no bias)."""
    return [
        ("double", "double_blocks.{i}.img_attn.qkv",
         tuple(f"transformer_blocks.{{i}}.attn.to_{x}" for x in "qkv"), "fuse", params),
        ("double", "double_blocks.{i}.txt_attn.qkv",
         tuple(f"transformer_blocks.{{i}}.attn.add_{x}_proj" for x in "qkv"), "fuse", params),
        ("double", "double_blocks.{i}.img_attn.norm.query_norm", ("transformer_blocks.{i}.attn.norm_q",), "same", NORM),
        ("double", "double_blocks.{i}.img_attn.norm.key_norm", ("transformer_blocks.{i}.attn.norm_k",), "same", NORM),
        ("double", "double_blocks.{i}.txt_attn.norm.query_norm",
         ("transformer_blocks.{i}.attn.norm_added_q",), "same", NORM),
        ("double", "double_blocks.{i}.txt_attn.norm.key_norm",
         ("transformer_blocks.{i}.attn.norm_added_k",), "same", NORM),
        ("double", "double_blocks.{i}.img_attn.proj", ("transformer_blocks.{i}.attn.to_out.0",), "same", params),
        ("double", "double_blocks.{i}.txt_attn.proj", ("transformer_blocks.{i}.attn.to_add_out",), "same", params),
    ]


def single_norms_and_final_layer(params) -> list:
    """The single blocks' q / k norms and the final layer, FLUX.1's and FLUX.2's alike."""
    return [
        ("single", "single_blocks.{i}.norm.query_norm", ("single_transformer_blocks.{i}.attn.norm_q",), "same", NORM),
        ("single", "single_blocks.{i}.norm.key_norm", ("single_transformer_blocks.{i}.attn.norm_k",), "same", NORM),
        ("", "final_layer.linear", ("proj_out",), "same", params),
        # BFL stores (shift, scale); diffusers' AdaLayerNormContinuous chunks (scale, shift)
        ("", "final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap", params),
    ]


# (block kind, official module, diffusers module(s), kind, (official param, diffusers param) pairs)
_MODULES: list[tuple[str, str, tuple[str, ...], str, tuple[tuple[str, str], ...]]] = [
    ("", "img_in", ("x_embedder",), "same", WB),
    ("", "txt_in", ("context_embedder",), "same", WB),
    ("", "time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",), "same", WB),
    ("", "time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",), "same", WB),
    ("", "vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",), "same", WB),
    ("", "vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",), "same", WB),
    ("guidance", "guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",), "same", WB),
    ("guidance", "guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",), "same", WB),
    ("double", "double_blocks.{i}.img_mod.lin", ("transformer_blocks.{i}.norm1.linear",), "same", WB),
    ("double", "double_blocks.{i}.txt_mod.lin", ("transformer_blocks.{i}.norm1_context.linear",), "same", WB),
    *double_attention(WB),
    ("double", "double_blocks.{i}.img_mlp.0", ("transformer_blocks.{i}.ff.net.0.proj",), "same", WB),
    ("double", "double_blocks.{i}.img_mlp.2", ("transformer_blocks.{i}.ff.net.2",), "same", WB),
    ("double", "double_blocks.{i}.txt_mlp.0", ("transformer_blocks.{i}.ff_context.net.0.proj",), "same", WB),
    ("double", "double_blocks.{i}.txt_mlp.2", ("transformer_blocks.{i}.ff_context.net.2",), "same", WB),
    ("single", "single_blocks.{i}.modulation.lin", ("single_transformer_blocks.{i}.norm.linear",), "same", WB),
    ("single", "single_blocks.{i}.linear1",
     tuple(f"single_transformer_blocks.{{i}}.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
     "fuse", WB),
    ("single", "single_blocks.{i}.linear2", ("single_transformer_blocks.{i}.proj_out",), "same", WB),
    *single_norms_and_final_layer(WB),
]

# The table at parameter granularity (checkpoints) and at module granularity (LoRA key mapping).
TABLE, MODULE_TABLE = tables(_MODULES)


def flux_rules(depth: int, depth_single_blocks: int, guidance_embed: bool, *, modules: bool = False) -> list[Rule]:
    return double_single_rules(MODULE_TABLE if modules else TABLE, depth, depth_single_blocks, guidance_embed)


def flux_split_sizes(hidden_size: int):
    """Row split of a fused official tensor into its diffusers parts: qkv thirds, linear1 [D, D, D, rest]."""

    def sizes(rule: Rule, t: Tensor) -> list[int]:
        if len(rule.others) == 3:
            return [t.shape[0] // 3] * 3
        return [hidden_size] * 3 + [t.shape[0] - 3 * hidden_size]

    return sizes
