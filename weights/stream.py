"""A streaming safetensors writer: the header first, then each tensor's bytes as the tensor is produced.

`safetensors.torch.save_file` needs every tensor in memory at once; a 12 B Flux converted that way needs the
whole model in RAM. The format makes streaming easy, because the header only needs names, dtypes and shapes,
which a conversion knows before it reads any tensor (run it once on meta tensors, see `weights/convert.py`):

    8 bytes   N, the header length, unsigned little-endian
    N bytes   JSON {key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
              padded with spaces so the data starts 8-byte aligned
    data      every tensor's raw little-endian bytes, back to back in header order, no gaps

Peak memory is the tensor being written. Files appear atomically: written to a temp file beside the target
and renamed into place only once complete and flushed to the disk (weights/atomic.py `durable_replace`).
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from .atomic import durable_replace, remove_stale_temps, temp_beside
from .io import WeightsError

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}

# One planned tensor: (key, dtype, shape).
Spec = tuple[str, torch.dtype, tuple[int, ...]]


def nbytes(dtype: torch.dtype, shape) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def encode_header(plan: list[Spec], metadata: dict[str, str] | None) -> bytes:
    """The length prefix and padded JSON header for tensors written in `plan` order; WeightsError (one line, the
    first bad entry and the fix) for what safetensors cannot hold."""
    header: dict[str, dict] = {}
    if metadata:
        for k, v in metadata.items():
            if not (isinstance(k, str) and isinstance(v, str)):
                bad = f"key {k!r} ({type(k).__name__}, not str)" if not isinstance(k, str) else \
                    f"{k!r} = {v!r:.40} ({type(v).__name__}, not str)"
                raise WeightsError(f"metadata {bad}; safetensors metadata maps str to str: pass str() or "
                                   "json.dumps() of it")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for key, dtype, shape in plan:
        if not isinstance(key, str) or key == "__metadata__":
            raise WeightsError(f"tensor key {key!r} cannot be written: a key is a str other than __metadata__, "
                               "which safetensors reserves; rename the tensor")
        if key in header:
            raise WeightsError(f"tensor key {key!r} is planned twice; a file holds each key once: drop or rename "
                               "the second")
        if dtype not in DTYPE_NAMES:
            raise WeightsError(f"tensor {key}: dtype {dtype} has no safetensors name; cast it to one of "
                               f"{', '.join(str(d).removeprefix('torch.') for d in DTYPE_NAMES)}")
        if not all(isinstance(n, int) and n >= 0 for n in shape):
            raise WeightsError(f"tensor {key}: shape {list(shape)} is not a list of sizes >= 0; fix the plan")
        size = nbytes(dtype, shape)
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads with spaces so tensor data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _write_bytes(f, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    if sys.byteorder != "little":  # the format is little-endian; every platform torch ships on is too
        raise WeightsError("big-endian hosts are not supported by the streaming writer")
    if t.numel():
        # a uint8 view of the tensor's own storage, written without a copy (numpy has no bfloat16)
        f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


class StreamWriter:
    """Write one safetensors file tensor by tensor. `plan` fixes keys, dtypes, shapes and order up front;
    `write` must then be called with exactly those tensors in that order, and `close` renames the file
    into place. Used as a context manager, an exception discards the temp file and leaves `path` untouched."""

    def __init__(self, path: str | os.PathLike, plan: list[Spec], metadata: dict[str, str] | None = None):
        self.path, self.plan, self._next = Path(path), list(plan), 0
        try:  # checked before the temp file exists: an error raised out of __init__ reaches no abort()
            header = encode_header(self.plan, metadata)
        except WeightsError as e:
            raise WeightsError(f"{self.path}: {e}") from None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.path)  # what a killed write of this same file left
        self._tmp = temp_beside(self.path)  # the user's umask, unlike mkstemp's 0600
        self._f = None
        try:
            self._f = open(self._tmp, "wb")  # noqa: SIM115  (closed by close() or abort())
            self._f.write(header)
        except BaseException:  # a full disk, an interrupt: no caller holds the writer to abort it
            self.abort()
            raise

    def write(self, key: str, t: torch.Tensor) -> None:
        if self._next >= len(self.plan):
            raise WeightsError(f"{self.path}: tensor {key} is beyond the planned {len(self.plan)}")
        want_key, dtype, shape = self.plan[self._next]
        if (key, t.dtype, tuple(t.shape)) != (want_key, dtype, tuple(shape)):
            raise WeightsError(f"{self.path}: got {key} {t.dtype} {list(t.shape)}, planned {want_key} "
                               f"{dtype} {list(shape)}; the conversion and its plan disagree")
        _write_bytes(self._f, t)
        self._next += 1

    def close(self) -> Path:
        if self._next != len(self.plan):
            self.abort()
            missing = len(self.plan) - self._next
            raise WeightsError(f"{self.path}: {missing} planned tensors were never written")
        try:
            self._f.close()
            durable_replace(self._tmp, self.path)  # data on the disk, renamed, the rename on the disk
        except BaseException:  # a full disk at the flush: the temp goes (a no-op once renamed), `path` stays
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        if self._f is not None and not self._f.closed:
            self._f.close()
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._f.closed:
            self.close()


def write_streaming(path: str | os.PathLike, plan: list[Spec], tensors: Iterable[tuple[str, torch.Tensor]],
                    metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` (yielding exactly `plan`, in order) to one file, each tensor dropped once written."""
    with StreamWriter(path, plan, metadata) as w:
        for key, t in tensors:
            w.write(key, t)
            del t  # the caller's iterator holds no reference either, so only one tensor is alive
        return w.close()
