"""The main job on the built-in demo, end to end at toy length: `python -m distill.train` with only size flags
renders a teacher dataset, caches it, trains, exports the LoRA; `python -m distill.evaluate` scores it; and
`python -m sampling.generate` with no --model samples the demo (with `--lora demo` the shipped LoRA)."""

import json

import pytest
from PIL import Image

from distill import evaluate, evaluation, run_setup, train
from distill.config_files import build_config
from distill.demo import world
from sampling.demo import DEMO_FOLDER, DEMO_LORA, IMAGE_SIZE, T5_LENGTH
from sampling.png_record import read_png_params


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-run")
    argv = ["--output", str(out), "--demo_images", "4", "--steps", "2", "--batch_size", "2", "--log_every", "1",
            "--checkpoint_every", "0", "--sample_every", "2", "--sample_steps", "1",
            "--sample_prompts", "a red circle at the top left"]
    assert train.main(argv) == 0
    return out


def test_no_arguments_mean_the_demo_preset():
    cfg = build_config("demo", {})
    assert cfg.model == "demo" and cfg.resolution == IMAGE_SIZE and cfg.t5_length == T5_LENGTH
    # the recipe's fixed shift range, and its sampling shift in the LoRA's hints (docs/method.md §2, §8)
    scfm = cfg.scfm
    assert (scfm.shift_min, scfm.shift_max, cfg.sample_shift, scfm.dynamic_shift_prob) == (2.5, 4.5, 3.0, 0.0)
    assert cfg.export_set == "slow_ema"  # what the default run's numbers in README are of
    resolved = run_setup.resolve_demo(cfg)
    assert resolved.model == str(DEMO_FOLDER) and resolved.data.endswith("data")
    assert resolved.t5_tokenizer.endswith("tokenizer_2") and resolved.vae.endswith("vae")


def test_demo_training_renders_trains_and_exports(demo_run):
    meta = [json.loads(ln) for ln in (demo_run / "data" / "metadata.jsonl").read_text().splitlines()]
    assert len(meta) == 4 and all(world.parse_caption(m["prompt"]) is not None for m in meta)
    image = Image.open(demo_run / "data" / meta[0]["file_name"])
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    log = [json.loads(ln) for ln in (demo_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r][-1] == 2
    for suffix in ("", "-kohya"):  # diffusers (loads everywhere) and kohya: the default layouts
        assert (demo_run / f"scfm-lora-slow_ema{suffix}.safetensors").is_file()  # the demo exports the slow EMA


def test_demo_training_samples_have_the_configured_size(demo_run):
    # the demo VAE has 4 image pixels per latent pixel, not the 8 of FLUX.1's: samples were 32 px once
    assert build_config("demo", {}).sample_size == 64
    assert Image.open(demo_run / "samples" / "step-000002_00.png").size == (64, 64)


def test_evaluate_scores_the_trained_lora(demo_run, tmp_path):
    report = tmp_path / "eval.json"
    grid = tmp_path / "grid.png"
    prompts = ["a red circle at the top left", "a blue square in the center on a white background"]
    argv = ["--lora", str(demo_run / "scfm-lora-slow_ema-kohya.safetensors"), "--prompts", *prompts, "--per-prompt", "1",
            "--steps", "1", "2", "--teacher-steps", "4", "--json", str(report), "--grid", str(grid),
            "--grid-scale", "1", "--threads", "1"]
    assert evaluate.main(argv) == 0
    data = json.loads(report.read_text())
    names = [r["name"] for r in data["rows"]]
    assert names == ["world", "teacher 4", "teacher 1", "teacher 2", "scfm 1", "scfm 2"]
    for row in data["rows"]:
        assert {"name", "model", "steps", *evaluation.METRICS} <= set(row)
        assert 0 <= row["adherence"] <= 100
    assert data["rows"][1]["paired"] == 0 and data["rows"][1]["hist"] == 0  # the reference against itself
    assert Image.open(grid).size == (64 * len(prompts), 64 * len(names))


def test_generate_without_model_samples_the_demo(tmp_path):
    from sampling import generate

    out = tmp_path / "a.png"
    argv = ["--prompt", "a red circle at the top left", "--steps", "4", "--out", str(out), "--lora", "demo"]
    assert generate.main(argv) == 0
    image = Image.open(out)
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    params = read_png_params(image)
    assert params["model"] == str(DEMO_FOLDER) and [r["path"] for r in params["loras"]] == [str(DEMO_LORA)]
    assert params["max_sequence_length"] == T5_LENGTH and params["steps"] == 4


def test_model_demo_without_its_preset_renders_and_caches_at_the_familys_text_length(tmp_path):
    """`--model demo` without `--config demo`: the default t5_length (0, the family's) is resolved before the demo
    teacher renders its data, which refused a length of 0."""
    out = tmp_path / "run"
    assert train.main(["--model", "demo", "--output", str(out), "--cache_only", "--demo_images", "1",
                       "--resolution", str(IMAGE_SIZE), "--device", "cpu"]) == 0
    assert json.loads((out / "cache" / "cache.json").read_text())["key"]["t5_length"] == 256
