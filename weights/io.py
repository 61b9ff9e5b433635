"""Reading safetensors: file discovery, header checks, pickle refusal, streamed reads (atomic writes:
weights/atomic.py).

Every loader in `weights/` reads through here, so every model family gets the same errors and the same memory
discipline: tensors are read one at a time from a memory-mapped file and cast on the way, so the only resident
copy is the one handed to the model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

# The dtype names every command takes (--dtype), to torch dtypes.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class WeightsError(ValueError):
    """A problem with a user's weights, reported as one line that names the problem and the fix."""


# Our savers write the model config here so a file can be loaded without a config.json.
CONFIG_METADATA_KEY = "scfm_config"

_PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl"}

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
_PACKED_DTYPES = {"F4", "F6_E2M3", "F6_E3M2", "F8_E8M0"}
# Integer entries real checkpoints carry beside the weights and that no loader reads (old transformers saves'
# position_ids, BatchNorm's step counter in FLUX.2's VAE): a casting reader lets them be.
_INTEGER_BUFFERS = ("position_ids", "num_batches_tracked")


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


def check_float_dtypes(dtypes: dict[str, str], source: str | os.PathLike) -> None:
    """Refuse, before any read, a tensor a float model will hold (a weight, a norm's statistics) stored in a type
    that is not float: an integer one would fail in load_state_dict after every tensor is read, or load as an int
    buffer without a word; a packed 4/6-bit one cannot be read at all."""
    for key, dtype in dtypes.items():
        if dtype in _PACKED_DTYPES:
            raise WeightsError(f"{source}: tensor {key} is stored as {dtype} (a 4/6-bit quantized format), which "
                               "scfm does not read; use a bf16 or fp8 file of this model")
        if dtype not in FLOAT_DTYPES:
            raise WeightsError(f"{source}: tensor {key} is stored as {dtype}, not as a floating-point type; the "
                               "file is damaged or not these weights: re-download or re-export it")


def _check_safetensors_file(path: Path) -> dict:
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
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80" or path.suffix.lower() in _PICKLE_SUFFIXES:
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


def _named(folder: Path, ending: str) -> list[Path]:
    """The entries of `folder` whose name ends with `ending` in any case (MODEL.SAFETENSORS from a FAT drive or a
    Windows copy), sorted; broken links included, for exists() to name."""
    return sorted(p for p in folder.iterdir() if p.name.lower().endswith(ending))


def _variants(files: list[Path]) -> set[Path]:
    """The variant files among `files` whose plain file is there too: `X.fp16.safetensors` beside
    `X.safetensors`, as Hugging Face repos ship them. diffusers and transformers load the plain file unless asked
    for a `variant=`, and we have no such flag, so we do the same; any other key found in two files is refused
    (_owners)."""
    names = {f.name.lower() for f in files}
    out = set()
    for f in files:
        stem, dot, _ = f.name[: -len(".safetensors")].rpartition(".")
        if dot and stem and (stem + ".safetensors").lower() in names:
            out.add(f)
    return out


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of one model folder: the shards named by an index, or the single file."""
    indexes = _named(folder, ".safetensors.index.json")
    for index in indexes:
        refuse_broken_link(index)
    names: list[str] = []
    if indexes:
        try:
            index = json.loads(indexes[0].read_text())
        except (OSError, ValueError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8 text
            raise WeightsError(f"{indexes[0]}: unreadable index ({e}); re-download the model folder") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) and n for n in weight_map.values()):
            raise WeightsError(f"{indexes[0]}: damaged index (not {{\"weight_map\": {{tensor: file name}}}}); "
                               "re-download it, or delete it to load the folder's .safetensors files")
        names = sorted(set(weight_map.values()))
    if names:
        files = [folder / n for n in names]
        missing = [f.name for f in files if not exists(f)]
        if missing:
            raise WeightsError(f"{folder}: shards listed in {indexes[0].name} are missing: {missing[:3]}")
        return files
    # no index, or one naming no file (a stub beside a single model.safetensors): the folder's files, as
    # transformers and diffusers read a folder whose index is absent
    files = _named(folder, ".safetensors")
    variants = _variants(files)
    files = [f for f in files if f not in variants]
    if not files:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
        hint = f" (found pickled {pickled[:2]}: scfm loads safetensors only)" if pickled else ""
        raise WeightsError(f"{folder}: no .safetensors files{hint}")
    return files


def parse_lora(spec: str) -> tuple[str, float | None]:
    """`PATH[:SCALE]` as the CLIs take LoRAs, scale None when not given (`weights.lora_merge.lora_spec` then
    asks the file). The suffix is a scale only if it parses as a number, so `C:\\loras\\x.safetensors` works."""
    path, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, None


def _file_key(path: str | os.PathLike) -> tuple:
    """What changes when a file is rewritten: the hashes below are remembered under it (the app and
    distill.evaluate ask again for the same LoRAs on every column and row)."""
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def file_sha256(path: str | os.PathLike) -> str:
    """The file's sha256 in hex, read in 4 MiB blocks (once per version of the file)."""
    return _sha256(*_file_key(path))


@functools.lru_cache(maxsize=256)
def _sha256(path: str, *_version) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def a1111_lora_hash(path: str | os.PathLike) -> str:
    """The 12 hex digits A1111 / Forge write in an image's `Lora hashes` and Civitai looks LoRAs up by
    ("AutoV3"): sd-scripts' `sshs_model_hash` when the file states one, else the sha256 of the tensor bytes
    (the file less its header, so that editing the metadata keeps the hash). Once per version of the file."""
    return _a1111_hash(*_file_key(path))


@functools.lru_cache(maxsize=256)
def _a1111_hash(path: str, *_version) -> str:
    stated = read_header(Path(path))[1].get("sshs_model_hash")
    if stated:
        return stated[:12]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def read_header(path: str | os.PathLike) -> tuple[dict[str, tuple[list[int], str]], dict[str, str]]:
    """Key -> (shape, dtype name) and the metadata of one file, without reading any tensor (the header is
    checked whole: a truncated or damaged file fails here, in one line)."""
    header = _check_safetensors_file(Path(path))
    metadata = header.pop("__metadata__", None) or {}
    return {k: (v["shape"], v["dtype"]) for k, v in header.items()}, metadata


def _scaled_fp8(dtypes: dict[str, str]) -> tuple[dict[str, str], set[str]]:
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


def _index_map(folder: Path) -> dict:
    """The weight_map of `folder`'s index, {} without one (weight_files has refused a damaged one already)."""
    for index in _named(folder, ".safetensors.index.json"):
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(weight_map, dict):
            return weight_map
    return {}


def _owners(files: list[Path], keys_of: list) -> dict[str, int]:
    """Key -> the position in `files` of the file it is read from (`keys_of[i]`: file i's keys). A key several
    files hold is read from the one the folder's index (model.safetensors.index.json) names. The index decides, as
    transformers' and diffusers' loaders go by it; without one a key in two files is refused, not taken from
    whichever sorts last."""
    owner: dict[str, int] = {}
    weight_map = None
    for i, keys in enumerate(keys_of):
        for key in keys:
            j = owner.setdefault(key, i)
            if j == i:
                continue
            if weight_map is None:
                weight_map = _index_map(files[i].parent) if files[i].parent == files[j].parent else {}
            named = weight_map.get(key)
            if named not in (files[i].name, files[j].name):
                raise WeightsError(f"{files[j]} and {files[i].name}: both hold {key} and no index says which to use; "
                                   "pass one file, or remove the file that should not be loaded")
            owner[key] = i if named == files[i].name else j
    return owner


def read_shapes(files: list[Path]) -> tuple[dict[str, tuple[list[int], str]], dict[str, str]]:
    """Key -> (shape, dtype name) over all files, as the readers hand the tensors out: a scaled fp8 weight
    reports its scale's dtype, and the scale / marker keys are left out. A key in several files is read from the
    one the index names (_owners)."""
    headers = []
    metadata: dict[str, str] = {}
    for f in files:
        s, m = read_header(f)
        headers.append(s)
        metadata.update(m)
    owner = _owners(files, headers)
    shapes = {k: headers[i][k] for k, i in owner.items()}
    scaled, hidden = _scaled_fp8({k: dtype for k, (_, dtype) in shapes.items()})
    for weight, scale in scaled.items():
        shapes[weight] = (shapes[weight][0], shapes[scale][1])
    return {k: v for k, v in shapes.items() if k not in hidden}, metadata


def iter_tensors(
    files: list[Path], keys: set[str] | None = None, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) one at a time in file order, as `TensorReader` reads them. `keys` filters."""
    with TensorReader(files, dtype, keys=keys) as read:
        for key in read.keys():
            if keys is None or key in keys:
                yield key, read(key)


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


class TensorReader:
    """Random access to the tensors of several safetensors files, each read on demand and cast to `dtype`.

    Use as a context manager; the files stay memory-mapped while it is open.
    """

    def __init__(self, files: list[Path], dtype: torch.dtype | None = None, prefix: str = "",
                 keys: set[str] | None = None):
        """`keys`: the full names that will be read, checked to be float before any is (check_float_dtypes);
        without them a reader that casts (`dtype`) checks every key under its prefix, being a model's loader."""
        for path in files:
            _check_safetensors_file(path)
        self.files, self.dtype, self.prefix, self.wanted = files, dtype, prefix, keys
        self._handles: list = []
        self._where: dict[str, object] = {}
        self._scales: dict[str, str] = {}
        self._hidden: set[str] = set()
        self._dtypes: dict[str, str] = {}

    def __enter__(self) -> TensorReader:
        handles, keys_of = [], []
        for path in self.files:
            try:
                h = safe_open(str(path), framework="pt", device="cpu")
            except SafetensorError as e:  # what our header check missed (the file changed since, say)
                raise WeightsError(f"{path}: safetensors cannot open it ({e}); re-download or re-export it") from None
            handles.append(h)
            keys_of.append(h.keys())
        self._handles = handles
        owner = _owners(self.files, keys_of)
        self._where = {k: handles[owner[k]] for keys in keys_of for k in keys}  # in file order
        # from the open handles: no second read of the headers
        dtypes = {k: h.get_slice(k).get_dtype() for k, h in self._where.items()}
        self._scales, self._hidden, self._dtypes = *_scaled_fp8(dtypes), dtypes
        reported = {k: dtypes[self._scales.get(k, k)] for k in dtypes if k not in self._hidden}
        if self.wanted is not None:
            checked = {k: reported[k] for k in self.wanted if k in reported}
        elif self.dtype is not None:
            checked = {k: d for k, d in reported.items()
                       if k.startswith(self.prefix) and k.rpartition(".")[2] not in _INTEGER_BUFFERS}
        else:
            checked = {}  # a LoRA's or a converter's reader: its callers know which tensors are what
        for i, path in enumerate(self.files):
            check_float_dtypes({k: d for k, d in checked.items() if owner[k] == i}, path)
        return self

    def __exit__(self, *exc) -> None:
        self._handles.clear()
        self._where.clear()

    def keys(self) -> list[str]:
        """Every key the reader hands out (full names, in file order; scaled-fp8 side keys left out)."""
        return [k for k in self._where if k not in self._hidden]

    def _get(self, full: str) -> torch.Tensor:
        h = self._where[full]
        if self._dtypes[full] in _PACKED_DTYPES:  # F6: a raw SafetensorError; F4 / E8M0: packed torch types
            check_float_dtypes({full: self._dtypes[full]}, self.files[self._handles.index(h)])
        try:
            return h.get_tensor(full)
        except SafetensorError as e:  # a type this safetensors cannot hand to torch, or a file changed since
            raise WeightsError(f"{self.files[self._handles.index(h)]}: tensor {full} cannot be read ({e}); "
                               "re-download or re-export the file") from None

    def __call__(self, key: str) -> torch.Tensor:
        full = self.prefix + key
        t = self._get(full)
        if full in self._scales:  # a scaled fp8 weight: the product, computed in fp32
            scale = self._get(self._scales[full])
            if scale.numel() not in (1, t.shape[0]):
                raise WeightsError(f"{full}: scale of shape {list(scale.shape)} fits neither the whole weight nor "
                                   f"its {t.shape[0]} rows; the file is not a scaled fp8 checkpoint we know")
            rows = scale.float().reshape(-1, *([1] * (t.ndim - 1)))  # (1 | out, 1, ...)
            t = (t.float() * rows).to(self.dtype or torch.promote_types(scale.dtype, torch.float32))
        if self.dtype is not None and t.is_floating_point() and t.dtype != self.dtype:
            t = t.to(self.dtype)  # fp8 files upcast here, before any key-map arithmetic
        return t


def read_config_json(folder: Path) -> dict | None:
    """A model folder's config.json, or None when it has none (a broken link to one is refused)."""
    if not exists(folder / "config.json"):
        return None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8 text
        raise WeightsError(f"{folder / 'config.json'}: unreadable ({e}); fix or delete it") from None
    if not isinstance(config, dict):  # every reader looks fields up in it
        raise WeightsError(f"{folder / 'config.json'}: not a JSON object (a {type(config).__name__}); "
                           "fix or delete it")
    return config


def model_files(source: str | os.PathLike, subfolder: str) -> tuple[list[Path], dict | None]:
    """The weight files and config.json of `source`: a single file, a model folder, or a diffusers pipeline
    folder (whose `subfolder`, e.g. `transformer`, is used)."""
    path = Path(source).expanduser()
    if not exists(path):
        raise WeightsError(f"{path}: no such file or folder; pass the path of a .safetensors file or a model folder")
    if path.is_file():
        _check_safetensors_file(path)
        return [path], None
    if exists(path / "model_index.json") or (path / subfolder).is_dir():
        if not (path / subfolder).is_dir():
            raise WeightsError(f"{path}: a pipeline folder without a {subfolder}/ subfolder")
        path = path / subfolder
    return weight_files(path), read_config_json(path)
