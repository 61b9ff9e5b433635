"""Smaller LoRA files: a lower rank by truncated SVD, and a narrower dtype.

Each slice's delta_W = scale * up @ down (rank r) is cut to its k largest singular values: by Eckart-Young the
closest rank-k matrix in Frobenius norm, so the relative error is sqrt(1 - kept) where `kept` is the share of
sum(sigma^2) that the k values hold. The SVD comes from the factors, never from delta_W (out x in): with
up = Qu Ru and down^T = Qd Rd (thin QR), delta_W = Qu (scale Ru Rd^T) Qd^T, and only the r x r middle is
decomposed. In float64, so a resize to the full rank gives the same delta back within the storage dtype's
rounding. The new factors split sigma evenly (up = U sqrt(S), down = sqrt(S) V^T) with alpha = k (scale 1).

    python -m tools.convert lora scfm.safetensors scfm-r32.safetensors --to kohya --rank 32 --dtype bf16
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from .io import WeightsError
from .lora import LoRA, LoRAPart, ModuleLoRA


@dataclass(frozen=True)
class Resized:
    """One slice: its rank before and after, and the share of delta_W's squared Frobenius norm kept."""

    module: str
    slice: int
    rank: int
    new_rank: int
    kept: float


def _svd(part: LoRAPart) -> tuple[Tensor, Tensor, Tensor]:
    """U (out, r), S (r,), Vh (r, in * kh * kw) of scale * up @ down, in float64."""
    up, down = part.up.flatten(1).double(), part.down.flatten(1).double()
    qu, ru = torch.linalg.qr(up)  # (out, r), (r, r)
    qd, rd = torch.linalg.qr(down.T)  # (in, r), (r, r)
    u, s, vh = torch.linalg.svd(part.scale * ru @ rd.T)
    return qu @ u, s, vh @ qd.T


def _rank_for(s: Tensor, rank: int | None, energy: float | None) -> int:
    k = len(s) if rank is None else min(rank, len(s))
    total = float((s * s).sum())
    if energy is not None and total > 0:
        share = torch.cumsum(s * s, 0) / total
        k = min(k, int((share < energy - 1e-12).sum()) + 1)  # the fewest values holding `energy`
    return max(k, 1)


def _resize_part(part: LoRAPart, rank: int | None, energy: float | None,
                 dtype: torch.dtype) -> tuple[LoRAPart, int, float]:
    u, s, vh = _svd(part)
    k = _rank_for(s, rank, energy)
    total = float((s * s).sum())
    kept = float((s[:k] * s[:k]).sum()) / total if total > 0 else 1.0
    root = s[:k].sqrt()
    up = (u[:, :k] * root).to(dtype).reshape(part.up.shape[0], k, *part.up.shape[2:])  # conv: (out, k, 1, 1)
    down = (root[:, None] * vh[:k]).to(dtype).reshape(k, *part.down.shape[1:])  # conv: (k, in, kh, kw)
    return LoRAPart(down, up, float(k)), k, kept


def resize_lora(lora: LoRA, *, rank: int | None = None, energy: float | None = None,
                dtype: torch.dtype | None = None) -> tuple[LoRA, list[Resized]]:
    """`lora` with every slice cut to at most `rank` and to the fewest singular values holding `energy` of its
    squared norm (either or both), its tensors in `dtype` (default: as stored). Neither rank nor energy: the
    same deltas, refactored (and cast). Text-encoder keys are kept as they are; so are the recommended
    settings."""
    if rank is not None and rank < 1:
        raise WeightsError(f"rank must be >= 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise WeightsError(f"energy must be in (0, 1], got {energy} (0.99 keeps 99% of each delta's norm)")
    modules: dict[str, ModuleLoRA] = {}
    report: list[Resized] = []
    for name, mod in lora.modules.items():
        parts: list[LoRAPart | None] = []
        for i, part in enumerate(mod.parts):
            if part is None:
                parts.append(None)
                continue
            new, k, kept = _resize_part(part, rank, energy, dtype or part.up.dtype)
            parts.append(new)
            report.append(Resized(name, i, part.up.shape[1], k, kept))
        modules[name] = ModuleLoRA(parts, mod.rows)
    diffs = {k: d.to(dtype) if dtype else d for k, d in lora.diffs.items()}  # full differences: only cast
    return dataclasses.replace(lora, modules=modules, diffs=diffs), report


def summary(report: list[Resized]) -> str:
    """One line: ranks before and after, and the share of the squared norm kept (mean and worst slice)."""
    if not report:
        return "no LoRA layers"
    worst = min(report, key=lambda r: r.kept)
    before = sorted({r.rank for r in report})
    after = sorted({r.new_rank for r in report})
    span = (lambda v: str(v[0]) if len(v) == 1 else f"{v[0]}-{v[-1]}")
    mean = sum(r.kept for r in report) / len(report)
    return (f"rank {span(before)} -> {span(after)} over {len(report)} slices; squared norm kept: mean "
            f"{mean:.4f}, lowest {worst.kept:.4f} ({worst.module} slice {worst.slice})")
