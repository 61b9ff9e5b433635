"""Block swapping (model/block_swap.py): the same bits as the whole model on the device, every frozen tensor of a
swapped block brought for its call, at most two blocks' copies alive, and the copies fetched ahead of use."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from conftest import randomize_
from flux_fixtures import tiny_config, tiny_inputs
from mmdit_fixtures import tiny_inputs as sd3_inputs

from distill.lora import SD3_TARGETS, LoRAConfig, inject_lora, lora_layers, weight_sets
from model.block_swap import BlockSwap
from model.flux import Flux
from model.fp8 import quantize_linears_
from model.layers import named_blocks
from model.mmdit import MMDIT_CONFIGS, MMDiT

FLUX_ARGS = ("img", "img_ids", "txt", "txt_ids", "timesteps", "y", "guidance")
# on a GPU the same tests run the real thing: page-locked buffers, copies on a side stream, events
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def flux_with_lora(fp8: bool = False) -> Flux:
    model = randomize_(Flux(tiny_config()), 0.1)
    if fp8:
        quantize_linears_(model)
    inject_lora(model, LoRAConfig(rank=2, sets=("live", "fast_ema", "slow_ema", "teacher"), zero_sets=()),
                torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # four different sets, so a set that went missing in a swapped block shows
        for layer in lora_layers(model).values():
            for t in (*layer.lora_down.values(), *layer.lora_up.values()):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model.enable_gradient_checkpointing(True)


def flux_step(model: Flux, device: str = DEVICE) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training-like call: per-element sets, checkpointed forward, backward; output and live gradients."""
    inp = tiny_inputs()
    args = [None if inp[k] is None else inp[k].to(device) for k in FLUX_ARGS]
    model.zero_grad(set_to_none=True)
    with weight_sets(model, ["live", "teacher"]):  # backward inside: the recomputation selects the same sets
        out = model(*args)
        (out.float() ** 2).sum().backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
def test_flux_forward_and_gradients_are_bit_for_bit_those_of_the_unswapped_model(fp8):
    swapped = flux_with_lora(fp8)  # built on the CPU, as the loaders leave a model to be swapped
    whole = copy.deepcopy(swapped).to(DEVICE)
    swap = BlockSwap(swapped, 3, DEVICE)
    want_out, want_grads = flux_step(whole)
    got_out, got_grads = flux_step(swapped)
    assert torch.equal(got_out, want_out)
    assert want_grads.keys() == got_grads.keys() and len(want_grads) > 0
    for k, g in want_grads.items():
        assert torch.equal(got_grads[k], g), k
    with torch.no_grad():  # a no-grad pass (the SCFM jumps) too
        args = [None if v is None else v.to(DEVICE) for v in map(tiny_inputs().get, FLUX_ARGS)]
        assert torch.equal(swapped(*args), whole(*args))
    assert swap.copies > 0 and swap.prefetched == swap.copies + 1  # +1: the last block serves its recomputation
    assert all(flat.is_pinned() == (DEVICE == "cuda") for flat in swap.flat.values())
    if fp8:  # the e4m3 weight and its scale buffer both wait in host memory
        assert swap.host[3]["linear1.weight"].dtype == torch.float8_e4m3fn
        assert swap.host[3]["linear1.weight_scale"].is_cpu


def test_sd3_with_skipped_layers_is_bit_for_bit_the_unswapped_model():
    whole = randomize_(MMDiT(MMDIT_CONFIGS["tiny"]), 0.1)
    inject_lora(whole, LoRAConfig(rank=2, targets=SD3_TARGETS), torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in lora_layers(whole).values():
            layer.lora_up["live"].normal_(0, 0.1)
    whole.enable_gradient_checkpointing(True)
    swapped = copy.deepcopy(whole)
    whole.to(DEVICE)
    BlockSwap(swapped, 2, DEVICE)
    inp = {k: v.to(DEVICE) for k, v in sd3_inputs(MMDIT_CONFIGS["tiny"]).items()}
    for skip in (None, [1]):
        outs = []
        for model in (whole, swapped):
            model.zero_grad(set_to_none=True)
            with weight_sets(model, ["live", "fast_ema"]):
                out = model(inp["x"], inp["timesteps"], inp["y"], inp["context"], skip_layers=skip)
                out.square().sum().backward()
            outs.append((out, [p.grad for p in model.parameters() if p.requires_grad]))
        (a, ga), (b, gb) = outs
        assert torch.equal(a, b) and sum(g is not None for g in ga) > 0
        assert all(x is y is None or torch.equal(x, y) for x, y in zip(ga, gb, strict=True))


def test_every_frozen_tensor_of_a_swapped_block_is_brought_for_its_call():
    """On "meta" the host tensors cannot take part in a computation, so a forward and backward that run at all
    show that each swapped block's frozen tensors came as copies, and its LoRA sets were on the device."""
    model = flux_with_lora(fp8=True)
    swap = BlockSwap(model, 3, "meta")
    names = {f"{block}.{k}" for i, (block, _) in enumerate(named_blocks(model)) if i in swap.host
             for k in swap.host[i]}
    assert any(k.endswith("weight_scale") for k in names) and any(k.endswith("norm.key_norm.scale") for k in names)
    held = {n: t.device.type for n, t in [*model.named_parameters(), *model.named_buffers()]}
    assert {n for n, d in held.items() if d == "cpu"} == names == set(model._ddp_params_and_buffers_to_ignore)
    assert all(held[n] == "meta" for n in held if "lora_" in n)
    out, grads = flux_step(model, "meta")
    assert out.device.type == "meta" and any("double_blocks.1" in k for k in grads)


def test_at_most_two_copies_are_alive_and_each_arrives_before_its_block_runs():
    model = flux_with_lora()
    swap = BlockSwap(model, 3, DEVICE)
    alive, peak = set(), [0]
    make = swap._copy

    def tracked(i):
        """A copy is alive while any of its views is (they share one allocation)."""
        tensors = make(i)
        key, views = object(), [len(tensors)]
        alive.add(key)
        peak[0] = max(peak[0], len(alive))

        def gone():
            views[0] -= 1
            if not views[0]:
                alive.discard(key)

        for t in tensors.values():
            weakref.finalize(t, gone)
        return tensors

    swap._copy = tracked
    flux_step(model)
    # 3 swapped blocks run forward and are recomputed (the last one's copy serves both); every use was prefetched;
    # block 0's recomputation, the last of backward, fetches block 1 for the next forward pass
    assert swap.copies == 6 and swap.prefetched == 6 and swap.late == 0
    assert peak[0] <= 2 and len(alive) == 1
    with torch.no_grad():  # an SCFM jump: no recomputation to come, so the last block's copy is not kept
        model(*[None if v is None else v.to(DEVICE) for v in map(tiny_inputs().get, FLUX_ARGS)])
    assert swap.copies == 8 and swap.prefetched == 9 and not alive


def test_block_counts_outside_the_range_are_refused():
    model = randomize_(Flux(tiny_config()), 0.1)
    for n in (0, 4):
        with pytest.raises(ValueError, match="between 1 and 3"):
            BlockSwap(model, n, "cpu")


def test_host_buffers_are_one_aligned_allocation_per_block_and_page_locked_at_their_exact_size(monkeypatch):
    import gc

    from model import block_swap

    model = flux_with_lora(fp8=True)
    swap = BlockSwap(model, 2, "cpu")
    layer = model.single_blocks[1].linear1  # the last block: swapped
    flat = swap.flat[3]
    for t in swap.host[3].values():
        assert t.untyped_storage().data_ptr() == flat.data_ptr()
        assert (t.data_ptr() - flat.data_ptr()) % block_swap.ALIGN == 0
    assert layer.weight.untyped_storage().data_ptr() == flat.data_ptr()  # the module holds the views themselves
    assert flat.numel() < sum(t.nbytes for t in swap.host[3].values()) + block_swap.ALIGN * len(swap.host[3])

    calls = []

    class FakeCudart:  # cudaHostRegister's bookkeeping, without a GPU
        def cudaHostRegister(self, ptr, size, flags):
            calls.append(("register", ptr, size))
            return 0 if len(calls) == 1 else 2  # the second buffer fails: a warning, not an error

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr, None))
            return 0

    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart())

    class Owner:
        pass

    owner, flats = Owner(), [swap.flat[2], swap.flat[3]]
    with pytest.warns(UserWarning, match="could not page-lock 1 of 2"):
        block_swap._pin(owner, flats)
    assert calls == [("register", f.data_ptr(), f.numel()) for f in flats]
    del owner
    gc.collect()
    assert calls[2:] == [("unregister", flats[0].data_ptr(), None)]  # only what was registered, when it goes
