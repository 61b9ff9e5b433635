"""Timing shared by the side-by-side benchmarks."""

from __future__ import annotations

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
