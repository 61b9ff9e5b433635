"""e4m3 storage of frozen Linear weights (model/fp8.py): the rounding bound, exact dequantization, storage that
survives `model.to(dtype)`, a quantized tiny Flux, and LoRA training on top of it."""

import pytest
import torch
from torch import nn

from distill.lora import LoRAConfig, LoRALinear, inject_lora, merge, weight_set
from model.flux import FLUX_CONFIGS, Flux
from model.fp8 import E4M3, Float8Linear, dequantize, quantize_linears_, quantize_rows
from sampling.velocity import FluxVelocity
from tests.flux_fixtures import tiny_inputs


def test_rows_are_scaled_by_powers_of_two_and_rounded_within_e4m3_precision():
    g = torch.Generator().manual_seed(0)
    # rows of very different magnitude, a zero row, and tiny values that land in e4m3's subnormals
    w = torch.randn(6, 64, generator=g) * torch.tensor([1e-4, 1e-2, 1.0, 30.0, 0.0, 3e3]).view(-1, 1)
    w[2, :8] = 1e-7
    q, scale = quantize_rows(w)
    assert q.dtype == E4M3 and scale.dtype == torch.float32 and scale.shape == (6, 1)
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)  # powers of two
    assert q.float().abs().amax() <= 448
    # each row's largest value uses the top octave: the scale is the smallest power of two that fits
    assert (q.float().abs().amax(dim=1)[[0, 1, 2, 3, 5]] >= 224).all()
    deq = dequantize(q, scale, torch.float32)
    # round to nearest with 3 mantissa bits: |error| <= 2^-4 |w|, or half the subnormal step 2^-9 * scale
    bound = torch.maximum(w.abs() * 2.0**-4, scale * 2.0**-10)
    assert ((deq - w).abs() <= bound).all()
    assert torch.equal(deq[4], torch.zeros(64))
    # dequantizing is exact in every float dtype (e4m3 times a power of two)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert torch.equal(dequantize(q, scale, dtype).float(), deq)


def test_float8_linear_is_the_linear_on_its_dequantized_weight():
    torch.manual_seed(0)
    base = nn.Linear(48, 40)
    f8 = Float8Linear.from_linear(base)
    assert isinstance(f8, nn.Linear) and f8.weight.dtype == E4M3 and not f8.weight.requires_grad
    x = torch.randn(3, 7, 48)
    want = nn.functional.linear(x, dequantize(f8.weight, f8.weight_scale, torch.float32), base.bias)
    assert torch.equal(f8(x), want)
    assert (f8(x) - base(x)).abs().max() < 0.05 * base(x).abs().max()  # and close to the original
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert f8(x).dtype == torch.bfloat16


def test_float8_linear_backward_keeps_only_the_e4m3_storage():
    """dx and d(bias) equal the dense layer's; what autograd saves is the e4m3 weight, not a dense copy."""
    torch.manual_seed(0)
    f8 = Float8Linear.from_linear(nn.Linear(48, 40))
    f8.bias.requires_grad_(True)
    dense = nn.Linear(48, 40)
    with torch.no_grad():
        dense.weight.copy_(dequantize(f8.weight, f8.weight_scale, torch.float32))
        dense.bias.copy_(f8.bias)
    x = torch.randn(3, 7, 48, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = f8(x)
    assert not any(t.shape == (40, 48) and t.dtype != E4M3 for t in saved)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, f8.bias), dy)
    want = torch.autograd.grad(dense(x), (x, dense.bias), dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an fp32 input's gradient comes back fp32
        assert torch.autograd.grad(f8(x).float().sum(), x)[0].dtype == torch.float32


def test_storage_survives_model_to_dtype_and_state_dict_round_trip():
    torch.manual_seed(0)
    f8 = Float8Linear.from_linear(nn.Linear(32, 16))
    q, scale = f8.weight.detach().clone(), f8.weight_scale.clone()
    model = nn.Sequential(f8, nn.Linear(16, 4))
    model.to(torch.bfloat16)  # casts every floating tensor: the e4m3 values come back exactly
    assert f8.weight.dtype == E4M3 and f8.weight_scale.dtype == torch.float32
    assert torch.equal(f8.weight.float(), q.float()) and torch.equal(f8.weight_scale, scale)
    assert model[1].weight.dtype == torch.bfloat16
    state = model.state_dict()
    assert state["0.weight"].dtype == E4M3 and "0.weight_scale" in state
    other = nn.Sequential(Float8Linear.from_linear(nn.Linear(32, 16)), nn.Linear(16, 4)).to(torch.bfloat16)
    other.load_state_dict(state)
    assert torch.equal(other[0].weight.float(), q.float())


def _tiny_flux(seed: int = 0) -> Flux:
    torch.manual_seed(seed)
    model = Flux(FLUX_CONFIGS["tiny"]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)  # larger than the init, so the model's output depends on every weight
    return model


def _forward(model: Flux) -> torch.Tensor:
    inp = tiny_inputs()
    with torch.no_grad():
        return model(inp["img"], inp["img_ids"], inp["txt"], inp["txt_ids"], inp["timesteps"], inp["y"],
                     inp["guidance"])


def test_quantized_flux_equals_flux_with_the_dequantized_block_weights():
    model = _tiny_flux()
    ref = _forward(model)
    quantized = _tiny_flux()
    saved = quantize_linears_(quantized)
    kinds = {n: type(m) for n, m in quantized.named_modules() if isinstance(m, nn.Linear)}
    assert all((k is Float8Linear) == n.startswith(("double_blocks.", "single_blocks.")) for n, k in kinds.items())
    n_block = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, nn.Linear) and n.startswith(("double_blocks.", "single_blocks.")))
    assert saved == 3 * n_block - 4 * sum(m.out_features for m in quantized.modules() if isinstance(m, Float8Linear))
    out = _forward(quantized)
    # the same model with its block weights replaced by q * scale, in fp32: the same numbers
    dense = _tiny_flux()
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, Float8Linear):
                dense.get_submodule(name).weight.copy_(dequantize(m.weight, m.weight_scale, torch.float32))
    torch.testing.assert_close(out, _forward(dense), rtol=1e-5, atol=1e-6)
    err = (out - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.1, err  # e4m3 rounding: visible, but small against the output


def test_lora_on_an_fp8_base_trains_the_live_set_and_selects_sets():
    model = _tiny_flux()
    quantize_linears_(model)
    inject_lora(model, LoRAConfig(rank=4, alpha=4), torch.Generator().manual_seed(0))
    layer = model.single_blocks[0].linear1
    assert isinstance(layer, LoRALinear) and layer.weight.dtype == E4M3 and layer.weight_scale is not None
    model.to(torch.float32)  # the trainer's cast after injection: storage kept, LoRA sets stay fp32
    assert layer.weight.dtype == E4M3 and layer.lora_down["live"].dtype == torch.float32
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_up["live"].normal_(0, 0.05)
    with weight_set(model, "teacher"):  # the zero set: the fp8 base alone
        teacher = _forward(model)
    live = _forward(model)
    assert (live - teacher).abs().max() > 1e-3
    # gradients reach the live LoRA through the fp8 layers; the frozen e4m3 weights get none
    x = torch.randn(2, 4, 8, 12)  # 4 latent channels: 16 packed
    v = FluxVelocity(model)(x, torch.tensor([0.7, 0.3]), {"txt": torch.randn(2, 5, 32), "y": torch.randn(2, 24)},
                            torch.tensor([3.5, 2.0]))
    v.square().mean().backward()
    assert layer.lora_down["live"].grad.abs().sum() > 0 and layer.weight.grad is None
    with pytest.raises(RuntimeError, match="fp8"):
        merge(model, "live")


def test_merging_into_fp8_weights_is_refused_and_merging_before_quantizing_is_kept():
    from weights.io import WeightsError
    from weights.lora import LoRA, LoRAPart, ModuleLoRA
    from weights.lora_merge import apply_loras, unload_loras

    g = torch.Generator().manual_seed(0)
    layer = "single_blocks.0.linear2"
    model = _tiny_flux()
    n_out, n_in = model.get_submodule(layer).weight.shape
    part = LoRAPart(down=torch.randn(2, n_in, generator=g), up=torch.randn(n_out, 2, generator=g), alpha=2.0)
    lora = LoRA(modules={layer: ModuleLoRA(parts=[part], rows=(n_out,))})
    apply_loras(model, [lora])  # restorable: originals kept
    merged = model.get_submodule(layer).weight.detach().clone()
    quantize_linears_(model)
    with pytest.raises(WeightsError, match="quantized to fp8 after its LoRAs were merged"):
        unload_loras(model)  # writing bf16 originals into e4m3 storage would corrupt it silently
    q = model.get_submodule(layer)
    assert torch.equal(dequantize(q.weight, q.weight_scale, torch.float32), dequantize(*quantize_rows(merged),
                                                                                          torch.float32))
    other = _tiny_flux()
    quantize_linears_(other)
    with pytest.raises(WeightsError, match="stored in fp8; merge LoRAs before quantizing"):
        apply_loras(other, [lora])


def test_quantizing_frees_each_full_precision_weight_before_the_next(monkeypatch):
    """A model on the GPU in bf16 must not hold its bf16 and fp8 copies at once while it is quantized."""
    import weakref

    import model.fp8 as fp8

    model = nn.Module()
    model.double_blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(3)])
    alive = [weakref.ref(layer.weight) for layer in model.double_blocks]
    counts, original = [], fp8.Float8Linear.from_linear
    monkeypatch.setattr(fp8.Float8Linear, "from_linear",
                        lambda linear, device=None: counts.append(sum(r() is not None for r in alive))
                        or original(linear, device))
    quantize_linears_(model)
    assert counts == [3, 2, 1] and all(r() is None for r in alive)
