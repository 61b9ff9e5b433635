"""Load and save the SD3 / SD3.5 MMDiT in the SAI (official) and diffusers layouts."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from model.mmdit import MMDiT, MMDiTConfig

from .assign import assign_tensors, check_keys_and_shapes, resolve_config
from .atomic import atomic_save
from .detect import detect_mmdit_layout
from .io import (
    CONFIG_METADATA_KEY,
    TensorReader,
    WeightsError,
    model_files,
    read_shapes,
)
from .keymaps import official_shapes, to_official, to_others
from .keymaps.mmdit import mmdit_rules, mmdit_split_sizes

# The other parts of SAI all-in-one files (VAE, the three text encoders): never the transformer's business.
_OTHER_PARTS = ("first_stage_model.", "text_encoders.", "cond_stage_model.", "conditioner.")


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
        msg = f"{source}: cannot infer the MMDiT config from its keys (no {e}); pass config="
        raise WeightsError(msg) from None
    if cfg["pos_embed_max_size"] ** 2 != n_pos:
        raise WeightsError(f"{source}: pos_embed has {n_pos} positions, not a square grid; file damaged?")
    if hidden % head_dim:
        raise WeightsError(f"{source}: width {hidden} is not a multiple of head dim {head_dim}; pass config=")
    try:
        return MMDiTConfig(**cfg)
    except ValueError as e:
        raise WeightsError(f"{source}: inferred an invalid MMDiT config ({e}); pass config=") from None


def _resolve_config(config, config_json, metadata, shapes, source) -> MMDiTConfig:
    return resolve_config(config, config_json, metadata, shapes, source, cls=MMDiTConfig, family="mmdit",
                          from_diffusers=config_from_diffusers, infer=infer_mmdit_config)


def _diffusers_rules(keys, source: str):
    """Rules for the model shape the diffusers keys describe, after checking every key is accounted for."""
    t = "transformer_blocks"
    dual = _block_indices(keys, rf"{t}\.(\d+)\.attn2\.")
    rules = mmdit_rules(_count_blocks(keys, t), dual, f"{t}.0.attn.norm_q.weight" in keys)
    wanted = {k for r in rules for k in r.others}
    missing, unexpected = wanted - keys.keys(), keys.keys() - wanted
    if missing or unexpected:
        which, names = ("missing", missing) if missing else ("unexpected", unexpected)
        raise WeightsError(
            f"{source}: {len(names)} {which} keys for the diffusers SD3 layout "
            f"({', '.join(sorted(names)[:3])}); "
            "the file is incomplete or not an SD3Transformer2DModel"
        )
    return rules


def load_mmdit(
    source: str | os.PathLike,
    *,
    config: MMDiTConfig | str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    fp8: bool = False,
    loras: Sequence = (),
) -> MMDiT:
    """Load an SD3 / SD3.5 transformer from an SAI single file (all-in-one files too: their VAE and text
    encoders are skipped), a diffusers single file, `transformer/` folder (one file or shards) or pipeline
    folder. Config: `config=` (a preset name or MMDiTConfig), else config.json, else the metadata our saver
    writes, else inferred from the shapes. Built on the meta device; tensors are assigned as they are read.
    fp8: the blocks' Linear weights are quantized to e4m3 as they are read (model/fp8.py).
    loras: LoRAs merged into the weights as they are read, before fp8 rounds them (LoRAs or paths, alone or as
    (lora, scale), as weights.lora.apply_loras takes them; checked before anything is read).
    device="meta": every check (files, keys, shapes, config, LoRAs) and no tensor read; a meta model back."""
    files, config_json = model_files(source, "transformer")
    raw, metadata = read_shapes(files)
    src = str(source)
    prefix, layout = detect_mmdit_layout(raw.keys(), src)
    keys = {
        k[len(prefix):]: tuple(s) for k, (s, _) in raw.items()
        if k.startswith(prefix) and not k[len(prefix):].startswith(_OTHER_PARTS)
    }

    rules = _diffusers_rules(keys, src) if layout == "diffusers" else None
    shapes = official_shapes(rules, keys) if rules is not None else keys

    cfg = _resolve_config(config, config_json, metadata, shapes, src)
    with torch.device("meta"):
        model = MMDiT(cfg)
    layout_name = "SAI MMDiT" if rules is None else "diffusers MMDiT"
    check_keys_and_shapes(model, shapes, source=src, layout=layout_name)

    with TensorReader(files, dtype=dtype, prefix=prefix) as read:
        tensors = to_official(rules, read) if rules is not None else ((k, read(k)) for k in shapes)
        assign_tensors(model, tensors, dtype=dtype, device=device, source=src, fp8=fp8, loras=loras)
    return model.eval()


def mmdit_state_dict(model: MMDiT, layout: str = "official") -> dict[str, torch.Tensor]:
    """The model's tensors in the SAI ("official", also "sai") or diffusers layout."""
    sd = model.state_dict()
    if layout in ("official", "sai"):
        return dict(sd)
    if layout != "diffusers":
        raise ValueError(f"layout must be 'official' (SAI) or 'diffusers', got {layout!r}")
    cfg = model.config
    rules = mmdit_rules(cfg.depth, cfg.dual_attention_layers, cfg.qk_norm is not None)
    return dict(to_others(rules, sd.__getitem__, mmdit_split_sizes))


def save_mmdit(
    model: MMDiT, path: str | os.PathLike, *, layout: str = "official", overwrite: bool = False
) -> Path:
    """One safetensors file (SAI keys without a prefix, or diffusers keys); our config goes into its metadata
    so it loads without a config.json."""
    tensors = mmdit_state_dict(model, layout)
    meta = {CONFIG_METADATA_KEY: json.dumps({"family": "mmdit", "config": model.config.to_dict()}),
            "format": "pt", "layout": "official" if layout == "sai" else layout}
    return atomic_save(tensors, path, meta, overwrite=overwrite)
