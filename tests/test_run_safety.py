"""A training run's files survive what goes wrong around it (issue 21): a diverged run writes no NaN checkpoint or
LoRA, a run whose checkpoints are all damaged is not silently restarted over them, a torn log line or a full disk
costs nothing, an unwritable output is refused before anything loads, a killed write's temp folder is cleaned
only once its process is gone, and a teacher LoRA loads from every layout we write. Each error is one line."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from test_data import make_cache
from test_trainer import Kill, config, kill_at, state, trainer

import distill.export
import distill.train
from distill import checkpoint as ckpt
from distill.config import ConfigError
from distill.lora import lora_layers
from distill.lora_export import export_lora
from distill.run_outputs import JsonlLog, StopSignals
from distill.trainer import Trainer, TrainingError
from model.mmdit import MMDIT_CONFIGS, MMDiT
from weights.atomic import temp_beside
from weights.io import WeightsError, file_sha256
from weights.lora import LoRAPart, ModuleLoRA


def files(folder) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: what an error path must leave as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(message: str) -> str:
    assert "\n" not in message.strip() and "Traceback" not in message, message
    return message


def poison_at(t_holder: list, step: int):
    """An on_step hook: after `step`, the live set's first tensor turns NaN, as an update with a huge lr does."""
    def hook(s):
        if s == step:
            layer = next(iter(lora_layers(t_holder[0].model).values()))
            with torch.no_grad():
                layer.lora_up["live"].fill_(float("nan"))
    return hook


# ----- #1 a diverged run: no NaN checkpoint, no NaN export ---------------------------------------------------


def test_a_diverged_run_writes_no_checkpoint_and_keeps_the_last_good_one(tmp_path):
    holder = []
    t = trainer(tmp_path, config(tmp_path, steps=6, checkpoint_every=2), on_step=poison_at(holder, 3))
    holder.append(t)
    root = tmp_path / "run" / "checkpoints"
    with pytest.raises(TrainingError) as e, pytest.warns(UserWarning, match="step 4: .* step skipped"):
        t.run()  # step 4 is NaN and skipped; then its checkpoint is refused
    first = next(iter(lora_layers(t.model)))
    one_line(str(e.value))
    assert f"step 4: LoRA set 'live' (first bad tensor {first}.lora_up) holds NaN/inf" in str(e.value)
    assert f"{root / 'step-000002'} is kept: lower --lr, then --resume" in str(e.value)
    assert [p.name for p in ckpt.checkpoints(root)] == ["step-000002"]
    tensors, _ = ckpt.read_checkpoint(root / "step-000002")
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
    assert not list(root.glob(".step-*"))


def test_a_nan_set_is_never_exported_by_the_run_or_from_a_checkpoint(tmp_path, capsys):
    cfg = config(tmp_path, steps=2, checkpoint_every=0, export_formats=("ours", "diffusers"))
    t = trainer(tmp_path, cfg)
    t.run()
    layer = next(iter(lora_layers(t.model).values()))
    with torch.no_grad():
        layer.lora_down["live"][0, 0] = float("inf")
    with pytest.raises(WeightsError, match=r"LoRA set 'live' at the run's end holds NaN/inf \(first bad tensor "):
        export_lora(t.model, cfg)
    assert not list((tmp_path / "run").glob("*.safetensors"))
    # a checkpoint written before this check existed (or edited): distill.export refuses it too
    step = tmp_path / "run" / "checkpoints" / "step-000002"
    tensors = load_file(str(step / "tensors.safetensors"))
    key = next(k for k in tensors if k.startswith("lora.live."))
    tensors[key][0] = float("nan")
    save_file(tensors, str(step / "tensors.safetensors"))
    saved = json.loads((step / "state.json").read_text())
    (step / "state.json").write_text(json.dumps({**saved, "tensors_sha256": file_sha256(step / "tensors.safetensors")}))
    before = files(tmp_path / "run")
    capsys.readouterr()  # the run's progress bar
    assert distill.export.main([str(step)]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"error: LoRA set 'live' at step 2 holds NaN/inf (first bad tensor {key[len('lora.live.'):]})" in err
    assert "export an earlier checkpoint" in err
    assert files(tmp_path / "run") == before


# ----- #2 every checkpoint damaged: refuse, never start over on top of them ----------------------------------


def test_resume_refuses_when_every_checkpoint_is_damaged_and_changes_nothing(tmp_path, capsys):
    make_cache(tmp_path)
    run = tmp_path / "cli"
    args = ["--model", "tiny", "--cache", str(tmp_path / "cache"), "--output", str(run), "--dtype", "fp32",
            "--device", "cpu", "--rank", "4", "--batch_size", "2", "--steps", "4", "--checkpoint_every", "2",
            "--export_formats", "ours", "--t5_length", "5"]
    assert distill.train.main(args) == 0
    root = run / "checkpoints"
    with open(root / "step-000004" / "tensors.safetensors", "r+b") as f:
        f.truncate(100)  # a copy cut short
    (root / "step-000002" / "state.json").write_text("{")  # an editor's accident
    capsys.readouterr()
    before = files(run)
    assert distill.train.main([*args, "--steps", "6", "--resume"]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"error: {root}: every checkpoint is damaged (step-000004: tensors.safetensors does not "
                          "match its recorded sha256 (damaged); step-000002: state.json is damaged); --resume has "
                          f"nothing to continue from: to start over, pass a new --output or delete {root}"), err
    assert files(run) == before
    assert distill.export.main([str(run)]) == 2
    err = one_line(capsys.readouterr().err)
    assert "every checkpoint is damaged" in err and err.strip().endswith("nothing to export")
    assert files(run) == before


def test_two_runs_on_one_output_the_second_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path, capsys):
    """Two trainers on one --output interleaved their checkpoints (one from each seed) and their log rows: the
    second is refused in one line while the first holds the folder; a lock whose process is gone is taken over
    and the lock is gone after the run."""
    from weights.atomic import folder_lock

    make_cache(tmp_path)
    run = tmp_path / "cli"
    args = ["--model", "tiny", "--cache", str(tmp_path / "cache"), "--output", str(run), "--dtype", "fp32",
            "--device", "cpu", "--rank", "4", "--batch_size", "2", "--steps", "2", "--export_formats", "ours",
            "--t5_length", "5"]
    with folder_lock(run, "training run"):  # a run in progress, in this process
        assert distill.train.main(args) == 2
        err = one_line(capsys.readouterr().err)
        assert err.startswith(f"error: {run}: another training run is using it (process {os.getpid()} on this "
                              f"machine); wait for it to end, or choose another folder"), err
        assert sorted(p.name for p in run.iterdir()) == [".scfm.lock"]  # the refused run wrote nothing
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    writer = (run / ".scfm.lock")
    with folder_lock(run, "x"):
        mine = writer.read_text().split()[0]
    writer.write_text(f"{mine} {dead.pid}\n")  # what a killed run left
    assert distill.train.main(args) == 0
    assert not writer.exists() and (run / "checkpoints").is_dir()


# ----- #4 a teacher LoRA in every layout we write ------------------------------------------------------------


def test_a_teacher_lora_in_any_layout_gives_the_same_teacher(tmp_path):
    cfg = config(tmp_path, "src", steps=2, checkpoint_every=0, export_formats=("ours", "diffusers", "kohya"))
    src = trainer(tmp_path, cfg)
    src.run()
    paths = export_lora(src.model, cfg)
    want = {n: layer.delta_weight("live") for n, layer in lora_layers(src.model).items()}
    assert all(w.abs().max() > 0 for w in want.values())
    teachers = {}
    for path in paths:  # -scfm-only, the main (diffusers) file, -kohya
        t = trainer(tmp_path, config(tmp_path, "t", teacher_lora=str(path)))
        teachers[path.name] = {n: layer.delta_weight("teacher") for n, layer in lora_layers(t.model).items()}
        for ema in ("fast_ema", "slow_ema"):  # the EMAs start from the teacher
            assert all(torch.equal(layer.delta_weight(ema), teachers[path.name][n])
                       for n, layer in lora_layers(t.model).items())
    for name, got in teachers.items():
        for n, w in want.items():
            torch.testing.assert_close(got[n], w, rtol=1e-6, atol=1e-7 * w.abs().max().item(), msg=f"{name}: {n}")
    # ours at the run's own rank and alpha is bit-exact; a larger run rank zero-pads, a different alpha rescales
    assert all(torch.equal(teachers[paths[0].name][n], w) for n, w in want.items())
    wider = trainer(tmp_path, config(tmp_path, "t", rank=8, alpha=2.0, teacher_lora=str(paths[2])))
    for n, layer in lora_layers(wider.model).items():
        torch.testing.assert_close(layer.delta_weight("teacher"), want[n], rtol=1e-5,
                                   atol=1e-6 * want[n].abs().max().item())
    with pytest.raises(ConfigError, match=r"rank 4 is above this run's --rank 2; train with --rank 4 or more"):
        trainer(tmp_path, config(tmp_path, "t", rank=2, teacher_lora=str(paths[1])))
    with pytest.raises(ConfigError, match=r"a LoRA for Flux, this run trains SD3 / SD3\.5; pass a teacher LoRA"):
        Trainer(config(tmp_path, "t", model="tiny-sd3", targets="sd3", teacher_lora=str(paths[0])),
                MMDiT(MMDIT_CONFIGS["tiny"]), make_cache(tmp_path), device="cpu")
    with pytest.raises(ConfigError, match=r"^--teacher_lora: .*pickled"):
        bad = tmp_path / "teacher.pt"
        bad.write_bytes(b"\x80\x04junk")
        trainer(tmp_path, config(tmp_path, "t", teacher_lora=str(bad)))


def test_a_dense_lora_of_a_fused_layer_fills_each_slice(tmp_path):
    """kohya's dense qkv (one down for q, k and v) goes into every slice: the same down, the slice's up rows."""
    from distill.run_setup import _place_teacher

    t = trainer(tmp_path, config(tmp_path))
    name, layer = next((n, la) for n, la in lora_layers(t.model).items() if len(la.slices) == 3)
    out, width = sum(layer.slices), layer.lora_down["live"].shape[1]
    g = torch.Generator().manual_seed(0)
    part = LoRAPart(torch.randn(3, width, generator=g), torch.randn(out, 3, generator=g), alpha=1.5)
    dense = ModuleLoRA([part], (out,))
    down, up = torch.zeros(layer.lora_down["live"].shape), torch.zeros(layer.lora_up["live"].shape)
    _place_teacher(dense, layer, down, up, name)
    from distill.lora import load_set

    load_set(t.model, "teacher", {f"{n}.lora_{p}": (down if p == "down" else up) if n == name else
                                  torch.zeros(getattr(la, f"lora_{p}")["live"].shape)
                                  for n, la in lora_layers(t.model).items() for p in ("down", "up")})
    torch.testing.assert_close(layer.delta_weight("teacher"), dense.delta(), rtol=1e-6, atol=1e-7)


# ----- #6 a torn last log line ------------------------------------------------------------------------------


def test_a_torn_last_log_line_is_dropped_and_an_earlier_damaged_one_refused(tmp_path, capsys):
    cfg = config(tmp_path, steps=4, checkpoint_every=2)
    with pytest.raises(Kill):
        trainer(tmp_path, cfg, on_step=kill_at(3)).run()
    log = tmp_path / "run" / "log.jsonl"
    good = log.read_text()
    log.write_text(good + '{"step": 4, "loss": 0.0')  # killed while writing the step-4 row
    capsys.readouterr()
    resumed = trainer(tmp_path, cfg.replace(resume=True))
    resumed.run()
    said = [ln for ln in capsys.readouterr().err.splitlines() if "dropped" in ln]  # beside the progress bar
    assert len(said) == 1 and said[0].startswith(f"{log}: dropped its last line, cut short by a killed run"), said
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [1, 2, 3, 4]
    # damage before the last line is not a kill's: refused, and nothing is touched
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], "not json", *lines[2:]]) + "\n")
    before = files(tmp_path / "run")
    with pytest.raises(TrainingError) as e:
        trainer(tmp_path, cfg.replace(steps=6, resume=True)).run()
    assert one_line(str(e.value)).startswith(f"{log}: line 2 of 4 is not a JSON log row ('not json'); fix or delete")
    assert files(tmp_path / "run") == before


# ----- #7 a full disk, an unwritable output -----------------------------------------------------------------


def test_a_full_disk_mid_checkpoint_keeps_the_previous_one_and_says_so_in_one_line(tmp_path, monkeypatch):
    real_save = ckpt.save_file
    calls = []

    def fills_the_disk(tensors, path):
        calls.append(path)
        if len(calls) == 2:  # the step-4 checkpoint: half a file, then ENOSPC
            real_save(tensors, path)
            with open(path, "r+b") as f:
                f.truncate(f.seek(0, 2) // 2)
            # what safetensors 0.8 raises for a full disk: its own error type (not an OSError), errno in the text
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save(tensors, path)

    monkeypatch.setattr(ckpt, "save_file", fills_the_disk)
    cfg = config(tmp_path, steps=4, checkpoint_every=2)
    root = tmp_path / "run" / "checkpoints"
    with pytest.raises(TrainingError) as e:
        trainer(tmp_path, cfg).run()  # the step-4 checkpoint is the run's last
    assert one_line(str(e.value)) == (f"step 4: checkpoint not written to {root} (No space left on device); "
                                      f"{root / 'step-000002'} is kept: free some space (or fix the folder), "
                                      "then --resume")
    assert [p.name for p in ckpt.checkpoints(root)] == ["step-000002"]
    assert [p.name for p in root.iterdir()] == ["step-000002"]  # no temp folder, no partial file
    _, saved = ckpt.read_checkpoint(root / "step-000002")
    assert saved["step"] == 2
    monkeypatch.setattr(ckpt, "save_file", real_save)
    resumed = trainer(tmp_path, cfg.replace(resume=True))
    resumed.run()  # the kept checkpoint continues the run
    whole = trainer(tmp_path, config(tmp_path, "whole", steps=4, checkpoint_every=2))
    whole.run()
    got = state(resumed)
    for k, v in state(whole).items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)


def test_a_real_failed_safetensors_write_is_an_oserror_and_leaves_no_temp(tmp_path):
    """Not a mock: a file-size limit makes the OS refuse safetensors' own write (EFBIG, as ENOSPC would be) in a
    child process; atomic_save turns safetensors' error into the OSError every writer says in one line."""
    import textwrap

    code = textwrap.dedent(f"""
        import resource, signal, torch
        from weights.atomic import atomic_save
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
        try:
            atomic_save({{"x": torch.zeros(1 << 16)}}, {str(tmp_path / "big.safetensors")!r})
        except OSError as e:
            print("OSError", e.errno, e.strerror)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == f"OSError {errno.EFBIG} {os.strerror(errno.EFBIG)}", out.stderr
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temp


def test_an_unwritable_output_is_refused_before_anything_loads(tmp_path, monkeypatch, capsys):
    import distill.run_setup

    def never(*a, **k):
        raise AssertionError("loaded before the output was checked")

    monkeypatch.setattr(distill.train, "load_model", never)
    monkeypatch.setattr(distill.train, "prepare_cache", never)
    blocked = tmp_path / "ro"
    blocked.mkdir()
    real_access = os.access
    # root writes anywhere chmod allows, so the read-only folder is simulated where the check asks the OS
    monkeypatch.setattr(distill.run_setup.os, "access",
                        lambda p, mode: False if str(p) == str(blocked) else real_access(p, mode))
    out = blocked / "run" / "sub"
    assert distill.train.main(["--model", "tiny", "--output", str(out)]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"error: {out}: {blocked} is not writable (permissions or a read-only disk); choose "
                          "another --output"), err
    assert list(blocked.iterdir()) == []
    # distill.export: its --output, and the run folder it writes beside by default
    cfg = config(tmp_path, steps=2, checkpoint_every=0)
    trainer(tmp_path, cfg).run()
    before = files(tmp_path / "run")
    capsys.readouterr()  # the run's progress bar
    assert distill.export.main([cfg.output, "--output", str(blocked)]) == 2
    assert one_line(capsys.readouterr().err).startswith(f"error: {blocked}: {blocked} is not writable")
    monkeypatch.setattr(distill.run_setup.os, "access",
                        lambda p, mode: False if str(p) == cfg.output else real_access(p, mode))
    assert distill.export.main([cfg.output]) == 2
    assert one_line(capsys.readouterr().err).strip().endswith("is not writable (permissions or a read-only disk); "
                                                              "pass --output FOLDER")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert distill.export.main([cfg.output, "--output", str(a_file / "x")]) == 2
    assert f"{a_file} is a file, not a folder; choose another --output" in one_line(capsys.readouterr().err)
    assert files(tmp_path / "run") == before


# ----- #14 temp folders of killed checkpoint writes ---------------------------------------------------------


def test_only_temp_folders_of_gone_processes_are_cleaned(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    root.mkdir()
    child = subprocess.Popen(["true"])
    child.wait()  # its pid now names no process
    with monkeypatch.context() as m:
        m.setattr(os, "getpid", lambda: child.pid)
        dead = temp_beside(root / "step-000004", folder=True)
    live = temp_beside(root / "step-000006", folder=True)  # this process: a write in progress
    old = root / ".step-000002.0a1b2c3d.tmp"  # an older name, without host and pid: its writer is unknown
    old.mkdir()
    (dead / "tensors.safetensors").write_bytes(b"half")
    ckpt.clean_temp(root)
    assert sorted(p.name for p in root.iterdir()) == sorted([live.name, old.name])


# ----- a resumed log's rewrite; a signal already ignored ------------------------------------------------------


@pytest.mark.skipif(os.name != "posix", reason="modes and umask are POSIX")
def test_a_resumed_log_is_rewritten_through_its_own_temp_with_the_umask(tmp_path):
    log = tmp_path / "run" / "log.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    # what an older scfm or another writer left under the old fixed name, made under a stricter umask: rewriting
    # through it would hand its 0600 to the log and take the file from its owner
    stale = tmp_path / "run" / ".log.jsonl.tmp"
    stale.write_text("not ours\n")
    stale.chmod(0o600)
    old = os.umask(0o022)
    try:
        JsonlLog(log, 2).close(finished=True)
    finally:
        os.umask(old)
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [1, 2]
    assert stat.S_IMODE(log.stat().st_mode) == 0o644
    assert stale.read_text() == "not ours\n"
    assert sorted(p.name for p in log.parent.iterdir() if p.name.startswith(".")) == [stale.name]


def test_a_signal_ignored_when_the_run_starts_stays_ignored_and_is_restored():
    # a background job (`&`) of a shell without job control starts with SIGINT ignored: the terminal's Ctrl-C
    # is for the foreground job, so the run must not turn it into a stop request
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with StopSignals() as stop:
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop._handle  # a scheduler's SIGTERM still stops cleanly
            os.kill(os.getpid(), signal.SIGINT)  # ignored, as without us
            assert stop.received is None
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_a_step_written_again_keeps_the_old_one_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    """A resumed run writes a step it has written before: the old folder moves aside rather than being deleted
    first, so a failed rename (a full disk) puts it back whole, and a good one leaves no temp behind."""
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(root, 2, {"w": torch.ones(3)}, {}, keep=3)

    def full(tmp, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(ckpt, "durable_replace", full)
        with pytest.raises(ckpt.CheckpointError, match="step-000002 is kept"):
            ckpt.save_checkpoint(root, 2, {"w": torch.zeros(3)}, {}, keep=3)
    tensors, state = ckpt.read_checkpoint(root / "step-000002")
    assert torch.equal(tensors["w"], torch.ones(3)) and state["step"] == 2

    def interrupted(tmp, path):  # a Ctrl-C between the two renames: no OSError, the old step must come back too
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ckpt, "durable_replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            ckpt.save_checkpoint(root, 2, {"w": torch.zeros(3)}, {}, keep=3)
    assert torch.equal(ckpt.read_checkpoint(root / "step-000002")[0]["w"], torch.ones(3))
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]
    ckpt.save_checkpoint(root, 2, {"w": torch.zeros(3)}, {}, keep=3)
    assert torch.equal(ckpt.read_checkpoint(root / "step-000002")[0]["w"], torch.zeros(3))
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]
