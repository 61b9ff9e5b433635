"""The fused producers of the fp8 GEMMs' inputs under the Triton interpreter: the adaLN (model/kernels/adanorm.py)
and the MLP activations (model/kernels/mlp_act.py). Their outputs against the fp32 references and the modules' own
ops, their rows bit for bit those `quant_rows` gives their outputs, their gradients, and the fp8 GEMMs of whole
tiny models taking their rows instead of rounding again."""

from __future__ import annotations

import pytest
import torch
from conftest import compile_for_gpus

import model.kernels as kernels
from model import fp8_gemm
from model.kernels.adanorm import modulated_layer_norm_fp32, modulated_layer_norm_reference
from model.kernels.mlp_act import mlp_activation_fp32, mlp_activation_reference
from model.kernels.quant import quant_rows_reference

pytestmark = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("SCFM_KERNELS", "triton")


def _case(b, n, d, x_dtype, mod_dtype, *, broadcast=False, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d + 8 if strided else d, generator=g) * 3 + 1
    x = (x[..., 4:4 + d] if strided else x).to(DEVICE, x_dtype)  # strided: a view into wider rows
    rows = 1 if broadcast else b
    shift, scale = (torch.randn(rows, 1, d, generator=g).to(DEVICE, mod_dtype) for _ in range(2))
    return x, shift, scale


CASES = [  # (B, L, D, x dtype, modulation dtype, broadcast, strided): D not a power of two, one token, views
    (2, 5, 48, torch.float32, torch.float32, False, False),
    (1, 1, 100, torch.float32, torch.float32, True, True),
    (2, 3, 64, torch.bfloat16, torch.bfloat16, False, True),
    (3, 4, 40, torch.float32, torch.bfloat16, False, False),  # autocast's case: an fp32 norm, bf16 modulation
]


@pytest.mark.parametrize("b,n,d,x_dtype,mod_dtype,broadcast,strided", CASES)
def test_kernel_against_the_fp32_reference_and_its_rows_bit_for_bit(b, n, d, x_dtype, mod_dtype, broadcast,
                                                                      strided):
    x, shift, scale = _case(b, n, d, x_dtype, mod_dtype, broadcast=broadcast, strided=strided)
    y, rows = kernels.modulated_layer_norm(x, shift, scale, 1e-6, quantize=True)
    want = modulated_layer_norm_fp32(x, shift, scale, 1e-6, torch.promote_types(x_dtype, mod_dtype))
    assert rows is not None and y.dtype == want.dtype and y.shape == x.shape
    if y.dtype == torch.float32:
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    else:  # one rounding of the same fp32 value: a summation-order difference may move it one bf16 step
        step = want.float().abs().clamp_min(1e-3) * 2.0**-7
        assert ((y.float() - want.float()).abs() <= step).all()
    q, s = rows
    want_q, want_s = quant_rows_reference(y.reshape(-1, d))
    assert torch.equal(s, want_s) and torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    # and the blocks' own ops, which round after each step, within those roundings
    ref = modulated_layer_norm_reference(x, shift, scale, 1e-6)
    assert (y.float() - ref.float()).abs().max() <= 4 * 2.0**-8 * ref.float().abs().max()


def test_without_quantize_or_on_the_torch_path_the_blocks_ops_run_exactly(monkeypatch):
    x, shift, scale = _case(2, 5, 48, torch.float32, torch.float32)
    want = (1 + scale) * torch.nn.LayerNorm(48, elementwise_affine=False, eps=1e-6).to(DEVICE)(x) + shift
    for quantize, backend in ((False, "triton"), (True, "torch")):
        monkeypatch.setenv("SCFM_KERNELS", backend)
        y, rows = kernels.modulated_layer_norm(x, shift, scale, 1e-6, quantize=quantize)
        assert rows is None and torch.equal(y, want)


def test_gradients_are_the_fp32_references():
    x, shift, scale = _case(2, 6, 40, torch.float32, torch.float32, seed=3)
    dy = torch.randn(2, 6, 40, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    inputs = [t.clone().requires_grad_() for t in (x, shift, scale)]
    y, _ = kernels.modulated_layer_norm(*inputs, 1e-6, quantize=True)
    got = torch.autograd.grad(y, inputs, dy)
    ref_inputs = [t.clone().requires_grad_() for t in (x, shift, scale)]
    want = torch.autograd.grad(modulated_layer_norm_reference(*ref_inputs, 1e-6), ref_inputs, dy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    # a frozen modulation: only dx is asked for, and given
    xs = x.clone().requires_grad_()
    y, _ = kernels.modulated_layer_norm(xs, shift, scale, 1e-6, quantize=True)
    (dx,) = torch.autograd.grad(y, [xs], dy)
    torch.testing.assert_close(dx, want[0], rtol=1e-4, atol=1e-5)


ACTIVATIONS = [  # (kind, h shape, dtype, strided): odd widths, one row, a view
    ("gelu_tanh", (2, 5, 48), torch.float32, False),
    ("gelu_tanh", (1, 1, 100), torch.bfloat16, True),
    ("swiglu", (3, 4, 80), torch.float32, True),
    ("swiglu", (2, 3, 66), torch.bfloat16, False),
]


def _hidden(shape, dtype, strided, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape[:-1], shape[-1] + 6, generator=g) * 3  # tails past both of GELU's and SiLU's bends
    return (h[..., 2:2 + shape[-1]] if strided else h[..., :shape[-1]].contiguous()).to(DEVICE, dtype)


@pytest.mark.parametrize("kind,shape,dtype,strided", ACTIVATIONS)
def test_activation_kernel_against_the_fp32_reference_and_its_rows_bit_for_bit(kind, shape, dtype, strided):
    h = _hidden(shape, dtype, strided)
    y, rows = kernels.mlp_activation(h, kind, quantize=True)
    want = mlp_activation_fp32(h, kind, dtype)
    assert rows is not None and y.dtype == dtype and y.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    else:  # the same fp32 value rounded once, up to exp's last bits: one bf16 step at most
        assert ((y.float() - want.float()).abs() <= want.float().abs().clamp_min(1e-3) * 2.0**-7).all()
    q, s = rows
    want_q, want_s = quant_rows_reference(y.reshape(-1, y.shape[-1]))
    assert torch.equal(s, want_s) and torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    ref = mlp_activation_reference(h, kind)  # the modules' ops round silu's output first
    assert (y.float() - ref.float()).abs().max() <= 2 * 2.0**-8 * ref.float().abs().max()


def test_activations_without_quantize_are_the_modules_ops_and_their_gradients_the_fp32_references(monkeypatch):
    from model.flux2 import SwiGLU

    h = _hidden((2, 6, 40), torch.float32, False, seed=5)
    for kind, module in (("gelu_tanh", torch.nn.GELU(approximate="tanh")), ("swiglu", SwiGLU())):
        y, rows = kernels.mlp_activation(h, kind)
        assert rows is None and torch.equal(y, module(h))
        leaf, ref_leaf = h.clone().requires_grad_(), h.clone().requires_grad_()
        y, _ = kernels.mlp_activation(leaf, kind, quantize=True)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(6)).to(DEVICE)
        (got,) = torch.autograd.grad(y, [leaf], dy)
        (want,) = torch.autograd.grad(module(ref_leaf), [ref_leaf], dy)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_attached_rows_are_taken_once_and_never_after_an_in_place_change(monkeypatch):
    calls = []
    real = fp8_gemm.kernels.quant_rows
    monkeypatch.setattr(fp8_gemm.kernels, "quant_rows", lambda *a: calls.append(1) or real(*a))
    x, shift, scale = _case(1, 4, 32, torch.float32, torch.float32)
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    wq, ws = quant_rows_reference(weight)
    y, rows = kernels.modulated_layer_norm(x, shift, scale, 1e-6, quantize=True)
    y = fp8_gemm.attach_rows(y, rows)
    first = fp8_gemm.forward(y, wq, ws, None, torch.float32)
    assert calls == []  # the producer's rows
    assert torch.equal(fp8_gemm.forward(y, wq, ws, None, torch.float32), first) and calls == [1]  # taken once
    y = fp8_gemm.attach_rows(y, rows)
    y.mul_(2)
    assert not torch.equal(fp8_gemm.forward(y, wq, ws, None, torch.float32), first) and calls == [1, 1]
    with torch.inference_mode():  # inference tensors keep no change counter: taken all the same
        y, rows = kernels.modulated_layer_norm(x, shift, scale, 1e-6, quantize=True)
        assert torch.equal(fp8_gemm.forward(fp8_gemm.attach_rows(y, rows), wq, ws, None, torch.float32), first)
    assert calls == [1, 1]


def _count_rounded_rows(monkeypatch):
    """Count the GEMMs' own roundings; they run the reference (bit-equal to their kernel, tests/test_fp8_compute.py)
    and so do the norm / RoPE kernels (tests/test_kernels.py): only the producer runs interpreted, in seconds."""
    calls = []
    monkeypatch.setattr(fp8_gemm.kernels, "quant_rows", lambda *a: calls.append(1) or quant_rows_reference(*a))
    monkeypatch.setattr(kernels, "_use_triton", lambda *a: False)
    return calls


def _tiny_model_and_inputs(family: str):
    """Each family's tiny model (SD3.5's with two dual blocks and a pre-only last block) and its inputs."""
    if family == "flux":
        from flux_fixtures import tiny_inputs

        from model.flux import FLUX_CONFIGS, Flux

        return Flux(FLUX_CONFIGS["tiny"]), tiny_inputs()
    if family == "flux2":
        from test_flux2 import TINY, inputs

        from model.flux2 import Flux2

        return Flux2(TINY), inputs(False)
    from mmdit_fixtures import SD35_TINY, tiny_inputs

    from model.mmdit import MMDiT

    return MMDiT(SD35_TINY), tiny_inputs(SD35_TINY)


def _fused_readers(model) -> int:
    """GEMMs a forward feeds from a fused producer: a Flux double block's qkv, MLP in and MLP out per stream and a
    single block's linear1; an SD3 stream's qkv (not a dual block's, whose norm also feeds attn2) and its MLP in and
    out (none in the last block's pre-only context)."""
    if hasattr(model, "double_blocks"):
        return 6 * len(model.double_blocks) + len(model.single_blocks)
    streams = [s for b in model.joint_blocks for s in (b.context_block, b.x_block)]
    return sum((not s.dual) + 2 * (not s.pre_only) for s in streams)


@pytest.mark.parametrize("family", ["flux", "flux2", "sd3"])
def test_whole_models_take_the_producers_rows(family, monkeypatch):
    """fp8 compute with the fused producers against the same model whose GEMMs round every input themselves:
    each block's adaLN readers take the producer's rows (fewer roundings, counted), and the output and the LoRA
    gradients agree within the fp8 rounding of the few values the two roundings of y put on either side of a
    step."""
    from conftest import randomize_

    from distill.lora import LoRAConfig, inject_lora
    from model.fp8 import enable_fp8_compute_, quantize_linears_

    model, inputs = _tiny_model_and_inputs(family)
    randomize_(model, sigma=0.1, seed=0)
    quantize_linears_(model)
    inject_lora(model, LoRAConfig(rank=4, alpha=4.0), torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_up" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    model.to(DEVICE)
    enable_fp8_compute_(model, DEVICE)
    inputs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    results = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(fp8_gemm, "FUSED_PRODUCERS", False)
        calls = _count_rounded_rows(monkeypatch)
        out = model(**inputs)
        n_forward = len(calls)
        grads = torch.autograd.grad(out, lora, torch.ones_like(out))
        results[fused] = out.detach(), grads, n_forward
    (out, grads, n_fused), (ref, ref_grads, n_plain) = results[True], results[False]
    assert n_plain - n_fused == _fused_readers(model) and n_fused > 0  # the single blocks' linear2, the proj
    assert (out - ref).abs().max() <= 0.02 * ref.abs().max()
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max() <= 0.05 * r.abs().max() + 1e-6


def test_kernels_compile_for_ada_and_hopper():
    """Compiled ahead of time for sm89 / sm90 at Flux-dev's widths (the adaLN's 3072, bf16 and fp32 out; the MLP's
    12288 in one 16384 tile over 16 warps, both kinds), with no GPU (the interpreter accepts Python the compiler
    may not)."""
    code = (
        "import triton\n"
        "from triton.compiler import ASTSource\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from model.kernels.adanorm import _adanorm_kernel\n"
        "sig = {'x_ptr': '*fp32', 'shift_ptr': '*bf16', 'scale_ptr': '*bf16', 'q_ptr': '*u8', 's_ptr': '*fp32',\n"
        "       'n_rows': 'i32', 'L': 'i32', 'D': 'i32', 'eps': 'fp32', 'stride_xb': 'i32', 'stride_xl': 'i32',\n"
        "       'stride_mb': 'i32', 'BLOCK_M': 'constexpr', 'BLOCK_D': 'constexpr'}\n"
        "for cap in (89, 90):\n"
        "    for y in ('*fp32', '*bf16'):\n"
        "        k = triton.compile(ASTSource(fn=_adanorm_kernel, signature={**sig, 'y_ptr': y},\n"
        "                                     constexprs={'BLOCK_M': 1, 'BLOCK_D': 4096}),\n"
        "                           target=GPUTarget('cuda', cap, 32))\n"
        "        assert 'cubin' in k.asm\n"
        "from model.kernels.mlp_act import _act_kernel\n"
        "sig = {'h_ptr': '*bf16', 'y_ptr': '*bf16', 'q_ptr': '*u8', 's_ptr': '*fp32', 'n_rows': 'i32', 'W': 'i32',\n"
        "       'stride_h': 'i32', 'SWIGLU': 'constexpr', 'BLOCK_M': 'constexpr', 'BLOCK_D': 'constexpr'}\n"
        "for cap in (89, 90):\n"
        "    for swiglu in (False, True):\n"
        "        k = triton.compile(ASTSource(fn=_act_kernel, signature=sig, constexprs={'SWIGLU': swiglu,\n"
        "                                     'BLOCK_M': 1, 'BLOCK_D': 16384}),\n"
        "                           target=GPUTarget('cuda', cap, 32), options={'num_warps': 16})\n"
        "        assert 'cubin' in k.asm and k.metadata.num_warps == 16\n"
    )
    compile_for_gpus(code)
