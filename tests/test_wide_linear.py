"""WideLinear (model/layers.py): the CPU inference GEMM of the wide projections in column panels. The same
numbers as nn.Linear, the panels really used where they should be and nowhere else, the layers it stands for in
each family, and fp8 storage still taking them."""

import pytest
import torch
import torch.nn.functional as F
from flux_fixtures import tiny_inputs
from test_flux2 import inputs as flux2_inputs
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from model.flux import FLUX_CONFIGS, Flux
from model.flux2 import FLUX2_CONFIGS, Flux2
from model.fp8 import Float8Linear, quantize_linears_
from model.layers import WideLinear
from model.mmdit import MMDIT_CONFIGS, MMDiT


class GemmCalls(TorchDispatchMode):
    """Counts the GEMMs a call runs, by kind (mm / addmm, in place or into an `out=` panel)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm"):
            self.calls.append(f"{name}.{func._overloadname}")
        return func(*args, **(kwargs or {}))


def _layer(k: int, n: int, bias: bool, panel: int, seed: int = 0) -> WideLinear:
    torch.manual_seed(seed)
    layer = WideLinear(k, n, bias=bias)
    layer.PANEL = panel  # an instance attribute: the class's 3072 stays for every other test
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
        if bias:
            layer.bias.normal_()
    return layer


@pytest.mark.parametrize("bias", [False, True])
def test_panels_give_nn_linear_numbers(bias):
    g = torch.Generator().manual_seed(1)
    for n, panel in [(48, 16), (50, 16), (6144, 3072)]:  # whole panels, a ragged last one, the real width
        layer = _layer(24, n, bias, panel)
        x = torch.randn(2, 9, 40, generator=g)[..., 3:27]  # a strided 3-D input, as a split projection gives
        with torch.inference_mode(), GemmCalls() as calls:
            out = layer(x)
        expected = "addmm.out" if bias else "mm.out"
        assert calls.calls == [expected] * -(-n // panel)
        assert out.shape == (2, 9, n) and out.is_contiguous()
        torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-6)


def test_autograd_bf16_and_narrow_layers_take_f_linear():
    layer = _layer(24, 64, True, 16)
    x = torch.randn(5, 24)
    with GemmCalls() as calls:  # grad mode with trainable weights: one ordinary GEMM, gradients flow
        layer(x).sum().backward()
    assert calls.calls[0] == "addmm.default" and layer.weight.grad is not None
    frozen = _layer(24, 64, True, 16).requires_grad_(False)
    frozen.bias.requires_grad_(True)  # the bias alone trains: autograd needs the ordinary GEMM too
    frozen(x).sum().backward()
    assert torch.equal(frozen.bias.grad, torch.full((64,), 5.0))
    with torch.no_grad(), GemmCalls() as calls:
        layer.to(torch.bfloat16)(x.bfloat16())  # bf16: measured only in fp32, so left to F.linear
        _layer(24, 31, True, 16)(x)  # under two panels wide: nothing to gain
    assert calls.calls == ["addmm.default", "addmm.default"]


def test_compiled_blocks_get_the_one_gemm(monkeypatch):
    layer = _layer(24, 64, True, 16)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # what dynamo reports while it traces
    with torch.no_grad(), GemmCalls() as calls:
        layer(torch.randn(5, 24))
    assert calls.calls == ["addmm.default"]


def _wide_names(model: nn.Module) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, WideLinear))


def test_each_family_makes_its_wide_projections_wide_linears():
    flux, flux2, mmdit = Flux(FLUX_CONFIGS["tiny"]), Flux2(FLUX2_CONFIGS["tiny"]), MMDiT(MMDIT_CONFIGS["tiny"])
    assert _wide_names(flux.double_blocks[0]) == ["img_attn.qkv", "img_mlp.0", "txt_attn.qkv", "txt_mlp.0"]
    assert _wide_names(flux.single_blocks[0]) == ["linear1"]
    assert _wide_names(flux2.double_blocks[0]) == ["img_attn.qkv", "img_mlp.0", "txt_attn.qkv", "txt_mlp.0"]
    assert _wide_names(flux2.single_blocks[0]) == ["linear1"]
    assert _wide_names(mmdit.joint_blocks[0]) == ["context_block.attn.qkv", "context_block.mlp.fc1",
                                                 "x_block.attn.qkv", "x_block.attn2.qkv", "x_block.mlp.fc1"]
    assert not any(isinstance(m, WideLinear) for m in (flux.img_in, flux.final_layer.linear, flux2.txt_in))
    quantize_linears_(flux2)  # fp8 storage takes them as it takes nn.Linear
    assert not _wide_names(flux2.double_blocks) and isinstance(flux2.single_blocks[0].linear1, Float8Linear)


@torch.inference_mode()
def test_flux_and_flux2_forwards_are_unchanged_by_the_panels(monkeypatch):
    """The tiny models are far narrower than a panel; with a 16-column panel every wide projection splits."""
    torch.manual_seed(0)
    flux, flux2 = Flux(FLUX_CONFIGS["tiny"]).eval(), Flux2(FLUX2_CONFIGS["tiny"]).eval()
    a, b = tiny_inputs(), flux2_inputs(False)
    runs = [lambda: flux(a["img"], a["img_ids"], a["txt"], a["txt_ids"], a["timesteps"], a["y"], a["guidance"]),
            lambda: flux2(b["img"], b["img_ids"], b["txt"], b["txt_ids"], b["timesteps"])]
    whole = [run() for run in runs]
    monkeypatch.setattr(WideLinear, "PANEL", 16)
    with GemmCalls() as calls:
        panels = [run() for run in runs]
    assert calls.calls.count("addmm.out") > 0 and calls.calls.count("mm.out") > 0  # FLUX.1 has biases, FLUX.2 not
    for p, w in zip(panels, whole):
        torch.testing.assert_close(p, w, rtol=1e-5, atol=1e-6)
