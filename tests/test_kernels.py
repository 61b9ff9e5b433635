"""Triton kernels against their torch references (model/kernels). On CPU the kernels run under
TRITON_INTERPRET=1 (tests/conftest.py); on a GPU the same tests run the compiled kernels.

fp32: tight (docs/models.md §1 tolerances). bf16/fp16 outputs: >= 99% bit-identical to the reference run in the
same dtype (the kernels reproduce its rounding points), and within one ulp of it or within the error-ratio
criterion against an fp64 oracle. Low-precision gradients: the error ratio (the reference's autograd rounds
intermediate gradients to bf16; the kernels keep them in fp32). Then the whole tiny Flux, and a tiny training
run, on vs off.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compile_for_gpus
from einops import rearrange

import model.kernels as kernels
from model.kernels.qk_norm_rope import qk_norm_reference, qk_norm_rope_joint_reference, qk_norm_rope_reference
from model.kernels.rmsnorm import rms_norm_reference
from model.kernels.rope import rope_reference

pytestmark = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")

REPO = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6

# (B, H, L, D): non-power-of-two width with several row tiles, one token at batch 1, Flux's head dim
SHAPES = [(2, 3, 37, 24), (1, 2, 1, 128), (3, 2, 5, 64)]
LAYOUTS = ["qkv", "blhd", "contiguous"]


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("SCFM_KERNELS", "triton")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Every tensor here is tiny: a second intra-op thread only adds barrier waits, which on a busy 2-core
    # machine cost ~10x (measured: a tiny-Flux train step 0.9 s with one thread, 8-10 s with two while other
    # jobs ran).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_base(shape, dtype, layout, gen):
    """A leaf whose views are q and k: a fused qkv projection output, a (B, L, H, D) tensor, or contiguous."""
    B, H, L, D = shape
    if layout == "qkv":
        base = torch.randn(B, L, 3 * H * D, generator=gen)
    elif layout == "blhd":
        base = torch.randn(2, B, L, H, D, generator=gen)
    else:
        base = torch.randn(2, B, H, L, D, generator=gen)
    return (3 * base).to(DEVICE, dtype).requires_grad_()


def views(base, shape, layout):
    """-> q, k as (B, H, L, D) views of base (strided for 'qkv' and 'blhd', as the model produces them)."""
    if layout == "qkv":
        q, k, _ = rearrange(base, "B L (K H D) -> K B H L D", K=3, H=shape[1])
        return q, k
    if layout == "blhd":
        return base[0].transpose(1, 2), base[1].transpose(1, 2)
    return base[0], base[1]


def make_scale(D, dtype, gen, sigma=0.2):
    return (1 + sigma * torch.randn(D, generator=gen)).to(DEVICE, dtype).requires_grad_()


def make_pe(B, L, D, gen):
    """(B, 1, L, D/2, 2) fp32 (cos, sin) of arbitrary angles: every pair sees a distinct rotation."""
    angle = 4 * torch.randn(B, 1, L, D // 2, generator=gen)
    return torch.stack((angle.cos(), angle.sin()), dim=-1).to(DEVICE)


def run(fn, leaves, out_grads=None, gen=None):
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if out_grads is None:
        out_grads = [torch.randn(o.shape, generator=gen).to(o) for o in outs]
    wanted = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(outs, wanted, [g.to(o.dtype) for g, o in zip(out_grads, outs)])
    return outs, grads, out_grads


def ulp(ref: torch.Tensor) -> torch.Tensor:
    """Spacing of ref's dtype at each value of ref."""
    info = torch.finfo(ref.dtype)
    _, exp = torch.frexp(ref.double())
    return torch.clamp(info.eps * torch.exp2(exp.double() - 1), min=info.tiny * info.eps)


def assert_ratio(ours, ref_low, ref64, what):
    err_ours = (ours.double() - ref64).abs().max().item()
    err_ref = (ref_low.double() - ref64).abs().max().item()
    bound = 2 * err_ref + 1e-3 * ref64.abs().max().item()
    assert err_ours <= bound, f"{what}: err {err_ours:.3g} > 2 x reference err {err_ref:.3g} + 1e-3 max"


def compare(ours_fn, ref_fn, leaves, seed=0):
    """Outputs and gradients w.r.t. every leaf that requires grad. fp32 / fp64 tensors tight; fp16 / bf16
    outputs by one ulp or the error ratio against an fp64 oracle of the reference, low-precision gradients by
    the ratio."""
    gen = torch.Generator().manual_seed(seed)
    outs, grads, out_grads = run(ours_fn, leaves, gen=gen)
    ref_outs, ref_grads, _ = run(ref_fn, leaves, out_grads)
    for o, r in zip(outs + grads, ref_outs + ref_grads):
        assert o.dtype == r.dtype and o.shape == r.shape, (o.dtype, r.dtype, o.shape, r.shape)
    half = (torch.float16, torch.bfloat16)
    # A gradient that flowed through a half-precision output was rounded inside the reference's autograd.
    any_half_out = any(o.dtype in half for o in outs)
    low = [o.dtype in half for o in outs] + [g.dtype in half or any_half_out for g in grads]
    if any(low):
        leaves64 = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
        outs64, grads64, _ = run(ref_fn, leaves64, out_grads)
    n_out = len(outs)
    for i, (o, r) in enumerate(zip(outs + grads, ref_outs + ref_grads)):
        what = f"output {i}" if i < n_out else f"grad {i - n_out}"
        if not low[i]:
            torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5 * max(1.0, r.abs().max().item()), msg=what)
            continue
        r64 = (outs64 + grads64)[i]
        if i < n_out:
            # Same rounding points as the reference: bit-identical but for rare ties (measured 99.99%); a
            # kernel that skips the round-before-scale step is ~72% identical yet still passes the ratio test
            # below.
            identical = (o == r).double().mean().item()
            assert identical >= 0.99, f"{what}: only {identical:.2%} bit-identical to the reference"
            if bool(((o.double() - r.double()).abs() <= ulp(r)).all()):
                continue
        assert_ratio(o, r, r64, what)


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm(shape, dtype):
    gen = torch.Generator().manual_seed(1)
    base, scale = make_base(shape, dtype, "blhd", gen), make_scale(shape[-1], dtype, gen)
    compare(
        lambda b, w: kernels.rms_norm(views(b, shape, "blhd")[0], w, EPS),
        lambda b, w: rms_norm_reference(views(b, shape, "blhd")[0], w, EPS),
        [base, scale],
    )  # fmt: skip


def test_rms_norm_any_rank():
    gen = torch.Generator().manual_seed(2)
    for shape in [(24,), (7, 96), (2, 3, 4, 5, 32)]:
        x, w = torch.randn(shape, generator=gen).to(DEVICE), make_scale(shape[-1], torch.float32, gen)
        compare(
            lambda a, b: kernels.rms_norm(a, b),
            lambda a, b: rms_norm_reference(a, b),
            [x.requires_grad_(), w],
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_rope(shape, layout, dtype):
    gen = torch.Generator().manual_seed(3)
    base, pe = make_base(shape, dtype, layout, gen), make_pe(shape[0], shape[2], shape[3], gen)
    compare(
        lambda b: kernels.rope(views(b, shape, layout)[1], pe),
        lambda b: rope_reference(views(b, shape, layout)[1], pe),
        [base],
    )  # fmt: skip


def test_rope_table_layouts():
    """A per-batch table, an L-slice of a longer table (what a double block passes per stream) and a table
    whose (cos, sin) pairs are not adjacent in memory (the kernels then read a contiguous copy)."""
    gen = torch.Generator().manual_seed(12)
    shape = (2, 3, 37, 24)
    base = make_base(shape, torch.float32, "qkv", gen)
    long_pe = make_pe(2, 50, 24, gen)
    split_pe = (
        make_pe(2, 37, 24, gen).transpose(-1, -2).contiguous().transpose(-1, -2)
    )  # cos run, then sin run
    qs, ks = make_scale(24, torch.float32, gen), make_scale(24, torch.float32, gen)
    assert split_pe.stride(-1) != 1
    for pe in (make_pe(2, 37, 24, gen), long_pe[:, :, 13:], split_pe):
        compare(
            lambda b, s, t: kernels.qk_norm_rope(*views(b, shape, "qkv"), s, t, pe),
            lambda b, s, t: qk_norm_rope_reference(*views(b, shape, "qkv"), s, t, pe),
            [base, qs, ks],
        )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_qk_norm_rope(shape, layout, dtype):
    gen = torch.Generator().manual_seed(4)
    B, H, L, D = shape
    base, qs, ks = make_base(shape, dtype, layout, gen), make_scale(D, dtype, gen), make_scale(D, dtype, gen)
    pe = make_pe(1, L, D, gen)  # one table broadcast over the batch, as Flux builds it for shared ids
    compare(
        lambda b, s, t: kernels.qk_norm_rope(*views(b, shape, layout), s, t, pe, EPS),
        lambda b, s, t: qk_norm_rope_reference(*views(b, shape, layout), s, t, pe, EPS),
        [base, qs, ks],
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_without_rope(dtype):
    gen = torch.Generator().manual_seed(5)
    shape = SHAPES[0]
    base, qs, ks = make_base(shape, dtype, "qkv", gen), make_scale(24, dtype, gen), make_scale(24, dtype, gen)
    compare(
        lambda b, s, t: kernels.qk_norm_rope(*views(b, shape, "qkv"), s, t, None, EPS),
        lambda b, s, t: qk_norm_rope_reference(*views(b, shape, "qkv"), s, t, None, EPS),
        [base, qs, ks],
    )  # fmt: skip


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_sd35_diffusers_casting(dtype, scale_dtype):
    """An fp32 scale on bf16 activations gives an fp32 output in diffusers; a bf16 scale rounds before the
    mul."""
    gen = torch.Generator().manual_seed(6)
    shape = (2, 3, 19, 64)
    base, qs, ks = (
        make_base(shape, dtype, "qkv", gen),
        make_scale(64, scale_dtype, gen),
        make_scale(64, scale_dtype, gen),
    )
    compare(
        lambda b, s, t: kernels.qk_norm(*views(b, shape, "qkv"), s, t, EPS),
        lambda b, s, t: qk_norm_reference(*views(b, shape, "qkv"), s, t, EPS),
        [base, qs, ks],
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_rope_joint(dtype):
    """Flux double block: per-stream scales, text first, one pe over the joint sequence."""
    gen = torch.Generator().manual_seed(7)
    txt_shape, img_shape = (2, 3, 5, 24), (2, 3, 37, 24)
    txt, img = make_base(txt_shape, dtype, "qkv", gen), make_base(img_shape, dtype, "qkv", gen)
    scales = [make_scale(24, dtype, gen) for _ in range(4)]
    pe = make_pe(2, 5 + 37, 24, gen)

    def call(fn):
        return lambda t, i, *s: fn(*views(t, txt_shape, "qkv"), *views(i, img_shape, "qkv"), *s, pe, EPS)

    compare(call(kernels.qk_norm_rope_joint), call(qk_norm_rope_joint_reference), [txt, img, *scales])


def test_frozen_scales_skip_dscale():
    """LoRA freezes the norm scales: no dScale is computed (the backward op returns empty ones) and dx still
    matches the reference."""
    gen = torch.Generator().manual_seed(8)
    shape = SHAPES[0]
    base, pe = make_base(shape, torch.float32, "qkv", gen), make_pe(1, shape[2], shape[3], gen)
    qs, ks = make_scale(24, torch.float32, gen).detach(), make_scale(24, torch.float32, gen).detach()
    q, k = views(base.detach(), shape, "qkv")
    dq, dk, dqs, dks = torch.ops.scfm.qk_norm_rope_backward(q, k, q, k, qs, ks, pe, EPS, 0, False)
    assert dqs.numel() == 0 and dks.numel() == 0
    compare(
        lambda b: kernels.qk_norm_rope(*views(b, shape, "qkv"), qs, ks, pe, EPS),
        lambda b: qk_norm_rope_reference(*views(b, shape, "qkv"), qs, ks, pe, EPS),
        [base],
    )  # fmt: skip
    x = base.detach()[..., :24].requires_grad_()
    kernels.rms_norm(x, qs).sum().backward()
    assert qs.grad is None and x.grad is not None


def test_gradcheck_fp64():
    gen = torch.Generator().manual_seed(9)

    def leaf(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()

    q, k, qs, ks = leaf(1, 2, 3, 6), leaf(1, 2, 3, 6), leaf(6), leaf(6)
    pe = make_pe(1, 3, 6, gen)
    t_q, t_k, tqs, tks = leaf(1, 2, 2, 6), leaf(1, 2, 2, 6), leaf(6), leaf(6)
    pe_joint = make_pe(1, 5, 6, gen)
    cases = [
        (lambda a, w: kernels.rms_norm(a, w), (q, qs)),
        (lambda a: kernels.rope(a, pe), (q,)),
        (lambda a, b, s, t: kernels.qk_norm_rope(a, b, s, t, pe), (q, k, qs, ks)),
        (lambda a, b, s, t: kernels.qk_norm(a, b, s, t), (q, k, qs, ks)),
        (
            lambda *x: kernels.qk_norm_rope_joint(*x[:4], x[4], x[5], qs, ks, pe_joint),
            (t_q, t_k, q, k, tqs, tks),
        ),
    ]
    for fn, args in cases:
        assert torch.autograd.gradcheck(fn, args, fast_mode=True)


def test_opcheck():
    gen = torch.Generator().manual_seed(10)
    shape = (2, 2, 5, 24)
    base = make_base(shape, torch.float32, "qkv", gen)
    q, k = views(base, shape, "qkv")
    q, k = q.detach().requires_grad_(), k.detach()  # opcheck needs leaves; q keeps its qkv strides
    qs, ks, pe = (
        make_scale(24, torch.float32, gen),
        make_scale(24, torch.float32, gen),
        make_pe(2, 5, 24, gen),
    )
    dy = torch.randn(shape, generator=gen).to(DEVICE)
    ops = [
        (torch.ops.scfm.rms_norm, (q, qs, EPS, 0)),
        (torch.ops.scfm.rms_norm_backward, (dy, q.detach(), qs.detach(), EPS, 0, True)),
        (torch.ops.scfm.rope, (q, pe, False)),
        (torch.ops.scfm.qk_norm_rope, (q, k, qs, ks, pe, EPS, 0)),
        (torch.ops.scfm.qk_norm_rope, (q, k, qs.detach(), ks, None, EPS, 1)),
        (
            torch.ops.scfm.qk_norm_rope_backward,
            (dy, dy, q.detach(), k, qs.detach(), ks.detach(), pe, EPS, 0, True),
        ),
        (
            torch.ops.scfm.qk_norm_rope_joint,
            (q[:, :, :2], k[:, :, :2], q, k, qs, ks, qs, ks, make_pe(1, 7, 24, gen), EPS),
        ),
    ]
    for op, args in ops:
        torch.library.opcheck(op, args)


def test_compile_fullgraph_no_graph_break():
    """A Flux-like attention prologue through every dispatcher op compiles as one graph (custom ops are opaque
    to Dynamo) and gives the eager result, forward and backward."""
    gen = torch.Generator().manual_seed(11)
    shape = (1, 2, 6, 24)
    base = make_base(shape, torch.float32, "qkv", gen)
    txt = make_base((1, 2, 3, 24), torch.float32, "qkv", gen)
    qs, ks, pe, pe_joint = (
        make_scale(24, torch.float32, gen),
        make_scale(24, torch.float32, gen),
        make_pe(1, 6, 24, gen),
        make_pe(1, 9, 24, gen),
    )

    def prologue(b, t, s, u):
        q, k = views(b, shape, "qkv")
        tq, tk = views(t, (1, 2, 3, 24), "qkv")
        q1, k1 = kernels.qk_norm_rope(q, k, s, u, pe)
        q2, k2 = kernels.qk_norm_rope_joint(tq, tk, q, k, u, s, s, u, pe_joint)
        q3, k3 = kernels.qk_norm(q, k, s, u)
        return q1 * k1 + kernels.rope(kernels.rms_norm(q3, s), pe) + k3, q2 + k2

    torch._dynamo.reset()
    compiled = torch.compile(prologue, fullgraph=True, backend="eager")
    compare(compiled, prologue, [base, txt, qs, ks])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequant_rows_is_bit_exact_for_every_e4m3_code(dtype):
    """Every one of the 256 e4m3 codes (NaNs, subnormals and both zeros included), in rows with different
    power-of-two scales, over more elements than one program covers (a masked tail)."""
    from model.kernels.dequant import dequant_rows_reference, dequant_rows_triton

    codes = torch.arange(256, dtype=torch.uint8)
    q = codes.repeat(41)[: 40 * 251].view(40, 251).view(torch.float8_e4m3fn).to(DEVICE)  # 10040 > 4096
    # 2^-12 .. 2^27; fp16: 2^-14 .. 2^7, where 448 * scale still fits its range
    exps = torch.arange(-12, 28) if dtype != torch.float16 else torch.arange(40) % 22 - 14
    scale = torch.exp2(exps.float()).view(-1, 1).to(DEVICE)
    got = dequant_rows_triton(q, scale, dtype)
    want = dequant_rows_reference(q, scale, dtype)
    assert got.dtype == want.dtype == dtype
    nan_codes = (q.view(torch.uint8) & 127) == 127  # 0x7F and 0xFF: e4m3fn's only NaNs
    assert torch.equal(got.isnan(), nan_codes) and torch.equal(want.isnan(), nan_codes)
    fin = ~want.isnan()
    assert torch.equal(got[fin], want[fin])
    assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32)[fin],
                       want.view(torch.int16 if dtype != torch.float32 else torch.int32)[fin])  # -0.0 kept
    assert torch.equal(kernels.dequant_rows(q, scale, dtype).isnan(), want.isnan())  # the dispatcher's path


def test_dequant_reference_keeps_rows_with_tiny_scales_in_fp16():
    """A row scale below fp16's smallest subnormal (2^-24) must not flush to zero before the product: the values
    themselves (448 * 2^-30) are fp16 subnormals, and the kernel gets them."""
    from model.kernels.dequant import dequant_rows_reference

    q = torch.tensor([[448.0, -2.0, 0.5], [1.0, 0.5, -448.0]]).to(torch.float8_e4m3fn)
    scale = torch.tensor([[2.0**-30], [1.0]])
    got = dequant_rows_reference(q, scale, torch.float16)
    assert torch.equal(got, (q.float() * scale).to(torch.float16)) and got[0, 0] > 0


def test_dequant_kernel_compiles_for_ampere_and_hopper():
    """The dequant kernel has never run on a GPU here: compile it ahead of time for sm80 / sm90 (no GPU needed;
    the interpreter would accept Python that the compiler rejects)."""
    code = (
        "import triton\n"
        "from triton.compiler import ASTSource\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from model.kernels.dequant import _dequant_kernel\n"
        "for cap in (80, 90):\n"
        "    sig = {'q_ptr': '*u8', 'scale_ptr': '*fp32', 'out_ptr': '*bf16', 'n': 'i32', 'n_in': 'i32',\n"
        "           'BLOCK': 'constexpr'}\n"
        "    k = triton.compile(ASTSource(fn=_dequant_kernel, signature=sig, constexprs={'BLOCK': 4096}),\n"
        "                       target=GPUTarget('cuda', cap, 32))\n"
        "    assert 'cubin' in k.asm\n"
    )
    compile_for_gpus(code)


def test_dispatcher_selects_backend(monkeypatch):
    x, w = torch.randn(3, 8, device=DEVICE, requires_grad=True), torch.ones(8, device=DEVICE)
    monkeypatch.setenv("SCFM_KERNELS", "torch")
    assert kernels.backend(x) == "torch"
    assert "rms_norm" not in type(kernels.rms_norm(x, w).grad_fn).__name__.lower()
    monkeypatch.setenv("SCFM_KERNELS", "triton")
    assert kernels.backend(x) == "triton"
    assert "rms_norm" in type(kernels.rms_norm(x, w).grad_fn).__name__.lower()
    monkeypatch.delenv("SCFM_KERNELS")
    assert kernels.backend(x) == ("triton" if x.is_cuda else "torch")
    monkeypatch.setenv("SCFM_KERNELS", "cuda")
    with pytest.raises(ValueError):
        kernels.backend(x)


def test_package_works_without_triton():
    """Block `import triton`: the package must import and every dispatcher op must run the reference."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, model.kernels as K\n"
        "assert not K.HAS_TRITON\n"
        "x = torch.randn(1, 2, 3, 8); w = torch.ones(8); pe = torch.randn(1, 1, 3, 4, 2)\n"
        "K.rms_norm(x, w); K.rope(x, pe); K.qk_norm_rope(x, x, w, w, pe); K.qk_norm(x, x, w, w)\n"
        "K.qk_norm_rope_joint(x, x, x, x, w, w, w, w, torch.randn(1, 1, 6, 4, 2))\n"
        "K.dequant_rows(torch.ones(3, 4).to(torch.float8_e4m3fn), torch.ones(3, 1), torch.bfloat16)\n"
    )
    env = {**os.environ, "SCFM_KERNELS": ""}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------ the whole tiny Flux, kernels on/off


def _tiny_lora_flux(dtype=torch.float32, seed=0):
    """Tiny Flux with every parameter random (sigma 0.2: large activations) and LoRA on every target, its `up`
    matrices random too so that every LoRA tensor gets a gradient."""
    from conftest import randomize_

    from distill.lora import LoRAConfig, inject_lora
    from model.flux import FLUX_CONFIGS, Flux

    model = randomize_(Flux(FLUX_CONFIGS["tiny"]), sigma=0.2, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    inject_lora(model, LoRAConfig(rank=4, alpha=4.0), gen)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.to(DEVICE, dtype)


def _inputs(dtype=torch.float32):
    from flux_fixtures import tiny_inputs

    return {k: (v.to(DEVICE, dtype) if k in ("img", "txt", "y") else v.to(DEVICE)) if v is not None else v
            for k, v in tiny_inputs().items()}  # fmt: skip


def _forward_backward(model, inp, backend, monkeypatch):
    monkeypatch.setenv("SCFM_KERNELS", backend)
    out = model(**inp)
    out_grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [p for _, p in named], out_grad)
    return out, dict(zip([n for n, _ in named], grads))


def test_tiny_flux_kernels_on_equals_off(monkeypatch):
    pytest.importorskip("model.flux")
    model, inp = _tiny_lora_flux(), _inputs()
    ref, ref_grads = _forward_backward(model, inp, "torch", monkeypatch)
    out, grads = _forward_backward(model, inp, "triton", monkeypatch)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * max(1.0, ref.abs().max().item()))
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, g in grads.items():
        r = ref_grads[name]
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * max(1.0, r.abs().max().item()), msg=name)


def test_tiny_flux_bf16_kernels_on_equals_off(monkeypatch):
    """bf16 at the model level: the transformer criterion of docs/models.md §1 (3e-2 of max|ref|)."""
    pytest.importorskip("model.flux")
    model, inp = _tiny_lora_flux(torch.bfloat16), _inputs(torch.bfloat16)
    with torch.no_grad():
        monkeypatch.setenv("SCFM_KERNELS", "torch")
        ref = model(**inp).float()
        monkeypatch.setenv("SCFM_KERNELS", "triton")
        out = model(**inp).float()
    assert (out - ref).abs().max().item() <= 3e-2 * ref.abs().max().item()


def _train(backend, monkeypatch, steps=3):
    """A flow-matching LoRA run with activation checkpointing (so the kernels also run inside the
    recompute)."""
    monkeypatch.setenv("SCFM_KERNELS", backend)
    model, inp = _tiny_lora_flux(), _inputs()
    model.enable_gradient_checkpointing()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(5)
    losses = []
    for _ in range(steps):
        x0 = inp["img"]
        noise = torch.randn(x0.shape, generator=gen).to(x0)
        sigma = torch.rand(x0.shape[0], generator=gen).to(x0)
        x_t = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        v = model(**{**inp, "img": x_t, "timesteps": sigma})
        loss = (v - (noise - x0)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64), [p.detach().clone() for p in params]


def test_tiny_training_run_same_with_kernels(monkeypatch):
    pytest.importorskip("model.flux")
    ref_losses, ref_params = _train("torch", monkeypatch)
    losses, params = _train("triton", monkeypatch)
    assert not torch.equal(ref_losses[0], ref_losses[-1])  # the run actually trains
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=0)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, rtol=1e-4, atol=1e-5 * max(1.0, r.abs().max().item()))
