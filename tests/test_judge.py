"""`python -m distill.evaluate --out` (distill/judge.py) end to end on the demo pipeline folder (written by
diffusers' save_pretrained): the reference row at distance 0, the same report from the same seed, a rerun that
renders only its new rows, and a folder made with another LoRA refused without --overwrite."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from distill.evaluate import main
from sampling.demo import DEMO_LORA
from weights.io import read_header

COMMON = ["--prompts", "a red circle", "a blue square at the top", "--per-prompt", "2", "--teacher-steps", "6",
          "--device", "cpu", "--dtype", "fp32"]


def run(out, lora="demo", steps=("2",), *extra) -> int:
    return main(["--lora", lora, *COMMON, "--steps", *steps, "--out", str(out), *extra])


def report(out) -> dict:
    return json.loads((out / "report.json").read_text())


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "sec/img"} for r in rows]


def test_report_reference_reruns_and_refusals(tmp_path, capsys):
    assert run(tmp_path / "a") == 0
    rows = report(tmp_path / "a")["rows"]
    assert [r["name"] for r in rows] == ["teacher 6", "teacher 2", "student 2"]
    ref = rows[0]
    assert (ref["mean|d|"], ref["psnr"], ref["ssim"], ref["lat mse"], ref["fd"]) == (0, None, 1, 0, 0)
    assert all(r["mean|d|"] > 0 and r["psnr"] > 0 and r["fd"] > 0 for r in rows[1:]) and rows[2]["nfe"] == 2
    assert (tmp_path / "a" / "grid.png").exists() and len(list((tmp_path / "a" / "student_2").glob("*.png"))) == 4
    manifest = json.loads((tmp_path / "a" / "student_2" / "manifest.json").read_text())
    assert manifest["loras"][0]["file"] == DEMO_LORA.name and manifest["steps"] == 2

    assert run(tmp_path / "b") == 0  # the same seed: the same report
    assert without_timing(report(tmp_path / "b")["rows"]) == without_timing(rows)

    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("*/*.png")}  # the rows' images
    capsys.readouterr()
    assert run(tmp_path / "a", "demo", ("2", "4")) == 0
    err = capsys.readouterr().err
    assert "rendering teacher 4" in err and "rendering student 4" in err and "rendering student 2" not in err
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # nothing rendered again

    other = tmp_path / "other.safetensors"
    save_file({k: v * 0.5 for k, v in load_file(DEMO_LORA).items()}, other, read_header(DEMO_LORA)[1])
    with pytest.raises(SystemExit, match="student_2: rendered with other settings .* pass --overwrite"):
        run(tmp_path / "a", str(other))
    assert run(tmp_path / "a", str(other), ("2",), "--overwrite") == 0
    assert report(tmp_path / "a")["rows"][2]["mean|d|"] != rows[2]["mean|d|"]
