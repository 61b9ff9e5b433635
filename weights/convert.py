"""Checkpoint conversion and LoRA merging, streamed tensor by tensor (the logic behind `tools/convert.py`): a
plan (weights/convert_plan.py) written to one file or a folder of shards, atomically.

A plan's generator is driven by a reader: run once on meta tensors it yields the output's keys, dtypes and shapes
for the streaming writer's header, run again on the memory-mapped input it yields the tensors, one at a time, so
peak memory is about one tensor. A merge copies an all-in-one file's other parts (VAE, text encoders) as stored.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from .atomic import durable_replace, remove_stale_temps, temp_beside
from .convert_plan import Plan, Reader, Source, detect, plan_conversion
from .io import QUANT_METADATA, WeightsError, read_header
from .reader import TensorReader
from .stream import DTYPE_NAMES, Spec, nbytes, write_streaming

_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}
DEFAULT_SHARD_BYTES = 5 * 1024**3  # diffusers' save_pretrained default


def _meta_reader(src: Source) -> Reader:
    header = src.header
    return lambda k: torch.empty(header[src.prefix + k][0], dtype=_BY_NAME[header[src.prefix + k][1]],
                                 device="meta")


# What `_write_folder` writes, and so all that a folder --overwrite replaces may hold (any layout, any shard count)
_OWN_FILE = re.compile(r"(diffusion_pytorch_model|model)((-\d{5}-of-\d{5})?\.safetensors|\.safetensors\.index\.json)"
                       r"|config\.json")


def _foreign_files(folder: Path) -> list[str]:
    """The entries of `folder` that a conversion does not write (a subfolder is named with its '/')."""
    return sorted(p.name + "/" * p.is_dir() for p in folder.iterdir()
                  if p.is_dir() or not _OWN_FILE.fullmatch(p.name))


def check_output(out: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Refuse before any work: an existing OUT without --overwrite, or an OUT that is an input, holds one or lies
    inside an input folder (--overwrite or not). `inputs`: every path read, a folder's files included; resolved,
    so a link (a Hugging Face cache's snapshot file) is its target. Inside a folder even a new OUT is refused: a
    folder is read as all its .safetensors files (weights/reader.py weight_files), so OUT would join its input.

    --overwrite replaces what a conversion writes, never a user's other files: an existing folder OUT is replaced
    (whole, in one rename: `_replace`) only when it is empty or holds nothing but such output, config.json and
    (diffusion_pytorch_model|model)[-NNNNN-of-NNNNN].safetensors shards and their .index.json, with no
    subfolder; any other entry (a LoRA, notes, a pipeline's parts) is named and the folder refused, with or
    without --overwrite. An existing file OUT is the one path named, and replaced with --overwrite."""
    resolved, found = out.resolve(), [(given, given.resolve()) for given in inputs]
    for given, p in found:
        if p == resolved:
            raise WeightsError(f"{out}: is the input {given}; write the output somewhere else")
        if resolved in p.parents:
            raise WeightsError(f"{out}: holds the input {given}; write the output somewhere else")
    for given, p in found:  # after: OUT that is one of a folder's files is named as that file
        if p.is_dir() and p in resolved.parents:
            raise WeightsError(f"{out}: is inside the input folder {given}; write the output somewhere else")
    _check_own_folder(out)
    if out.exists() and not overwrite:
        raise WeightsError(f"{out} exists; pass --overwrite to replace it")


def _check_own_folder(out: Path) -> None:
    if out.is_dir() and (foreign := _foreign_files(out)):
        listed = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise WeightsError(f"{out}: an existing folder holding files a conversion does not write ({listed}), which "
                           "--overwrite never deletes; choose a new or empty OUT, or move those files out of it")


def _replace(tmp: Path, out: Path) -> None:
    """Move a finished temp file or folder into place; an old OUT is removed only after the move, and an old folder
    only when it still holds nothing but a conversion's output (checked again: it may have changed meanwhile)."""
    if out.exists() and (out.is_dir() or tmp.is_dir()):
        _check_own_folder(out)
        old = temp_beside(out, folder=True)
        os.replace(out, old / "x")
        try:
            durable_replace(tmp, out)  # on the disk (files, then the rename) before the old OUT goes
        except BaseException:
            if not out.exists():  # the new OUT never arrived: the old one goes back where it was
                os.replace(old / "x", out)
                old.rmdir()
            raise
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
            try:
                _replace(tmp, out)
            finally:
                tmp.unlink(missing_ok=True)  # refused: the folder changed meanwhile
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
