"""One flag convention: every flag of the six CLIs takes both spellings (`--blocks-to-swap` and `--blocks_to_swap`),
--help shows one (sampling/options.py OneLineParser)."""

from __future__ import annotations

import argparse

import pytest


def parsers():
    from distill.evaluate import build_parser as evaluate
    from distill.export import build_parser as export
    from distill.teacher_data import build_parser as make_dataset
    from distill.train import build_parser as train
    from sampling.flags import build_parser as generate
    from tools.convert import build_parser as convert

    out = {"generate": generate(), "make_dataset": make_dataset(), "train": train(), "export": export(),
           "evaluate": evaluate(), "convert": convert()}
    for action in out["convert"]._actions:  # its subcommands' own parsers
        if isinstance(action, argparse._SubParsersAction):
            out |= {f"convert {name}": p for name, p in action.choices.items()}
    return out


@pytest.mark.parametrize("name", ["generate", "make_dataset", "train", "export", "evaluate", "convert"])
def test_both_spellings_of_every_flag_and_one_in_help(name):
    for cli, parser in parsers().items():
        if cli.split()[0] != name:
            continue
        for action in parser._actions:
            longs = [s for s in action.option_strings if s.startswith("--") and s != "--help"]
            names = {s[2:].replace("_", "-") for s in longs}
            assert len(names) == len(longs), f"{cli}: {longs} shows two spellings of one flag"
            for flag in longs:
                for other in (flag.replace("_", "-"), "--" + flag[2:].replace("-", "_")):
                    assert parser._option_string_actions[parser.spelled(other)] is action, (cli, other)


def test_the_other_spelling_parses_to_the_same_values():
    from distill.train import build_parser as train
    from sampling.flags import build_parser as generate

    a = generate().parse_args(["--prompt", "x", "--blocks_to_swap", "2", "--fp8_compute", "--t5_tokenizer=tok",
                               "--negative_prompt=--x"])
    assert (a.blocks_to_swap, a.fp8_compute, a.t5_tokenizer, a.negative_prompt) == (2, True, "tok", "--x")
    b = vars(train().parse_args(["--blocks-to-swap", "3", "--t5-tokenizer", "tok", "--fp8-base"]))
    assert (b["blocks_to_swap"], b["t5_tokenizer"], b["fp8_base"]) == (3, "tok", True)


def test_generate_and_train_build_their_flags_from_dataclasses_with_one_helper():
    """generate's model-file, generation and run flags are the fields of ModelFiles, GenerationFlags and
    RunOptions (sampling/fields.py add_dataclass_args, which builds train's from DistillConfig too): a flag per
    field, unset flags at the field's default, each value parsed to the field's type."""
    import dataclasses

    from sampling.flags import GenerationFlags, ModelFiles, build_parser
    from sampling.options import RunOptions

    parser = build_parser()
    dests = {a.dest for a in parser._actions}
    args = vars(parser.parse_args([]))
    for cls in (ModelFiles, GenerationFlags, RunOptions):
        for f in dataclasses.fields(cls):
            assert f.name in dests and args[f.name] == (list(f.default) if f.metadata.get("repeat") else f.default)
    given = vars(parser.parse_args(["--steps", "4", "--slg-layers", "7,8", "--lora", "a:0.5", "--lora", "b",
                                    "--fp8", "--guidance", "2", "--variant", "base"]))
    assert (given["steps"], given["slg_layers"], given["lora"], given["fp8"], given["guidance"]) == (
        4, (7, 8), ["a:0.5", "b"], True, 2.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["--variant", "turbo"])


# ----- warnings: one line each, as the errors are -----------------------------------------------------------

COMMANDS = ["sampling/generate.py", "sampling/app.py", "distill/make_dataset.py", "distill/train.py",
            "distill/export.py", "distill/evaluate.py", "tools/convert.py"]


def test_each_command_says_its_warnings_in_one_line(tmp_path, capsys):
    """Python's default printed `.../train.py:191: UserWarning: cfg_scale 3.5: ...` and then that source line."""
    import ast
    import subprocess
    import sys
    import warnings
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from sampling.options import plain_warnings

    root = Path(__file__).resolve().parents[1]
    for path in COMMANDS:  # each command's `__main__` block installs it before main()
        tree = ast.parse((root / path).read_text())
        block = next(n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))
        assert ast.unparse(block.body[0]) == "plain_warnings()", path
    with warnings.catch_warnings():
        plain_warnings()
        warnings.simplefilter("always")
        for _ in range(2):
            warnings.warn("the message alone", stacklevel=1)
        warnings.warn("another", stacklevel=1)
    assert capsys.readouterr().err == "warning: the message alone\nwarning: another\n"  # each text once
    # one command end to end: a kohya LoRA whose alpha is 0 warns as it is read (twice: detection, then reading)
    stem = "lora_unet_double_blocks_0_img_attn_proj"
    save_file({f"{stem}.lora_down.weight": torch.ones(2, 32), f"{stem}.lora_up.weight": torch.ones(32, 2),
               f"{stem}.alpha": torch.tensor(0.0)}, tmp_path / "k.safetensors")
    done = subprocess.run([sys.executable, "tools/convert.py", "lora", str(tmp_path / "k.safetensors"),
                           str(tmp_path / "o.safetensors"), "--to", "diffusers"], cwd=root, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert [line for line in lines if "is 0: applied with no effect" in line] == lines[:1], done.stderr
    assert lines[0].startswith(f"warning: {tmp_path / 'k.safetensors'}: {stem}.alpha is 0"), done.stderr
    assert "UserWarning" not in done.stderr and "warnings.warn" not in done.stderr, done.stderr
