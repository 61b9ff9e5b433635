"""One safetensors file: its header checked before any read (damaged, truncated, pickled, GGUF, or quantized in a
format we do not read), its metadata, the scaled-fp8 rule its readers apply, and its hashes; with the error every
loader raises (WeightsError) and the broken-link rule they share. Which files make a model and the reader over
them: weights/reader.py; atomic writes: weights/atomic.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import struct
from pathlib import Path

import torch

# The dtype names every command takes (--dtype), to torch dtypes.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class WeightsError(ValueError):
    """A problem with a user's weights, reported as one line that names the problem and the fix."""


# Our savers write the model config here so a file can be loaded without a config.json.
CONFIG_METADATA_KEY = "scfm_config"

PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl"}

# ComfyUI's "scaled fp8" files (flux1-dev-fp8-scaled, t5xxl_fp8_e4m3fn_scaled, ...): an fp8 `X.weight` is stored
# with `X.scale_weight` (older) or `X.weight_scale` (newer), a scalar or one value per output row, and the real
# weight is their product. Readers hand out that product and hide the side keys: the activation scales
# (`X.scale_input` / `X.input_scale`, for fp8 matmuls we do not run) and the `scaled_fp8` marker.
_WEIGHT_SCALES = ("scale_weight", "weight_scale")
_INPUT_SCALES = ("scale_input", "input_scale")
_MARKERS = ("scaled_fp8",)
# ComfyUI's mixed-precision files (its MixedPrecisionOps save, `*_fp8mixed.safetensors`) keep the same fp8 `weight`
# + per-tensor `weight_scale` (+ `input_scale`) and name each quantized layer's format, as JSON, in a uint8
# `X.comfy_quant` tensor and/or the header's `_quantization_metadata` {"layers": {X: {"format": ...}}}. The fp8
# formats (dequantized as weight * scale, comfy/quant_ops.py) read as above; the block-scaled ones cannot.
_LAYER_CONFIG = "comfy_quant"
QUANT_METADATA = "_quantization_metadata"
_FP8_FORMATS = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}  # ComfyUI's format -> the weight's dtype


# safetensors' own cap on the JSON header (its MAX_HEADER_SIZE): a longer length prefix is refused before any
# read, so a damaged or hostile file cannot make us allocate its whole size for a "header".
MAX_HEADER_BYTES = 100_000_000

# Bits per element of every dtype name safetensors writes: each tensor's byte range must match its shape.
_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
               "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U16": 16, "I16": 16, "F16": 16, "BF16": 16,
               "U32": 32, "I32": 32, "F32": 32, "U64": 64, "I64": 64, "F64": 64, "C64": 64}
# What a model's weight or float buffer may be stored as: the float types and the fp8 ones (upcast on read).
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}
# Block-scaled / sub-byte formats (MXFP4, NVFP4, their E8M0 scales): safetensors hands them out as packed torch
# types or not at all (F6), and no weight of ours can be read from them alone.
PACKED_DTYPES = {"F4", "F6_E2M3", "F6_E3M2", "F8_E8M0"}


def refuse_broken_link(path: Path) -> None:
    """One line for a link whose target is gone: in a Hugging Face cache a snapshot's files link to blobs/, and a
    deleted or half-fetched blob must not read as "no such file" (a missing config.json would be guessed from the
    shapes, a wrong model)."""
    if path.is_symlink() and not path.exists():
        raise WeightsError(f"{path}: a broken link (its cache blob is missing); download the model again")


def exists(path: Path) -> bool:
    """`path.exists()`, refusing a broken link rather than calling it absent (refuse_broken_link)."""
    refuse_broken_link(path)
    return path.exists()


def read_json_object(path: Path, fix: str, what: str = "a JSON object", error: type[Exception] = WeightsError
                     ) -> dict:
    """A JSON file that must hold an object (a config, an index, a record): unreadable, damaged (a cut-short
    download, a hand edit, bytes that are not UTF-8) or another JSON value is one line naming `path`, `what` it
    should be and the `fix`, raised as `error`."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8 text
        raise error(f"{path}: unreadable ({e}); {fix}") from None
    if not isinstance(value, dict):  # every reader looks fields up in it
        raise error(f"{path}: not {what} (a JSON {type(value).__name__}, not an object); {fix}")
    return value


def check_float_dtypes(dtypes: dict[str, str], source: str | os.PathLike) -> None:
    """Refuse, before any read, a tensor a float model will hold (a weight, a norm's statistics) stored in a type
    that is not float: an integer one would fail in load_state_dict after every tensor is read, or load as an int
    buffer without a word; a packed 4/6-bit one cannot be read at all."""
    for key, dtype in dtypes.items():
        if dtype in PACKED_DTYPES:
            raise WeightsError(f"{source}: tensor {key} is stored as {dtype} (a 4/6-bit quantized format), which "
                               "scfm does not read; use a bf16 or fp8 file of this model")
        if dtype not in FLOAT_DTYPES:
            raise WeightsError(f"{source}: tensor {key} is stored as {dtype}, not as a floating-point type; the "
                               "file is damaged or not these weights: re-download or re-export it")


def check_safetensors_file(path: Path) -> dict:
    """The JSON header of `path` (tensor entries and `__metadata__`), checked as safetensors checks it before
    opening, so that no damaged file reaches its Rust errors: reads the header only, never the tensors."""
    if not exists(path):
        raise WeightsError(f"{path}: no such file or folder; pass the path of a .safetensors file or a model folder")
    if not path.is_file():
        raise WeightsError(f"{path}: not a file")
    try:
        with open(path, "rb") as f:
            head, size = f.read(9), os.fstat(f.fileno()).st_size
            if len(head) == 9 and head[8:9] == b"{":  # a safetensors header, whatever the file is called
                (n,) = struct.unpack("<Q", head[:8])
                if n > MAX_HEADER_BYTES:
                    raise WeightsError(f"{path}: header length {n:,} bytes is over safetensors' limit of 100 MB; "
                                       "the file is damaged or not a safetensors file: re-download or re-export it")
                if 8 + n > size:
                    raise WeightsError(f"{path}: truncated (its header alone should be {n:,} bytes, the file has "
                                       f"{size - 8:,} after the length field); re-download it")
                f.seek(8)
                raw = f.read(n)
    except OSError as e:
        raise WeightsError(f"{path}: cannot be read ({e.strerror}); check its permissions") from None
    if len(head) == 9 and head[8:9] == b"{":
        header = _parse_header(path, raw, size - 8 - n)
        _check_quantized(path, header, 8 + n)
        return header
    if head[:4] == b"GGUF":  # llama.cpp's container (city96's Flux / T5 quantizations for ComfyUI and Forge)
        raise WeightsError(f"{path}: a GGUF file; scfm does not read GGUF: use a safetensors file of this model "
                           "(bf16, or fp8 / fp8 scaled)")
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80" or path.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightsError(
            f"{path}: a pickled PyTorch checkpoint; scfm loads safetensors only (pickles can run code): "
            "convert it with safetensors.torch.save_file on a machine you trust"
        )
    if len(head) < 9:
        raise WeightsError(f"{path}: too short to be a safetensors file (truncated download?)")
    raise WeightsError(f"{path}: not a safetensors file (bad header); re-download or re-export it")


def _parse_header(path: Path, raw: bytes, data_bytes: int) -> dict:
    """`raw` as JSON whose entries tile the `data_bytes` after the header exactly, as safetensors requires."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a safetensors file (header is not a JSON object); re-download or re-export it")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise WeightsError(f"{path}: damaged header (__metadata__ is not a map of strings); re-export the file")
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ints = isinstance(shape, list) and all(type(x) is int and x >= 0 for x in [*shape, begin, end])
            fits = ints and begin <= end and (end - begin) * 8 == math.prod(shape) * _DTYPE_BITS[dtype]
        except (TypeError, KeyError, ValueError):
            fits = False
        if not fits:
            raise WeightsError(f"{path}: damaged header: tensor {key!r} has no valid dtype, shape and data_offsets "
                               f"({repr(entry)[:80]}); re-download or re-export the file")
        spans.append((begin, end, key))
    at = 0
    for begin, end, key in sorted(spans):
        if begin != at:
            raise WeightsError(f"{path}: damaged header: tensor {key!r} overlaps another or leaves a gap before it; "
                               "re-download or re-export the file")
        at = end
    if at > data_bytes:
        raise WeightsError(f"{path}: truncated (header says {at:,} bytes of tensors, the file has {data_bytes:,}); "
                           "re-download it")
    if at < data_bytes:
        raise WeightsError(f"{path}: damaged ({data_bytes - at:,} bytes after the last tensor its header names); "
                           "re-download or re-export it")
    return header


def _check_quantized(path: Path, header: dict, data_start: int) -> None:
    """Refuse ComfyUI mixed-precision layers in any format but fp8 (see _LAYER_CONFIG), naming the format; an
    fp8 layer whose weight is not stored in that fp8 dtype is a damaged file."""
    configs = [k for k in header if k.rpartition(".")[2] == _LAYER_CONFIG]
    declared = (header.get("__metadata__") or {}).get(QUANT_METADATA)
    if not configs and declared is None:
        return
    formats: dict[str, object] = {}  # layer -> its format
    tagged = {k.rpartition(".")[0] for k in configs}  # layers whose weight must be stored in their tag's format
    if declared is not None:
        try:
            layers = json.loads(declared)["layers"]
            # a converted copy may keep the metadata of layers it renamed or dequantized: only present ones count
            formats |= {k: v.get("format") for k, v in layers.items() if k + ".weight" in header}
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError):
            raise WeightsError(f"{path}: damaged {QUANT_METADATA} header entry (not ComfyUI's JSON of layers); "
                               "re-download or re-export the file") from None
    with open(path, "rb") as f:
        for key in configs:
            begin, end = header[key]["data_offsets"]
            f.seek(data_start + begin)
            try:
                formats[key.rpartition(".")[0]] = json.loads(f.read(end - begin)).get("format")
            except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                raise WeightsError(f"{path}: {key} is not ComfyUI's JSON layer config; re-download or re-export "
                                   "the file") from None
    for layer, fmt in formats.items():
        if not (isinstance(fmt, str) and fmt in _FP8_FORMATS):
            raise WeightsError(f"{path}: layer {layer} is quantized as {fmt!r} (ComfyUI mixed precision), which scfm "
                               "does not read; use a bf16 or fp8 file of this model")
        stored = header.get(layer + ".weight", {}).get("dtype")
        if layer in tagged and stored is not None and stored != _FP8_FORMATS[fmt]:
            raise WeightsError(f"{path}: layer {layer} is marked {fmt} but its weight is {stored}; the file is "
                               "damaged: re-download or re-export it")


def parse_lora(spec: str) -> tuple[str, float | None]:
    """`PATH[:SCALE]` as the CLIs take LoRAs, scale None when not given (`weights.lora_merge.lora_spec` then
    asks the file). The suffix is a scale only if it parses as a number, so `C:\\loras\\x.safetensors` works.
    A suffix that is no number nor a path's part (no separator) after an existing PATH, `x.safetensors:abc`, is a
    mistyped scale: refused in one line naming it (read as a path it would be reported as a missing file)."""
    path, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            if _mistyped_scale(spec, path, tail):
                raise WeightsError(f"{spec}: the scale {tail!r} is not a number; pass {path}:0.8 (or no ':' for its "
                                   "default scale)") from None
    return spec, None


def _mistyped_scale(spec: str, path: str, tail: str) -> bool:
    # a scale holds no separator (a drive letter's tail does: C:\\x), and a file really named `x:abc` is read
    return bool(path) and not any(c in tail for c in "/\\") and os.path.exists(path) and not os.path.exists(spec)


def file_version(path: str | os.PathLike) -> tuple:
    """What changes when a file is rewritten: the hashes below are remembered under it (the app and
    distill.evaluate ask again for the same LoRAs on every column and row)."""
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def file_sha256(path: str | os.PathLike) -> str:
    """The file's sha256 in hex, read in 4 MiB blocks (once per version of the file)."""
    return _sha256(*file_version(path))


@functools.lru_cache(maxsize=256)
def _sha256(path: str, *_version) -> str:
    with open(path, "rb") as f:
        return stream_sha256(f)


def stream_sha256(f) -> str:
    """The sha256 in hex of an open binary file from where it stands to its end, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 22), b""):
        digest.update(block)
    return digest.hexdigest()


def a1111_lora_hash(path: str | os.PathLike) -> str:
    """The 12 hex digits A1111 / Forge write in an image's `Lora hashes` and Civitai looks LoRAs up by
    ("AutoV3"): sd-scripts' `sshs_model_hash` when the file states one, else the sha256 of the tensor bytes
    (the file less its header, so that editing the metadata keeps the hash). Once per version of the file."""
    return _a1111_hash(*file_version(path))


@functools.lru_cache(maxsize=256)
def _a1111_hash(path: str, *_version) -> str:
    stated = read_header(Path(path))[1].get("sshs_model_hash")
    if stated:
        return stated[:12]
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        return stream_sha256(f)[:12]


def read_header(path: str | os.PathLike) -> tuple[dict[str, tuple[list[int], str]], dict[str, str]]:
    """Key -> (shape, dtype name) and the metadata of one file, without reading any tensor (the header is
    checked whole: a truncated or damaged file fails here, in one line)."""
    header = check_safetensors_file(Path(path))
    metadata = header.pop("__metadata__", None) or {}
    return {k: (v["shape"], v["dtype"]) for k, v in header.items()}, metadata


def scaled_fp8(dtypes: dict[str, str]) -> tuple[dict[str, str], set[str]]:
    """(fp8 weight key -> its scale key, the side keys to hide), from each key's dtype name (see _WEIGHT_SCALES)."""
    scaled: dict[str, str] = {}
    for key, dtype in dtypes.items():
        if dtype.startswith("F8") and key.endswith(".weight"):
            stem = key[: -len("weight")]
            found = [stem + s for s in _WEIGHT_SCALES if stem + s in dtypes]
            if found:
                scaled[key] = found[0]
    stems = {k[: -len("weight")] for k in scaled}
    hidden = set(scaled.values()) | {s + i for s in stems for i in _INPUT_SCALES if s + i in dtypes}
    if scaled:
        hidden |= {k for k in dtypes if k.rpartition(".")[2] in _MARKERS}  # top level or under a prefix
    # ComfyUI's per-layer format tags: only fp8 ones get this far (_check_quantized refused the rest)
    hidden |= {k for k in dtypes if k.rpartition(".")[2] == _LAYER_CONFIG}
    return scaled, hidden


def config_from_metadata(metadata: dict[str, str]) -> dict | None:
    """The object our savers write under CONFIG_METADATA_KEY; None when it is absent or damaged (not a JSON
    object), so that the config comes from the next source (the key shapes) as for a file without one. Its
    fields are not checked here: the loaders turn a bad one into a WeightsError."""
    raw = metadata.get(CONFIG_METADATA_KEY)
    if raw is None:
        return None
    try:
        stored = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return stored if isinstance(stored, dict) else None
