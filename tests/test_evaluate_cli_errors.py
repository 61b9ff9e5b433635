"""`python -m distill.evaluate` and `python -m distill.export` on mistyped command lines: each refused in one line
that names the flag the user typed and the fix, before anything renders or any folder is made; and evaluate's
--help stating the defaults that decide a run's cost."""

from __future__ import annotations

from argparse import Namespace

import pytest
from test_evaluate_refusals import refused

from distill.evaluate import build_parser

TABLE = ["--per-prompt", "1", "--steps", "1", "--teacher-steps", "2", "--device", "cpu", "--threads", "1"]
FAST = [*TABLE, "--dtype", "fp32"]  # with --out


@pytest.fixture
def no_render(monkeypatch):
    """Rendering fails the test: every refusal here comes before it."""
    import distill.judge

    def renders(*args, **kwargs):
        raise AssertionError("rendered")

    monkeypatch.setattr(distill.judge, "render_rows", renders)


def test_a_prompts_file_given_to_prompts_is_refused_naming_prompts_file(tmp_path, monkeypatch, no_render):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p3.txt").write_text("a red circle\n")
    out = tmp_path / "e1"
    for mode in ([*FAST, "--out", str(out)], [*TABLE, "--no-grid"]):  # any model, and the demo world's table
        msg = refused(["--prompts", "p3.txt", *mode])
        assert msg.startswith("error: --prompts p3.txt: a file") and "pass --prompts-file p3.txt" in msg, msg
    msg = refused(["--prompts", "other/p4.txt", *FAST, "--out", str(out)])  # a path that is not there
    assert "--prompts other/p4.txt" in msg and "--prompts-file FILE" in msg, msg
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p3.txt"]  # no report, grid or json either
    from distill.evaluate import check_prompt_text

    check_prompt_text(["a red circle", "a " * 300, "notes.txt and more"])  # prompts, too long to be a file: kept


def test_teacher_steps_among_steps_is_the_reference_row_with_out_as_without():
    from distill.judge import rows_for
    from sampling.demo import DEMO_LORA
    from weights.lora_merge import lora_spec

    lora = lora_spec(str(DEMO_LORA))
    args = Namespace(steps=[1, 2, 2], teacher_steps=2, shift=None, compare_model=[], guidance=None, out=None)
    names = [r.name for r in rows_for(args, lora, [], [])]
    assert names == ["teacher 2", "teacher 1", "student 1", "student 2"]  # one reference serves teacher 2
    args.shift = 3.0  # the teacher on the SCFM grid is another row: kept
    names = [r.name for r in rows_for(args, lora, [], [])]
    assert names == ["teacher 2", "teacher 1", "teacher 1 scfm", "student 1", "teacher 2 scfm", "student 2"]


def test_a_wrong_width_or_height_is_refused_by_its_own_flag_before_any_folder(tmp_path, no_render):
    out = tmp_path / "e3"
    base = ["--prompts", "a red circle", *FAST, "--out", str(out)]
    msg = refused([*base, "--width", "60"])  # --height follows --width, but was never given
    assert msg == "error: --width 60 is not a multiple of 8; use 56 or 64", msg
    msg = refused([*base, "--height", "60"])
    assert msg == "error: --height 60 is not a multiple of 8; use 56 or 64", msg
    msg = refused([*base, "--width", "0"])  # not read as unset: the demo's own default is the fix
    assert msg.startswith("error: --width 0:") and "pass --width 64" in msg, msg
    assert not out.exists()


def test_help_states_the_defaults_that_decide_the_cost():
    text = " ".join(build_parser().format_help().split())
    for says in ("noises per prompt [16]", "step counts [1 2 4 8]", "reference run [32]", "seed [0]"):
        assert says in text, says


def test_a_lora_folder_is_said_to_be_a_folder(tmp_path, no_render):
    folder = tmp_path / "adir"
    folder.mkdir()
    table = refused(["--lora", str(folder), "--prompts", "a red circle", *TABLE, "--no-grid"])
    assert table.startswith(f"error: --lora {folder}: a folder") and ".safetensors file" in table, table
    assert "no such file" not in table
    out = refused(["--lora", str(folder), "--prompts", "a red circle", *FAST, "--out", str(tmp_path / "out")])
    assert out.startswith(f"error: --lora {folder}: a folder") and ".safetensors file" in out, out


def test_export_names_set_for_an_unknown_set(tmp_path, capsys):
    from distill.export import main as export

    assert export([str(tmp_path / "run"), "--set", "slowema"]) == 2  # refused before the run is looked for
    err = capsys.readouterr().err
    assert err.startswith("error: --set slowema:") and "slow_ema" in err and "export_set must" not in err, err
    assert err.count("\n") == 1
