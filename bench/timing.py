"""Timing and memory-traffic counts shared by the side-by-side benchmarks."""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


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


def twin_row(name: str, device: str, dtype: torch.dtype, run_ref, run_ours, iters: int) -> dict:
    """One row of a forward-against-diffusers benchmark: the max relative error of ours, the median
    milliseconds of each, and the ratio as the median of per-pair ratios with its quartiles. Each pair is one
    call of each, back to back, the first of the pair alternating, so drift in the machine's load (a shared
    2-core VM swings a whole forward by +-5% between seconds) hits both sides of a pair alike instead of
    landing in the ratio of two separate medians."""
    out_ref, out_ours = run_ref().float(), run_ours().float()
    err = ((out_ours - out_ref).abs().max() / out_ref.abs().max()).item()
    warmup = 2 if name != "tiny" else 5
    t_ref, t_ours = [], []
    for i in range(iters):
        pair = [(run_ref, t_ref), (run_ours, t_ours)]
        for fn, times in pair if i % 2 == 0 else pair[::-1]:
            times.append(median_time(fn, device, 0 if times else warmup, 1))
    ratios = sorted(o / r for o, r in zip(t_ours, t_ref))
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return dict(case=name, device=device, dtype=str(dtype).removeprefix("torch."),
                ours_ms=1e3 * statistics.median(t_ours), diffusers_ms=1e3 * statistics.median(t_ref),
                ratio=statistics.median(ratios), ratio_q1=q1, ratio_q3=q3, max_rel_err=err)


def twin_main(description: str, title: str, cases: dict, run_case) -> None:
    """The command line of a forward-against-diffusers benchmark (bench/*_forward.py): `cases` name ->
    (..., devices, dtype) with the devices fifth; `run_case(name, device, iters)` gives one row."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cases", nargs="*", default=list(cases), choices=list(cases))
    ap.add_argument("--iters", type=int, default=7)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"# {title}, ours vs diffusers, {device_name}, torch {torch.__version__}")
    print(f"{'case':<20}{'dtype':<10}{'ours ms':>10}{'diffusers ms':>14}{'ratio':>8}{'quartiles':>14}"
          f"{'max rel err':>13}")
    for name in args.cases:
        if args.device in cases[name][4]:
            r = run_case(name, args.device, args.iters)
            print(f"{r['case']:<20}{r['dtype']:<10}{r['ours_ms']:>10.2f}{r['diffusers_ms']:>14.2f}"
                  f"{r['ratio']:>8.3f}{r['ratio_q1']:>8.3f}-{r['ratio_q3']:.3f}{r['max_rel_err']:>13.2e}", flush=True)


@contextlib.contextmanager
def trials(fast_accum: bool = False, cudnn: bool = False, unfused: bool = False):
    """Speed trials, for the calls inside only: Hopper's fast accumulation in the forward fp8 GEMMs
    (model/fp8_gemm.py FAST_ACCUM_FORWARD), torch's cuDNN attention first in SDPA's priority (its default order
    puts FlashAttention-2 first), and the fp8 GEMMs rounding their own inputs instead of taking the adaLN
    producers' rows (fp8_gemm.FUSED_PRODUCERS off: the eager path before the fused kernel). Compiled code keeps
    what it was traced under."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from model import fp8_gemm

    previous = fp8_gemm.FAST_ACCUM_FORWARD, fp8_gemm.FUSED_PRODUCERS
    fp8_gemm.FAST_ACCUM_FORWARD, fp8_gemm.FUSED_PRODUCERS = fast_accum, not unfused
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        with sdpa_kernel(order, set_priority=True) if cudnn else contextlib.nullcontext():
            yield
    finally:
        fp8_gemm.FAST_ACCUM_FORWARD, fp8_gemm.FUSED_PRODUCERS = previous


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


# allocations touch no data; _unsafe_view aliases its input although its schema does not say so
NOT_TRAFFIC = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros_like",
                         "_unsafe_view"})


class Traffic(TorchDispatchMode):
    """Bytes of every tensor argument and result of each operator that computes (views and allocations skipped);
    an in-place operator's tensor counts as read and written."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        is_view = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
        if not is_view and schema.name.split("::")[-1] not in NOT_TRAFFIC:
            self.bytes += sum(t.numel() * t.element_size() for t in tree_leaves((args, kwargs, out))
                              if isinstance(t, torch.Tensor))
        return out
