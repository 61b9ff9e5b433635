"""Triton kernels against eager PyTorch and torch.compile of the same references, then whole-model numbers.

    python bench/kernels.py --device cuda                # Flux-dev shapes: 512 / 1024 px, batch 1 / 8, bf16
    python bench/kernels.py --device cpu --small         # tiny shapes; Triton runs in the interpreter (slow!)
    python bench/kernels.py --device cuda --skip-model   # op table only

Op rows: time per call (median, CUDA: triton.testing.do_bench) of `eager` (the torch reference), `compiled`
(torch.compile of that reference) and `triton` (the dispatcher's kernel), the triton kernel's achieved GB/s
over the minimum traffic (read inputs once, write outputs once, pe table once), its share of peak bandwidth,
and the ratios. `fwd+bwd` rows take gradients w.r.t. q/k only (norm scales frozen, as under LoRA). Model rows:
a Flux forward (bf16, random weights, 1024 px, batch 1) and a LoRA training step (512 px, batch 8, per-block
checkpointing, AdamW) with SCFM_KERNELS=torch vs triton, interleaved A/B, plus peak memory. Issue 7 targets:
fused QK-norm + RoPE >= 5x eager and >= 70% of peak bandwidth; forward >= 1.15x; train >= 1.3x.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    ap.add_argument("--small", action="store_true", help="tiny shapes and the tiny Flux (the CPU smoke run)")
    ap.add_argument("--ops", nargs="*", default=None, help="subset of op names")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    ap.add_argument("--skip-model", action="store_true", help="op table only")
    ap.add_argument(
        "--compile-model", action="store_true", help="also time the compiled model forward on/off"
    )
    ap.add_argument("--peak-gbps", type=float, default=None, help="memory bandwidth for the %%peak column")
    ap.add_argument("--reps", type=int, default=None, help="model reps (default 10 on cuda, 2 on cpu)")
    return ap.parse_args()


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and (ARGS.device == "cpu" or (ARGS.device is None and "--small" in sys.argv)):
    # Read when @triton.jit decorates, i.e. at the first import of model.kernels: must precede it.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from einops import rearrange  # noqa: E402

sys.path.insert(0, str(ROOT))
import model.kernels as kernels  # noqa: E402
from model.fp8 import quantize_rows  # noqa: E402
from model.kernels.adanorm import modulated_layer_norm_reference  # noqa: E402
from model.kernels.dequant import dequant_rows_reference  # noqa: E402
from model.kernels.mlp_act import mlp_activation_reference  # noqa: E402
from model.kernels.qk_norm_rope import (  # noqa: E402
    qk_norm_reference,
    qk_norm_rope_joint_reference,
    qk_norm_rope_reference,
)
from model.kernels.rmsnorm import rms_norm_reference  # noqa: E402
from model.kernels.rope import rope_reference  # noqa: E402
from model.layers import image_ids, text_ids  # noqa: E402
from model.rope import EmbedND  # noqa: E402

PEAK_GBPS = {"H100 PCIe": 2000.0, "H100": 3350.0, "H200": 4800.0, "A100": 2039.0}  # vendor specs, GB/s


def set_backend(name: str) -> None:
    os.environ["SCFM_KERNELS"] = name


# --------------------------------------------------------------------------------------------------- timing


def time_ms(fn, device: str) -> float:
    """Median milliseconds of fn()."""
    fn()  # warm-up outside the clock: compiles (torch.compile, Triton JIT) or sets up the interpreter
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=200, return_mode="median")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def time_ab(fns: dict, device: str, reps: int, warmup: int = 2) -> dict:
    """Interleaved A/B/A/B so clock and thermal drift hit every variant alike; (median, p20, p80) ms each."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            samples[name].append(1e3 * (time.perf_counter() - t0))
    out = {}
    for name, s in samples.items():
        s = sorted(s)
        out[name] = (statistics.median(s), s[int(0.2 * (len(s) - 1))], s[int(0.8 * (len(s) - 1))])
    return out


# ------------------------------------------------------------------------------------------------- op cases


def flux_pe(L_txt: int, L_img: int, device, axes=(16, 56, 56)) -> torch.Tensor:
    side = int(round(L_img**0.5))
    ids = torch.cat((text_ids(L_txt), image_ids(2 * side, 2 * (L_img // side))), dim=0)  # (L, 3)
    return EmbedND(10_000, axes)(ids.to(device))  # (1, 1, L, D/2, 2) fp32


def op_cases(small: bool):
    """(label, B, L_txt, L_img, H, D) per resolution and batch; SD3.5-large rows for the QK-norm-only op."""
    if small:
        return [("128px", b, 16, 64, 4, 128) for b in (1, 2)]
    return [(f"{r}px", b, 512, (r // 16) ** 2, 24, 128) for r in (512, 1024) for b in (1, 8)]


def make_op(name: str, B: int, L_txt: int, L_img: int, H: int, D: int, device, dtype):
    """-> (inputs requiring grad, eager fn, triton fn, bytes fwd, bytes bwd). fns map inputs to output
    tuples."""
    g = torch.Generator(device).manual_seed(0)
    L, es = L_txt + L_img, torch.tensor([], dtype=dtype).element_size()
    scale = lambda: (1 + 0.1 * torch.randn(D, generator=g, device=device)).to(dtype)  # noqa: E731
    qkv = lambda n: torch.randn(B, n, 3 * H * D, generator=g, device=device, dtype=dtype)  # noqa: E731
    split = lambda t: rearrange(t.requires_grad_(), "B L (K H D) -> K B H L D", K=3, H=H)[:2]  # noqa: E731
    pe = flux_pe(L_txt, L_img, device, (16, 56, 56) if D == 128 else (D // 4, 3 * D // 8, 3 * D // 8))
    n, pe_bytes = B * H * L * D, pe.numel() * 4
    qs, ks = scale(), scale()  # frozen (no grad): the LoRA case
    if name == "rms_norm":
        q, _ = split(qkv(L))
        return (
            [q],
            lambda x: (rms_norm_reference(x, qs),),
            lambda x: (kernels.rms_norm(x, qs),),
            2 * n * es,
            3 * n * es,
        )
    if name == "rope":
        x = torch.randn(B, H, L, D, generator=g, device=device, dtype=dtype).requires_grad_()
        io = 2 * n * es + pe_bytes
        return [x], lambda x: (rope_reference(x, pe),), lambda x: (kernels.rope(x, pe),), io, io
    if name == "qk_norm_rope":
        q, k = split(qkv(L))
        return (
            [q, k],
            lambda q, k: qk_norm_rope_reference(q, k, qs, ks, pe),
            lambda q, k: kernels.qk_norm_rope(q, k, qs, ks, pe),
            4 * n * es + pe_bytes,
            6 * n * es + pe_bytes,
        )
    if name == "qk_norm_rope_joint":
        (tq, tk), (iq, ik) = split(qkv(L_txt)), split(qkv(L_img))
        ts, us = scale(), scale()
        ref = lambda a, b, c, d: qk_norm_rope_joint_reference(a, b, c, d, ts, us, qs, ks, pe)  # noqa: E731
        tri = lambda a, b, c, d: kernels.qk_norm_rope_joint(a, b, c, d, ts, us, qs, ks, pe)  # noqa: E731
        return [tq, tk, iq, ik], ref, tri, 4 * n * es + pe_bytes, 6 * n * es + pe_bytes
    if name == "qk_norm_sd35":
        q, k = split(qkv(L))
        return (
            [q, k],
            lambda q, k: qk_norm_reference(q, k, qs, ks),
            lambda q, k: kernels.qk_norm(q, k, qs, ks),
            4 * n * es,
            6 * n * es,
        )
    if name == "dequant_rows":  # a Flux single block's linear1 weight (7D x D), e4m3 -> dtype; no backward
        q, s = quantize_rows(torch.randn(7 * H * D, H * D, generator=g, device=device))
        return ([], lambda: (dequant_rows_reference(q, s, dtype),), lambda: (kernels.dequant_rows(q, s, dtype),),
                q.numel() * (1 + es), 0)
    if name == "adanorm_fp8":  # a block's adaLN output and its e4m3 rows for an fp8 GEMM (fp8 compute); no backward
        x = torch.randn(B, L, H * D, generator=g, device=device, dtype=dtype)
        shift, mod = (0.1 * torch.randn(B, 1, H * D, generator=g, device=device, dtype=dtype) for _ in range(2))

        def eager():  # the torch ops, then the rounding on its own (the torch reference in this column)
            y = modulated_layer_norm_reference(x, shift, mod, 1e-6)
            return (y, *kernels.quant_rows(y.reshape(-1, H * D)))

        def fused():
            y, rows = kernels.modulated_layer_norm(x, shift, mod, 1e-6, quantize=True)
            return (y, *rows)

        return [], eager, fused, B * L * H * D * (2 * es + 1), 0
    if name == "gelu_fp8":  # a FLUX.1 double block's MLP activation (4 x width) and its e4m3 rows for mlp.2
        h = torch.randn(B, L, 4 * H * D, generator=g, device=device, dtype=dtype)

        def eager_gelu():
            y = mlp_activation_reference(h, "gelu_tanh")
            return (y, *kernels.quant_rows(y.reshape(-1, 4 * H * D)))

        def fused_gelu():
            y, rows = kernels.mlp_activation(h, "gelu_tanh", quantize=True)
            return (y, *rows)

        return [], eager_gelu, fused_gelu, B * L * 4 * H * D * (2 * es + 1), 0
    raise ValueError(name)


OPS = ["rms_norm", "rope", "qk_norm_rope", "qk_norm_rope_joint", "qk_norm_sd35", "dequant_rows", "adanorm_fp8",
       "gelu_fp8"]
NO_BACKWARD = ("dequant_rows", "adanorm_fp8", "gelu_fp8")


def fwd_bwd(fn, inputs):
    def run():
        outs = fn(*inputs)
        torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs])

    return run


def bench_ops(args, device, dtype, peak):
    rows = []
    for label, B, L_txt, L_img, H, D in op_cases(args.small):
        for name in args.ops or OPS:
            h, d = (38, 64) if name == "qk_norm_sd35" and not args.small else (H, D)  # SD3.5-large heads
            lt = 333 if name == "qk_norm_sd35" and not args.small else L_txt  # 77 CLIP + 256 T5 tokens
            if name == "dequant_rows" and (label, B) != op_cases(args.small)[0][:2]:
                continue  # a weight: the same at every resolution and batch
            inputs, ref, tri, bytes_f, bytes_b = make_op(name, B, lt, L_img, h, d, device, dtype)
            comp = None if args.no_compile else torch.compile(ref, dynamic=False)
            for mode in ("fwd",) if name in NO_BACKWARD else ("fwd", "fwd+bwd"):
                wrap = (lambda f: lambda: f(*inputs)) if mode == "fwd" else (lambda f: fwd_bwd(f, inputs))
                ctx = torch.no_grad() if mode == "fwd" else torch.enable_grad()
                with ctx:
                    set_backend("triton")
                    t_tri = time_ms(wrap(tri), device)
                    set_backend("torch")
                    t_eager = time_ms(wrap(ref), device)
                    t_comp = time_ms(wrap(comp), device) if comp is not None else float("nan")
                nbytes = bytes_f + (bytes_b if mode == "fwd+bwd" else 0)
                gbps = nbytes / t_tri / 1e6
                shape = f"weight {7 * h * d}x{h * d}" if name == "dequant_rows" else f"{label} B{B} H{h} L{lt + L_img} D{d}"
                rows.append(dict(op=name, shape=shape, mode=mode,
                                 eager=t_eager, compiled=t_comp, triton=t_tri, gbps=gbps,
                                 peak=100 * gbps / peak if peak else float("nan")))  # fmt: skip
                print_row(rows[-1], header=len(rows) == 1)
    return rows


def print_row(r, header=False):
    if header:
        print(f"{'op':<19} {'shape':<28} {'mode':<8} {'eager ms':>9} {'compiled':>9} {'triton':>9} "
              f"{'GB/s':>7} {'%peak':>6} {'x eager':>8} {'x comp':>7}")  # fmt: skip
    print(f"{r['op']:<19} {r['shape']:<28} {r['mode']:<8} {r['eager']:>9.3f} {r['compiled']:>9.3f} "
          f"{r['triton']:>9.3f} {r['gbps']:>7.1f} {r['peak']:>6.1f} {r['eager'] / r['triton']:>8.2f} "
          f"{r['compiled'] / r['triton']:>7.2f}", flush=True)  # fmt: skip


# ------------------------------------------------------------------------------------------------ model rows


def random_flux(cfg, device, dtype):
    """Flux with random weights built straight in the target dtype (meta -> dtype -> empty on device: the bf16
    Flux-dev is 23.8 GB, an fp32 detour would need 48)."""
    from model.flux import Flux

    with torch.device("meta"):
        model = Flux(cfg)
    model = model.to(dtype).to_empty(device=device)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:  # fan-in scaled so activations stay O(1) through 57 blocks in bf16
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=dtype) * p[0].numel() ** -0.5)
            else:
                p.fill_(1.0 if name.endswith("scale") else 0.0)
    return model.eval()


def flux_inputs(cfg, B, res, L_txt, device, dtype):
    g = torch.Generator(device).manual_seed(1)
    h = w = res // 8  # latent pixels; 2x2 packing gives (res/16)^2 tokens
    return dict(
        img=torch.randn(B, h * w // 4, cfg.in_channels, generator=g, device=device, dtype=dtype),
        img_ids=image_ids(h, w, device),
        txt=torch.randn(B, L_txt, cfg.context_in_dim, generator=g, device=device, dtype=dtype),  # fmt: skip
        txt_ids=text_ids(L_txt, device),
        timesteps=torch.rand(B, generator=g, device=device),
        y=torch.randn(B, cfg.vec_in_dim, generator=g, device=device, dtype=dtype),
        guidance=torch.full((B,), 3.5, device=device) if cfg.guidance_embed else None,
    )


def on_off(fn):
    def run(backend):
        def go():
            set_backend(backend)
            return fn()

        return go

    return {"kernels off": run("torch"), "kernels on": run("triton")}


def bench_model(args, device, dtype):
    from distill.lora import LoRAConfig, inject_lora
    from model.flux import FLUX_CONFIGS

    cfg = FLUX_CONFIGS["tiny" if args.small else "flux-dev"]
    reps = args.reps or (10 if device == "cuda" else 2)
    res_fwd, B_fwd, res_train, B_train, L_txt = (128, 1, 128, 2, 16) if args.small else (1024, 1, 512, 8, 512)
    model = random_flux(cfg, device, dtype)
    results = []

    inp = flux_inputs(cfg, B_fwd, res_fwd, L_txt, device, dtype)
    with torch.inference_mode():
        fns = on_off(lambda: model(**inp))
        if args.compile_model:
            compiled = torch.compile(model)
            fns.update({f"compiled {k}": v for k, v in on_off(lambda: compiled(**inp)).items()})
        results.append((f"forward {res_fwd}px B{B_fwd}", time_ab(fns, device, reps), None))

    inject_lora(
        model, LoRAConfig(rank=16, alpha=16.0, sets=("live",), zero_sets=()), torch.Generator().manual_seed(0)
    )
    model.enable_gradient_checkpointing()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    inp = flux_inputs(cfg, B_train, res_train, L_txt, device, dtype)
    target = torch.randn_like(inp["img"])

    def step():
        loss = (model(**inp).float() - target.float()).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    fns, peaks = on_off(step), {}
    for name, fn in fns.items():  # peak memory per variant, measured outside the timed loop
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated() / 2**30
    results.append((f"LoRA train step {res_train}px B{B_train} ckpt", time_ab(fns, device, reps), peaks))

    print(f"\n{'model row':<34} {'variant':<22} {'median ms':>10} {'p20':>9} {'p80':>9} {'peak GiB':>9}")
    for label, timings, peak in results:
        base = timings["kernels off"][0]
        for name, (med, p20, p80) in timings.items():
            mem = f"{peak[name]:>9.2f}" if peak else f"{'':>9}"
            print(
                f"{label:<34} {name:<22} {med:>10.2f} {p20:>9.2f} {p80:>9.2f} {mem}  x{base / med:.2f} vs off"
            )
        if "compiled kernels on" in timings:
            ratio = timings["compiled kernels off"][0] / timings["compiled kernels on"][0]
            print(f"{'':<34} compiled on / compiled off: x{ratio:.3f}")
    return results


def main():
    args = ARGS
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not args.small:
        print(
            "note: full Flux-dev shapes on CPU run the Triton interpreter for hours; use --small",
            file=sys.stderr,
        )
    dtype = torch.bfloat16
    peak = args.peak_gbps
    if peak is None and device == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_GBPS.items() if all(w in name for w in k.split())), None)
    torch.manual_seed(0)
    # Every op's compiled reference is one lambda code object: with the default limit of 8 recompiles (shapes
    # x grad modes) Dynamo would silently fall back to eager and the `compiled` column would lie.
    torch._dynamo.config.recompile_limit = 256
    env = (
        f"{torch.cuda.get_device_name()}"
        if device == "cuda"
        else f"CPU, {torch.get_num_threads()} threads, interpreter"
    )
    print(f"# bench/kernels.py on {env}; torch {torch.__version__}; dtype {dtype}; peak {peak} GB/s\n")
    bench_ops(args, device, dtype, peak)
    if not args.skip_model:
        bench_model(args, device, dtype)


if __name__ == "__main__":
    main()
