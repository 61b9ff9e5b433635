"""Data-parallel training (gloo on CPU): 2 processes equal 1 process with the same global batch, including a
NaN step that only one rank sees (both must skip it).

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
from test_trainer import assert_same, config, state, tiny_model

from distill.data import Cache
from distill.trainer import Trainer

STEPS, POISONED = 3, 2  # step 2 has a NaN student prediction on the last rank only
RUN = dict(steps=STEPS, batch_size=4, micro_batch=2, checkpoint_every=0)


def run(tmp_path, cfg, rank: int, world: int) -> dict[str, torch.Tensor]:
    t = Trainer(cfg, tiny_model(), Cache(tmp_path / "cache"), device="cpu")
    real = t.velocity

    def velocity(x, sigma, cond, guidance):
        v = real(x, sigma, cond, guidance)
        poison = torch.is_grad_enabled() and t.progress.step + 1 == POISONED and rank == world - 1
        return v * float("nan") if poison else v

    t.velocity = velocity
    t.run()
    assert t.progress.updates == STEPS - 1
    return state(t)


def _worker(rank: int, tmp_path, world: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=rank, world_size=world)
    try:
        result = run(tmp_path, config(tmp_path, "ddp", **RUN), rank, world)
        torch.save(result, tmp_path / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:step 2")
def test_two_processes_equal_one(tmp_path):
    # four 512-px images in one bucket, 16 tokens each: the smallest case that still splits 2 + 2
    make_cache(tmp_path, images=[((512, 512), f"prompt {i}") for i in range(4)], pool=64)
    # fork: the children inherit the imported modules instead of importing torch again (seconds each)
    mp.start_processes(_worker, args=(tmp_path, 2), nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = run(tmp_path, config(tmp_path, "single", **RUN), 0, 1)
    assert_same(ranks[0], ranks[1], atol=0.0)  # live, both EMAs, optimizer state: the same on every rank
    assert_same(ranks[0], single, atol=0.0)  # bitwise
