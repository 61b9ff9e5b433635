"""The fused multi-set LoRA linear (distill/lora_fn.py) against the plain formula, in value and gradient."""

import pytest
import torch

from distill.lora_fn import lora_linear
from model.fp8 import dequantize, quantize_rows

RANK = 2


def plain(x, weight, bias, scale, slices, sets_per_element, factors):
    """y_b = x_b W^T + bias + scale * sum over slices i of (x_b D_i^T) U_i^T, D_i / U_i of element b's set."""
    rows = []
    for b, k in enumerate(sets_per_element):
        y = x[b] @ weight.t() + (0 if bias is None else bias)
        if k is not None:
            down, up = factors[2 * k], factors[2 * k + 1]
            parts = [(x[b] @ d.t()) @ u.t() for d, u in zip(down.chunk(len(slices)), up.split(list(slices)))]
            y = y + scale * torch.cat(parts, dim=-1)
        rows.append(y)
    return torch.stack(rows)


def case(slices, n_sets, dtype=torch.float64, seed=0, bias=True, tokens=3):
    g = torch.Generator().manual_seed(seed)
    n_in, n_out = 5, sum(slices)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    x = rnd(4, tokens, n_in) if tokens else rnd(4, n_in)
    factors = tuple(t for _ in range(n_sets) for t in (rnd(len(slices) * RANK, n_in), rnd(n_out, RANK)))
    return x, rnd(n_out, n_in), rnd(n_out) if bias else None, factors


# groups as the LoRA layers build them, and the set each of the 4 elements gets (None: no LoRA)
GROUPS = {
    "one set": (((None, 0),), [0, 0, 0, 0]),
    "runs": (((slice(0, 1), 0), (slice(1, 4), 1)), [0, 1, 1, 1]),
    "scattered": (((torch.tensor([0, 2]), 0), (torch.tensor([3]), 1)), [0, None, 0, 1]),
    "run and scatter": (((slice(2, 4), 1), (torch.tensor([0]), 0)), [0, None, 1, 1]),
}


@pytest.mark.parametrize("compiling", [False, True], ids=["eager", "compiled sum"])
@pytest.mark.parametrize("slices", [(3,), (5, 5, 5, 7)], ids=["plain", "fused slices"])
@pytest.mark.parametrize("groups", list(GROUPS), ids=list(GROUPS))
def test_value_and_every_gradient_equal_the_plain_formula(slices, groups, compiling, monkeypatch):
    """Eager adds the up-projections in place; inside a compiled block the sum is out of place (torch 2.11 loses
    the gradients of the in-place form): both are the plain formula, for every kind of group."""
    if compiling:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    groups, per_element = GROUPS[groups]
    x, weight, bias, factors = case(slices, n_sets=2)
    out = lora_linear(x, weight, bias, 0.7, slices, groups, factors)
    ref = plain(x, weight, bias, 0.7, slices, per_element, factors)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    inputs = (x, weight, bias, *factors)
    dy = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, dy, allow_unused=True)
    want = torch.autograd.grad(ref, inputs, dy, allow_unused=True)
    for name, a, b in zip(["x", "weight", "bias"] + [f"factor {i}" for i in range(4)], got, want):
        if b is None:  # a set no element uses has no gradient
            assert a is None or not a.any(), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_gradcheck_on_a_vector_input_with_frozen_base_and_no_bias():
    x, weight, _, factors = case((2, 2, 2, 3), n_sets=2, tokens=0, bias=False)
    weight.requires_grad_(False)  # as in training: only x and the factors want gradients
    groups = ((slice(0, 2), 0), (torch.tensor([3, 2]), 1))

    def fn(x, *factors):
        return lora_linear(x, weight, None, 1.3, (2, 2, 2, 3), groups, factors)

    assert torch.autograd.gradcheck(fn, (x, *factors))


def test_autocast_bf16_keeps_input_and_factor_dtypes_and_matches_plain_autocast():
    x, weight, bias, factors = case((4, 4), n_sets=1, dtype=torch.float32, seed=1, tokens=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora_linear(x, weight, bias, 0.5, (4, 4), ((None, 0),), factors)
        ref = plain(x, weight, bias, 0.5, (4, 4), [0] * 4, factors)
    assert out.dtype == torch.bfloat16  # as F.linear gives under autocast
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    got = torch.autograd.grad(out.float().sum(), (x, weight, *factors))
    want = torch.autograd.grad(ref.float().sum(), (x, weight, *factors))
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * b.abs().max().item())


def test_no_groups_is_the_base_linear():
    x, weight, bias, factors = case((3,), n_sets=1)
    torch.testing.assert_close(lora_linear(x, weight, bias, 1.0, (3,), (), factors),
                               torch.nn.functional.linear(x, weight, bias), rtol=0, atol=0)


def test_non_contiguous_input_and_output_gradient():
    x, weight, bias, factors = case((5, 5, 5, 7), n_sets=2)
    xt = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # (4, 3, 5), batch not outermost
    assert not xt.is_contiguous()
    groups, per_element = GROUPS["run and scatter"]
    out = lora_linear(xt, weight, bias, 0.7, (5, 5, 5, 7), groups, factors)
    ref = plain(x, weight, bias, 0.7, (5, 5, 5, 7), per_element, factors)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn(3, 4, 22, dtype=out.dtype).transpose(0, 1)  # a non-contiguous output gradient
    got = torch.autograd.grad(out, (xt, *factors), dy)
    want = torch.autograd.grad(ref, (x, *factors), dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_bf16_base_with_fp32_factors_under_autocast_matches_float64():
    """The trainer's GPU setup: bf16 base and activations, fp32 LoRA sets, bf16 autocast."""
    x, weight, bias, factors = case((4, 4, 4), n_sets=1, seed=2, tokens=16)
    xb = x.detach().bfloat16().requires_grad_()
    fb = tuple(f.detach().float().requires_grad_() for f in factors)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora_linear(xb, weight.detach().bfloat16(), bias.detach().bfloat16(), 0.5, (4, 4, 4),
                          ((slice(0, 2), 0),), fb)
    assert out.dtype == torch.bfloat16
    dy = torch.randn(out.shape, dtype=torch.float64)
    got = (out, *torch.autograd.grad(out, (xb, *fb), dy.bfloat16()))
    assert [t.dtype for t in got[1:]] == [torch.bfloat16, torch.float32, torch.float32]
    # the float64 reference from the same bf16-rounded inputs
    xr = xb.detach().double().requires_grad_()
    fr = tuple(f.detach().double().requires_grad_() for f in fb)
    ref = plain(xr, weight.detach().bfloat16().double(), bias.detach().bfloat16().double(), 0.5, (4, 4, 4),
                [0, 0, None, None], fr)
    want = (ref, *torch.autograd.grad(ref, (xr, *fr), dy))
    for a, b in zip(got, want):
        assert (a.double() - b).abs().max() <= 1e-2 * b.abs().max()


@pytest.mark.parametrize("groups", ["runs", "run and scatter"])
def test_fp8_base_weight_equals_the_plain_formula_on_its_dequantized_weight(groups):
    """An e4m3 base weight with a per-row scale (model/fp8.py): forward and every gradient are the plain
    formula on q * scale; the weight itself gets no gradient (it is frozen storage)."""
    groups, per_element = GROUPS[groups]
    x, weight, bias, factors = case((5, 5, 5, 7), n_sets=2, dtype=torch.float32, seed=3)
    q, scale = quantize_rows(weight.detach() * 40)  # large enough that the scale is not 1
    out = lora_linear(x, q, bias, 0.7, (5, 5, 5, 7), groups, factors, weight_scale=scale)
    assert out.dtype == torch.float32
    # float64 reference on the dequantized weight (exact in fp32: e4m3 times a power of two)
    xr, br = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    fr = tuple(f.detach().double().requires_grad_() for f in factors)
    ref = plain(xr, dequantize(q, scale, torch.float64), br, 0.7, (5, 5, 5, 7), per_element, fr)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    dy = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, (x, bias, *factors), dy.float())
    want = torch.autograd.grad(ref, (xr, br, *fr), dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-4 * b.abs().max().item())
    no_groups = lora_linear(x, q, bias, 0.7, (5, 5, 5, 7), (), factors, weight_scale=scale)
    torch.testing.assert_close(no_groups, torch.nn.functional.linear(x, dequantize(q, scale, x.dtype), bias),
                               rtol=0, atol=0)
