"""`python -m distill.make_dataset` refuses what would mix, duplicate or silently ignore: a folder holding another
dataset, a second run on one folder, a damaged record, flags the model does not read; and it repairs rows of deleted
images, knows a model by its content, and stops on Ctrl-C in one line."""

from __future__ import annotations

import json

import pytest
from test_data import FakePipeline

from distill import make_dataset, teacher_data
from sampling.demo import DEMO_FOLDER, DEMO_PROMPTS
from weights.atomic import folder_lock


def fake_make_dataset(tmp_path, monkeypatch, per_bucket: int):
    """make_dataset on the tiny fake Flux (fast on CPU), `per_bucket` images in each of its 5 buckets; returns
    (pipe, argv for --out tmp_path/d)."""
    pipe = FakePipeline()
    monkeypatch.setattr(teacher_data, "make_pipeline", lambda args: pipe)
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    return pipe, ["--model", "unused", "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "d"),
                  "--images-per-bucket", str(per_bucket), "--steps", "1", "--batch-size", "8"]


@pytest.fixture
def fake(tmp_path, monkeypatch):
    return fake_make_dataset(tmp_path, monkeypatch, 1)


def error_line(capsys, code) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, (code, err)
    return err


def rows(folder) -> list[str]:
    return [json.loads(ln)["file_name"] for ln in (folder / "metadata.jsonl").read_text().splitlines()]


def test_a_folder_with_another_dataset_is_refused(fake, tmp_path, capsys):
    pipe, argv = fake
    d = tmp_path / "d"
    d.mkdir()
    (d / "cat.png").write_bytes(b"mine")
    (d / "metadata.jsonl").write_text('{"file_name": "cat.png", "prompt": "my cat"}\n')
    assert "no make_dataset.json" in error_line(capsys, make_dataset.main(argv))
    assert rows(d) == ["cat.png"] and pipe.rendered == 0


def test_a_deleted_record_is_refused_not_appended_to(fake, tmp_path, capsys):
    pipe, argv = fake
    assert make_dataset.main(argv) == 0
    (tmp_path / "d" / "make_dataset.json").unlink()
    before, _ = rows(tmp_path / "d"), capsys.readouterr()
    assert "no make_dataset.json" in error_line(capsys, make_dataset.main(argv))
    assert rows(tmp_path / "d") == before


def test_a_deleted_image_is_listed_once_after_the_rerun(fake, tmp_path):
    pipe, argv = fake
    assert make_dataset.main(argv) == 0
    listed, rendered = rows(tmp_path / "d"), pipe.rendered
    (tmp_path / "d" / listed[0]).unlink()
    assert make_dataset.main(argv) == 0 and pipe.rendered == rendered + 1
    assert sorted(rows(tmp_path / "d")) == sorted(listed)


def test_a_second_run_on_the_folder_is_refused(fake, tmp_path, capsys):
    pipe, argv = fake
    with folder_lock(tmp_path / "d", "make_dataset run"):
        assert "another make_dataset run is using it" in error_line(capsys, make_dataset.main(argv))
    assert pipe.rendered == 0


def test_the_model_is_known_by_its_content_not_its_path_spelling(fake, tmp_path, capsys):
    pipe, argv = fake
    argv[1] = str(DEMO_FOLDER)
    assert make_dataset.main(argv) == 0
    (tmp_path / "link").symlink_to(DEMO_FOLDER)
    for spelling in (str(DEMO_FOLDER) + "/", str(tmp_path / "link")):
        argv[1] = spelling
        assert make_dataset.main(argv) == 0, capsys.readouterr().err
    # a record from before (the path given then) resumes while that path holds the same model
    record = tmp_path / "d" / "make_dataset.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "model": str(DEMO_FOLDER)}))
    assert make_dataset.main(argv) == 0, capsys.readouterr().err


@pytest.mark.parametrize("text", ["{", "[1, 2]"])
def test_a_damaged_record_is_named_in_one_line(fake, tmp_path, capsys, text):
    pipe, argv = fake
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "make_dataset.json").write_text(text)
    err = error_line(capsys, make_dataset.main(argv))
    assert str(tmp_path / "d" / "make_dataset.json") in err and "choose another --out" in err


@pytest.mark.parametrize("flags, expected", [
    (["--guidance", "2"], "has no guidance embedding"),
    (["--variant", "base"], "--variant: FLUX.2"),
    (["--qwen", str(DEMO_FOLDER)], "--qwen: FLUX.2"),
    (["--ignore-te-lora"], "--ignore-te-lora: no --lora given"),
    (["--steps", "100000"], "--steps 100000: over 1000"),
])
def test_flags_that_would_do_nothing_are_refused(tmp_path, monkeypatch, capsys, flags, expected):
    def rendered(*args):
        raise AssertionError("rendered")  # the refusal comes before, not after 100000 steps

    monkeypatch.setattr(teacher_data, "render", rendered)
    argv = ["--model", str(DEMO_FOLDER), "--prompts", str(DEMO_PROMPTS), "--out", str(tmp_path / "d"),
            "--images-per-bucket", "1", "--steps", "1", "--device", "cpu", *flags]
    assert expected in error_line(capsys, make_dataset.main(argv))
    assert not (tmp_path / "d").exists()


def test_ctrl_c_is_one_line_and_rc_130(fake, monkeypatch, capsys):
    pipe, argv = fake

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipe, "sample", interrupted)
    try:
        code = make_dataset.main(argv)
    except KeyboardInterrupt:
        code = "KeyboardInterrupt escaped"
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and "rerun the same command" in err[-1] and not any("Traceback" in ln for ln in err)


def test_a_huge_images_per_bucket_is_refused_before_planning(fake, monkeypatch, capsys):
    pipe, argv = fake

    def planned(*args):
        raise AssertionError("the job list was planned")  # in place of building 10^8 jobs in memory

    monkeypatch.setattr(teacher_data, "plan_jobs", planned)
    argv[argv.index("--images-per-bucket") + 1] = "100000000"
    assert "--images-per-bucket 100000000: over" in error_line(capsys, make_dataset.main(argv))


def test_a_rerun_with_another_value_names_the_flag_that_continues_the_dataset(fake, tmp_path, capsys):
    """A default that changed between versions (SD3.5's teacher CFG 3.5 -> 4.5) or a flag given otherwise: the
    refusal says the value the dataset was made with, as the flag that continues it."""
    pipe, argv = fake
    assert make_dataset.main(argv) == 0
    capsys.readouterr()
    err = error_line(capsys, make_dataset.main([*argv, "--steps", "2", "--seed", "3"]))
    assert err.endswith("holds a dataset made with other seed, steps; pass --seed 0 --steps 1 to continue it, or use "
                        "another --out"), err
    assert not list((tmp_path / "d").glob(".make_dataset.json*"))
