"""`python -m distill.train`'s command line: a repeated tuple flag (--base_loras A --base_loras B) keeps both, --resume
with nothing to resume is refused before a folder is made, LoRAs that do not fit the model are refused before the
demo data or the cache, a negative --seed is refused, and --help / a range error give the demo preset's values
where a run takes them."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
from conftest import random_lora
from test_config_resume import one_line_error, train_argv

import distill.train
from distill.config import ConfigError, DistillConfig, flat_fields
from distill.config_files import load_toml
from distill.dataset import DataError
from distill.train import build_parser, main, make_config
from model.flux import FLUX_CONFIGS, Flux
from model.mmdit import MMDIT_CONFIGS, MMDiT
from weights.lora_write import write_lora


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> list[str]:
    return train_argv(tmp_path_factory)


def flags(argv: list[str]) -> dict:
    return vars(build_parser().parse_args(argv))


# ----- 1: a repeated tuple flag adds, and still replaces the file's value -----------------------------------------


def test_a_repeated_tuple_flag_keeps_every_value_and_replaces_the_files(tmp_path):
    args = flags(["--model", "tiny", "--base_loras", "a.safetensors:0.5", "--base_loras", "b.safetensors:0.3",
                  "--sample_prompts", "a cat", "a dog", "--sample_prompts", "a fox",
                  "--export_formats", "ours", "--export_formats", "kohya"])
    cfg, _ = make_config(args.pop("config"), args)
    assert cfg.lora.base_loras == ("a.safetensors:0.5", "b.safetensors:0.3")
    assert cfg.sample_prompts == ("a cat", "a dog", "a fox")
    assert cfg.export_formats == ("ours", "kohya")
    # a file's list is replaced by the flags' (not added to), and the bare flag still means none
    file = tmp_path / "run.toml"
    file.write_text('model = "tiny"\nbase_loras = ["file.safetensors"]\nexport_formats = ["diffusers"]\n')
    for argv, loras, formats in [(["--base_loras", "x.safetensors"], ("x.safetensors",), ("diffusers",)),
                                 (["--base_loras"], (), ("diffusers",)),
                                 (["--export_formats", "kohya", "--export_formats", "ours"], ("file.safetensors",),
                                  ("kohya", "ours"))]:
        args = flags(["--config", str(file), *argv])
        cfg, _ = make_config(args.pop("config"), args)
        assert (cfg.lora.base_loras, cfg.export_formats) == (loras, formats), argv


# ----- 2: --resume where no run ever was --------------------------------------------------------------------------


def test_resume_without_any_run_there_is_refused_and_creates_nothing(tmp_path, capsys, cli):
    typo = tmp_path / "runs" / "typo"
    err = one_line_error(capsys, [*cli, "--output", str(typo), "--resume"],
                         f"--resume: no checkpoint in {typo / 'checkpoints'}; check --output, or drop --resume to "
                         "start a new run")
    assert "Warning" not in err and not (tmp_path / "runs").exists()
    # the demo preset (no --model): refused the same way, before it renders any data
    one_line_error(capsys, ["--output", str(typo), "--resume"], "--resume: no checkpoint in")
    assert not (tmp_path / "runs").exists()


def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_it_again_in_one_line(tmp_path, capsys, cli):
    out = tmp_path / "killed"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n')  # what a run killed before step 2 leaves
    one_line_error(capsys, [*cli, "--output", str(out)], "is an earlier run's; choose another --output (or --resume")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert main([*cli, "--output", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"--resume: no checkpoint in {out / 'checkpoints'} yet; starting that run again from step 0\n" in err
    assert not [w for w in said if "--resume" in str(w.message)], [str(w.message) for w in said]
    assert (out / "checkpoints" / "step-000002").is_dir()


# ----- 3: LoRAs that do not fit the model, before the data and the cache ------------------------------------------


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("loras")
    wide = Flux(dataclasses.replace(FLUX_CONFIGS["tiny"], hidden_size=48, axes_dim=(8, 8, 8)))
    return {"sd3": write_lora(random_lora(MMDiT(MMDIT_CONFIGS["tiny"]), seed=1, family="sd3"),
                              folder / "sd3.safetensors", "kohya"),
            "wide": write_lora(random_lora(wide, seed=1), folder / "wide.safetensors", "kohya"),
            "fits": write_lora(random_lora(Flux(FLUX_CONFIGS["tiny"]), seed=1), folder / "fits.safetensors", "kohya")}


@pytest.fixture
def no_cache(monkeypatch):
    """The cache and the demo's data stand in for "too late": reaching them is this line."""
    def reached(*_, **__):
        raise DataError("reached the data / cache")
    monkeypatch.setattr(distill.train, "prepare_cache", reached)
    monkeypatch.setattr(distill.train, "render_demo_data", reached)


@pytest.mark.parametrize(("flag", "lora", "message"), [
    ("--teacher_lora", "sd3", "a LoRA for SD3 / SD3.5, this run trains Flux"),
    ("--teacher_lora", "wide", "img_in: delta_W [48, 16] in the file, [32, 16] in this model"),
    ("--base_loras", "sd3", "sd3.safetensors: a "),  # another family's LoRA
    ("--base_loras", "wide", "has shape [48, 48], the model's weight [32, 32]"),
])
def test_a_lora_that_does_not_fit_is_refused_before_the_cache(tmp_path, capsys, cli, loras, no_cache, flag, lora,
                                                               message):
    err = one_line_error(capsys, [*cli, "--output", str(tmp_path / "run"), flag, str(loras[lora])], message)
    assert "reached" not in err
    # LoRAs that fit pass the check and go on to the cache
    one_line_error(capsys, [*cli, "--output", str(tmp_path / "ok"), flag, str(loras["fits"])], "reached the data")


def test_the_demo_checks_a_teacher_lora_on_its_meta_model_before_rendering(tmp_path, capsys, no_cache):
    """The demo transformer is read from its files: the check builds it on meta from their headers."""
    from distill.demo.models import FLUX_CONFIG

    tiny = Flux(dataclasses.replace(FLUX_CONFIGS["tiny"], guidance_embed=False))  # the demo's layers, other widths
    other = write_lora(random_lora(tiny, seed=1), tmp_path / "other.safetensors", "kohya")
    one_line_error(capsys, ["--output", str(tmp_path / "demo"), "--teacher_lora", str(other)],
                   "img_in: delta_W [32, 16] in the file, [128, 64] in this model")
    own = write_lora(random_lora(Flux(FLUX_CONFIG), seed=1), tmp_path / "own.safetensors", "kohya")
    one_line_error(capsys, ["--output", str(tmp_path / "demo"), "--teacher_lora", str(own)], "reached the data")
    one_line_error(capsys, ["--output", str(tmp_path / "demo"), "--base_loras", str(other)],
                   f"--base_loras: {other}: LoRA for ")  # the weights' shapes differ
    assert not (tmp_path / "demo" / "data").exists()


# ----- 4: a negative seed -----------------------------------------------------------------------------------------


def test_a_negative_seed_is_refused_as_generate_refuses_it(capsys, cli, tmp_path):
    one_line_error(capsys, [*cli, "--output", str(tmp_path / "run"), "--seed", "-1"],
                   "seed -1: seeds are 0 or more (-1 does not mean random here); pass --seed 0")
    with pytest.raises(ConfigError, match=r"^seed -5: seeds are 0 or more"):
        DistillConfig.from_flat(seed=-5)  # a config file's too
    with pytest.raises(ConfigError, match=r"^seed 18446744073709551616: over torch's largest seed"):
        DistillConfig.from_flat(seed=2**64)  # the LoRA's initial values are drawn with it
    assert not (tmp_path / "run").exists()


# ----- 5: --help and range errors say the demo's values where the demo applies -----------------------------------


def demo_values() -> dict:
    defaults = {k: f.default for k, (f, _) in flat_fields().items()}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in load_toml("demo").items() if v != defaults[k]}


def test_help_gives_the_demo_presets_values_beside_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    assert "With neither --config nor --model" in text and "distill/configs/demo.toml applies" in text
    demo = demo_values()
    assert {"steps", "output", "lr", "export_set", "demo_images"} <= demo.keys()
    for name, value in demo.items():
        default = flat_fields()[name][0].default
        assert f"[{default!r}; demo {value!r}]" in text, name
    assert f"[{flat_fields()['seed'][0].default!r}]" in text  # a field the demo leaves alone: its default alone


def test_a_range_error_names_the_default_the_run_would_have(capsys, tmp_path):
    demo_lr = load_toml("demo")["lr"]
    one_line_error(capsys, ["--lr", "-1"], f"lr must lie in (0, 1], got -1.0 (--lr; default {demo_lr})")
    preset_lr = load_toml("flux-dev-scfm")["lr"]
    one_line_error(capsys, ["--config", "flux-dev-scfm", "--lr", "2"], f"(--lr; default {preset_lr})")
    field_lr = flat_fields()["lr"][0].default
    one_line_error(capsys, ["--model", "tiny", "--output", str(tmp_path / "r"), "--lr", "2"],
                   f"(--lr; default {field_lr})")
