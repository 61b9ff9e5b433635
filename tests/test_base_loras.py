"""--base_loras: an SCFM LoRA trained on base + a style LoRA (distill.train), the teacher's data rendered with it
(make_dataset --lora), the stack recorded in every exported layout, and generate's warning when the SCFM LoRA is
sampled without it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_same_bits, random_lora
from test_data import FakePipeline
from test_trainer import config, trainer

from distill.lora_export import export_checkpoint, export_lora
from distill.run_setup import load_model
from distill.trainer import TrainingError
from model.flux import FLUX_CONFIGS, Flux
from sampling.job import missing_base_loras
from weights.io import file_sha256, read_header
from weights.lora_merge import apply_loras
from weights.lora_write import write_lora


@pytest.fixture
def style(tmp_path):
    """A style LoRA for the tiny Flux, in kohya's layout (any layout is read)."""
    return write_lora(random_lora(Flux(FLUX_CONFIGS["tiny"]), seed=3), tmp_path / "style.safetensors", "kohya")


def test_the_model_is_loaded_with_the_base_loras_merged(tmp_path, style):
    cfg = config(tmp_path, seed=5, base_loras=(f"{style}:0.5",))
    got = load_model(cfg, torch.device("cpu"))
    torch.manual_seed(5)
    plain = Flux(FLUX_CONFIGS["tiny"])
    want = Flux(FLUX_CONFIGS["tiny"])
    want.load_state_dict(plain.state_dict())
    apply_loras(want, [(str(style), 0.5)], restorable=False)
    assert_same_bits(got.state_dict(), want.state_dict())
    assert not torch.equal(got.double_blocks[0].img_attn.qkv.weight, plain.double_blocks[0].img_attn.qkv.weight)


def test_every_layout_records_the_stack_and_generate_warns_without_it(tmp_path, style):
    cfg = config(tmp_path, steps=2, base_loras=(f"{style}:0.5",))
    t = trainer(tmp_path, cfg)
    t.run()
    exported = export_lora(t.model, cfg)
    assert len(exported) == len(cfg.export_formats) == 2
    moved = style.rename(tmp_path / "elsewhere.safetensors")  # a checkpoint exports with its own record of them
    exported += export_checkpoint(cfg.output, formats=("kohya",))
    moved.rename(style)
    want = [{"file": "style.safetensors", "scale": 0.5, "sha256": file_sha256(style)}]
    for path in exported:
        assert json.loads(read_header(path)[1]["scfm_training"])["base_loras"] == want, path.name
        warning = missing_base_loras([(str(path), 1.0)])
        assert warning == [f"warning: {path.name} was trained on top of style.safetensors at scale 0.5; add --lora "
                           "style.safetensors:0.5 to sample it as trained"]
        assert missing_base_loras([(str(path), 1.0), (str(style), 0.5)]) == []
        assert len(missing_base_loras([(str(path), 1.0), (str(style), 0.8)])) == 1  # another scale
    assert missing_base_loras([(str(style), 1.0)]) == []  # a LoRA without the record: nothing to say
    with pytest.raises(TrainingError, match="different base_loras"):
        trainer(tmp_path, cfg.replace(base_loras=(), resume=True, steps=4)).run()
    # another style LoRA at the same path (the spec is the same): the checkpoint's sha256 tells
    write_lora(random_lora(Flux(FLUX_CONFIGS["tiny"]), seed=4), style, "kohya", overwrite=True)
    with pytest.raises(TrainingError, match=r"the files of --base_loras are not those that run trained with"):
        trainer(tmp_path, cfg.replace(resume=True, steps=4)).resume()


def test_a_teacher_lora_replaced_at_its_path_is_refused_on_resume(tmp_path, style):
    cfg = config(tmp_path, steps=2, checkpoint_every=0, teacher_lora=str(style))
    trainer(tmp_path, cfg).run()
    assert trainer(tmp_path, cfg.replace(resume=True, steps=3)).resume()  # the same file: resumed
    write_lora(random_lora(Flux(FLUX_CONFIGS["tiny"]), seed=4), style, "kohya", overwrite=True)
    with pytest.raises(TrainingError, match=r"the files of --teacher_lora are not those that run trained with"):
        trainer(tmp_path, cfg.replace(resume=True, steps=3)).resume()


def test_make_dataset_renders_with_the_loras_and_keeps_datasets_apart(tmp_path, style, monkeypatch, capsys):
    from distill import make_dataset, teacher_data
    from sampling.demo import DEMO_FOLDER

    args = teacher_data.build_parser().parse_args(
        ["--model", str(DEMO_FOLDER), "--prompts", "p.txt", "--out", "o", "--images-per-bucket", "1",
         "--lora", f"{style}:0.5", "--device", "cpu"])
    assert teacher_data.make_pipeline(args).loras == [(str(style), 0.5)]

    monkeypatch.setattr(teacher_data, "make_pipeline", lambda args: FakePipeline())
    (tmp_path / "prompts.txt").write_text("a cat\n")
    argv = ["--model", "unused", "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "d"),
            "--images-per-bucket", "1", "--steps", "2"]
    assert make_dataset.main([*argv, "--lora", f"{style}:0.5"]) == 0
    settings = json.loads((tmp_path / "d" / "make_dataset.json").read_text())
    assert settings["loras"] == [["style.safetensors", 0.5, file_sha256(style)]]
    capsys.readouterr()
    assert make_dataset.main(argv) == 2  # without the LoRA it would be another teacher's data
    assert "made with other loras; use another --out" in capsys.readouterr().err  # a setting dropped is named too
    assert settings["run"] == {"dtype": "fp32", "fp8": False, "fp8_compute": False, "variant": None}
    assert make_dataset.main([*argv, "--lora", f"{style}:0.5", "--dtype", "bf16"]) == 2  # other pixels: refused
    assert "made with other run; use another --out" in capsys.readouterr().err
    del settings["run"]  # a dataset from before the run options were recorded: continued
    (tmp_path / "d" / "make_dataset.json").write_text(json.dumps(settings))
    assert make_dataset.main([*argv, "--lora", f"{style}:0.5", "--dtype", "bf16"]) == 0
    assert make_dataset.main([*argv, "--lora", str(tmp_path / "missing.safetensors")]) == 2


def test_make_dataset_keeps_datasets_of_other_parts_apart_by_content(tmp_path, monkeypatch, capsys):
    """The parts given beside --model render the images too: another VAE file is refused, the same one at another
    path continues (distill/data.py file_identity: name, size, header and sampled chunks), and a dataset from
    before the parts were recorded continues as it was."""
    import shutil

    from safetensors.torch import save_file

    from distill import make_dataset, teacher_data

    monkeypatch.setattr(teacher_data, "make_pipeline", lambda args: FakePipeline())
    (tmp_path / "prompts.txt").write_text("a cat\n")
    save_file({"w": torch.ones(4)}, tmp_path / "vae.safetensors")
    save_file({"w": torch.full((4,), 2.0)}, tmp_path / "other.safetensors")
    (tmp_path / "moved").mkdir()
    shutil.copy(tmp_path / "vae.safetensors", tmp_path / "moved" / "vae.safetensors")
    argv = ["--model", "unused", "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "d"),
            "--images-per-bucket", "1", "--steps", "2"]
    assert make_dataset.main([*argv, "--vae", str(tmp_path / "vae.safetensors")]) == 0
    assert make_dataset.main([*argv, "--vae", str(tmp_path / "moved" / "vae.safetensors")]) == 0  # the same file
    capsys.readouterr()
    for vae in (tmp_path / "other.safetensors", None):  # another VAE, or the pipeline's own: other pixels
        assert make_dataset.main([*argv, *(("--vae", str(vae)) if vae else ())]) == 2
        assert "made with other parts; use another --out" in capsys.readouterr().err
    settings = json.loads((tmp_path / "d" / "make_dataset.json").read_text())
    del settings["parts"]  # a dataset from before the parts were recorded: continued
    (tmp_path / "d" / "make_dataset.json").write_text(json.dumps(settings))
    assert make_dataset.main([*argv, "--vae", str(tmp_path / "other.safetensors")]) == 0


def test_a_checkpoint_from_before_the_field_existed_resumes(tmp_path):
    """A checkpoint written without base_loras in its config is a run without them (the field's default)."""
    cfg = config(tmp_path, "old", steps=2)
    trainer(tmp_path, cfg).run()
    state_file = next((tmp_path / "old" / "checkpoints").glob("step-*/state.json"))
    state = json.loads(state_file.read_text())
    del state["config"]["base_loras"]
    state_file.write_text(json.dumps(state))
    resumed = trainer(tmp_path, cfg.replace(resume=True, steps=3))
    resumed.run()
    assert resumed.progress.step == 3
