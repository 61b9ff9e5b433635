"""FLUX.2 as a family (weights/family.py): how its files look (BFL single files, with or without ComfyUI's prefix,
and diffusers folders), its config in each layout, its key maps and LoRA names, and its sampling and training
parts (the klein pipeline, sampling/flux2.py; the LoRA target table, distill/lora_targets.py)."""

from __future__ import annotations

from model.flux2 import Flux2, Flux2Config

from ..family import CONFIG_JSON_FIX, Family
from ..io import WeightsError
from ..keymaps.flux2 import flux2_rules, flux2_split_sizes
from ..keymaps.lora import block_counts, flux2_lora_names
from .flux import _count_blocks, stream_shapes

# The key only FLUX.2 files have (its global modulation): FLUX.1's keys are otherwise a subset of its names.
MARKER = "double_stream_modulation_img."
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "")


def detect_flux2_layout(keys) -> tuple[str, str] | None:
    """(prefix, layout) with layout "official" (BFL) or "diffusers"; None for anything else."""
    for prefix in _PREFIXES:
        if prefix + MARKER + "lin.weight" in keys:
            return prefix, "official"
        if prefix + MARKER + "linear.weight" in keys:
            return prefix, "diffusers"
    return None


def _axes(head_dim: int, source: str) -> tuple[int, ...]:
    """FLUX.2 splits the head dim over four equal RoPE axes (T, H, W, L): 4 x 32 for 128."""
    if head_dim % 8:
        raise WeightsError(f"{source}: head dim {head_dim} does not split into four even RoPE axes; {CONFIG_JSON_FIX}")
    return (head_dim // 4,) * 4


def config_from_diffusers(d: dict) -> Flux2Config:
    """A diffusers `Flux2Transformer2DModel` config.json -> Flux2Config."""
    if d.get("patch_size", 1) != 1:
        raise WeightsError(f"patch_size {d['patch_size']} is not supported (FLUX.2 is patchified by the pipeline)")
    if d.get("eps", 1e-6) != 1e-6:
        raise WeightsError(f"eps {d['eps']} is not supported (every FLUX.2 norm uses 1e-6)")
    heads, head_dim = d.get("num_attention_heads", 48), d.get("attention_head_dim", 128)
    return Flux2Config(
        in_channels=d.get("in_channels", 128), out_channels=d.get("out_channels") or d.get("in_channels", 128),
        context_in_dim=d.get("joint_attention_dim", 15360), hidden_size=heads * head_dim,
        mlp_ratio=float(d.get("mlp_ratio", 3.0)), num_heads=heads, depth=d.get("num_layers", 8),
        depth_single_blocks=d.get("num_single_layers", 48), axes_dim=tuple(d.get("axes_dims_rope", (32,) * 4)),
        theta=d.get("rope_theta", 2000), guidance_embed=bool(d.get("guidance_embeds", True)),
    )


def config_to_diffusers(cfg: Flux2Config) -> dict:
    return {
        "_class_name": "Flux2Transformer2DModel", "patch_size": 1, "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels, "num_layers": cfg.depth, "num_single_layers": cfg.depth_single_blocks,
        "attention_head_dim": cfg.hidden_size // cfg.num_heads, "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_in_dim, "timestep_guidance_channels": 256, "mlp_ratio": cfg.mlp_ratio,
        "axes_dims_rope": list(cfg.axes_dim), "rope_theta": cfg.theta, "eps": 1e-6,
        "guidance_embeds": cfg.guidance_embed,
    }


def infer_flux2_config(shapes: dict[str, tuple[int, ...]], source: str = "checkpoint") -> Flux2Config:
    """Widths, depths, MLP ratio and the guidance input from BFL key names and shapes (as ComfyUI's detection:
    docs/flux2.md §1.4); the RoPE axes split the head dim in four, theta is FLUX.2's 2000."""
    try:
        cfg, head_dim = stream_shapes(shapes)
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{source}: cannot infer the FLUX.2 config from its keys (no {e}); {CONFIG_JSON_FIX}"
                           ) from None
    return Flux2Config(axes_dim=_axes(head_dim, source), **cfg)


def diffusers_rules(keys):
    """The table for the model shape diffusers keys describe (the loader checks every key is accounted for)."""
    return flux2_rules(_count_blocks(keys, "transformer_blocks"), _count_blocks(keys, "single_transformer_blocks"),
                       "time_guidance_embed.guidance_embedder.linear_1.weight" in keys)


def base_architecture(config: Flux2Config) -> str | None:
    sizes = {(5, 20, 3072): "flux-2-klein-4b", (8, 24, 4096): "flux-2-klein-9b", (8, 48, 6144): "flux-2-dev"}
    return sizes.get((config.depth, config.depth_single_blocks, config.hidden_size))


def describe(cfg: Flux2Config) -> str:
    name = base_architecture(cfg) or f"width {cfg.hidden_size}"
    guidance = "guidance input" if cfg.guidance_embed else "no guidance input (klein: base or distilled)"
    return f"FLUX.2 {name}, {guidance}, {cfg.depth} double + {cfg.depth_single_blocks} single blocks"


FLUX2 = Family(
    name="flux2", title="FLUX.2", display="FLUX.2", model_class=Flux2, config_class=Flux2Config,
    # the transformer sees the VAE's latents already 2x2-patchified (model/vae.py normalize_latents): one token per
    # latent pixel of the normalised latent, which has all of in_channels
    # klein (what scfm samples and trains) is guided by real CFG, u + g (c - u), so SCFM can bake it in as for SD3.5
    # (cfg_scale w = g - 1); dev's guidance input is refused by generate
    guidance="cfg", latent_channels=lambda cfg: cfg.in_channels, token_side=lambda cfg: 1,
    dynamic_shift="empirical",
    detect_layout=detect_flux2_layout, official_name="BFL", diffusers_classes=("Flux2",),
    diffusers_class="Flux2Transformer2DModel", claims=lambda keys: any(MARKER in k for k in keys),
    markers=(MARKER,), key_hints=((MARKER, "a FLUX.2 transformer"),), loader="weights.load_flux2",
    config_from_diffusers=config_from_diffusers, config_to_diffusers=config_to_diffusers,
    infer_config=infer_flux2_config,
    rules=lambda cfg: flux2_rules(cfg.depth, cfg.depth_single_blocks, cfg.guidance_embed),
    diffusers_rules=diffusers_rules, split_sizes=lambda cfg: flux2_split_sizes,
    lora_names=lambda stems: flux2_lora_names(*block_counts(stems)),
    # input widths (a LoRA down's) no FLUX.1 layer has: klein 4B's mlp.2 and txt_in (9216, 7680), klein 9B's linear2
    # (16384), dev's width, mlp.2 and linear2 (6144, 18432, 24576). klein 9B's 4096 and 12288 are FLUX.1's txt_in and
    # mlp.2 widths too, and klein 4B's 3072 is FLUX.1's: those LoRAs are told by their released shapes instead
    # (weights/lora_alone.py read_lora_alone)
    lora_widths=frozenset({9216, 7680, 16384, 6144, 18432, 24576}),
    architecture="flux-2", implementation="https://github.com/black-forest-labs/flux2",
    kohya_module="networks.lora_flux_2", kohya_base="flux2", base_architecture=base_architecture,
    # diffusers' kohya FLUX.2 converter (_convert_kohya_flux2_lora_to_diffusers) maps the blocks, img_in, txt_in,
    # time_in and final_layer.linear, and only logs the shared modulations, the final adaLN and the guidance embedder
    diffusers_kohya_drops=("double_stream_modulation_img.", "double_stream_modulation_txt.",
                           "single_stream_modulation.", "final_layer.adaLN_modulation.", "guidance_in."),
    describe=describe,
    parts={"velocity": "sampling.velocity:Flux2Velocity", "pipeline": "sampling.flux2:Flux2KleinPipeline",
           "lora_targets": "distill.lora_targets:FLUX2_TARGETS"},
)
