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
    from sampling.job import build_parser as generate
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
    from sampling.job import build_parser as generate

    a = generate().parse_args(["--prompt", "x", "--blocks_to_swap", "2", "--fp8_compute", "--t5_tokenizer=tok",
                               "--negative_prompt=--x"])
    assert (a.blocks_to_swap, a.fp8_compute, a.t5_tokenizer, a.negative_prompt) == (2, True, "tok", "--x")
    b = vars(train().parse_args(["--blocks-to-swap", "3", "--t5-tokenizer", "tok", "--fp8-base"]))
    assert (b["blocks_to_swap"], b["t5_tokenizer"], b["fp8_base"]) == (3, "tok", True)
