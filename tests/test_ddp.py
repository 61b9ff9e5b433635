"""Data-parallel training (gloo on CPU): 2 processes equal 1 process with the same global batch, including a
NaN step that only one rank sees (both must skip it); the same with every set sharded (--fsdp), through a kill,
a gathered checkpoint and a resume, and for SD3.5 with CFG and EMA restarts.

Both runs use micro-batches of 2, so each gradient is the same two halves summed once: the runs agree to the
bit. (Without that, one batch of 4 against two of 2 differs by fp32 summation order, ~1e-6 relative in the
gradients, which Adam's per-entry normalisation turns into up to ~1e-5 in entries whose gradient is ~0.)
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_data import make_cache
from test_trainer import Kill, assert_same, config, kill_at, state, tiny_model

from distill.data import Cache
from distill.trainer import Trainer

STEPS, POISONED, KILL = 3, 2, 2  # step 2 has a NaN student prediction on the last rank only
RUN = dict(steps=STEPS, batch_size=4, micro_batch=2, checkpoint_every=0)


def run(tmp_path, cfg, rank: int, world: int) -> dict[str, torch.Tensor]:
    t = Trainer(cfg, tiny_model(), Cache(tmp_path / "cache"), device="cpu",
                on_step=kill_at(KILL) if cfg.output.endswith("killed") else None)
    real = t.velocity

    def velocity(x, sigma, cond, guidance):
        v = real(x, sigma, cond, guidance)
        poison = torch.is_grad_enabled() and t.progress.step + 1 == POISONED and rank == world - 1
        return v * float("nan") if poison else v

    t.velocity = velocity
    t.run()
    assert t.progress.updates == STEPS - 1 and t.sharded == (cfg.fsdp and world > 1)
    return state(t)


def _worker(rank: int, tmp_path, world: int, name: str = "ddp", extra: dict | None = None) -> None:
    torch.set_num_threads(1)
    store = tmp_path / f"store-{name}{'-resumed' if (extra or {}).get('resume') else ''}"  # one per launch
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = run(tmp_path, config(tmp_path, name, **{**RUN, **(extra or {})}), rank, world)
        torch.save(result, tmp_path / f"{name}-rank{rank}.pt")
    except Kill:
        pass
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:step 2")
def test_two_processes_equal_one(tmp_path):
    # four 512-px images in one bucket, 16 tokens each: the smallest case that still splits 2 + 2
    make_cache(tmp_path, images=[((512, 512), f"prompt {i}") for i in range(4)], pool=64)
    # fork: the children inherit the imported modules instead of importing torch again (seconds each)
    mp.start_processes(_worker, args=(tmp_path, 2), nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"ddp-rank{r}.pt") for r in range(2)]
    single = run(tmp_path, config(tmp_path, "single", **RUN), 0, 1)
    assert_same(ranks[0], ranks[1], atol=0.0)  # live, both EMAs, optimizer state: the same on every rank
    assert_same(ranks[0], single, atol=0.0)  # bitwise


@pytest.mark.filterwarnings("ignore:step 2")
def test_sharded_processes_equal_one_and_resume_from_a_gathered_checkpoint(tmp_path):
    """--fsdp: every set and Adam moment is sharded over 2 processes. Killed after the step-2 checkpoint (written
    whole by rank 0) and resumed, the run ends where one unsharded process does, clipping active throughout."""
    make_cache(tmp_path, images=[((512, 512), f"prompt {i}") for i in range(4)], pool=64)
    sharded = dict(fsdp=True, checkpoint_every=2, max_grad_norm=0.05)
    for name, extra in (("killed", sharded), ("killed", {**sharded, "resume": True})):
        mp.start_processes(_worker, args=(tmp_path, 2, name, extra), nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"killed-rank{r}.pt") for r in range(2)]
    single = run(tmp_path, config(tmp_path, "single", **RUN, max_grad_norm=0.05), 0, 1)
    assert_same(ranks[0], ranks[1], atol=0.0)  # gathered: the same whole tensors on every process
    assert_same(ranks[0], single, atol=1e-6)


def _sd3_worker(rank: int, tmp_path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store-sd3'}", rank=rank, world_size=2)
    try:
        torch.save(_sd3_run(tmp_path, sharded=True), tmp_path / f"sd3-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _sd3_run(tmp_path, sharded: bool, micro_batch: int = 2) -> dict[str, torch.Tensor]:
    from test_sd3_scfm import TINY
    from test_sd3_scfm import config as sd3_config

    from model.mmdit import MMDiT

    torch.manual_seed(0)
    cfg = sd3_config(tmp_path, ema_restart_every=2, steps=4, sample_every=4, micro_batch=micro_batch,
                     fsdp=sharded, output=str(tmp_path / f"{'sharded' if sharded else 'single'}-{micro_batch}"))
    t = Trainer(cfg, MMDiT(TINY), Cache(tmp_path / "cache"), device="cpu")
    t.run()
    return state(t)


def test_sharded_sd3_with_cfg_and_ema_restarts_equals_one_process(tmp_path):
    """SD3.5's conv LoRA, CFG on every call and EMA restarts (sharded set to sharded set) under --fsdp."""
    from test_sd3_scfm import sd3_cache

    sd3_cache(tmp_path)
    mp.start_processes(_sd3_worker, args=(tmp_path,), nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"sd3-rank{r}.pt") for r in range(2)]
    assert_same(ranks[0], ranks[1], atol=0.0)
    # The sharded gradient is reduced in another order than one process sums it (last bits), and Adam turns
    # that into more where an entry's gradient nearly cancels between steps (1e-8 after step 1, ~2e-6 after
    # step 4 on one machine). The yardstick is one process summing the same batch in another order (micro-
    # batches of 4, not 2): sharding may differ no more than that. A real fault (an unreduced or unscaled
    # gradient, a set mixed up) moves entries by about the learning rate, 3e-3.
    single = _sd3_run(tmp_path, sharded=False)
    reordered = max_diff(single, _sd3_run(tmp_path, sharded=False, micro_batch=4))
    assert 0 < reordered < 1e-4
    assert max_diff(ranks[0], single) <= reordered
    assert (tmp_path / "sharded-2" / "samples" / "step-000004.safetensors").exists()  # rank 0 wrote it


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _klein_run(tmp_path, name: str, fsdp: bool = False) -> dict[str, torch.Tensor]:
    from test_flux2_scfm import W, base_model

    cfg = config(tmp_path, name, **RUN, targets="flux2", cfg_scale=W, dynamic_shift_prob=0.5, fsdp=fsdp)
    t = Trainer(cfg, base_model(), Cache(tmp_path / "cache"), device="cpu")
    t.run()
    assert t.sharded == (fsdp and dist.is_initialized())
    return state(t)


def _klein_worker(rank: int, tmp_path, fsdp: bool) -> None:
    torch.set_num_threads(1)
    store = tmp_path / f"store-klein-{fsdp}"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.save(_klein_run(tmp_path, f"klein-{fsdp}", fsdp), tmp_path / f"klein-{fsdp}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_train_klein_with_cfg_as_one(tmp_path, fsdp):
    """FLUX.2 [klein] base with its CFG baked in (negative broadcast to each rank's elements) and its empirical
    dynamic shift: two processes end where one does, bit for bit (DDP); sharded, within the last bits of a sum
    reduced in another order (as the Flux and SD3.5 sharded tests above)."""
    from test_flux2_scfm import klein_cache

    klein_cache(tmp_path)
    mp.start_processes(_klein_worker, args=(tmp_path, fsdp), nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"klein-{fsdp}-rank{r}.pt") for r in range(2)]
    assert_same(ranks[0], ranks[1], atol=0.0)
    assert_same(ranks[0], _klein_run(tmp_path, "klein-single"), atol=1e-6 if fsdp else 0.0)
