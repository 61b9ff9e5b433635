"""What a LoRA covers: the released target lists as tables in official module names, the fused layers' slices,
and `LoRAConfig` with its presets. distill/lora.py builds the layers from these."""

from __future__ import annotations

import re
from dataclasses import dataclass

SETS = ("live", "fast_ema", "slow_ema", "teacher")

# Official (BFL) module names, `{i}` = block index, `:kind` = per-slice LoRAs on a fused layer. Mapped through
# docs/models.md §2.4 this is exactly the released diffusers list of docs/method.md §6 (tests/test_lora.py
# checks it against peft). `proj_out` there means both single_blocks.{i}.linear2 and final_layer.linear.
FLUX_TARGETS: tuple[str, ...] = (
    "img_in", "txt_in",
    "time_in.in_layer", "time_in.out_layer",
    "vector_in.in_layer", "vector_in.out_layer",
    "guidance_in.in_layer", "guidance_in.out_layer",
    "double_blocks.{i}.img_mod.lin", "double_blocks.{i}.txt_mod.lin",
    "double_blocks.{i}.img_attn.qkv:qkv", "double_blocks.{i}.txt_attn.qkv:qkv",
    "double_blocks.{i}.img_attn.proj", "double_blocks.{i}.txt_attn.proj",
    "double_blocks.{i}.img_mlp.0", "double_blocks.{i}.img_mlp.2",
    "double_blocks.{i}.txt_mlp.0", "double_blocks.{i}.txt_mlp.2",
    "single_blocks.{i}.modulation.lin", "single_blocks.{i}.linear1:qkv_mlp", "single_blocks.{i}.linear2",
    "final_layer.linear", "final_layer.adaLN_modulation.1",
)

# SD3.5 in SAI names (docs/models.md §3.4). The released list has no context-stream adaLN or MLP
# (`norm1_context`, `ff_context`), its `norm2.linear` matches no SD3 module and its `attn.to_q` misses
# the dual blocks' `attn2`.
SD3_TARGETS: tuple[str, ...] = (
    "x_embedder.proj", "context_embedder",
    "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.mlp.0", "y_embedder.mlp.2",
    "joint_blocks.{i}.x_block.adaLN_modulation.1",
    "joint_blocks.{i}.x_block.attn.qkv:qkv", "joint_blocks.{i}.context_block.attn.qkv:qkv",
    "joint_blocks.{i}.x_block.attn.proj", "joint_blocks.{i}.context_block.attn.proj",
    "joint_blocks.{i}.x_block.mlp.fc1", "joint_blocks.{i}.x_block.mlp.fc2",
    "final_layer.linear", "final_layer.adaLN_modulation.1",
)

# FLUX.2 in BFL names: FLUX.1's list on FLUX.2's layers (every Linear: the embedders, the three shared modulations,
# both streams' attention and SwiGLU MLP, the single blocks' fused linear1 / linear2, the final layer); no released
# SCFM list exists for it. `mlp.0` ([gate | up]) and the single blocks' `linear1` ([qkv | gate | up]) take one LoRA
# each, as musubi-tuner and ai-toolkit train them and diffusers keeps linear1 fused (`to_qkv_mlp_proj`).
FLUX2_TARGETS: tuple[str, ...] = (
    "img_in", "txt_in",
    "time_in.in_layer", "time_in.out_layer",
    "guidance_in.in_layer", "guidance_in.out_layer",
    "double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin",
    "double_blocks.{i}.img_attn.qkv:qkv", "double_blocks.{i}.txt_attn.qkv:qkv",
    "double_blocks.{i}.img_attn.proj", "double_blocks.{i}.txt_attn.proj",
    "double_blocks.{i}.img_mlp.0", "double_blocks.{i}.img_mlp.2",
    "double_blocks.{i}.txt_mlp.0", "double_blocks.{i}.txt_mlp.2",
    "single_blocks.{i}.linear1", "single_blocks.{i}.linear2",
    "final_layer.linear", "final_layer.adaLN_modulation.1",
)

FUSED_KINDS = ("qkv", "qkv_mlp")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 64
    alpha: float = 64.0  # scale = alpha / rank
    targets: tuple[str, ...] = FLUX_TARGETS  # full-name patterns; `{i}` matches a block index
    init_std: float | None = None  # std of the Gaussian down init; None: 1 / rank (peft's "gaussian")
    sets: tuple[str, ...] = ("live", "fast_ema", "slow_ema")  # materialised sets; only `live` is trained
    zero_sets: tuple[str, ...] = ("teacher",)  # selectable, add nothing (the base model) until loaded

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "sets", tuple(self.sets))
        object.__setattr__(self, "zero_sets", tuple(self.zero_sets))
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if "live" not in self.sets:
            raise ValueError(f"sets must include 'live', got {self.sets}")
        if set(self.sets) & set(self.zero_sets):
            both = set(self.sets) & set(self.zero_sets)
            raise ValueError(f"a set cannot be both materialised and zero: {both}")
        for t in self.targets:
            parse_target(t)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def parse_target(target: str) -> tuple[re.Pattern, str]:
    name, _, kind = target.partition(":")
    if kind and kind not in FUSED_KINDS:
        raise ValueError(f"target {target!r}: unknown fused kind {kind!r}; choose one of {FUSED_KINDS}")
    return re.compile(re.escape(name).replace(re.escape("{i}"), r"\d+")), kind


def slice_sizes(kind: str, in_features: int, out_features: int) -> tuple[int, ...]:
    if kind == "qkv":
        if out_features % 3:
            raise ValueError(f"a qkv layer needs out_features divisible by 3, got {out_features}")
        return (out_features // 3,) * 3
    if kind == "qkv_mlp":  # Flux single block: q, k, v of width D = in_features, then the MLP input
        if out_features <= 3 * in_features:
            raise ValueError(f"a qkv_mlp layer needs out_features > 3 * in_features, got {out_features}")
        return (in_features,) * 3 + (out_features - 3 * in_features,)
    return (out_features,)
