"""A folder `python -m distill.make_dataset` has not finished (killed halfway, or rendering now) is refused by
training before anything is cached, with the way to finish it (or to train on it as it is); a full disk while
rendering is one line naming the folder and the fix; and the demo's rendering speaks train's flags."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
from test_data import FakePipeline
from test_make_dataset_refusals import fake_make_dataset

import distill.train
from distill import make_dataset, teacher_data
from distill.config import ConfigError, DistillConfig
from distill.data import plan_cache
from distill.dataset import DataError, read_folder
from distill.run_setup import render_demo_data, resolve_demo
from weights.atomic import _WRITER

FINISH = "rerun python -m distill.make_dataset with the same flags to finish it"


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """2 images in each of the 5 buckets of tmp_path/d."""
    return fake_make_dataset(tmp_path, monkeypatch, 2)


def killed_halfway(folder, keep: int) -> None:
    """What a kill leaves: the first `keep` rows listed, a PNG written but not listed, half a row, the lock of the
    run that is gone."""
    meta = folder / "metadata.jsonl"
    lines = meta.read_text().splitlines()
    for line in lines[keep + 1:]:
        (folder / json.loads(line)["file_name"]).unlink()
    meta.write_text("".join(ln + "\n" for ln in lines[:keep]) + lines[keep][:20])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (folder / ".scfm.lock").write_text(f"{_WRITER} {gone.pid}\n")


def one_line(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, (code, err)
    return err


def test_training_refuses_a_half_rendered_folder_before_caching(fake, tmp_path, capsys):
    pipe, argv = fake
    assert make_dataset.main(argv) == 0
    data = tmp_path / "d"
    killed_halfway(data, keep=6)
    for name in ("vae.safetensors", "clip.safetensors", "t5.safetensors", "spiece.model"):
        (tmp_path / name).write_bytes(b"stand-in: the refusal comes before any encoder is read")
    run = tmp_path / "run"
    capsys.readouterr()
    err = one_line(capsys, distill.train.main([
        "--model", "tiny", "--data", str(data), "--output", str(run), "--vae", str(tmp_path / "vae.safetensors"),
        "--clip", str(tmp_path / "clip.safetensors"), "--t5", str(tmp_path / "t5.safetensors"),
        "--t5_tokenizer", str(tmp_path / "spiece.model"), "--device", "cpu", "--dtype", "fp32"]))
    assert f"{data}: make_dataset rendered 6 of the 10 images" in err and FINISH in err, err
    assert "rename make_dataset.json" in err  # the way to train on the 6 by choice
    assert not (run / "cache").exists()
    # finished with the same flags, the folder is read whole
    assert make_dataset.main(argv) == 0
    assert len(plan_cache(data, {"k": 1}, 512)["items"]) == 10


def test_a_partial_set_is_trained_on_by_choice_once_its_record_is_renamed(fake, tmp_path):
    pipe, argv = fake
    assert make_dataset.main(argv) == 0
    data = tmp_path / "d"
    killed_halfway(data, keep=3)
    with pytest.raises(DataError, match="rendered 3 of the 10 images"):
        read_folder(data)
    (data / "make_dataset.json").rename(data / "make_dataset.partial.json")
    (data / "metadata.jsonl").write_text("".join(ln + "\n" for ln in (data / "metadata.jsonl").read_text()
                                                 .splitlines()[:3]))  # the readers refuse half a row
    assert len(read_folder(data)) == 3
    (data / "make_dataset.partial.json").rename(data / "make_dataset.json")  # back: make_dataset finishes it
    assert make_dataset.main(argv) == 0 and len(read_folder(data)) == 10


def test_a_folder_being_rendered_is_refused_even_when_its_rows_are_all_there(fake, tmp_path):
    pipe, argv = fake
    assert make_dataset.main(argv) == 0
    data, lock = tmp_path / "d", tmp_path / "d" / ".scfm.lock"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{_WRITER} {alive.pid}\n")
        with pytest.raises(DataError, match=f"a make_dataset run holds it \\(process {alive.pid} on this "
                                            "machine; 10 of 10 images so far\\); wait for it to finish"):
            read_folder(data)
    finally:
        alive.kill()
        alive.wait()
    lock.write_text("otherhost-1 4242\n")  # a shared disk: another machine's pid is not ours to probe
    with pytest.raises(DataError, match="a make_dataset run holds it \\(host otherhost-1, pid 4242; 10 of 10"):
        read_folder(data)
    lock.write_text("")  # folder_lock makes it empty, then writes it
    with pytest.raises(DataError, match="holds it \\(host \\?, pid \\?; 10 of 10"):  # named by no one yet
        read_folder(data)
    lock.write_text(f"{_WRITER} {os.getpid()}\n")  # this process's own lock (--data inside a locked folder)
    assert len(read_folder(data)) == 10
    lock.unlink()
    assert len(read_folder(data)) == 10


def test_a_plain_folder_is_read_as_it_is(tmp_path):
    from test_data import write_images

    write_images(tmp_path / "p")
    (tmp_path / "p" / ".scfm.lock").write_text("otherhost-1 4242\n")  # no make_dataset.json: not make_dataset's
    assert len(read_folder(tmp_path / "p")) == 6


# ----- a full disk while rendering --------------------------------------------------------------------------------


def full_disk(monkeypatch):
    from PIL import Image

    def save(self, *args, **kwargs):  # as PIL reports it: the OS's error, no file name
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", save)


def test_a_full_disk_names_the_folder_and_the_fix(fake, tmp_path, monkeypatch, capsys):
    pipe, argv = fake
    with monkeypatch.context() as m:
        full_disk(m)
        code = make_dataset.main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert code == 2, err
    assert err == (f"error: {tmp_path / 'd'}: no space left on its disk; free some space, then rerun python -m "
                   "distill.make_dataset with the same flags: it continues where it stopped"), err
    assert make_dataset.main(argv) == 0 and len(read_folder(tmp_path / "d")) == 10


# ----- the demo's rendering, in train's flags ---------------------------------------------------------------------


def demo_cfg(tmp_path, images: int) -> DistillConfig:
    return resolve_demo(DistillConfig(model="demo", output=str(tmp_path / "x5"), demo_images=images, t5_length=8))


def test_the_demo_names_trains_flags_not_make_datasets(tmp_path, monkeypatch, capsys):
    (tmp_path / "x5").mkdir()
    (tmp_path / "x5" / "data").write_text("a file where the demo's data goes")
    err = one_line(capsys, distill.train.main(["--output", str(tmp_path / "x5")]))
    assert err.startswith(f"error: --output {tmp_path / 'x5'}: {tmp_path / 'x5' / 'data'} is a file, not a folder; "
                          "pass another --output"), err
    (tmp_path / "x5" / "data").unlink()

    monkeypatch.setattr(teacher_data, "make_pipeline", lambda args: FakePipeline())
    render_demo_data(demo_cfg(tmp_path, 1))
    with pytest.raises(ConfigError) as e:
        render_demo_data(demo_cfg(tmp_path, 2))
    assert str(e.value).endswith("made with other images_per_bucket; pass --demo_images 1 to continue it, or choose "
                                 "another --output"), e.value
    # a setting only make_dataset's flag sets (the demo fixes its teacher steps): only the way train has
    record = tmp_path / "x5" / "data" / "make_dataset.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "steps": 7}))
    with pytest.raises(ConfigError) as e:
        render_demo_data(demo_cfg(tmp_path, 1))
    assert str(e.value).endswith("made with other steps; choose another --output"), e.value


def test_the_demos_full_disk_says_rerun_train(tmp_path, monkeypatch):
    monkeypatch.setattr(teacher_data, "make_pipeline", lambda args: FakePipeline())
    full_disk(monkeypatch)
    with pytest.raises(ConfigError) as e:
        render_demo_data(demo_cfg(tmp_path, 1))
    assert str(e.value) == (f"{tmp_path / 'x5' / 'data'}: no space left on its disk; free some space, then rerun "
                            "python -m distill.train with the same flags: it continues where it stopped")
