"""fp8 compute (model/fp8_gemm.py, model/kernels/quant.py): the per-row rounding, the emulated GEMMs against a
float64 reference of the same rounding, the LoRA path untouched by the switch, the refusal on GPUs without fp8
GEMMs, and on CUDA the real `_scaled_mm` path against the emulation."""

import pytest
import torch
from conftest import compile_for_gpus
from torch import nn

from distill.lora import LoRAConfig, inject_lora, lora_layers
from model import fp8_gemm
from model.flux import FLUX_CONFIGS, Flux
from model.fp8 import Float8Linear, compute_dtype, dequantize, enable_fp8_compute_, quantize_linears_
from model.kernels.quant import quant_rows_reference
from tests.flux_fixtures import tiny_inputs

E4M3 = torch.float8_e4m3fn
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def e4m3_values() -> torch.Tensor:
    """Every finite non-negative e4m3fn value, ascending (0, the subnormals 2^-9 .. 7 * 2^-9, ..., 448)."""
    return torch.arange(127, dtype=torch.uint8).view(E4M3).float()


def tie_rows() -> torch.Tensor:
    """Rows holding every e4m3 value, every midpoint between neighbours (ties: even codes win) and points a
    quarter step either side of them, negated too, with 448 in each row so the scale is 1."""
    v = e4m3_values()
    mid = (v[1:] + v[:-1]) / 2
    quarter = (v[1:] - v[:-1]) / 4
    row = torch.cat([v, mid, mid - quarter, mid + quarter])
    return torch.stack([row, -row, row * 2.0**-20, row * 2.0**12])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_kernel_equals_its_reference_bit_for_bit(dtype):
    from model.kernels.quant import quant_rows_triton

    g = torch.Generator().manual_seed(0)
    x = torch.cat([tie_rows(), torch.randn(5, tie_rows().shape[1], generator=g) * 3.0])
    x[-1] = 0.0  # a zero row
    x[-2, :7] = torch.tensor([1e-30, -1e-38, 0.0, -0.0, 1e-45, 6e4, -7e4])  # fp32 subnormals, large values
    x = x.to(dtype).to(DEVICE)
    for col in (None, torch.exp2(torch.randint(-6, 7, (x.shape[1],), generator=g).float()).to(DEVICE)):
        got_q, got_s = quant_rows_triton(x, col)
        want_q, want_s = quant_rows_reference(x, col)
        assert torch.equal(got_s, want_s)
        assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8))


def test_rows_round_to_nearest_even_under_the_smallest_power_of_two_scale():
    rows = tie_rows()
    q, scale = quant_rows_reference(rows)
    assert torch.equal(scale.view(-1), torch.tensor([1.0, 1.0, 2.0**-20, 2.0**12]))
    values, codes = e4m3_values(), torch.arange(127)
    n = len(values)
    exact = q[0, :n].view(torch.uint8).long()
    assert torch.equal(exact, codes)  # representable values are kept
    ties = q[0, n:2 * n - 1].view(torch.uint8).long()
    assert torch.equal(ties, codes[:-1] + (codes[:-1] % 2))  # a midpoint goes to the even code
    below = q[0, 2 * n - 1:3 * n - 2].view(torch.uint8).long()
    above = q[0, 3 * n - 2:].view(torch.uint8).long()
    assert torch.equal(below, codes[:-1]) and torch.equal(above, codes[1:])
    assert torch.equal(q[1].view(torch.uint8), q[0].view(torch.uint8) | 128)  # sign bit only
    # random rows: the scale is the smallest power of two that fits 448, and the error is half a step at most
    x = torch.randn(64, 300, generator=torch.Generator().manual_seed(1)) * torch.logspace(-6, 6, 64).view(-1, 1)
    q, scale = quant_rows_reference(x)
    top = x.abs().amax(1, keepdim=True) / scale
    assert (top <= 448).all() and (top > 224).all()
    err = (q.float() * scale - x).abs()
    assert (err <= torch.maximum(x.abs() * 2.0**-4, scale * 2.0**-10)).all()


def fp8_layer(n_in=96, n_out=80, seed=0) -> Float8Linear:
    torch.manual_seed(seed)
    layer = Float8Linear.from_linear(nn.Linear(n_in, n_out))
    layer.fp8_compute = True
    return layer


def float64_gemm(a_q, a_s, b_q, b_s):
    """(a_q * a_s) @ (b_q * b_s)^T in float64, and the bound of an fp32 accumulation of the same products."""
    a, b = a_q.double() * a_s.double(), b_q.double() * b_s.double()
    k = a.shape[1]
    return a @ b.t(), k * 2.0**-24 * (a.abs() @ b.abs().t())


def test_emulated_forward_and_input_gradient_equal_float64_of_the_same_rounding():
    layer = fp8_layer()
    x = torch.randn(3, 7, 96, requires_grad=True)
    y = layer(x)
    xq, xs = quant_rows_reference(x.detach().reshape(-1, 96))
    want, bound = float64_gemm(xq, xs, layer.weight, layer.weight_scale)
    want = want + layer.bias.double()
    err = (y.detach().reshape(-1, 80).double() - want).abs()
    assert (err <= bound + 1e-12).all()
    assert (y.detach() - nn.functional.linear(x, dequantize(layer.weight, layer.weight_scale, torch.float32),
                                              layer.bias)).abs().max() > 0  # it is not the dequantized GEMM

    dy = torch.randn(3, 7, 80)
    y.backward(dy)
    dq, ds = quant_rows_reference(dy.reshape(-1, 80), layer.weight_scale.view(-1))
    ones = torch.ones(96, 1, dtype=torch.float64)
    want, bound = float64_gemm(dq, ds, layer.weight.t().contiguous(), ones)
    err = (x.grad.reshape(-1, 96).double() - want).abs()
    assert (err <= bound + 1e-12).all()
    # and the rounding is the only difference from the exact product: within e4m3's 2^-4 relative step
    exact = dy.reshape(-1, 80).double() @ dequantize(layer.weight, layer.weight_scale, torch.float64)
    assert (x.grad.reshape(-1, 96).double() - exact).abs().max() < 0.1 * exact.abs().max()


def test_the_lora_gradients_are_unchanged_by_the_switch():
    """Same input, same output gradient: d(down) and d(up) are the same bits with fp8 compute on and off, dx is
    the base's fp8 input gradient plus the same LoRA part."""
    grads = {}
    for on in (False, True):
        layer = nn.Sequential(fp8_layer(64, 48, seed=3))
        inject_lora(layer, LoRAConfig(rank=4, alpha=4, sets=("live",), targets=("0",)),
                    torch.Generator().manual_seed(0))
        lora = lora_layers(layer)["0"]
        assert lora.fp8_compute  # carried over from the quantized layer
        lora.fp8_compute = on
        with torch.no_grad():
            lora.lora_up["live"].normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
        layer(x).backward(torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(3)))
        grads[on] = (lora.lora_down["live"].grad, lora.lora_up["live"].grad, x.grad)
    assert torch.equal(grads[False][0], grads[True][0]) and torch.equal(grads[False][1], grads[True][1])
    assert not torch.equal(grads[False][2], grads[True][2])
    assert (grads[False][2] - grads[True][2]).abs().max() < 0.1 * grads[False][2].abs().max()


def test_the_fp8_gemm_computes_in_the_autocast_dtype():
    """An fp32 activation under CPU autocast to bf16 computes in bf16, as nn.Linear would: `compute_dtype` reads
    autocast, and the fp8 GEMM of a quantized layer (enable_fp8_compute_) writes bf16, close to the dequantized
    bf16 Linear. Without autocast it is the input's dtype."""
    layer = nn.Sequential(Float8Linear.from_linear(nn.Linear(96, 80)))
    assert enable_fp8_compute_(layer, "cpu") == 1
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(0))
    assert compute_dtype(x) == torch.float32 and layer(x).dtype == torch.float32
    with torch.autocast("cpu", torch.bfloat16):
        assert compute_dtype(x) == torch.bfloat16
        y = layer(x)
        dense = nn.functional.linear(x, dequantize(layer[0].weight, layer[0].weight_scale, torch.float32),
                                     layer[0].bias)
    assert y.dtype == dense.dtype == torch.bfloat16
    assert (y.float() - dense.float()).abs().max() < 0.1 * dense.float().abs().max()


def test_a_gpu_without_fp8_gemms_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError) as e:
        fp8_gemm.check_device("cuda:0")
    assert "sm80" in str(e.value) and "drop --fp8_compute" in str(e.value) and "\n" not in str(e.value)
    fp8_gemm.check_device("cpu")  # the emulation
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fp8_gemm.check_device("cuda:0")


def test_a_model_without_fp8_weights_is_refused():
    with pytest.raises(ValueError, match="no fp8 weights"):
        enable_fp8_compute_(Flux(FLUX_CONFIGS["tiny"]), "cpu")


def test_tiny_flux_with_fp8_compute_is_close_to_the_dequantized_model_and_trains():
    torch.manual_seed(0)
    model = Flux(FLUX_CONFIGS["tiny"])
    for p in model.parameters():
        nn.init.normal_(p, 0, 0.1)
    quantize_linears_(model)
    inp = tiny_inputs()
    with torch.no_grad():
        dense_out = model(**inp)
        n = enable_fp8_compute_(model, "cpu")
        fp8_out = model(**inp)
    assert n == sum(isinstance(m, Float8Linear) for m in model.modules()) > 0
    rel = ((fp8_out - dense_out).abs().max() / dense_out.abs().max()).item()
    assert 0 < rel < 0.05
    inject_lora(model, LoRAConfig(rank=4, alpha=4, sets=("live",)), torch.Generator().manual_seed(0))
    model(**inp).pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the _scaled_mm path needs a CUDA GPU with fp8 GEMMs")
@pytest.mark.parametrize("m", [1, 8, 300, 4096])
def test_scaled_mm_on_the_gpu_equals_the_emulation(m):
    """Modulation (M = batch), small and large token counts, with a bias; forward and input gradient."""
    if not fp8_gemm.gemm_supported("cuda"):
        pytest.skip("this GPU has no fp8 GEMMs")
    g = torch.Generator(device="cuda").manual_seed(0)
    torch.manual_seed(0)
    layer = Float8Linear.from_linear(nn.Linear(3072, 1536, device="cuda"), "cuda")
    layer.bias.data = layer.bias.data.bfloat16()
    x = torch.randn(m, 3072, device="cuda", generator=g, dtype=torch.bfloat16)
    xq, xs = quant_rows_reference(x)
    got = fp8_gemm.scaled_mm(xq, xs, layer.weight.t(), layer.weight_scale, layer.bias, torch.bfloat16)
    want = fp8_gemm.scaled_mm(xq.cpu(), xs.cpu(), layer.weight.t().cpu(), layer.weight_scale.cpu(),
                              layer.bias.cpu(), torch.bfloat16)
    assert ((got.cpu().float() - want.float()).abs() <= 2**-7 * want.float().abs() + 1e-3).all()
    dy = torch.randn(m, 1536, device="cuda", generator=g, dtype=torch.bfloat16)
    got = fp8_gemm.input_grad(dy, layer.weight, layer.weight_scale, torch.bfloat16)
    want = fp8_gemm.input_grad(dy.cpu(), layer.weight.cpu(), layer.weight_scale.cpu(), torch.bfloat16)
    assert ((got.cpu().float() - want.float()).abs() <= 2**-7 * want.float().abs() + 1e-3).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the _scaled_mm path needs a CUDA GPU with fp8 GEMMs")
def test_scaled_mm_on_the_gpu_serves_an_fp32_model():
    """torch's row-wise scaled GEMM writes bf16 / fp16 only: an fp32 model gets that product, then its bias in fp32."""
    if not fp8_gemm.gemm_supported("cuda"):
        pytest.skip("this GPU has no fp8 GEMMs")
    g = torch.Generator(device="cuda").manual_seed(0)
    layer = Float8Linear.from_linear(nn.Linear(256, 128, device="cuda"), "cuda")
    xq, xs = quant_rows_reference(torch.randn(64, 256, device="cuda", generator=g))
    got = fp8_gemm.scaled_mm(xq, xs, layer.weight.t(), layer.weight_scale, layer.bias, torch.float32)
    bf16 = fp8_gemm.scaled_mm(xq, xs, layer.weight.t(), layer.weight_scale, None, torch.bfloat16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, bf16.float() + layer.bias.float(), rtol=0, atol=0)


def test_quant_kernel_compiles_for_ada_and_hopper():
    """Compiled ahead of time for sm89 / sm90 with no GPU (the interpreter accepts Python the compiler may not)."""
    code = (
        "import triton\n"
        "from triton.compiler import ASTSource\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from model.kernels.quant import _quant_rows_kernel\n"
        "for cap in (89, 90):\n"
        "    sig = {'x_ptr': '*bf16', 'col_ptr': '*fp32', 'q_ptr': '*u8', 's_ptr': '*fp32', 'K': 'i32',\n"
        "           'stride_x': 'i32', 'HAS_COL': 'constexpr', 'BLOCK': 'constexpr'}\n"
        "    k = triton.compile(ASTSource(fn=_quant_rows_kernel, signature=sig,\n"
        "                                 constexprs={'HAS_COL': True, 'BLOCK': 1024}),\n"
        "                       target=GPUTarget('cuda', cap, 32))\n"
        "    assert 'cubin' in k.asm\n"
    )
    compile_for_gpus(code)
