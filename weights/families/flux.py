"""FLUX.1 as a family (weights/family.py): how its files look, its config in each layout, its key maps and
LoRA names, and where sampling and distill keep their parts of it."""

from __future__ import annotations

import re

from model.flux import FLUX_CONFIGS, Flux, FluxConfig

from ..family import CONFIG_JSON_FIX, Family
from ..io import WeightsError
from ..keymaps.flux import flux_rules, flux_split_sizes
from ..keymaps.lora import block_counts, flux_lora_names

# Prefixes other tools put in front of the transformer's keys: ComfyUI and all-in-one files, some exporters.
_FLUX_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")

def _flux_prefix(keys) -> str:
    for p in _FLUX_PREFIXES:
        if any(k.startswith(p + "img_in.") or k.startswith(p + "x_embedder.") for k in keys):
            return p
    return ""


def detect_flux_layout(keys) -> tuple[str, str] | None:
    """(prefix, layout) with layout "official" (BFL) or "diffusers"; None for anything else."""
    prefix = _flux_prefix(keys)
    bare = {k[len(prefix):] for k in keys if k.startswith(prefix)}
    if "img_in.weight" in bare or any(k.startswith("double_blocks.") for k in bare):
        return prefix, "official"
    if "x_embedder.weight" in bare or any(k.startswith("single_transformer_blocks.") for k in bare):
        return prefix, "diffusers"
    return None


def _count_blocks(keys, stem: str) -> int:
    pat = re.compile(re.escape(stem) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    return max(found) + 1 if found else 0


def config_from_diffusers(d: dict) -> FluxConfig:
    """A diffusers `FluxTransformer2DModel` config.json -> FluxConfig (MLP ratio 4 and theta 10000 are fixed there)."""
    if d.get("patch_size", 1) != 1:
        raise WeightsError(f"patch_size {d['patch_size']} is not supported (Flux packs 2x2 patches outside the model)")
    heads, head_dim = d.get("num_attention_heads", 24), d.get("attention_head_dim", 128)
    return FluxConfig(
        in_channels=d.get("in_channels", 64), out_channels=d.get("out_channels") or d.get("in_channels", 64),
        vec_in_dim=d.get("pooled_projection_dim", 768), context_in_dim=d.get("joint_attention_dim", 4096),
        hidden_size=heads * head_dim, num_heads=heads, depth=d.get("num_layers", 19),
        depth_single_blocks=d.get("num_single_layers", 38), axes_dim=tuple(d.get("axes_dims_rope", (16, 56, 56))),
        guidance_embed=bool(d.get("guidance_embeds", False)),
    )


def config_to_diffusers(cfg: FluxConfig) -> dict:
    if cfg.mlp_ratio != 4.0 or cfg.theta != 10_000 or not cfg.qkv_bias:
        raise WeightsError("diffusers' Flux fixes mlp_ratio 4, theta 10000 and qkv bias; this config cannot be saved")
    return {
        "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels, "num_layers": cfg.depth, "num_single_layers": cfg.depth_single_blocks,
        "attention_head_dim": cfg.hidden_size // cfg.num_heads, "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_in_dim, "pooled_projection_dim": cfg.vec_in_dim,
        "guidance_embeds": cfg.guidance_embed, "axes_dims_rope": list(cfg.axes_dim),
    }


def stream_shapes(shapes: dict[str, tuple[int, ...]]) -> tuple[dict, int]:
    """What FLUX.1 and FLUX.2 official keys tell alike: (config fields, head dim). Widths, heads, the MLP ratio
    (from the MLP's output layer, whose input is the MLP width in both), block counts and the guidance input;
    KeyError / TypeError / ValueError for keys that are not there."""
    hidden, in_ch = shapes["img_in.weight"]
    head_dim = (shapes.get("double_blocks.0.img_attn.norm.query_norm.scale")
                or shapes["single_blocks.0.norm.query_norm.scale"])[0]
    mlp = (shapes.get("double_blocks.0.img_mlp.2.weight") or shapes["single_blocks.0.linear2.weight"])[1]
    if "double_blocks.0.img_mlp.2.weight" not in shapes:
        mlp -= hidden  # linear2 takes [attention (D), mlp]
    return {"in_channels": in_ch, "out_channels": shapes["final_layer.linear.weight"][0],
            "context_in_dim": shapes["txt_in.weight"][1], "hidden_size": hidden, "mlp_ratio": mlp / hidden,
            "num_heads": hidden // head_dim, "depth": _count_blocks(shapes, "double_blocks"),
            "depth_single_blocks": _count_blocks(shapes, "single_blocks"),
            "guidance_embed": "guidance_in.in_layer.weight" in shapes}, head_dim


def infer_flux_config(shapes: dict[str, tuple[int, ...]], source: str = "checkpoint") -> FluxConfig:
    """Widths, depths, MLP ratio, biases and the guidance embedding from official key names and shapes.

    RoPE axes and theta are not in the weights: they come from the preset with the same head dim.
    """
    try:
        cfg, head_dim = stream_shapes(shapes)
        cfg |= {"vec_in_dim": shapes["vector_in.in_layer.weight"][1],
                "qkv_bias": "double_blocks.0.img_attn.qkv.bias" in shapes or "single_blocks.0.linear1.bias" in shapes}
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{source}: cannot infer the Flux config from its keys (no {e}); {CONFIG_JSON_FIX}"
                           ) from None
    same_head = [p for p in FLUX_CONFIGS.values() if sum(p.axes_dim) == head_dim]
    if not same_head:
        raise WeightsError(f"{source}: head dim {head_dim} matches no preset's RoPE axes; {CONFIG_JSON_FIX}")
    return FluxConfig(axes_dim=same_head[0].axes_dim, theta=same_head[0].theta, **cfg)


def diffusers_rules(keys):
    """The table for the model shape diffusers keys describe (the loader checks every key is accounted for)."""
    return flux_rules(_count_blocks(keys, "transformer_blocks"), _count_blocks(keys, "single_transformer_blocks"),
                      "time_text_embed.guidance_embedder.linear_1.weight" in keys)


def base_architecture(config: FluxConfig) -> str | None:
    if (config.depth, config.depth_single_blocks, config.hidden_size) == (19, 38, 3072):
        return "flux-1-dev" if config.guidance_embed else "flux-1-schnell"
    return None


def describe(cfg: FluxConfig) -> str:
    size = "12B" if cfg.hidden_size == 3072 and cfg.depth == 19 else f"width {cfg.hidden_size}"
    kind = "dev (guidance-distilled)" if cfg.guidance_embed else "schnell (no guidance embedding)"
    return f"Flux {kind}, {size}, {cfg.depth} double + {cfg.depth_single_blocks} single blocks"


FLUX = Family(
    name="flux", title="Flux", display="FLUX.1", model_class=Flux, config_class=FluxConfig,
    guidance="embedding", latent_channels=lambda cfg: cfg.in_channels // 4, token_side=lambda cfg: 2,
    detect_layout=detect_flux_layout, official_name="BFL", diffusers_classes=("Flux",),
    diffusers_class="FluxTransformer2DModel",
    # BFL double_blocks / diffusers single_transformer_blocks
    claims=lambda keys: any("double_blocks." in k or "single_transformer_blocks." in k for k in keys),
    key_hints=(("double_blocks.", "a Flux transformer (BFL layout)"),
               ("single_transformer_blocks.", "a Flux transformer (diffusers layout)")),
    loader="weights.load_flux",
    config_from_diffusers=config_from_diffusers, config_to_diffusers=config_to_diffusers,
    infer_config=infer_flux_config,
    rules=lambda cfg: flux_rules(cfg.depth, cfg.depth_single_blocks, cfg.guidance_embed),
    diffusers_rules=diffusers_rules, split_sizes=lambda cfg: flux_split_sizes(cfg.hidden_size),
    lora_names=lambda stems: flux_lora_names(*block_counts(stems)),
    text_encoders=("clip_l", "t5"),
    text_lora_prefixes={"lora_te_": "clip_l", "lora_te1_": "clip_l", "lora_te2_": "t5", "lora_te3_": "t5",
                        "text_encoder.": "clip_l", "text_encoder_2.": "t5"},
    architecture="flux-1", implementation="https://github.com/black-forest-labs/flux",
    kohya_module="networks.lora_flux", kohya_base="flux1", base_architecture=base_architecture,
    diffusers_kohya_drops=("img_in", "txt_in", "time_in.", "vector_in.", "guidance_in.", "final_layer."),
    describe=describe,
    parts={"velocity": "sampling.velocity:FluxVelocity", "pipeline": "sampling.pipeline:FluxPipeline",
           "lora_targets": "distill.lora_targets:FLUX_TARGETS"},
)
