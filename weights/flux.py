"""Load and save the Flux transformer in the BFL (official) and diffusers layouts."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from model.flux import FLUX_CONFIGS, Flux, FluxConfig

from .assign import assign_tensors, check_keys_and_shapes, resolve_config
from .atomic import atomic_save
from .detect import detect_flux_layout
from .io import (
    CONFIG_METADATA_KEY,
    TensorReader,
    WeightsError,
    model_files,
    read_shapes,
)
from .keymaps import official_shapes, to_official, to_others
from .keymaps.flux import flux_rules, flux_split_sizes


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


def infer_flux_config(shapes: dict[str, tuple[int, ...]], source: str = "checkpoint") -> FluxConfig:
    """Widths, depths, MLP ratio, biases and the guidance embedding from official key names and shapes.

    RoPE axes and theta are not in the weights: they come from the preset with the same head dim.
    """
    try:
        hidden, in_ch = shapes["img_in.weight"]
        head_dim = (shapes.get("double_blocks.0.img_attn.norm.query_norm.scale")
                    or shapes["single_blocks.0.norm.query_norm.scale"])[0]
        mlp = (shapes.get("double_blocks.0.img_mlp.0.weight") or shapes["single_blocks.0.linear2.weight"])[0]
        if "double_blocks.0.img_mlp.0.weight" not in shapes:
            mlp -= hidden  # linear2 takes [attention (D), mlp]
        cfg = dict(
            in_channels=in_ch, out_channels=shapes["final_layer.linear.weight"][0],
            vec_in_dim=shapes["vector_in.in_layer.weight"][1], context_in_dim=shapes["txt_in.weight"][1],
            hidden_size=hidden, mlp_ratio=mlp / hidden, num_heads=hidden // head_dim,
            depth=_count_blocks(shapes, "double_blocks"), depth_single_blocks=_count_blocks(shapes, "single_blocks"),
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes or "single_blocks.0.linear1.bias" in shapes,
            guidance_embed="guidance_in.in_layer.weight" in shapes,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{source}: cannot infer the Flux config from its keys (no {e}); pass config=") from None
    same_head = [p for p in FLUX_CONFIGS.values() if sum(p.axes_dim) == head_dim]
    if not same_head:
        raise WeightsError(f"{source}: head dim {head_dim} matches no preset's RoPE axes; pass config=FluxConfig(...)")
    return FluxConfig(axes_dim=same_head[0].axes_dim, theta=same_head[0].theta, **cfg)


def _resolve_config(config, config_json, metadata, shapes, source) -> FluxConfig:
    return resolve_config(config, config_json, metadata, shapes, source, cls=FluxConfig, family="flux",
                          from_diffusers=config_from_diffusers, infer=infer_flux_config)


def load_flux(
    source: str | os.PathLike,
    *,
    config: FluxConfig | str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    fp8: bool = False,
    loras: Sequence = (),
) -> Flux:
    """Load a Flux transformer from a BFL or diffusers single file, a diffusers `transformer/` folder (one file or
    shards) or a diffusers pipeline folder. Built on the meta device; tensors are assigned as they are read.
    fp8: the blocks' Linear weights are quantized to e4m3 as they are read (model/fp8.py).
    loras: LoRAs merged into the weights as they are read, before fp8 rounds them (LoRAs or paths, alone or as
    (lora, scale), as weights.lora.apply_loras takes them; checked before anything is read).
    device="meta": every check (files, keys, shapes, config, LoRAs) and no tensor read; a meta model back."""
    files, config_json = model_files(source, "transformer")
    raw, metadata = read_shapes(files)
    src = str(source)
    prefix, layout = detect_flux_layout(raw.keys(), src)
    keys = {k[len(prefix):]: tuple(s) for k, (s, _) in raw.items() if k.startswith(prefix)}

    if layout == "diffusers":
        rules = flux_rules(
            _count_blocks(keys, "transformer_blocks"), _count_blocks(keys, "single_transformer_blocks"),
            "time_text_embed.guidance_embedder.linear_1.weight" in keys,
        )
        wanted = {k for r in rules for k in r.others}
        missing, unexpected = wanted - keys.keys(), keys.keys() - wanted
        if missing or unexpected:
            which, names = ("missing", missing) if missing else ("unexpected", unexpected)
            raise WeightsError(
                f"{src}: {len(names)} {which} keys for the diffusers Flux layout ({', '.join(sorted(names)[:3])}); "
                "the file is incomplete or not a FluxTransformer2DModel"
            )
        shapes = official_shapes(rules, keys)
    else:
        shapes = keys

    cfg = _resolve_config(config, config_json, metadata, shapes, src)
    with torch.device("meta"):
        model = Flux(cfg)
    check_keys_and_shapes(model, shapes, source=src, layout=f"{layout} Flux")

    with TensorReader(files, dtype=dtype, prefix=prefix) as read:
        tensors = to_official(rules, read) if layout == "diffusers" else ((k, read(k)) for k in shapes)
        assign_tensors(model, tensors, dtype=dtype, device=device, source=src, fp8=fp8, loras=loras)
    return model.eval()


def flux_state_dict(model: Flux, layout: str = "official") -> dict[str, torch.Tensor]:
    """The model's tensors in the BFL ("official") or diffusers layout."""
    sd = model.state_dict()
    if layout == "official":
        return dict(sd)
    if layout != "diffusers":
        raise ValueError(f"layout must be 'official' or 'diffusers', got {layout!r}")
    cfg = model.config
    rules = flux_rules(cfg.depth, cfg.depth_single_blocks, cfg.guidance_embed)
    return dict(to_others(rules, sd.__getitem__, flux_split_sizes(cfg.hidden_size)))


def save_flux(model: Flux, path: str | os.PathLike, *, layout: str = "official", overwrite: bool = False) -> Path:
    """One safetensors file; our config goes into its metadata so it loads without a config.json."""
    meta = {CONFIG_METADATA_KEY: json.dumps({"family": "flux", "config": model.config.to_dict()}),
            "format": "pt", "layout": layout}
    return atomic_save(flux_state_dict(model, layout), path, meta, overwrite=overwrite)
