"""SD3 / SD3.5 as a family (weights/family.py): how its files look, its config in each layout, its key maps and
LoRA names, and where sampling and distill keep their parts of it."""

from __future__ import annotations

import math
import re

from model.mmdit import MMDiT, MMDiTConfig

from ..family import CONFIG_JSON_FIX, Family
from ..io import WeightsError
from ..keymaps.lora import mmdit_depth, mmdit_lora_names
from ..keymaps.mmdit import mmdit_rules, mmdit_split_sizes

# The other parts of SAI all-in-one files (VAE, the three text encoders): never the transformer's business.
OTHER_PARTS = ("first_stage_model.", "text_encoders.", "cond_stage_model.", "conditioner.")


# Prefixes in front of the transformer's keys: SAI single files and ComfyUI use the first.
_MMDIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "")

def detect_mmdit_layout(keys) -> tuple[str, str] | None:
    """(prefix, layout) with layout "official" (SAI) or "diffusers"; None for anything else."""
    for prefix in _MMDIT_PREFIXES:
        if prefix + "x_embedder.proj.weight" in keys:
            return prefix, "official"
        if prefix + "pos_embed.proj.weight" in keys:
            return prefix, "diffusers"
    return None


def _block_indices(keys, pattern: str) -> list[int]:
    pat = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


def _count_blocks(keys, stem: str) -> int:
    found = _block_indices(keys, re.escape(stem) + r"\.(\d+)\.")
    return found[-1] + 1 if found else 0


def config_from_diffusers(d: dict) -> MMDiTConfig:
    """diffusers' `SD3Transformer2DModel` config.json -> MMDiTConfig; absent fields get its defaults."""
    heads, head_dim = d.get("num_attention_heads", 18), d.get("attention_head_dim", 64)
    hidden = heads * head_dim
    if d.get("caption_projection_dim", 1152) != hidden:
        raise WeightsError(f"caption_projection_dim {d.get('caption_projection_dim')} differs from the width "
                           f"{hidden}: no released SD3 model does that and the MMDiT cannot represent it")
    qk_norm = d.get("qk_norm")
    if qk_norm not in (None, "rms_norm"):
        raise WeightsError(f"qk_norm {qk_norm!r} is not supported (SD3.5 uses 'rms_norm', SD3.0 none)")
    return MMDiTConfig(
        in_channels=d.get("in_channels", 16), out_channels=d.get("out_channels") or d.get("in_channels", 16),
        patch_size=d.get("patch_size", 2), hidden_size=hidden, num_heads=heads, depth=d.get("num_layers", 18),
        adm_in_channels=d.get("pooled_projection_dim", 2048),
        context_in_dim=d.get("joint_attention_dim", 4096),
        pos_embed_max_size=d.get("pos_embed_max_size") or 96, qk_norm="rms" if qk_norm else None,
        dual_attention_layers=tuple(d.get("dual_attention_layers") or ()),
    )


def config_to_diffusers(cfg: MMDiTConfig) -> dict:
    if cfg.mlp_ratio != 4.0:
        raise WeightsError("diffusers' SD3 fixes mlp_ratio 4; this config cannot be saved in its layout")
    return {
        "_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": cfg.patch_size,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "num_layers": cfg.depth,
        "attention_head_dim": cfg.head_dim, "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_in_dim, "caption_projection_dim": cfg.hidden_size,
        "pooled_projection_dim": cfg.adm_in_channels, "pos_embed_max_size": cfg.pos_embed_max_size,
        "dual_attention_layers": list(cfg.dual_attention_layers),
        "qk_norm": "rms_norm" if cfg.qk_norm else None,
    }


def infer_mmdit_config(shapes: dict[str, tuple[int, ...]], source: str = "checkpoint") -> MMDiTConfig:
    """The config from SAI key names and shapes, as SAI's loader infers it: width and patch from
    `x_embedder`, the table size from `pos_embed`, QK-norm from `ln_q` keys, dual blocks from `attn2` keys.
    The head dim is the `ln_q` width when there is one, else SAI's fixed 64 (every released model has
    heads = depth = D / 64)."""
    try:
        hidden, in_ch, patch, _ = shapes["x_embedder.proj.weight"]
        depth = _count_blocks(shapes, "joint_blocks")
        qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in shapes
        head_dim = shapes["joint_blocks.0.x_block.attn.ln_q.weight"][0] if qk_norm else 64
        n_pos = shapes["pos_embed"][1]
        cfg = dict(
            in_channels=in_ch, out_channels=shapes["final_layer.linear.weight"][0] // (patch * patch),
            patch_size=patch, hidden_size=hidden, num_heads=hidden // head_dim, depth=depth,
            mlp_ratio=shapes["joint_blocks.0.x_block.mlp.fc1.weight"][0] / hidden,
            adm_in_channels=shapes["y_embedder.mlp.0.weight"][1],
            context_in_dim=shapes["context_embedder.weight"][1],
            pos_embed_max_size=math.isqrt(n_pos), qk_norm="rms" if qk_norm else None,
            dual_attention_layers=tuple(_block_indices(shapes, r"joint_blocks\.(\d+)\.x_block\.attn2\.")),
        )
    except (KeyError, TypeError, ValueError) as e:
        msg = f"{source}: cannot infer the MMDiT config from its keys (no {e}); {CONFIG_JSON_FIX}"
        raise WeightsError(msg) from None
    if cfg["pos_embed_max_size"] ** 2 != n_pos:
        raise WeightsError(f"{source}: pos_embed has {n_pos} positions, not a square grid; file damaged?")
    if hidden % head_dim:
        raise WeightsError(f"{source}: width {hidden} is not a multiple of head dim {head_dim}; {CONFIG_JSON_FIX}")
    try:
        return MMDiTConfig(**cfg)
    except ValueError as e:
        raise WeightsError(f"{source}: inferred an invalid MMDiT config ({e}); {CONFIG_JSON_FIX}") from None


def diffusers_rules(keys):
    """The table for the model shape diffusers keys describe (the loader checks every key is accounted for)."""
    t = "transformer_blocks"
    dual = _block_indices(keys, rf"{t}\.(\d+)\.attn2\.")
    return mmdit_rules(_count_blocks(keys, t), dual, f"{t}.0.attn.norm_q.weight" in keys)


def base_architecture(config: MMDiTConfig) -> str | None:
    if config.depth == 38:
        return "stable-diffusion-3-5-large"
    if config.depth == 24:
        return "stable-diffusion-3-5-medium" if config.dual_attention_layers else "stable-diffusion-3-medium"
    return None


def describe(cfg: MMDiTConfig) -> str:
    if cfg.qk_norm is None:
        name = "SD3 medium" if cfg.depth == 24 else "SD3"
    else:
        name = {38: "SD3.5 large", 24: "SD3.5 medium"}.get(cfg.depth, "SD3.5")
        name += " (dual attention)" if cfg.dual_attention_layers else ""
    return f"{name} MMDiT, width {cfg.hidden_size}, {cfg.depth} joint blocks"


SD3 = Family(
    name="sd3", title="SD3 / SD3.5", display="SD3 / SD3.5", model_class=MMDiT, config_class=MMDiTConfig,
    aliases=("mmdit",),  # checkpoints saved before the registry carry this spelling
    guidance="cfg", latent_channels=lambda cfg: cfg.in_channels, token_side=lambda cfg: cfg.patch_size,
    detect_layout=detect_mmdit_layout, official_name="SAI",
    diffusers_classes=("StableDiffusion3", "SD3Transformer2DModel"), diffusers_class="SD3Transformer2DModel",
    # SAI joint_blocks / diffusers pos_embed
    claims=lambda keys: any("joint_blocks." in k or k.endswith("pos_embed.proj.weight") for k in keys),
    key_hints=(("joint_blocks.", "an SD3 / SD3.5 MMDiT checkpoint"),), loader="weights.load_mmdit",
    other_parts=OTHER_PARTS, official_prefix="model.diffusion_model.",
    config_from_diffusers=config_from_diffusers, config_to_diffusers=config_to_diffusers,
    infer_config=infer_mmdit_config,
    rules=lambda cfg: mmdit_rules(cfg.depth, cfg.dual_attention_layers, cfg.qk_norm is not None),
    diffusers_rules=diffusers_rules, split_sizes=lambda cfg: mmdit_split_sizes,
    lora_names=lambda stems: mmdit_lora_names(mmdit_depth(stems)),
    # the released medium (1536) and large (2432) widths: no Flux Linear has them
    lora_widths=frozenset({1536, 2432}),
    text_encoders=("clip_l", "clip_g", "t5"),
    text_lora_prefixes={"lora_te_": "clip_l", "lora_te1_": "clip_l", "lora_te2_": "clip_g", "lora_te3_": "t5",
                        "text_encoder.": "clip_l", "text_encoder_2.": "clip_g", "text_encoder_3.": "t5"},
    architecture="stable-diffusion-3", implementation="diffusers", kohya_module="networks.lora_sd3",
    kohya_base="sd3", base_architecture=base_architecture, diffusers_kohya_drops=None, describe=describe,
    parts={"velocity": "sampling.velocity:MMDiTVelocity", "pipeline": "sampling.sd3:SD3Pipeline",
           "lora_targets": "distill.lora_targets:SD3_TARGETS"},
)
