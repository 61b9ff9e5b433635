"""Timing shared by the side-by-side benchmarks."""

from __future__ import annotations

import contextlib
import statistics
import time

import torch


def median_time(fn, device: str, warmup: int, iters: int) -> float:
    """Median seconds of `iters` calls after `warmup` calls, synchronising CUDA around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@contextlib.contextmanager
def built_in(device: str | torch.device, dtype: torch.dtype):
    """Build modules directly on `device` in `dtype`: a full-size model built in fp32 and cast afterwards would
    need twice its bf16 size (flux-dev: 48 GB) at the peak."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)
