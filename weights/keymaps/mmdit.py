"""SD3 / SD3.5: SAI (official) <-> diffusers `SD3Transformer2DModel` names (docs/models.md §3.4).

Rows apply to groups of blocks rather than to every block: the last block's context stream has no output
projection, no MLP and a 2-way adaLN stored in the other order; QK-norm exists only in SD3.5; `attn2` only in
the dual-attention blocks.
"""

from __future__ import annotations

from torch import Tensor

from . import Rule

WB = (("weight", "weight"), ("bias", "bias"))
W = (("weight", "weight"),)
TENSOR = (("", ""),)  # a bare tensor (the position table), no parameter suffix

# (group, official module, diffusers module(s), kind, (official param, diffusers param) pairs). Groups:
#   ""      once                      "block"  every joint block        "qk"    every block, QK-norm models
#   "ctx"   every block but the last  "last"   the last block           "dual"  dual-attention blocks
#   "dual_qk" dual blocks of QK-norm models
_X, _C, _T = "joint_blocks.{i}.x_block", "joint_blocks.{i}.context_block", "transformer_blocks.{i}"
_MODULES: list[tuple[str, str, tuple[str, ...], str, tuple[tuple[str, str], ...]]] = [
    ("", "pos_embed", ("pos_embed.pos_embed",), "same", TENSOR),
    ("", "x_embedder.proj", ("pos_embed.proj",), "same", WB),
    ("", "t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",), "same", WB),
    ("", "t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",), "same", WB),
    ("", "y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",), "same", WB),
    ("", "y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",), "same", WB),
    ("", "context_embedder", ("context_embedder",), "same", WB),
    ("block", f"{_X}.attn.qkv", tuple(f"{_T}.attn.to_{x}" for x in "qkv"), "fuse", WB),
    ("block", f"{_C}.attn.qkv", tuple(f"{_T}.attn.add_{x}_proj" for x in "qkv"), "fuse", WB),
    ("block", f"{_X}.attn.proj", (f"{_T}.attn.to_out.0",), "same", WB),
    ("block", f"{_X}.adaLN_modulation.1", (f"{_T}.norm1.linear",), "same", WB),
    ("block", f"{_X}.mlp.fc1", (f"{_T}.ff.net.0.proj",), "same", WB),
    ("block", f"{_X}.mlp.fc2", (f"{_T}.ff.net.2",), "same", WB),
    ("qk", f"{_X}.attn.ln_q", (f"{_T}.attn.norm_q",), "same", W),
    ("qk", f"{_X}.attn.ln_k", (f"{_T}.attn.norm_k",), "same", W),
    ("qk", f"{_C}.attn.ln_q", (f"{_T}.attn.norm_added_q",), "same", W),
    ("qk", f"{_C}.attn.ln_k", (f"{_T}.attn.norm_added_k",), "same", W),
    ("ctx", f"{_C}.attn.proj", (f"{_T}.attn.to_add_out",), "same", WB),
    ("ctx", f"{_C}.adaLN_modulation.1", (f"{_T}.norm1_context.linear",), "same", WB),
    ("ctx", f"{_C}.mlp.fc1", (f"{_T}.ff_context.net.0.proj",), "same", WB),
    ("ctx", f"{_C}.mlp.fc2", (f"{_T}.ff_context.net.2",), "same", WB),
    # the last context stream is modulated (shift, scale) by SAI; diffusers' AdaLayerNormContinuous chunks
    # (scale, shift)
    ("last", f"{_C}.adaLN_modulation.1", (f"{_T}.norm1_context.linear",), "swap", WB),
    ("dual", f"{_X}.attn2.qkv", tuple(f"{_T}.attn2.to_{x}" for x in "qkv"), "fuse", WB),
    ("dual", f"{_X}.attn2.proj", (f"{_T}.attn2.to_out.0",), "same", WB),
    ("dual_qk", f"{_X}.attn2.ln_q", (f"{_T}.attn2.norm_q",), "same", W),
    ("dual_qk", f"{_X}.attn2.ln_k", (f"{_T}.attn2.norm_k",), "same", W),
    ("", "final_layer.linear", ("proj_out",), "same", WB),
    # SAI (shift, scale), diffusers (scale, shift), as for Flux's final layer
    ("", "final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap", WB),
]


def _join(module: str, param: str) -> str:
    return f"{module}.{param}" if param else module


# The module table expanded to parameter rows (group, official key, diffusers keys, kind).
TABLE = [
    (group, _join(off, po), tuple(_join(o, pd) for o in others), kind)
    for group, off, others, kind, params in _MODULES
    for po, pd in params
]
# The same table at module granularity, for LoRA key mapping.
MODULE_TABLE = [(group, off, others, kind) for group, off, others, kind, _ in _MODULES]


def _blocks(group: str, depth: int, dual: tuple[int, ...], qk_norm: bool) -> list[int | None]:
    return {
        "": [None], "block": list(range(depth)), "qk": list(range(depth)) if qk_norm else [],
        "ctx": list(range(depth - 1)), "last": [depth - 1] if depth else [], "dual": list(dual),
        "dual_qk": list(dual) if qk_norm else [],
    }[group]


def mmdit_rules(
    depth: int, dual_attention_layers: tuple[int, ...] | list[int], qk_norm: bool, *, modules: bool = False
) -> list[Rule]:
    """The rules for one model shape: `depth` joint blocks, these dual blocks, with or without QK-norm."""
    rules = []
    for group, official, others, kind in MODULE_TABLE if modules else TABLE:
        for i in _blocks(group, depth, tuple(dual_attention_layers), qk_norm):
            fill = (lambda s: s) if i is None else (lambda s, i=i: s.replace("{i}", str(i)))
            rules.append(Rule(fill(official), tuple(fill(o) for o in others), kind))
    return rules


def mmdit_split_sizes(rule: Rule, t: Tensor) -> list[int]:
    """Every fused SAI tensor is a qkv projection: three equal row blocks."""
    return [t.shape[0] // 3] * 3
