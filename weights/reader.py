"""Which files make a model and reading its tensors from them: the folder rules (an index's shards, or the
folder's files less the variants beside their plain file; a diffusers pipeline's subfolder; config.json), which
file a key is read from when several hold it, and TensorReader over the files. One file's header checks, the
scaled-fp8 rule and WeightsError: weights/io.py.

Every loader in `weights/` reads through here, so every model family gets the same errors and the same memory
discipline: tensors are read one at a time from a memory-mapped file and cast on the way, so the only resident
copy is the one handed to the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .io import (
    PACKED_DTYPES,
    PICKLE_SUFFIXES,
    WeightsError,
    check_float_dtypes,
    check_safetensors_file,
    exists,
    read_header,
    read_json_object,
    refuse_broken_link,
    scaled_fp8,
)

# Integer entries real checkpoints carry beside the weights and that no loader reads (old transformers saves'
# position_ids, BatchNorm's step counter in FLUX.2's VAE): a casting reader lets them be.
_INTEGER_BUFFERS = ("position_ids", "num_batches_tracked")


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


def _weight_map(folder: Path) -> tuple[Path, dict] | None:
    """(`folder`'s index file, its weight_map), None without an index; a damaged one is refused in one line."""
    indexes = _named(folder, ".safetensors.index.json")
    for index in indexes:
        refuse_broken_link(index)
    if not indexes:
        return None
    try:
        index = json.loads(indexes[0].read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8 text
        raise WeightsError(f"{indexes[0]}: unreadable index ({e}); re-download the model folder") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(n, str) and n for n in weight_map.values()):
        raise WeightsError(f"{indexes[0]}: damaged index (not {{\"weight_map\": {{tensor: file name}}}}); "
                           "re-download it, or delete it to load the folder's .safetensors files")
    return indexes[0], weight_map


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of one model folder: the shards named by an index, or the single file."""
    found = _weight_map(folder)
    names = sorted(set(found[1].values())) if found else []
    if names:
        files = [folder / n for n in names]
        missing = [f.name for f in files if not exists(f)]
        if missing:
            raise WeightsError(f"{folder}: shards listed in {found[0].name} are missing: {missing[:3]}")
        return files
    # no index, or one naming no file (a stub beside a single model.safetensors): the folder's files, as
    # transformers and diffusers read a folder whose index is absent
    files = _named(folder, ".safetensors")
    variants = _variants(files)
    files = [f for f in files if f not in variants]
    if not files:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        hint = f" (found pickled {pickled[:2]}: scfm loads safetensors only)" if pickled else ""
        raise WeightsError(f"{folder}: no .safetensors files{hint}")
    return files


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
                found = _weight_map(files[i].parent) if files[i].parent == files[j].parent else None
                weight_map = found[1] if found else {}
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
    scaled, hidden = scaled_fp8({k: dtype for k, (_, dtype) in shapes.items()})
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


class TensorReader:
    """Random access to the tensors of several safetensors files, each read on demand and cast to `dtype`.

    Use as a context manager; the files stay memory-mapped while it is open.
    """

    def __init__(self, files: list[Path], dtype: torch.dtype | None = None, prefix: str = "",
                 keys: set[str] | None = None):
        """`keys`: the full names that will be read, checked to be float before any is (check_float_dtypes);
        without them a reader that casts (`dtype`) checks every key under its prefix, being a model's loader."""
        for path in files:
            check_safetensors_file(path)
        self.files, self.dtype, self.prefix, self.wanted = files, dtype, prefix, keys
        self._handles: list = []
        self._file_of: dict[str, int] = {}  # key -> the position of the file it is read from, in file order
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
        self._file_of = _owners(self.files, keys_of)  # every key, in file order
        # from the open handles: no second read of the headers
        dtypes = {k: handles[i].get_slice(k).get_dtype() for k, i in self._file_of.items()}
        self._scales, self._hidden = scaled_fp8(dtypes)
        self._dtypes = dtypes
        if self.wanted is not None:
            checked = [k for k in self.wanted if k in dtypes and k not in self._hidden]
        elif self.dtype is not None:
            checked = [k for k in dtypes if k not in self._hidden and k.startswith(self.prefix)
                       and k.rpartition(".")[2] not in _INTEGER_BUFFERS]
        else:
            checked = []  # a LoRA's or a converter's reader: its callers know which tensors are what
        by_file: list[dict[str, str]] = [{} for _ in self.files]
        for k in checked:  # the dtype the reader hands out: a scaled fp8 weight's is its scale's
            by_file[self._file_of[k]][k] = dtypes[self._scales.get(k, k)]
        for path, reported in zip(self.files, by_file):
            check_float_dtypes(reported, path)
        return self

    def __exit__(self, *exc) -> None:
        self._handles.clear()
        self._file_of.clear()

    def keys(self) -> list[str]:
        """Every key the reader hands out (full names, in file order; scaled-fp8 side keys left out)."""
        return [k for k in self._file_of if k not in self._hidden]

    def _get(self, full: str) -> torch.Tensor:
        i = self._file_of[full]
        if self._dtypes[full] in PACKED_DTYPES:  # F6: a raw SafetensorError; F4 / E8M0: packed torch types
            check_float_dtypes({full: self._dtypes[full]}, self.files[i])
        try:
            return self._handles[i].get_tensor(full)
        except SafetensorError as e:  # a type this safetensors cannot hand to torch, or a file changed since
            raise WeightsError(f"{self.files[i]}: tensor {full} cannot be read ({e}); "
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
    return read_json_object(folder / "config.json", "fix or delete it")


def model_files(source: str | os.PathLike, subfolder: str) -> tuple[list[Path], dict | None]:
    """The weight files and config.json of `source`: a single file, a model folder, or a diffusers pipeline
    folder (whose `subfolder`, e.g. `transformer`, is used)."""
    path = Path(source).expanduser()
    if not exists(path):
        raise WeightsError(f"{path}: no such file or folder; pass the path of a .safetensors file or a model folder")
    if path.is_file():
        check_safetensors_file(path)
        return [path], None
    if exists(path / "model_index.json") or (path / subfolder).is_dir():
        if not (path / subfolder).is_dir():
            raise WeightsError(f"{path}: a pipeline folder without a {subfolder}/ subfolder")
        path = path / subfolder
    return weight_files(path), read_config_json(path)
