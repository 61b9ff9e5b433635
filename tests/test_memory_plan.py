"""The `--unchecked_blocks auto` planner (distill/memory_plan.py): the live-bytes count it measures with, the choice,
the budget parser, and that a plan at FLUX.1-dev shapes is both safe and tight, counted on the meta device.

The plan tests run bench/scfm_step.py's SCFM step (`build`, `ours`): FLUX.1-dev widths in bf16, LoRA rank 64 with
the live / fast EMA / slow EMA sets, gradient checkpointing, batch 8 at 512 px (64x64 latents) with 256 text tokens,
and an AdamW step (its state made beforehand, as every step after a run's first holds it). A meta step of all 57
blocks takes several seconds on a CPU, so the plan is checked on 2 double + 4 single blocks of the same widths
(each block's activations are as at full size; only the number of blocks and the weights they hold shrink) at two
budgets and with every block unchecked, and once at full depth, for 40 GB.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from distill.lora import weight_set
from distill.memory_plan import (
    LiveBytes,
    block_saved_bytes,
    choose_unchecked,
    default_max_memory,
    held_bytes,
    parse_memory,
    plan_unchecked,
    step_peak,
)
from model.flux import FluxConfig
from model.layers import named_blocks
from sampling.velocity import FluxVelocity

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import scfm_step  # bench/scfm_step.py: the benchmark's model and step

GB = 10**9
META = torch.device("meta")


# ----- LiveBytes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_live_bytes_counts_allocations_and_frees_not_views(device):
    outside = torch.zeros(250, device=device)  # 1000 bytes made before the mode: never counted
    with LiveBytes() as live:
        a = torch.empty(1000, device=device)  # 4000
        view = a[100:].view(30, 30)
        _ = outside.t(), outside.detach(), outside[:10]
        assert live.current == 4000
        b = a * 2  # 4000 more
        b.add_(1)  # in place: nothing new
        del a  # its storage lives on in `view`
        assert live.current == 8000
        del view  # now it dies
        assert live.current == 4000
        # the peak: b, its fp64 copy and their product (4000 + 2 x 8000); the copy dies before the sum is made
        s = (b.double() * 3).sum()
        assert live.current == 4008
        d = outside + 1  # 1000
        assert (live.current, live.peak) == (5008, 20000)
        del b
        assert live.current == 1008
    del s, d
    assert live.current == 0


def test_live_bytes_sees_backward():
    w = torch.randn(64, 64, requires_grad=True)
    with LiveBytes() as live:
        y = torch.randn(32, 64)  # 8192
        h = (y @ w).relu()  # 8192, saved for backward
        h.sum().backward()  # the gradient of w (16384) stays; h, the graph and the temporaries go with the loss
        del h
        assert live.current == 8192 + 16384
        assert live.peak > live.current
    assert w.grad.shape == (64, 64)


# ----- the choice and the budget ----------------------------------------------------------------------------


def test_choose_unchecked():
    assert choose_unchecked(10, [3, 3, 3], 9) == 0  # even the checkpointed step does not fit
    assert choose_unchecked(10, [3, 3, 3], 10) == 0
    assert choose_unchecked(10, [3, 3, 3], 15) == 1
    assert choose_unchecked(10, [3, 3, 3], 16) == 2  # equal to the budget fits
    assert choose_unchecked(10, [3, 3, 3], 100) == 3  # capped at the block count
    assert choose_unchecked(10, [], 100) == 0
    assert choose_unchecked(10, [0, 0, 5, 0], 14) == 2  # the first n blocks: a later small one does not jump
    assert choose_unchecked(10, [0, 0, 5, 0], 15) == 4


@pytest.mark.parametrize("text, want", [
    ("40GB", 40 * 10**9), ("40GiB", 40 * 2**30), ("38.5G", int(38.5 * 2**30)), ("40000MB", 40 * 10**9),
    ("1234567", 1234567), ("40 gb", 40 * 10**9), ("512MiB", 2**29), ("1.5TB", 15 * 10**11), (".5G", 2**29),
    ("0", 0),
])
def test_parse_memory(text, want):
    assert parse_memory(text) == want


@pytest.mark.parametrize("text", ["", "forty GB", "40 GBs", "-1GB", "40XB", "1e9", "40GB 2", "GB"])
def test_parse_memory_refuses_in_one_line(text):
    with pytest.raises(ValueError) as e:
        parse_memory(text)
    assert "\n" not in str(e.value) and "40GB" in str(e.value) and repr(text) in str(e.value)


def test_default_max_memory_needs_cuda():
    for device in ("cpu", "meta"):
        with pytest.raises(ValueError, match="--max_memory must be given"):
            default_max_memory(device)


def test_default_max_memory_counts_what_the_process_holds_already(monkeypatch):
    """The plan compares the budget with a peak that includes the loaded model: 90% of the free memory alone
    (the model already loaded) counted the model twice, on an 80 GB card with Flux-dev some 48 GB, not 72."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (50 * 10**9, 80 * 10**9))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 25 * 10**9)
    assert default_max_memory("cuda") == int(0.9 * 75 * 10**9)


def test_the_plan_probes_the_largest_bucket():
    from distill.speed import largest_bucket_batch

    buckets = [(640, 384), (512, 512), (384, 640), (512, 512), (640, 384)]
    assert largest_bucket_batch(buckets, [0, 4, 0]) == [1, 3, 1]  # 512x512 holds 6% more tokens than 640x384
    assert largest_bucket_batch([(448, 576), (576, 448)], [0, 0]) == [1, 1]  # a tie: one bucket, never mixed


# ----- the plan at FLUX.1-dev shapes, on meta -------------------------------------------------------------------


def _build(config: FluxConfig):
    """scfm_step.build with `config` in its flux-dev case (the same shapes, batch, rank and sets)."""
    name = f"test-{config.depth}-{config.depth_single_blocks}"
    family, _, *shapes = scfm_step.CASES["flux-dev"]
    scfm_step.CASES[name] = (family, config, *shapes)
    try:
        model, x0, cond, _ = scfm_step.build(name, META, torch.bfloat16, ("live", "fast_ema", "slow_ema"))
    finally:
        del scfm_step.CASES[name]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    # the optimiser state a run holds at every step after the first, made without a step
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)

    def step():
        scfm_step.ours(model, x0, cond, opt, 1)

    def forward():  # the student's call inside the step
        b = x0.shape[0]
        with weight_set(model, "live"):
            FluxVelocity(model)(x0, torch.full((b,), 0.5, device=META), cond, torch.full((b,), 3.5, device=META))

    return model, step, forward


def _peak(model, step, n: int) -> int:
    model.enable_gradient_checkpointing(True, n)
    try:
        return step_peak(model, step, META)
    finally:
        model.enable_gradient_checkpointing(True, 0)


def _stray() -> int:
    """Meta bytes alive before a test builds its model (other tests' leftovers): a step's count includes them,
    as a shared GPU's allocator would, so the budgets are on top of them."""
    return held_bytes(nn.Module(), META)


@pytest.fixture
def short_flux():
    # one test's, not the module's: a later test's steps would count it
    return _stray(), *_build(FluxConfig(depth=2, depth_single_blocks=4))


def test_block_saved_bytes_keeps_nothing_and_restores_checkpointing(short_flux):
    _, model, _, forward = short_flux
    model.enable_gradient_checkpointing(True, 1)
    with LiveBytes() as live:
        per_block = block_saved_bytes(model, forward)
    assert (model.gradient_checkpointing, model.unchecked_blocks) == (True, 1)
    # a double block of FLUX.1-dev keeps ~2.9 GB, a single one ~2.8 GB (eager, math attention), together ~17 GB;
    # measuring them held no more than about one block's worth at a time
    assert all(2.5 * GB < b < 3.5 * GB for b in per_block) and len(per_block) == 6
    assert live.peak < 4 * GB and live.current < 0.1 * GB

    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        block_saved_bytes(model, broken)
    assert (model.gradient_checkpointing, model.unchecked_blocks) == (True, 1)
    with pytest.raises(ValueError, match="ran 0 of the 6 blocks with gradients"):
        block_saved_bytes(model, torch.no_grad()(forward))
    assert (model.gradient_checkpointing, model.unchecked_blocks) == (True, 1)
    assert not any(b._forward_hooks or b._forward_pre_hooks for _, b in named_blocks(model))


def test_plan_is_safe_and_tight(short_flux):
    """For budgets between the fully checkpointed peak and all blocks unchecked, the planned n keeps the measured
    peak under the budget and n + 1 would not; the prediction is the measured peak itself."""
    stray, model, step, forward = short_flux
    planned, figures = plan_unchecked(model, step, forward, stray + 12 * GB, META)
    base, per_block = figures["base_peak"], figures["per_block"]
    assert model.unchecked_blocks == 0  # planning changed no setting
    assert figures["predicted_peak"] == base + sum(per_block[:planned])
    for budget in (stray + 12 * GB, stray + 18 * GB):
        n = choose_unchecked(base, per_block, budget)
        assert 0 < n < len(per_block), (budget, base, per_block)  # the budgets exercise a real choice
        assert _peak(model, step, n) == base + sum(per_block[:n]) <= budget
        assert _peak(model, step, n + 1) == base + sum(per_block[:n + 1]) > budget
    # every block unchecked: the last block's recomputation is gone too, so one block lower than the sum (safe)
    assert _peak(model, step, len(per_block)) == base + sum(per_block[:-1])


def _full_depth_peak_elsewhere(n: int) -> subprocess.Popen:
    """A second process (the machine's other core) that builds the full-depth model and prints its step's peak with
    the first n blocks unchecked: the same step as here, counted with nothing stray (this process adds its own)."""
    return subprocess.Popen([sys.executable, __file__, str(n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_plan_at_full_depth_under_40gb():
    """All 57 blocks at 40 GB: the fully checkpointed step (28 GB of weights and LoRA sets, 2.8 GB of AdamW state)
    peaks just under 40 GB in meta's eager count, so no block fits, and one would go over (that step is measured
    in a second process while this one plans)."""
    stray = _stray()
    budget = stray + 40 * GB
    one_unchecked = _full_depth_peak_elsewhere(1)
    try:
        model, step, forward = _build(scfm_step.CASES["flux-dev"][1])
        n, figures = plan_unchecked(model, step, forward, budget, META)
        out, err = one_unchecked.communicate(timeout=600)
    finally:
        one_unchecked.kill()
    base, per_block = figures["base_peak"], figures["per_block"]
    assert len(per_block) == 57 and figures["predicted_peak"] == base + sum(per_block[:n]) <= budget
    assert n == 0 and one_unchecked.returncode == 0, (n, err[-2000:])
    assert stray + int(out.splitlines()[-1]) == base + sum(per_block[:n + 1]) > budget


if __name__ == "__main__":  # python tests/test_memory_plan.py N: what _full_depth_peak_elsewhere runs
    torch.set_num_threads(1)  # as tests/conftest.py sets it
    model, step, _ = _build(scfm_step.CASES["flux-dev"][1])
    print(_peak(model, step, int(sys.argv[1])))
