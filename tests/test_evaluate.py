"""distill/evaluate.py on a random demo-shaped pipeline folder (no shipped demo needed): the table's shape, the
reference row at distance 0, a zero LoRA that changes nothing, a LoRA that does, the grid's size, and one-line
errors for bad input that leave existing files alone."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluate_refusals import refused

from distill.demo import models, world
from distill.evaluate import main
from distill.evaluation import EvalConfig, evaluate
from distill.lora import LoRAConfig, inject_lora, set_state_dict
from model.flux import Flux
from model.vae import AutoEncoder
from sampling.demo import T5_LENGTH
from sampling.png_record import read_png_params
from weights.lora_write import save_lora

PROMPTS = ("a red circle at the top left", "a blue square in the center on a white background")
SMALL = ["--per-prompt", "2", "--steps", "1", "2", "--teacher-steps", "4", "--threads", "1", "--prompts", *PROMPTS]
NAMES = ["world", "teacher 4", "teacher 1", "teacher 2", "scfm 1", "scfm 2"]
METRICS = ("adherence", "paired", "hist", "crispness", "iou")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The demo's architecture at random init (default PyTorch init, so the velocity is not zero)."""
    spiece = models.train_spiece(world.sample(0, 200)[1], seed=0)
    clip, t5 = models.build_text_encoders(models.spiece_pieces(spiece), seed=0)
    torch.manual_seed(0)
    return models.save_pipeline(tmp_path_factory.mktemp("evaluate") / "demo", transformer=Flux(models.FLUX_CONFIG),
                                vae=AutoEncoder(models.VAE_CONFIG).eval(), clip=clip, t5=t5, spiece=spiece)


def lora_file(path, layout: str = "ours", up_std: float = 0.0, config=models.FLUX_CONFIG):
    """A rank-2 LoRA over every Flux target: inject_lora's init (random down, zero up), up optionally random."""
    model = Flux(config)
    inject_lora(model, LoRAConfig(rank=2, alpha=2.0), torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    state = {k: torch.randn(v.shape, generator=gen) * up_std if k.endswith(".lora_up") else v
             for k, v in set_state_dict(model, "live").items()}
    return save_lora(state, path, layout=layout, alpha=2.0)


def test_cli_writes_the_table_and_the_grid(folder, tmp_path, capsys):
    lora = lora_file(tmp_path / "kohya.safetensors", "kohya", up_std=0.05)
    out, grid = tmp_path / "eval.json", tmp_path / "grid.png"
    assert main(["--model", str(folder), "--lora", str(lora), "--json", str(out), "--grid", str(grid),
                 "--grid-scale", "3", *SMALL]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in NAMES)

    report = json.loads(out.read_text())
    cfg = report["config"]
    assert cfg["steps"] == [1, 2] and cfg["teacher_steps"] == 4 and cfg["prompts"] == list(PROMPTS)
    assert cfg["per_prompt"] == 2 and cfg["t5_length"] == T5_LENGTH and cfg["lora_scale"] == 1.0
    rows = {r["name"]: r for r in report["rows"]}
    assert [r["name"] for r in report["rows"]] == NAMES
    for r in report["rows"]:
        split = {"hist_by_attribute"} if r["model"] != "world" else set()
        assert set(r) == {"name", "model", "steps", *METRICS, *split}
    for r in report["rows"][1:]:  # hist is the mean of its per-attribute parts
        parts = r["hist_by_attribute"]
        assert set(parts) == {"shape", "colour", "background", "position", "size"}
        assert abs(sum(parts.values()) / 5 - r["hist"]) < 1e-3
    assert all(v == 0 for v in rows["teacher 4"]["hist_by_attribute"].values())
    assert [(r["model"], r["steps"]) for r in report["rows"]] == [
        ("world", None), ("teacher", 4), ("teacher", 1), ("teacher", 2), ("scfm", 1), ("scfm", 2)]
    assert rows["world"]["paired"] is None and rows["world"]["hist"] is None
    assert rows["world"]["adherence"] == 100.0  # ground-truth renders of the prompts
    assert rows["teacher 4"]["paired"] == 0.0 and rows["teacher 4"]["hist"] == 0.0
    assert rows["teacher 1"]["paired"] > 0
    # the LoRA was merged for the scfm rows (and only for them: the teacher rows do not see it)
    assert rows["scfm 1"]["paired"] != rows["teacher 1"]["paired"]

    size = world.SIZE * 3
    with Image.open(grid) as im:
        assert im.size == (len(PROMPTS) * size, len(NAMES) * size) and im.mode == "RGB"
        assert read_png_params(im)["rows"] == NAMES
        pixels = np.asarray(im)
    assert np.array_equal(pixels[:size:3, :size:3], world.sample_for_prompt(PROMPTS[0], 0, 1)[0][0])


def test_the_variant_world_reads_its_own_palette_and_adds_style(folder):
    """--world variant without --out: the world row is drawn in the swapped palette (100% adherent, 100% styled
    as that world reads it), the rows carry a style column, and the other metrics are those of the base world's
    table wherever the palette does not enter (paired: pixels against the same reference)."""
    base, variant = (evaluate(EvalConfig(model=folder, lora=None, prompts=PROMPTS, per_prompt=2, steps=(1,),
                                         teacher_steps=2, world=w)) for w in ("base", "variant"))
    rows = {r["name"]: r for r in variant["rows"]}
    assert rows["world"]["adherence"] == 100.0 and rows["world"]["style"] == 100.0
    assert all("style" in r for r in variant["rows"]) and not any("style" in r for r in base["rows"])
    assert variant["config"]["world"] == "variant" and base["config"]["world"] == "base"
    assert [r["paired"] for r in variant["rows"]] == [r["paired"] for r in base["rows"]]
    truth = world.sample_for_prompt(PROMPTS[0], 0, 1, world="variant")[0][0]
    assert np.array_equal(variant["grid"][:world.SIZE, :world.SIZE], truth)
    assert not np.array_equal(base["grid"][:world.SIZE, :world.SIZE], truth)  # red drawn blue: another image
    with pytest.raises(ValueError, match="--world sepia: one of base, variant"):
        evaluate(EvalConfig(model=folder, lora=None, prompts=PROMPTS, world="sepia"))


def test_a_zero_lora_gives_the_teacher_rows(folder, tmp_path):
    lora = lora_file(tmp_path / "zero.safetensors", "diffusers", up_std=0.0)
    report = evaluate(EvalConfig(model=folder, lora=lora, prompts=PROMPTS, per_prompt=2, steps=(1, 2),
                                 teacher_steps=4))
    rows = {r["name"]: r for r in report["rows"]}
    for n in (1, 2):
        assert {k: rows[f"scfm {n}"][k] for k in METRICS} == {k: rows[f"teacher {n}"][k] for k in METRICS}
    grid, size = report["grid"], world.SIZE
    assert grid.shape == (len(NAMES) * size, len(PROMPTS) * size, 3) and grid.dtype == np.uint8
    assert np.array_equal(grid[4 * size:], grid[2 * size:4 * size])  # scfm 1, 2 drawn exactly as teacher 1, 2


def test_floor_row_is_the_reference_sampler_from_other_noises(folder):
    """--floor: the reference sampler again, from the noises seed + 1 would use; scored against seed's reference."""
    base = dict(model=folder, lora=None, prompts=PROMPTS, per_prompt=2, steps=(1,), teacher_steps=4)
    report = evaluate(EvalConfig(**base, floor=True))
    names = [r["name"] for r in report["rows"]]
    assert names == ["world", "teacher 4", "teacher 4 new noises", "teacher 1"]
    floor = report["rows"][2]
    assert floor["model"] == "teacher" and floor["steps"] == 4 and floor["paired"] > 0
    size = world.SIZE
    other = evaluate(EvalConfig(**base, seed=1))["grid"]  # rows: world, teacher 4, teacher 1
    assert np.array_equal(report["grid"][2 * size:3 * size], other[size:2 * size])
    assert not np.array_equal(report["grid"][2 * size:3 * size], report["grid"][size:2 * size])


def test_shift_moves_the_few_step_rows_not_the_reference(folder):
    base = dict(model=folder, lora=None, prompts=PROMPTS, per_prompt=2, steps=(2,), teacher_steps=4)
    plain, shifted = evaluate(EvalConfig(**base))["grid"], evaluate(EvalConfig(**base, shift=3.0))
    size = world.SIZE  # grid rows: world, teacher 4 (the reference), teacher 2
    assert np.array_equal(shifted["grid"][:2 * size], plain[:2 * size])
    assert not np.array_equal(shifted["grid"][2 * size:], plain[2 * size:])  # sigmas 1, 0.75, 0 against 1, 0.5, 0
    assert shifted["config"]["shift"] == 3.0
    with pytest.raises(ValueError, match="--shift"):
        evaluate(EvalConfig(**base, shift=0.0))


def test_missing_lora_or_model_is_a_one_line_error(folder, tmp_path):
    grid = tmp_path / "grid.png"
    msg = refused(["--model", str(folder), "--lora", str(tmp_path / "nope.safetensors"), "--grid", str(grid),
                   *SMALL])
    assert "--lora" in msg and "nope.safetensors" in msg and "distill.train" in msg
    msg = refused(["--model", str(tmp_path / "missing"), "--lora", str(tmp_path / "x"), *SMALL])
    assert "--model" in msg and "tools.make_demo" in msg
    assert not grid.exists()


def test_wrong_files_and_prompts_are_one_line_errors(folder, tmp_path):
    lora = lora_file(tmp_path / "ok.safetensors")
    base = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    msg = refused(["--model", str(folder), "--lora", str(base), "--no-grid", *SMALL])
    assert "no LoRA tensors" in msg
    deeper = lora_file(tmp_path / "deeper.safetensors",
                       config=dataclasses.replace(models.FLUX_CONFIG, depth_single_blocks=7))
    msg = refused(["--model", str(folder), "--lora", str(deeper), "--no-grid", *SMALL])
    assert "single_blocks.6" in msg and "not in this model" in msg
    msg = refused(["--model", str(folder), "--lora", str(lora), "--no-grid", *SMALL[:-2], "a photo of a cat"])
    assert "not a caption of the demo world" in msg


def test_flags_that_only_out_reads_are_refused_on_the_demo_table(folder, tmp_path, capsys):
    lora = str(lora_file(tmp_path / "ok.safetensors"))
    msg = refused(["--model", str(folder), "--lora", lora, "--compare", lora, "--width", "128", "--vae",
                   str(folder / "vae"), "--guidance", "4", "--no-grid", *SMALL])
    assert msg.startswith("error: --vae, --compare, --width, --guidance: read with --out DIR only"), msg
    msg = refused(["--model", str(folder), "--lora", lora, "--lora", lora, "--no-grid", *SMALL])
    assert "a second --lora" in msg
    assert main(["--lora", "demo", "--no-grid", *SMALL[:-len(PROMPTS)], PROMPTS[0]]) == 0  # as --help says
    assert "scfm 2" in capsys.readouterr().out


def test_existing_outputs_are_kept_without_overwrite(folder, tmp_path):
    lora = lora_file(tmp_path / "ok.safetensors")
    for flags in (["--grid"], ["--no-grid", "--json"]):
        path = tmp_path / f"mine{flags[-1][2:]}.{'png' if flags == ['--grid'] else 'json'}"  # --grid takes *.png
        path.write_text("the user's file")
        msg = refused(["--model", str(folder), "--lora", str(lora), *flags, str(path), *SMALL])
        assert "exists" in msg and "--overwrite" in msg
        assert path.read_text() == "the user's file"


def test_fp8_rows_are_the_lora_on_rounded_weights_and_the_teacher_rows_stay(folder, tmp_path):
    lora = lora_file(tmp_path / "l.safetensors", up_std=0.3)
    base = dict(model=folder, lora=lora, prompts=PROMPTS, per_prompt=2, steps=(1, 2), teacher_steps=4)
    plain, fp8 = evaluate(EvalConfig(**base)), evaluate(EvalConfig(**base, fp8=True))
    assert [r["name"] for r in fp8["rows"]] == NAMES[:4] + ["scfm-fp8 1", "scfm-fp8 2"] and fp8["config"]["fp8"]
    size = world.SIZE
    assert np.array_equal(fp8["grid"][:4 * size], plain["grid"][:4 * size])  # world and teacher rows: fp32
    teacher, student = (plain["grid"][r * size:(r + 2) * size].astype(int) for r in (2, 4))
    rounded = fp8["grid"][4 * size:].astype(int)
    lora_effect, rounding = np.abs(student - teacher).mean(), np.abs(rounded - student).mean()
    assert 0 < rounding < lora_effect / 4, (rounding, lora_effect)  # the LoRA applied, then e4m3 rounding
    with pytest.raises(ValueError, match="--fp8"):
        evaluate(EvalConfig(**{**base, "lora": None}, fp8=True))
