"""`python -m distill.train` with no config on a family guided by CFG (SD3.5, klein base) distils the guided teacher of
its packaged recipe (the preset's cfg_scale, said in one line) and its LoRA records that guidance, as generate reads
it; `--cfg_scale 0` still means off, a resume keeps the value its run began with, and FLUX.1 and the distilled klein
(which sample without CFG) stay at 0. With no --targets, the run takes its model's table (it was refused with
"pass --targets sd3"). Tiny models on caches built from fake encoders, one or two steps each."""

from __future__ import annotations

import warnings
from pathlib import Path

from safetensors.torch import save_file
from test_data import make_cache
from test_flux2_scfm import base_model, klein_cache
from test_sd3_scfm import sd3_cache

from distill.checkpoint import newest_settings
from distill.config_files import build_config, load_toml, presets
from distill.train import main as train
from sampling.samplers import cfg_scale_from_w
from weights.families import get_family
from weights.lora import read_lora

FAST = ["--device", "cpu", "--dtype", "fp32", "--rank", "2", "--batch_size", "1", "--steps", "1", "--sample_every",
        "0", "--export_formats", "ours", "--t5_length", "5", "--resolution", "512"]
SAID = "no flag or file sets it"  # the one line a run taking its recipe's cfg_scale says


def trained(argv: list[str]) -> tuple[list[str], object]:
    """Run train's CLI; (the lines it warned about cfg_scale, the exported LoRA's recommendation)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train(argv) == 0
    (lora,) = Path(argv[argv.index("--output") + 1]).glob("scfm-lora-*.safetensors")  # --export_formats ours
    return [str(w.message) for w in caught if "cfg_scale" in str(w.message)], read_lora(lora).recommended


def recipe(preset: str) -> float:
    w = load_toml(preset)["cfg_scale"]
    assert w > 0  # the recipe guides its teacher
    return w


def test_sd3_without_a_config_bakes_in_the_recipes_cfg_and_a_resume_keeps_each_runs_own(tmp_path):
    sd3_cache(tmp_path)
    w = recipe("sd35-large-scfm")
    common = ["--model", "tiny-sd3", "--cache", str(tmp_path / "cache"), *FAST]
    said, rec = trained([*common, "--output", str(tmp_path / "default")])
    assert len(said) == 1 and said[0].startswith(f"cfg_scale {w:g}: {SAID}") and "--cfg_scale 0" in said[0], said
    assert "\n" not in said[0]
    assert (rec.guidance, rec.training_cfg_scale) == (cfg_scale_from_w(w), w)  # generate samples it at 1 + w
    said, rec = trained([*common, "--output", str(tmp_path / "off"), "--cfg_scale", "0"])
    assert said == [] and (rec.guidance, rec.training_cfg_scale) == (None, None)  # 0: off, as passed
    for run, want in (("default", w), ("off", 0.0)):  # each run goes on with the cfg_scale it began with
        said, rec = trained(["--output", str(tmp_path / run), "--steps", "2", "--resume"])
        assert said == [] and newest_settings(tmp_path / run / "checkpoints")["cfg_scale"] == want
        assert rec.training_cfg_scale == (want or None)
    said, rec = trained([*common, "--output", str(tmp_path / "fm"), "--objective", "flow_matching"])
    assert said == [] and rec.training_cfg_scale is None  # the plain target, no CFG: its own 0


def test_klein_base_takes_its_recipe_and_the_distilled_klein_none(tmp_path):
    """klein files as BFL names them: 'base' in the name is the CFG model, without it the step-distilled one (a
    cfg_scale above 0 is refused there, so the recipe's must not be taken)."""
    klein_cache(tmp_path)
    w = recipe("flux2-klein-4b-scfm")
    state = base_model().state_dict()
    for name, want in (("tiny-klein-base.safetensors", w), ("tiny-klein.safetensors", 0.0)):
        save_file(state, tmp_path / name)
        said, rec = trained(["--model", str(tmp_path / name), "--cache",
                             str(tmp_path / "cache"), *FAST, "--output", str(tmp_path / name.split(".")[0])])
        assert len(said) == bool(want), (name, said)
        assert rec.training_cfg_scale == (want or None), name
        assert rec.guidance == (cfg_scale_from_w(w) if want else None), name


def test_flux1_keeps_no_cfg(tmp_path):
    make_cache(tmp_path)
    common = ["--model", "tiny", "--targets", "flux", "--cache", str(tmp_path / "cache"), *FAST]
    said, rec = trained([*common, "--output", str(tmp_path / "scfm")])
    assert said == [] and rec.training_cfg_scale is None and rec.guidance == build_config(None, {}).sample_guidance


def test_the_recipe_value_is_the_families_presets():
    """One value per family from its presets (all of FLUX.1's four say none); a family no preset targets: none."""
    from dataclasses import replace

    from distill.config_files import recipe_cfg_scale

    for family in ("flux", "sd3", "flux2"):
        values = {load_toml(p).get("cfg_scale", 0.0) for p in presets() if load_toml(p)["targets"] == family}
        assert len(values) == 1 and recipe_cfg_scale(get_family(family))[0] == values.pop(), family
    assert recipe_cfg_scale(replace(get_family("sd3"), name="other", aliases=())) == (0.0, "")
