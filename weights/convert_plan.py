"""What a checkpoint conversion writes, decided before any tensor is read: the input's family and layout
(`detect`), and per family the output's config, metadata and a generator of its tensors (`plan_conversion`).

Every model family goes through its own key map and config helpers (its record in weights/families, and
weights/vae.py); nothing here names a key. Transformers pass through the official (BFL / SAI) layout on the way,
one rule at a time, which is where a merged LoRA's delta is added, with the same fp32 arithmetic as
`apply_loras`, so a merged file equals applying at run time. Writing a plan: weights/convert.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from model.vae import AutoEncoder, VAEConfig

from . import vae as vae_io
from .assign import check_keys_and_shapes
from .families import checkpoint_family, families, reads
from .family import Family
from .io import CONFIG_METADATA_KEY, WeightsError, config_from_metadata
from .keymaps import to_official, to_others
from .keymaps.lora import parse_key, refuse_non_lora
from .keymaps.vae import diffusers_to_ours, ours_to_diffusers
from .lora_merge import _fit_error, param_delta, touched_keys  # the run-time merger's own keys
from .reader import model_files, read_shapes
from .transformer import meta_model, read_layout

Reader = Callable[[str], Tensor]


@dataclass
class Source:
    """A checkpoint as found on disk: its files, header, family (a transformer family's name, or "vae" | "t5" |
    "clip" | "lora"), layout and key prefix; `transformer` is the family record of a transformer."""

    path: Path
    files: list[Path]
    config_json: dict | None
    header: dict[str, tuple[list[int], str]]  # key as stored -> (shape, safetensors dtype)
    metadata: dict[str, str]
    family: str
    layout: str
    prefix: str = ""
    transformer: Family | None = None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes by key without the prefix (the keys a conversion names)."""
        n = len(self.prefix)
        return {k[n:]: tuple(s) for k, (s, _) in self.header.items() if k.startswith(self.prefix)}


def detect(source: str | os.PathLike) -> Source:
    """Find the family and layout of a file or folder from its keys alone; one line for anything unknown."""
    path = Path(source).expanduser()
    files, config_json = model_files(path, "transformer")
    header, metadata = read_shapes(files)
    keys = header.keys()

    def make(family, layout, prefix="", transformer=None):
        return Source(path, files, config_json, header, metadata, family, layout, prefix, transformer)

    lora_keys = any((p := parse_key(k)) and p[1] != "alpha" for k in keys)
    if lora_keys or "lora" in metadata.get("scfm_format", ""):
        return make("lora", "")
    family = checkpoint_family(keys, metadata)
    if family is not None:
        prefix, layout = reads(family, keys)
        return make(family.name, layout, prefix, family)
    if any(k.startswith((vae_io.SAI_PREFIX, "encoder.down.", "encoder.down_blocks.")) for k in keys):
        layout = vae_io._detect_layout(set(keys), path)  # the VAE loader's own rule
        return make("vae", layout, vae_io.SAI_PREFIX if layout == "sai" else "")
    refuse_non_lora(keys, str(path), as_lora=False)  # LoKr, DoRA and friends: their own line, not "unknown"
    if any(k.startswith(("encoder.block.", "shared.", "encoder.embed_tokens.")) for k in keys):
        return make("t5", "transformers")
    if any("text_model." in k or k.startswith(("transformer.resblocks.", "token_embedding.")) for k in keys):
        return make("clip", "transformers" if any("text_model." in k for k in keys) else "open_clip")
    raise WeightsError(f"{path}: not a {', '.join(f.title for f in families())}, VAE, T5, CLIP or LoRA checkpoint "
                       f"(first keys: {', '.join(sorted(keys)[:3])})")


def _cast(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t


# ----- one plan per family: the config, the rules and the generator of output tensors ----------------------


@dataclass
class Plan:
    family: str
    layout: str  # the output's layout
    config: object  # FluxConfig / MMDiTConfig / VAEConfig
    tensors: Callable[[Reader, bool], Iterator[tuple[str, Tensor]]]  # (reader of bare input keys, real?)
    metadata: dict[str, str]
    config_json: dict | None  # the diffusers config.json of a folder output
    # input keys written as they are stored, after `tensors`: an all-in-one file's VAE and text encoders, which a
    # merge keeps beside the merged transformer (see `merge_loras`)
    kept: list[str] = dataclasses.field(default_factory=list)


def _transformer_plan(src: Source, to: str, dtype, loras, out_prefix: str | None) -> Plan:
    family = src.transformer
    _, _, official, _ = read_layout(family, src.header, str(src.path))  # the header detect already read
    model = meta_model(family, None, src.config_json, src.metadata, official, str(src.path), src.layout)
    cfg = model.config
    rules, split = family.rules(cfg), family.split_sizes(cfg)
    by_official = {r.official: r for r in rules}
    deltas = _lora_deltas(model, loras)
    if out_prefix is None:
        out_prefix = family.official_prefix if to == "official" else ""

    def tensors(read: Reader, real: bool) -> Iterator[tuple[str, Tensor]]:
        def get_official(key: str) -> Tensor:
            rule = by_official[key]
            t = read(key) if src.layout == "official" else next(to_official([rule], read))[1]
            t = _cast(t, dtype)  # before the LoRA, as loading in `dtype` and then applying does
            if real and key in deltas:
                with torch.no_grad():  # apply_loras' arithmetic: sum the deltas in fp32, round once
                    delta = sum(s * param_delta(lora, key, t.device) for lora, s in deltas[key])
                    t = (t.float() + delta).to(t.dtype)
            return t

        if to == "official":
            pairs = ((r.official, get_official(r.official)) for r in rules)
        else:
            pairs = to_others(rules, get_official, split)
        for k, t in pairs:
            yield out_prefix + k, t

    meta = {CONFIG_METADATA_KEY: json.dumps({"family": family.name, "config": cfg.to_dict()}), "layout": to}
    config_json = family.config_to_diffusers(cfg) if to == "diffusers" else None
    return Plan(src.family, to, cfg, tensors, meta, config_json)


def _lora_deltas(model, loras) -> dict[str, list]:
    """Official parameter -> [(LoRA, scale)] after checking every LoRA fits `model` (built on meta)."""
    deltas: dict[str, list] = {}
    if not loras:
        return deltas
    for item, scale in loras:
        error = _fit_error(model, item, item.source or "LoRA")  # the family first, then every layer's shape
        if error is not None:
            raise WeightsError(error)
        if item.text_encoders:
            raise WeightsError(f"{item.source}: has {len(item.text_encoders)} text-encoder LoRA keys, which a "
                               "merge does not bake in (only the transformer's layers); pass --ignore-te-lora "
                               "to merge the transformer part alone")
        for key in touched_keys(item):
            deltas.setdefault(key, []).append((item, float(scale)))
    return deltas


def vae_config_to_diffusers(cfg: VAEConfig) -> dict:
    """Our VAEConfig as diffusers' AutoencoderKL (or, FLUX.2's, AutoencoderKLFlux2) config.json (the inverse of
    weights/vae.py's reader)."""
    n = len(cfg.ch_mult)
    if cfg.batch_norm_eps is not None:
        return {
            "_class_name": "AutoencoderKLFlux2", "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": [cfg.ch * m for m in cfg.ch_mult], "layers_per_block": cfg.num_res_blocks,
            "act_fn": "silu", "latent_channels": cfg.z_channels, "norm_num_groups": cfg.norm_groups,
            "sample_size": 1024, "use_quant_conv": True, "use_post_quant_conv": True,
            "mid_block_add_attention": True, "batch_norm_eps": cfg.batch_norm_eps, "batch_norm_momentum": 0.1,
            "patch_size": [2, 2],
        }
    return {
        "_class_name": "AutoencoderKL", "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult], "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu", "latent_channels": cfg.z_channels, "norm_num_groups": cfg.norm_groups,
        "sample_size": 1024, "scaling_factor": cfg.scale_factor, "shift_factor": cfg.shift_factor,
        "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True,
        "force_upcast": True,
    }


def _vae_plan(src: Source, to: str, dtype) -> Plan:
    shapes = src.shapes()
    if src.layout == "diffusers":
        pattern = re.compile(r"encoder\.down_blocks\.(\d+)\.")
        levels = 1 + max(int(m.group(1)) for k in shapes if (m := pattern.match(k)))
        names = {}
        for k in (k for k in shapes if k != vae_io._SKIPPED):
            if (mapped := diffusers_to_ours(k, levels)) is None:
                raise WeightsError(f"{src.path}: unexpected key {k!r} for the diffusers AutoencoderKL layout")
            names[k] = mapped
    else:
        names = {k: (k, None) for k in shapes if k != vae_io._SKIPPED}
    ours = {o: tuple(t(torch.empty(shapes[k], device="meta")).shape) if t else shapes[k]
            for k, (o, t) in names.items()}
    stored = config_from_metadata(src.metadata)
    if stored is not None:
        cfg = VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})
    elif src.config_json is not None and src.layout == "diffusers":
        cfg = vae_io._config_from_diffusers(src.config_json, src.path)
    else:
        cfg = vae_io._config_from_shapes(ours, src.layout, src.path)
    with torch.device("meta"):
        check_keys_and_shapes(AutoEncoder(cfg), ours, source=str(src.path), layout=f"{src.layout} VAE")
    levels = len(cfg.ch_mult)

    def tensors(read: Reader, real: bool) -> Iterator[tuple[str, Tensor]]:
        for k, (our_key, to_ours) in names.items():
            t = read(k)
            t = to_ours(t) if to_ours else t
            if to == "diffusers":
                key, to_theirs = ours_to_diffusers(our_key, levels)
                t = to_theirs(t) if to_theirs else t
            else:
                key = our_key
            yield key, _cast(t, dtype)

    meta = {CONFIG_METADATA_KEY: json.dumps(dataclasses.asdict(cfg)), "layout": to}
    return Plan("vae", to, cfg, tensors, meta, vae_config_to_diffusers(cfg) if to == "diffusers" else None)


def plan_conversion(src: Source, to: str, dtype: torch.dtype | None = None, loras=None,
                    out_prefix: str | None = None) -> Plan:
    if to not in ("official", "diffusers"):
        raise WeightsError(f"--to must be official or diffusers, got {to!r}")
    if src.transformer is not None:
        return _transformer_plan(src, to, dtype, loras, out_prefix)
    if loras:
        raise WeightsError(f"{src.path}: LoRAs merge into a transformer, not a {src.family}")
    if src.family == "vae":
        return _vae_plan(src, to, dtype)
    if src.family == "lora":
        raise WeightsError(f"{src.path}: a LoRA; convert it with `convert.py lora IN OUT --to ...`")
    raise WeightsError(f"{src.path}: a {src.family.upper()} text encoder has one layout ({src.layout}); "
                       "there is nothing to convert")
