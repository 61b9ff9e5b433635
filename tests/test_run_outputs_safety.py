"""The run's own outputs, checked before steps are spent and kept across a resume: a file in the way of
checkpoints/ or samples/ (or a read-only one) is refused before training, a disk error's advice follows its errno,
a resumed run keeps the export of its earlier end, and the samples of a step killed while sampling are made on
resume. Each error is one line."""

from __future__ import annotations

import errno
import os

import pytest
from test_config_resume import train_argv
from test_trainer import Kill, config, kill_at, trainer

import distill.train
from distill.lora_export import export_step
from distill.run_outputs import os_error_line
from distill.train import main


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> list[str]:
    return train_argv(tmp_path_factory)


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bar
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


def refused_before_training(monkeypatch):
    def never(*a, **k):
        raise AssertionError("trained before the run's paths were checked")

    monkeypatch.setattr(distill.train, "Trainer", never)


def test_a_file_at_checkpoints_or_samples_is_refused_before_any_step(tmp_path, capsys, cli, monkeypatch):
    refused_before_training(monkeypatch)
    for sub, extra in (("checkpoints", ["--checkpoint_every", "1"]), ("samples", ["--sample_every", "1"])):
        out = tmp_path / sub
        out.mkdir()
        (out / sub).write_text("mine")
        assert main([*cli, "--output", str(out), *extra]) == 2
        assert error_line(capsys) == (f"error: {out / sub}: a file where the run makes its {sub} folder; move it "
                                      "aside or choose another --output")
        assert (out / sub).read_text() == "mine" and sorted(p.name for p in out.iterdir()) == [sub]
    a_file = tmp_path / "myfile.txt"
    a_file.write_text("x")
    assert main([*cli[:2], "--cache", str(a_file), *cli[4:], "--output", str(tmp_path / "c")]) == 2
    assert error_line(capsys).startswith(f"error: --cache {a_file}: a file, not a folder; pass a cache folder")


def test_a_read_only_checkpoints_folder_is_refused_before_any_step(tmp_path, capsys, cli, monkeypatch):
    import distill.run_setup

    refused_before_training(monkeypatch)
    out = tmp_path / "ro"
    (out / "checkpoints").mkdir(parents=True)
    real_access = os.access
    # root writes anywhere chmod allows: the read-only folder is simulated where the check asks the OS
    monkeypatch.setattr(distill.run_setup.os, "access", lambda p, mode: False if str(p) == str(out / "checkpoints")
                        else real_access(p, mode))
    assert main([*cli, "--output", str(out)]) == 2
    assert error_line(capsys).startswith(f"error: {out / 'checkpoints'}: {out / 'checkpoints'} is not writable")


def test_a_disk_error_says_its_own_fix_and_names_a_checkpoint_only_when_one_exists(tmp_path, capsys, cli,
                                                                                     monkeypatch):
    from distill.trainer import Trainer, TrainingError

    samples = tmp_path / "o" / "samples"

    def in_the_way(self, step):  # a file put at samples/ while the run goes on
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(samples))

    monkeypatch.setattr(Trainer, "sample", in_the_way)
    assert main([*cli, "--output", str(tmp_path / "o"), "--sample_every", "1", "--checkpoint_every", "0"]) == 2
    assert error_line(capsys) == (f"error: {samples}: File exists; checkpoints: none written yet: move the file in "
                                  "the way aside (or choose another --output), then run the same command again")
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    trainer(tmp_path, config(tmp_path, steps=2, checkpoint_every=1)).run()
    assert os_error_line(full, tmp_path / "run") == (f"No space left on device; checkpoints: "
                                                     f"{tmp_path / 'run' / 'checkpoints' / 'step-000002'}, the newest, "
                                                     "is intact: free some space (or fix the folder), then --resume")
    # the trainer's own checkpoint write (a Python caller skips train.check_paths): a file there is no full disk
    (tmp_path / "f1").mkdir()
    (tmp_path / "f1" / "checkpoints").write_text("mine")
    with pytest.raises(TrainingError) as e:
        trainer(tmp_path, config(tmp_path, "f1", steps=2, checkpoint_every=1)).run()
    assert "(File exists); no earlier checkpoint" in str(e.value) and "free some space" not in str(e.value)


def test_a_resume_past_a_finished_run_keeps_its_earlier_export(tmp_path, capsys, cli):
    out = tmp_path / "run"
    base = [*cli, "--output", str(out), "--checkpoint_every", "2", "--keep_checkpoints", "1"]
    assert main([*base, "--steps", "4"]) == 0
    [final] = out.glob("scfm-lora-*.safetensors")  # scfm-lora-{export_set}.safetensors
    first = final.read_bytes()
    capsys.readouterr()
    assert main(["--output", str(out), "--resume", "--steps", "8"]) == 0
    err = capsys.readouterr().err
    aside = out / "earlier-exports" / f"{final.stem}.step-000004.safetensors"
    assert f"--resume: {final.name}, exported at an earlier step, moved to {aside} " in err
    assert aside.read_bytes() == first and export_step(aside) == 4  # the step-4 result, whole
    assert export_step(final) == 8
    # the same end again replaces its own export, nothing more moves aside
    assert main(["--output", str(out), "--resume", "--steps", "8"]) == 0
    assert [p.name for p in out.glob("scfm-lora-*")] == [final.name]
    assert [p.name for p in aside.parent.iterdir()] == [aside.name]


def test_a_plain_resume_of_an_interrupted_run_exports_as_before(tmp_path, capsys, cli, monkeypatch):
    out = tmp_path / "run"
    real = distill.train.Trainer

    def killed(*a, **k):
        return real(*a, **{**k, "on_step": kill_at(2)})

    monkeypatch.setattr(distill.train, "Trainer", killed)
    with pytest.raises(Kill):
        main([*cli, "--output", str(out), "--checkpoint_every", "2", "--steps", "4"])
    monkeypatch.setattr(distill.train, "Trainer", real)
    assert main(["--output", str(out), "--resume"]) == 0
    assert "moved to" not in capsys.readouterr().err
    [final] = out.glob("scfm-lora-*")
    assert export_step(final) == 4


def test_samples_of_a_step_killed_while_sampling_are_made_on_resume(tmp_path, monkeypatch):
    from distill.trainer import Trainer

    cfg = config(tmp_path, steps=4, checkpoint_every=2, sample_every=2)
    real_sample = Trainer.sample

    def killed_while_sampling(self, step):
        raise Kill  # the step's checkpoint is written, its samples never are

    monkeypatch.setattr(Trainer, "sample", killed_while_sampling)
    with pytest.raises(Kill):
        trainer(tmp_path, cfg).run()
    samples = tmp_path / "run" / "samples"
    assert not samples.exists()
    monkeypatch.setattr(Trainer, "sample", real_sample)
    trainer(tmp_path, cfg.replace(resume=True)).run()
    assert sorted(p.name for p in samples.iterdir()) == ["step-000002.safetensors", "step-000004.safetensors"]
    # a resume whose step's samples exist renders nothing again
    made = []
    monkeypatch.setattr(Trainer, "sample", lambda self, step: made.append(step) or real_sample(self, step))
    trainer(tmp_path, cfg.replace(resume=True, steps=6)).run()
    assert made == [6]
