"""`python -m distill.export RUN` while the run trains on: the trainer writes a newer checkpoint, then deletes the
older ones (--keep_checkpoints 1), possibly between the export listing a checkpoint and reading it. The export
then reads the newer one, in one go; it never reads one version's state with another's tensors. The pruning is
simulated inside the read (no timing), on the tiny Flux."""

from __future__ import annotations

import shutil

import pytest
from test_export import assert_same_files
from test_trainer import config, trainer

import distill.checkpoint
from distill.export import main
from distill.lora_export import export_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run with checkpoints at steps 2 and 4, trained once, and step 4's export to compare with."""
    tmp = tmp_path_factory.mktemp("trained")
    trainer(tmp, config(tmp, steps=4, checkpoint_every=2, keep_checkpoints=3)).run()
    want = export_checkpoint(tmp / "run" / "checkpoints" / "step-000004", formats=("kohya",), folder=tmp / "want")
    return tmp / "run", want[0]


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the run folder listing only step 2's checkpoint, step 4's still being written (hidden):
    (run, its checkpoints folder, publish step 4, step 4's export)."""
    out = shutil.copytree(trained[0], tmp_path / "run")
    root = out / "checkpoints"
    (root / "step-000004").rename(root / ".step-000004.writing.tmp")  # not listed, as the trainer's temp folder

    def publish():
        (root / ".step-000004.writing.tmp").rename(root / "step-000004")

    return str(out), root, publish, trained[1]


def during_the_first_read(monkeypatch, what):
    """Run `what` when the first checkpoint read opens its tensors file by name (after listing and hashing)."""
    real, calls = distill.checkpoint.load_file, []

    def load_file(name):
        if not calls:
            what()
        calls.append(name)
        return real(name)

    monkeypatch.setattr(distill.checkpoint, "load_file", load_file)
    return calls


def test_the_checkpoint_pruned_mid_read_gives_way_to_the_newer_one(run, monkeypatch, capsys):
    out, root, publish, want = run

    def prune():  # the trainer: step 4 written, then step 2 deleted
        publish()
        shutil.rmtree(root / "step-000002")

    calls = during_the_first_read(monkeypatch, prune)
    assert main([out, "--formats", "kohya"]) == 0
    cap = capsys.readouterr()
    assert cap.err == "", cap.err  # no "skipping a damaged checkpoint": it was pruned, not damaged
    assert cap.out.strip().endswith("scfm-lora-live-step000004-kohya.safetensors") and len(calls) == 2
    assert_same_files(want, cap.out.strip())


def test_a_checkpoint_replaced_mid_read_is_never_mixed_with_its_new_tensors(run, monkeypatch, capsys):
    out, root, publish, want = run

    def replace():  # the folder rewritten under the same name (a resumed run writing a step again) with new contents
        shutil.rmtree(root / "step-000002")
        publish()
        (root / "step-000004").rename(root / "step-000002")

    during_the_first_read(monkeypatch, replace)
    assert main([out, "--formats", "kohya"]) == 0
    got = capsys.readouterr().out.strip()
    assert got.endswith("scfm-lora-live-step000004-kohya.safetensors"), got  # the new state with the new tensors
    assert_same_files(want, got)


def test_a_named_checkpoint_pruned_mid_read_is_refused_in_one_line(run, monkeypatch, capsys):
    out, root, publish, _ = run
    during_the_first_read(monkeypatch, lambda: (publish(), shutil.rmtree(root / "step-000002")))
    assert main([str(root / "step-000002")]) == 2
    err = capsys.readouterr().err
    assert "step-000002: deleted while being read" in err and "pass the run folder" in err, err
    assert err.count("\n") == 1, err


def test_checkpoints_pruned_at_every_look_are_refused_in_one_line(run, monkeypatch, capsys):
    out, root, publish, _ = run
    publish()

    def vanish(name):
        raise FileNotFoundError(f"No such file or directory: {name}")

    monkeypatch.setattr(distill.checkpoint, "load_file", vanish)
    assert main([out]) == 2
    err = capsys.readouterr().err
    assert "deleted while being read, 3 times" in err and "try again" in err and err.count("\n") == 1, err
