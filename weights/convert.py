"""Checkpoint conversion and LoRA merging, streamed tensor by tensor (the logic behind `tools/convert.py`).

Every model family goes through its own key map and config helpers (its record in weights/families, and
weights/vae.py); nothing here names a key. A conversion is a generator of (key, tensor) driven
by a reader: run once on meta tensors it yields the output's plan (keys, dtypes, shapes) for the streaming
writer's header, run again on the memory-mapped input it yields the tensors, one at a time. Transformers
pass through the official (BFL / SAI) layout on the way, one rule at a time, which is where a merged LoRA's
delta is added, with the same fp32 arithmetic as `apply_loras`, so a merged file equals applying at run time.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from model.vae import AutoEncoder, VAEConfig

from . import vae as vae_io
from .assign import check_keys_and_shapes
from .atomic import durable_replace, remove_stale_temps, temp_beside
from .families import checkpoint_family, families, reads
from .family import Family
from .io import (
    CONFIG_METADATA_KEY,
    QUANT_METADATA,
    TensorReader,
    WeightsError,
    config_from_metadata,
    model_files,
    read_header,
    read_shapes,
)
from .keymaps import to_official, to_others
from .keymaps.lora import parse_key, refuse_non_lora
from .keymaps.vae import diffusers_to_ours, ours_to_diffusers
from .lora_merge import _fit_error, param_delta, touched_keys  # the run-time merger's own keys
from .stream import DTYPE_NAMES, Spec, nbytes, write_streaming
from .transformer import meta_model, read_layout

_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}
DEFAULT_SHARD_BYTES = 5 * 1024**3  # diffusers' save_pretrained default

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


def _meta_reader(src: Source) -> Reader:
    header = src.header
    return lambda k: torch.empty(header[src.prefix + k][0], dtype=_BY_NAME[header[src.prefix + k][1]],
                                 device="meta")


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


# ----- writing: one file, or a folder of shards, atomically ------------------------------------------------


def check_output(out: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Refuse before any work: an existing OUT without --overwrite, or an OUT that is an input, holds one or lies
    inside an input folder (--overwrite or not). `inputs`: every path read, a folder's files included; resolved,
    so a link (a Hugging Face cache's snapshot file) is its target. Inside a folder even a new OUT is refused: a
    folder is read as all its .safetensors files (weights/io.py weight_files), so OUT would join its input."""
    resolved, found = out.resolve(), [(given, given.resolve()) for given in inputs]
    for given, p in found:
        if p == resolved:
            raise WeightsError(f"{out}: is the input {given}; write the output somewhere else")
        if resolved in p.parents:
            raise WeightsError(f"{out}: holds the input {given}; write the output somewhere else")
    for given, p in found:  # after: OUT that is one of a folder's files is named as that file
        if p.is_dir() and p in resolved.parents:
            raise WeightsError(f"{out}: is inside the input folder {given}; write the output somewhere else")
    if out.exists() and not overwrite:
        raise WeightsError(f"{out} exists; pass --overwrite to replace it")


def _replace(tmp: Path, out: Path) -> None:
    """Move a finished temp file or folder into place; an old OUT is removed only after the move."""
    if out.exists() and (out.is_dir() or tmp.is_dir()):
        old = temp_beside(out, folder=True)
        os.replace(out, old / "x")
        durable_replace(tmp, out)  # on the disk (files, then the rename) before the old OUT goes
        shutil.rmtree(old)
    else:
        durable_replace(tmp, out)


def shard(plan: list[Spec], max_bytes: int) -> list[list[Spec]]:
    shards: list[list[Spec]] = [[]]
    size = 0
    for spec in plan:
        n = nbytes(spec[1], spec[2])
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


def write_plan(src: Source, plan: Plan, out: str | os.PathLike, *, overwrite: bool = False,
               shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Stream `plan` into OUT: one file when OUT ends in .safetensors, else a folder (diffusers: config.json,
    shards and an index, what `from_pretrained` reads; official: shards and an index, as our loaders read).
    """
    # .safetensors in any case names a file (X.SAFETENSORS too), unless a trailing slash (Path drops it) says folder
    one_file = Path(out).suffix.lower() == ".safetensors" and not os.fspath(out).endswith(("/", os.sep))
    out = Path(out)
    check_output(out, overwrite, [src.path, *src.files])
    spec = [(k, t.dtype, tuple(t.shape)) for k, t in plan.tensors(_meta_reader(src), False)]
    spec += _stored_spec(src.files, plan.kept)
    metadata = _still_quantized({**src.metadata, **plan.metadata, "format": "pt"}, plan.kept)
    with TensorReader(src.files, prefix=src.prefix) as read:
        tensors = itertools.chain(plan.tensors(read, True), _stored_tensors(src.files, plan.kept))
        if one_file and not out.is_dir():
            return write_streaming(out, spec, tensors, metadata)  # its own temp and rename: nothing left behind
        if one_file:  # replacing a folder that happens to be called *.safetensors
            tmp = write_streaming(out.parent / f".{out.name}.partial", spec, tensors, metadata)
            _replace(tmp, out)
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)  # the folders of a killed conversion to this OUT
        tmp_dir = temp_beside(out, folder=True)  # the user's umask, unlike mkdtemp's 0700
        try:
            _write_folder(tmp_dir, plan, spec, tensors, metadata, shard_bytes)
            _replace(tmp_dir, out)
        finally:
            if tmp_dir.exists():
                shutil.rmtree(tmp_dir)
    return out


def _still_quantized(metadata: dict[str, str], kept: list[str]) -> dict[str, str]:
    """ComfyUI's list of quantized layers (weights/io.py QUANT_METADATA) cut to the layers still stored so: those
    copied as stored (an all-in-one file's other parts). The converted transformer is dequantized, and a stale
    entry would make ComfyUI read its bf16 weights as fp8."""
    raw = metadata.get(QUANT_METADATA)
    if raw is None:
        return metadata
    stored, listed = set(kept), json.loads(raw)  # read_header checked it
    layers = {k: v for k, v in listed["layers"].items() if k + ".weight" in stored}
    rest = {k: v for k, v in metadata.items() if k != QUANT_METADATA}
    return rest | ({QUANT_METADATA: json.dumps({**listed, "layers": layers})} if layers else {})


def _stored_header(files: list[Path]) -> dict[str, tuple[list[int], str, Path]]:
    """Key -> (shape, dtype name, file) as stored: scaled-fp8 scales and markers are keys like any other here."""
    return {k: (shape, dtype, f) for f in files for k, (shape, dtype) in read_header(f)[0].items()}


def _stored_spec(files: list[Path], keys: list[str]) -> list[Spec]:
    header = _stored_header(files) if keys else {}
    spec = []
    for k in keys:
        shape, name, path = header[k]
        if name not in _BY_NAME:
            raise WeightsError(f"{path}: tensor {k} is {name}, a dtype the writer cannot copy; convert that part "
                               "with its own tool, or merge into the transformer file alone")
        spec.append((k, _BY_NAME[name], tuple(shape)))
    return spec


def _stored_tensors(files: list[Path], keys: list[str]) -> Iterator[tuple[str, Tensor]]:
    """`keys` one at a time, bit for bit as stored (no fp8 scale applied, no cast): what a merge does not touch."""
    if not keys:
        return
    handles = {f: safe_open(str(f), framework="pt", device="cpu") for f in files}
    header = _stored_header(files)
    for k in keys:
        yield k, handles[header[k][2]].get_tensor(k)


def outside_transformer(src: Source) -> list[str]:
    """The keys of an all-in-one file outside its transformer (ComfyUI / SAI checkpoints: the VAE under
    first_stage_model., the text encoders under text_encoders. or conditioner.), in file order."""
    others = src.transformer.other_parts
    n = len(src.prefix)
    return [k for k in _stored_header(src.files)
            if not k.startswith(src.prefix) or k[n:].startswith(others)]


def _write_folder(folder: Path, plan: Plan, spec, tensors, metadata, shard_bytes) -> None:
    stem = "diffusion_pytorch_model" if plan.layout == "diffusers" else "model"
    shards = shard(spec, shard_bytes)
    names = [f"{stem}.safetensors"] if len(shards) == 1 else \
        [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, part in zip(names, shards):
        write_streaming(folder / name, part, (next(tensors) for _ in part), metadata)
        weight_map |= {k: name for k, _, _ in part}
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(nbytes(d, s) for _, d, s in spec)}, "weight_map": weight_map}
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if plan.config_json is not None:
        (folder / "config.json").write_text(json.dumps(plan.config_json, indent=2))


def convert_checkpoint(source, out, to: str, *, dtype: torch.dtype | None = None, overwrite: bool = False,
                       shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    src = detect(source)
    return write_plan(src, plan_conversion(src, to, dtype), out, overwrite=overwrite, shard_bytes=shard_bytes)


def merge_loras(base, loras, out, *, dtype: torch.dtype | None = None, overwrite: bool = False,
                shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Bake `loras` ([(LoRA, scale)]) into a copy of `base`, written in the base's layout and key prefix."""
    src = detect(base)
    if src.transformer is None:
        raise WeightsError(f"{src.path}: a {src.family}, not a transformer to merge LoRAs into")
    plan = plan_conversion(src, src.layout, dtype, loras, out_prefix=src.prefix)
    plan.metadata["scfm_merged_loras"] = json.dumps([f"{lora.source} @ {s}" for lora, s in loras])
    # an all-in-one file stays one: its VAE and text encoders are copied as stored (never cast by `dtype`, which
    # is the transformer's), so the output loads wherever the base did
    plan.kept = outside_transformer(src)
    return write_plan(src, plan, out, overwrite=overwrite, shard_bytes=shard_bytes)
