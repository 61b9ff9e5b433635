"""Reading and writing safetensors: file discovery, pickle refusal, streamed reads, atomic writes.

Every loader in `weights/` reads through here, so every model family gets the same errors and the same memory
discipline: tensors are read one at a time from a memory-mapped file and cast on the way, so the only resident
copy is the one handed to the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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


def _check_safetensors_file(path: Path) -> None:
    if not path.exists():
        raise WeightsError(f"{path}: no such file or folder; pass the path of a .safetensors file or a model folder")
    if not path.is_file():
        raise WeightsError(f"{path}: not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise WeightsError(f"{path}: cannot be read ({e.strerror}); check its permissions") from None
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= path.stat().st_size:
        return  # a valid safetensors header, whatever the file is called
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80" or path.suffix in _PICKLE_SUFFIXES:
        raise WeightsError(
            f"{path}: a pickled PyTorch checkpoint; scfm loads safetensors only (pickles can run code): "
            "convert it with safetensors.torch.save_file on a machine you trust"
        )
    if len(head) < 9:
        raise WeightsError(f"{path}: too short to be a safetensors file (truncated download?)")
    raise WeightsError(f"{path}: not a safetensors file (bad header); re-download or re-export it")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of one model folder: the shards named by an index, or the single file."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            index = json.loads(indexes[0].read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise WeightsError(f"{indexes[0]}: unreadable index ({e}); re-download the model folder") from None
        names = sorted(set(index.get("weight_map", {}).values()))
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise WeightsError(f"{folder}: shards listed in {indexes[0].name} are missing: {missing[:3]}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
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


def file_sha256(path: str | os.PathLike) -> str:
    """The file's sha256 in hex, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def a1111_lora_hash(path: str | os.PathLike) -> str:
    """The 12 hex digits A1111 / Forge write in an image's `Lora hashes` and Civitai looks LoRAs up by
    ("AutoV3"): sd-scripts' `sshs_model_hash` when the file states one, else the sha256 of the tensor bytes
    (the file less its header, so that editing the metadata keeps the hash)."""
    path = Path(path)
    stated = read_header(path)[1].get("sshs_model_hash")
    if stated:
        return stated[:12]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def read_header(path: Path) -> tuple[dict[str, tuple[list[int], str]], dict[str, str]]:
    """Key -> (shape, dtype name) and the metadata of one file, without reading any tensor."""
    _check_safetensors_file(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError:
            raise WeightsError(f"{path}: not a safetensors file (header is not JSON)") from None
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
    return scaled, hidden


def read_shapes(files: list[Path]) -> tuple[dict[str, tuple[list[int], str]], dict[str, str]]:
    """Key -> (shape, dtype name) over all files, as the readers hand the tensors out: a scaled fp8 weight
    reports its scale's dtype, and the scale / marker keys are left out."""
    shapes: dict[str, tuple[list[int], str]] = {}
    metadata: dict[str, str] = {}
    for f in files:
        s, m = read_header(f)
        shapes.update(s)
        metadata.update(m)
    scaled, hidden = _scaled_fp8({k: dtype for k, (_, dtype) in shapes.items()})
    for weight, scale in scaled.items():
        shapes[weight] = (shapes[weight][0], shapes[scale][1])
    return {k: v for k, v in shapes.items() if k not in hidden}, metadata


def iter_tensors(
    files: list[Path], keys: set[str] | None = None, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) one at a time in file order, as `TensorReader` reads them. `keys` filters."""
    with TensorReader(files, dtype) as read:
        for key in read.keys():
            if keys is None or key in keys:
                yield key, read(key)


def config_from_metadata(metadata: dict[str, str]) -> dict | None:
    raw = metadata.get(CONFIG_METADATA_KEY)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return None


def atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None,
                *, overwrite: bool = False) -> Path:
    """Write a safetensors file through a temp file and a rename, so a crash never leaves half a file."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise WeightsError(f"{path} exists; pass overwrite=True (or --overwrite) to replace it")
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    return path


def temp_beside(path: Path, *, folder: bool = False) -> Path:
    """A new, empty file (or folder) `.NAME.<random>.tmp` beside `path`, to be renamed onto it once complete.

    Created with mode 0666 (0777) for the OS to take the umask off, as for any open(): tempfile's mkstemp and
    mkdtemp make 0600 / 0700, the rename keeps that, and no other user (a ComfyUI in Docker, a web server)
    could read what we wrote. Asking the OS to apply the umask also spares reading it, which POSIX allows only
    by setting it, a race with other threads. O_EXCL makes the name ours alone, as mkstemp does."""
    for _ in range(10):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            if folder:
                os.mkdir(tmp, 0o777)
            else:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
                os.close(os.open(tmp, flags, 0o666))
            return tmp
        except FileExistsError:
            continue  # another writer drew the same name: draw again
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name}; delete its .{path.name}.*.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp file beside `path` (see `temp_beside`) for the block to write; renamed onto `path` when the block
    ends, deleted if it raises, so a crash never leaves half a file under the final name. The file keeps the
    mode the umask gave the temp file even when the block's writer replaced it: safetensors' save_file writes
    its own 0600 file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    mode = stat.S_IMODE(tmp.stat().st_mode)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class TensorReader:
    """Random access to the tensors of several safetensors files, each read on demand and cast to `dtype`.

    Use as a context manager; the files stay memory-mapped while it is open.
    """

    def __init__(self, files: list[Path], dtype: torch.dtype | None = None, prefix: str = ""):
        for path in files:
            _check_safetensors_file(path)
        self.files, self.dtype, self.prefix = files, dtype, prefix
        self._handles: list = []
        self._where: dict[str, object] = {}
        self._scales: dict[str, str] = {}
        self._hidden: set[str] = set()

    def __enter__(self) -> TensorReader:
        dtypes: dict[str, str] = {}  # from the open handles: no second read of the headers
        for path in self.files:
            h = safe_open(str(path), framework="pt", device="cpu")
            self._handles.append(h)
            for key in h.keys():
                self._where[key] = h
                dtypes[key] = h.get_slice(key).get_dtype()
        self._scales, self._hidden = _scaled_fp8(dtypes)
        return self

    def __exit__(self, *exc) -> None:
        self._handles.clear()
        self._where.clear()

    def keys(self) -> list[str]:
        """Every key the reader hands out (full names, in file order; scaled-fp8 side keys left out)."""
        return [k for k in self._where if k not in self._hidden]

    def _get(self, full: str) -> torch.Tensor:
        return self._where[full].get_tensor(full)

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
    """A model folder's config.json, or None when it has none."""
    if not (folder / "config.json").exists():
        return None
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{folder / 'config.json'}: unreadable ({e}); fix or delete it") from None


def model_files(source: str | os.PathLike, subfolder: str) -> tuple[list[Path], dict | None]:
    """The weight files and config.json of `source`: a single file, a model folder, or a diffusers pipeline
    folder (whose `subfolder`, e.g. `transformer`, is used)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise WeightsError(f"{path}: no such file or folder; pass the path of a .safetensors file or a model folder")
    if path.is_file():
        _check_safetensors_file(path)
        return [path], None
    if (path / "model_index.json").exists() or (path / subfolder).is_dir():
        if not (path / subfolder).is_dir():
            raise WeightsError(f"{path}: a pipeline folder without a {subfolder}/ subfolder")
        path = path / subfolder
    return weight_files(path), read_config_json(path)
