"""The sampling command lines' one-line answers to a Ctrl-C, a LoRA given as --model, an impossible --port or a
file as --lora-dir, and the defaults their --help states."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from sampling.demo import DEMO_FOLDER, DEMO_LORA
from sampling.generate import main as generate


def main_of_interrupted(argv: list[str]) -> int:
    """generate's exit code; a Ctrl-C escaping it (the traceback) fails the test, not the whole pytest run."""
    try:
        return generate(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped generate's main: a traceback")


def test_ctrl_c_is_one_line_exit_130_and_leaves_no_partial_png(tmp_path, capsys, monkeypatch):
    """Ctrl-C while the second PNG is being written: the first is kept and listed, the second's half-written
    bytes vanish (the atomic write), and the command says how far it got instead of a traceback."""
    from PIL import Image

    real_save, saves = Image.Image.save, []

    def save(self, fp, *args, **kwargs):
        saves.append(fp)
        if len(saves) == 2:
            with open(fp, "wb") as f:  # the temp file beside the PNG, half-written
                f.write(b"\x89PNG\r\n")
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "out"
    rc = main_of_interrupted(["--prompt", "x", "--batch-size", "2", "--steps", "1", "--device", "cpu", "--out",
                              str(out)])
    captured = capsys.readouterr()
    assert rc == 130
    first = out / "000000_000.png"
    assert captured.out.splitlines() == [str(first)]
    assert captured.err.splitlines()[-1] == f"interrupted: 1 of 2 images written to {out}"
    assert "Traceback" not in captured.err
    assert sorted(p.name for p in out.iterdir()) == [first.name]  # no temp file, no partial second PNG
    with Image.open(first) as im:
        im.load()


def test_ctrl_c_before_a_single_png_is_written(tmp_path, capsys, monkeypatch):
    import sampling.generate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sampling.generate, "render", interrupted)  # Ctrl-C while sampling
    png = tmp_path / "int.png"
    rc = main_of_interrupted(["--prompt", "x", "--steps", "1", "--device", "cpu", "--out", str(png)])
    captured = capsys.readouterr()
    assert (rc, captured.out) == (130, "")
    assert captured.err.splitlines()[-1] == f"interrupted: {png} not written"
    assert list(tmp_path.iterdir()) == []


def diffusers_lora(path):
    """A diffusers-layout Flux LoRA without any metadata: told from its tensor names alone."""
    g = torch.Generator().manual_seed(0)
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 64, generator=g),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(64, 4, generator=g)}, str(path))
    return path


def lora_line(path) -> str:
    return (f"error: --model {path} is a LoRA, not a model: pass the base model as --model and this file as "
            f"--lora {path}")


@pytest.mark.parametrize("kind", ["ours", "diffusers"])
def test_a_lora_given_as_model_is_refused_first_by_generate_and_make_dataset(tmp_path, capsys, kind):
    from distill.make_dataset import main as make_dataset

    lora = DEMO_LORA if kind == "ours" else diffusers_lora(tmp_path / "pytorch_lora_weights.safetensors")
    parts = ["--vae", str(DEMO_FOLDER / "vae"), "--clip", str(DEMO_FOLDER / "text_encoder"), "--t5",
             str(DEMO_FOLDER / "text_encoder_2"), "--t5-tokenizer", str(DEMO_FOLDER / "tokenizer_2")]
    for extra in ([], parts):  # with every other part given too: no "missing keys" from reading it as a model
        assert generate(["--model", str(lora), "--prompt", "x", "--device", "cpu", "--out", str(tmp_path / "g"),
                         *extra]) == 2
        assert capsys.readouterr().err == lora_line(lora) + "\n"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "data"
    assert make_dataset(["--model", str(lora), "--prompts", str(prompts), "--out", str(out),
                         "--images-per-bucket", "1", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == lora_line(lora) + "\n"
    assert not out.exists() and not (tmp_path / "g").exists()


@pytest.fixture
def app(monkeypatch):
    """sampling.app whose Session (the model's load) fails the test: each refusal comes before it. gradio is
    imported only after these checks, so they run without the `ui` extra."""
    import sampling.app

    def no_session(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sampling.app, "Session", no_session)
    return sampling.app


def test_the_app_refuses_a_lora_as_model_before_loading(app, capsys):
    assert app.main(["--model", str(DEMO_LORA)]) == 2
    assert capsys.readouterr().err == lora_line(DEMO_LORA) + "\n"


def test_the_app_says_a_lora_dir_that_is_a_file_is_no_folder(app, tmp_path, capsys):
    image = tmp_path / "teacher.png"
    image.write_bytes(b"\x89PNG\r\n")
    assert app.main(["--lora-dir", str(image)]) == 2
    assert capsys.readouterr().err == (f"error: --lora-dir {image}: a file, not a folder; pass a folder of "
                                       ".safetensors LoRAs\n")
    assert app.main(["--lora-dir", str(DEMO_LORA)]) == 2  # a LoRA file: it could be given as --lora
    assert capsys.readouterr().err.endswith(f"a folder of .safetensors LoRAs, or this file as --lora {DEMO_LORA}\n")


def test_the_app_refuses_a_port_outside_1_to_65535_while_parsing(app, capsys):
    for port in ("99999", "0", "-1", "x"):  # 0: gradio checks its server at port 0 and fails
        with pytest.raises(SystemExit) as e:
            app.main(["--port", port])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith(f"error: argument --port: {port} is not a port (1 to 65535); pass --port 7860")
    for port in (1, 65535):
        assert app.build_parser().parse_args(["--port", str(port)]).port == port


def test_generate_help_states_the_defaults_of_seed_batch_size_and_out():
    from sampling.flags import build_parser

    helps = {a.dest: (a.default, a.help) for a in build_parser()._actions}
    for dest in ("seed", "batch_size", "out"):
        default, text = helps[dest]
        assert re.search(rf"\(default {re.escape(str(default))}/?[,)]", text), (dest, text)
    assert "fixed" in helps["seed"][1]  # 0 is a seed, not "random"
