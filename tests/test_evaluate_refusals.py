"""`python -m distill.evaluate` (both modes) and `python -m distill.export` refusing what they would otherwise get
wrong silently or only after the run: a reused row rendered with other settings, a cut-short latents file, bad
input found after rendering, two scales for one LoRA, --height alone, clashing or misnamed table outputs, a user's
own report.json, Ctrl-C, and an export that writes one layout before refusing the next."""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest

from distill.evaluate import main

FAST = ["--prompts", "a red circle", "--per-prompt", "1", "--steps", "1", "--teacher-steps", "2", "--device", "cpu",
        "--dtype", "fp32", "--threads", "1"]


def run(out, *extra) -> int:
    return main(["--lora", "demo", *FAST, "--out", str(out), *extra])


def refused(argv: list[str], during_run: bool = False) -> str:
    """evaluate's refusal in every command's form: main() returns 2 and stderr is one `error: ...` line, nothing
    else (no traceback); that line is returned. `during_run`: refused once the rows' progress began, which stays
    above the line."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    *before, last = err.getvalue().splitlines() or [""]
    assert code == 2 and last.startswith("error: "), (code, before, last)
    if during_run:  # the progress bars' lines, no other error and no traceback
        assert not any(ln.startswith("error: ") or "Traceback" in ln for ln in before), before
    else:
        assert not before, before
    return last


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("judge") / "out"
    assert run(out) == 0
    return out


def test_other_pixel_settings_are_named_and_old_manifests_still_match(rendered, capsys):
    assert "fp8_compute" in refused(["--lora", "demo", *FAST, "--out", str(rendered), "--fp8-compute"], True)
    record = rendered / "teacher_2" / "manifest.json"
    old = {k: v for k, v in json.loads(record.read_text()).items()
           if k not in ("fp8_compute", "no_t5", "ignore_te_lora", "variant", "model_identity")}
    record.write_text(json.dumps(old))  # as written before these keys were recorded
    capsys.readouterr()
    assert run(rendered) == 0
    assert "rendering" not in capsys.readouterr().err


def test_a_cut_short_latents_file_or_a_missing_png_is_rendered_again(rendered, capsys):
    latents = rendered / "student_1" / "latents-000.safetensors"
    assert oct(latents.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not save_file's 0600
    latents.write_bytes(latents.read_bytes()[:50])
    (rendered / "teacher_1" / "000_000.png").unlink()
    capsys.readouterr()
    assert run(rendered) == 0
    err = capsys.readouterr().err
    assert "rendering student 1" in err and "rendering teacher 1" in err and "rendering teacher 2" not in err


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_bad_input_is_refused_before_rendering(tmp_path):
    from conftest import random_lora
    from mmdit_fixtures import SD35_TINY

    from model.mmdit import MMDiT
    from weights.lora_write import write_lora

    sd3 = tmp_path / "sd3-lora.safetensors"
    write_lora(random_lora(MMDiT(SD35_TINY), 0, family="sd3"), sd3, "diffusers")
    out = tmp_path / "out"
    (tmp_path / "file").write_text("x")
    for extra, says in ((["--shift", "nan"], "--shift nan"), (["--shift", "0"], "--shift 0"),
                        (["--lora-scale", "nan"], "--lora-scale nan"),
                        (["--compare", str(sd3)], "a LoRA for SD3 / SD3.5"),
                        (["--guidance", "nan"], "--guidance nan"), (["--guidance", "0"], "--guidance 0.0"),
                        (["--clip-vision", "/nonexistent"], "--clip-vision /nonexistent"),
                        (["--steps", "100000"], "at most")):
        assert says in refused(["--lora", "demo", *FAST, "--out", str(out), *extra]), extra
        assert not out.exists(), extra  # nothing rendered
    assert "a LoRA for SD3 / SD3.5" in refused(["--lora", str(sd3), *FAST, "--out", str(out)])
    assert "a file, not a folder" in refused(["--lora", "demo", *FAST, "--out", str(tmp_path / "file")])


def test_one_lora_scale(tmp_path):
    out = str(tmp_path / "out")
    assert "name the same scale" in refused(["--lora", "demo:0.5", "--lora-scale", "1", *FAST, "--out", out])
    assert "name the same scale" in refused(["--lora", "demo:0.5", "--lora-scale", "1", "--prompts", "a red circle"])
    assert "--lora-scale without --lora" in refused([*FAST, "--out", out, "--lora-scale", "3"])


def test_height_alone_keeps_its_height(tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    # not a demo-world prompt: the world's columns read square images only
    assert main([*FAST, "--prompts", "a photo", "--out", str(out), "--height", "32"]) == 0
    assert Image.open(out / "teacher_2" / "000_000.png").size == (64, 32)


def test_demo_table_outputs_are_refused_up_front(tmp_path):
    table = ["--lora", "demo", "--prompts", "a red circle", "--per-prompt", "1", "--steps", "1"]
    same = str(tmp_path / "same.out")
    assert "one would replace the other" in refused([*table, "--json", same, "--grid", same])
    assert "--no-grid with --grid" in refused([*table, "--no-grid", "--grid", str(tmp_path / "g.png")])
    assert "--no-grid with --grid" in refused([*table, "--no-grid", "--grid-scale", "3"])
    assert "*.png" in refused([*table, "--grid", str(tmp_path / "g.jpg")])
    assert "a folder or empty" in refused([*table, "--json", str(tmp_path), "--overwrite", "--no-grid"])
    assert "a folder or empty" in refused([*table, "--json", "", "--no-grid"])
    assert "at most 1000" in refused([*table, "--teacher-steps", "5000", "--no-grid"])
    assert not list(tmp_path.iterdir())


def test_a_users_report_is_kept_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text('{"mine": 1}')
    assert "evaluate did not write" in refused(["--lora", "demo", *FAST, "--out", str(out)])
    assert (out / "report.json").read_text() == '{"mine": 1}' and list(out.iterdir()) == [out / "report.json"]


def test_ctrl_c_is_one_line(tmp_path, monkeypatch, capsys):
    import distill.evaluate
    import distill.judge

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(distill.judge, "judge", interrupted)
    assert run(tmp_path / "out") == 130
    assert capsys.readouterr().err == "interrupted: run it again to continue with the rows done\n"  # generate's form

    def interrupted_table(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(distill.evaluate, "evaluate", interrupted_table)  # the demo table: nothing to continue
    table = ["--lora", "demo", "--prompts", "a red circle", "--per-prompt", "1", "--steps", "1", "--no-grid"]
    assert main(table) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_export_checks_every_target_before_writing_any(tmp_path, capsys):
    from test_export import trained

    from distill.export import main as export

    cfg, _ = trained(tmp_path)
    run_folder = cfg.output
    assert export([run_folder, "--set", "fast_ema", "--formats", "kohya"]) == 0
    capsys.readouterr()
    assert export([run_folder, "--set", "fast_ema", "--formats", "diffusers", "kohya"]) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite" in err and "overwrite=True" not in err, err
    assert not list(tmp_path.glob("**/scfm-lora-fast_ema-step000004.safetensors"))  # the diffusers one
    assert export([str(tmp_path / "run" / "log.jsonl")]) == 2
    assert "a file; pass the run folder" in capsys.readouterr().err
    assert export([run_folder, "--set", ""]) == 2
    assert "--set ''" in capsys.readouterr().err


def test_a_cfg_below_1_is_refused_before_loading_in_evaluates_own_flag(tmp_path, monkeypatch):
    """On SD3.5 and klein --guidance is the teacher rows' CFG scale: below 1 it is off, as at 1 (generate refuses it).
    Refused from the model's headers before anything loads, naming --guidance (generate's refusal, met after the
    model loaded, named --cfg, which evaluate does not have) and the range it takes."""
    from safetensors.torch import save_file
    from test_flux2_scfm import base_model

    import distill.judge
    from model.mmdit import MMDIT_CONFIGS, MMDiT

    def loads(args):
        raise AssertionError("the models load")

    monkeypatch.setattr(distill.judge, "judge", loads)
    models = {"sd3.safetensors": MMDiT(MMDIT_CONFIGS["tiny"]), "tiny-klein-base.safetensors": base_model()}
    for name, model in models.items():
        save_file(model.state_dict(), tmp_path / name)
        out = tmp_path / "out"
        msg = refused(["--model", str(tmp_path / name), *FAST, "--out", str(out), "--guidance", "0.5"])
        assert msg.startswith("error: --guidance 0.5:") and "[1, inf)" in msg and "--cfg" not in msg, msg
        assert "pass --guidance 1" in msg and not out.exists(), msg
