"""Ctrl-C and SIGTERM during training (distill/run_outputs.StopSignals, Trainer._loop): the run stops after the
step with a checkpoint, every process at the same step, and `--resume` then ends where an uninterrupted run
does; a second signal stops at once."""

from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_data import make_cache
from test_trainer import assert_same, config, state, trainer

import distill.train
from distill.checkpoint import checkpoints
from distill.run_outputs import StopSignals
from distill.trainer import Stopped


@pytest.fixture(autouse=True)
def usual_handlers():
    """Python's own dispositions, whatever started pytest: a shell's background job without job control starts
    with SIGINT ignored, and the trainer rightly restores what it found (a second signal then does nothing)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def signal_at(step: int, signum: int = signal.SIGINT, times: int = 1):
    def hook(s):
        if s == step:
            for _ in range(times):
                os.kill(os.getpid(), signum)

    return hook


def test_ctrl_c_stops_after_a_step_with_a_checkpoint_and_resume_equals_the_uninterrupted_run(tmp_path):
    cfg = config(tmp_path, "stopped", steps=6, checkpoint_every=0)
    with pytest.raises(Stopped, match="SIGINT at step 4: checkpoint .*step-000004 written") as e:
        # the signal comes after step 3 agreed its stop flag, so step 4 is the first to see it
        trainer(tmp_path, cfg, on_step=signal_at(3)).run()
    assert e.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert [p.name for p in checkpoints(tmp_path / "stopped" / "checkpoints")] == ["step-000004"]
    resumed = trainer(tmp_path, config(tmp_path, "stopped", steps=6, checkpoint_every=0, resume=True))
    resumed.run()
    whole = trainer(tmp_path, config(tmp_path, "whole", steps=6, checkpoint_every=0))
    whole.run()
    assert_same(state(resumed), state(whole))


def test_a_second_signal_stops_at_once_and_a_signal_in_the_last_step_lets_the_run_finish(tmp_path, monkeypatch):
    # two at once are one request (torchrun passes on the terminal's Ctrl-C to workers that got it too)
    with pytest.raises(Stopped, match="SIGINT at step 3"):
        trainer(tmp_path, config(tmp_path, "burst", checkpoint_every=0), on_step=signal_at(2, times=2)).run()
    monkeypatch.setattr(StopSignals, "REPEAT", 0.0)  # as if the second came later
    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path, config(tmp_path, "twice", checkpoint_every=0), on_step=signal_at(2, times=2)).run()
    assert checkpoints(tmp_path / "twice" / "checkpoints") == []  # stopped at once, as without us
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    t = trainer(tmp_path, config(tmp_path, "last", steps=3, checkpoint_every=0), on_step=signal_at(2))
    t.run()  # step 3 sees the signal, but it is the last one: the run is complete
    assert t.progress.step == 3 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_cli_exits_with_the_signals_code_and_one_line(tmp_path, monkeypatch, capsys):
    make_cache(tmp_path)
    real_step = distill.train.Trainer.step

    def step_then_term(self):
        metrics = real_step(self)
        if metrics["step"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    monkeypatch.setattr(distill.train.Trainer, "step", step_then_term)
    args = ["--model", "tiny", "--cache", str(tmp_path / "cache"), "--output", str(tmp_path / "cli"), "--dtype",
            "fp32", "--device", "cpu", "--rank", "4", "--batch_size", "2", "--steps", "4", "--t5_length", "5"]
    assert distill.train.main(args) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("stopped: SIGTERM at step 2: checkpoint") and "--resume" in err[-1]
    assert not (tmp_path / "cli" / "scfm-lora-live.safetensors").exists()  # the run is not finished
    assert distill.train.main([*args, "--resume"]) == 0
    assert (tmp_path / "cli" / "scfm-lora-live.safetensors").exists()


def _worker(rank: int, tmp_path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=rank, world_size=2)
    cfg = config(tmp_path, "ddp", steps=6, batch_size=4, checkpoint_every=0)
    try:  # only rank 1 is signalled (a scheduler preempting one node): both must stop after the same step
        trainer(tmp_path, cfg, on_step=signal_at(1, signal.SIGTERM) if rank == 1 else None).run()
        outcome = "finished"
    except Stopped as e:
        outcome = str(e)
    finally:
        dist.destroy_process_group()
    (tmp_path / f"rank{rank}.txt").write_text(outcome)


def test_a_signal_to_one_process_stops_every_process_after_the_same_step(tmp_path):
    make_cache(tmp_path, images=[((512, 512), f"prompt {i}") for i in range(4)], pool=64)
    mp.start_processes(_worker, args=(tmp_path,), nprocs=2, join=True, start_method="fork")
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert outcomes[0] == outcomes[1] and outcomes[0].startswith("SIGTERM at step 2: checkpoint"), outcomes
    assert [p.name for p in checkpoints(tmp_path / "ddp" / "checkpoints")] == ["step-000002"]
