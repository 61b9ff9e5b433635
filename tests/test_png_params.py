"""What a PNG of ours tells other tools and ours: A1111-style infotext under `parameters` (read here by a
re-implementation of A1111's reader), our JSON under `scfm` (read by `read_png_params`, which still reads the
JSON-in-`parameters` PNGs written before), and the LoRAs with the scale each was applied at, a LoRA's
recommended scale when the command line gives none."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from safetensors.torch import load_file, save_file

from distill.run_outputs import base_lora_records
from sampling.demo import DEMO_LORA
from sampling.generate import main
from sampling.infotext import infotext
from sampling.png_record import read_png_params, save_png
from weights.io import read_header
from weights.lora_merge import lora_spec

# A1111's infotext reader, written here from the behaviour of parse_generation_parameters and unquote in
# AUTOMATIC1111/stable-diffusion-webui, modules/infotext_utils.py (v1.10): the last line holds the settings when
# at least three `Key: value` pairs are found in it, else it is prompt too; the lines before are the prompt up to
# one starting "Negative prompt:", the rest the negative prompt; a value in double quotes is read as JSON; a
# value like 64x32 becomes Key-1 and Key-2.
PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:[^"\\]|\\.)*"|[^,]*)(?:,|$)')


def a1111_parse(text: str) -> dict[str, str]:
    *lines, last = text.strip().split("\n")
    if len(PAIR.findall(last)) < 3:
        lines, last = [*lines, last], ""
    prompt: list[str] = []
    negative: list[str] = []
    into = prompt
    for line in (ln.strip() for ln in lines):
        if line.startswith("Negative prompt:"):
            into, line = negative, line.removeprefix("Negative prompt:").strip()
        into.append(line)
    found = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in PAIR.findall(last):
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        size = re.fullmatch(r"(\d+)x(\d+)", value)
        if size:
            found[f"{key}-1"], found[f"{key}-2"] = size.groups()
        else:
            found[key] = value
    return found


PROMPT = 'a red circle, top left: "big"'
NEGATIVE = "dark, blue: x"


def generate(tmp_path, name: str, *extra: str) -> Image.Image:
    out = tmp_path / name
    assert main(["--prompt", PROMPT, "--steps", "2", "--seed", "5", "--out", str(out), *extra]) == 0
    return Image.open(out)


def test_a1111_reads_prompt_negative_and_settings_of_a_generated_png(tmp_path):
    # the demo Flux with real CFG, so that a negative prompt is used
    image = generate(tmp_path, "a.png", "--width", "64", "--height", "32", "--true-cfg", "2",
                     "--negative-prompt", NEGATIVE)
    found = a1111_parse(image.text["parameters"])
    assert (found["Prompt"], found["Negative prompt"]) == (PROMPT, NEGATIVE)
    assert (found["Steps"], found["Seed"], found["Size-1"], found["Size-2"]) == ("2", "5", "64", "32")
    assert (found["Sampler"], found["CFG scale"], found["Model"]) == ("Euler", "2", "flux-demo")
    assert found["Schedule type"] == "Diffusers shift 1"  # the demo scheduler's own: flux-schnell's
    assert "Distilled CFG Scale" not in found  # the demo transformer has no guidance embedding
    params = read_png_params(image)
    assert (params["prompt"], params["negative_prompt"], params["seed"], params["shift"]) == (PROMPT, NEGATIVE, 5, 1.0)
    assert params["guidance"] is None and params["true_cfg"] == 2.0


def test_only_known_settings_are_written_and_old_pngs_still_read(tmp_path):
    # a training sample knows its prompt only: fewer than three pairs would be read as prompt, so none are written
    assert infotext({"prompt": "a b, c: d", "step": 100}) == "a b, c: d"
    assert a1111_parse(infotext({"prompt": "x", "step": 100})) == {"Prompt": "x", "Negative prompt": ""}
    text = infotext({"prompt": "x", "family": "sd3", "guidance": 4.5, "negative_prompt": "", "steps": 4, "seed": 1,
                     "width": 32, "height": 64, "schedule": "scfm", "shift": 3.0, "model": "/m/sd3.5, large"})
    assert a1111_parse(text) == {"Prompt": "x", "Negative prompt": "", "Steps": "4", "Sampler": "Euler",
                                 "Schedule type": "SCFM shift 3", "CFG scale": "4.5", "Seed": "1", "Size-1": "32",
                                 "Size-2": "64", "Model": "sd3.5, large", "Version": "scfm"}
    save_png(Image.new("RGB", (8, 8)), tmp_path / "new.png", {"prompt": "p", "step": 3})
    assert read_png_params(tmp_path / "new.png") == {"prompt": "p", "step": 3}
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps({"prompt": "p", "seed": 1}))  # how PNGs were written before
    Image.new("RGB", (8, 8)).save(tmp_path / "old.png", pnginfo=info)
    assert read_png_params(tmp_path / "old.png") == {"prompt": "p", "seed": 1}
    Image.new("RGB", (8, 8)).save(tmp_path / "none.png")
    with pytest.raises(ValueError, match="no scfm settings"):
        read_png_params(tmp_path / "none.png")


def test_generate_applies_and_records_a_loras_recommended_scale(tmp_path):
    lora = tmp_path / "half.safetensors"
    meta = {k: v for k, v in read_header(DEMO_LORA)[1].items() if k != "sshs_model_hash"}  # hashed below
    save_file(load_file(DEMO_LORA), lora, metadata={**meta, "scfm_lora_scale": "0.5"})
    assert lora_spec(str(lora)) == (str(lora), 0.5) and lora_spec(f"{lora}:1") == (str(lora), 1.0)
    assert base_lora_records((str(lora),))[0]["scale"] == 0.5  # train --base_loras resolves the same way
    default, half, full = (generate(tmp_path, f"{n}.png", "--lora", str(lora) + s)
                           for n, s in (("default", ""), ("half", ":0.5"), ("full", ":1")))
    assert np.array_equal(np.asarray(default), np.asarray(half))
    assert not np.array_equal(np.asarray(default), np.asarray(full))
    record = read_png_params(default)["loras"]
    data = lora.read_bytes()
    tensor_bytes = data[8 + int.from_bytes(data[:8], "little"):]  # A1111's LoRA hash: the file less its header
    assert record == [{"file": "half.safetensors", "path": str(lora), "scale": 0.5,
                       "sha256": hashlib.sha256(data).hexdigest(),
                       "a1111_hash": hashlib.sha256(tensor_bytes).hexdigest()[:12]}]
    found = a1111_parse(default.text["parameters"])
    assert found["Prompt"] == f"{PROMPT} <lora:half:0.5>"  # as A1111 writes a LoRA used at 0.5
    assert found["Lora hashes"] == f"half: {record[0]['a1111_hash']}"
    assert read_png_params(full)["loras"][0]["scale"] == 1.0


@pytest.mark.parametrize("extra", [(), ("--lora", "demo:0.8", "--steps", "3", "--shift", "2.5", "--true-cfg", "2",
                                        "--negative-prompt", "blurry")], ids=["teacher", "lora-cfg"])
def test_from_png_renders_the_same_image_from_the_png_alone(tmp_path, capsys, extra):
    """Every setting the PNG records (prompt, model, LoRAs at their scales, grid, shift, CFG, seed) is what
    `--from-png` samples again: the same pixels; a PNG without our chunk and a changed LoRA file are refused."""
    first = tmp_path / "a.png"
    assert main(["--prompt", "a red circle above a blue square", "--seed", "7", "--out", str(first), *extra]) == 0
    assert main(["--from-png", str(first), "--out", str(tmp_path / "b.png")]) == 0
    a, b = Image.open(first), Image.open(tmp_path / "b.png")
    assert np.array_equal(np.asarray(a), np.asarray(b)) and read_png_params(a) == read_png_params(b)
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert main(["--from-png", str(tmp_path / "plain.png"), "--out", str(tmp_path / "c.png")]) == 2
    assert "no scfm settings in this PNG" in capsys.readouterr().err
    if extra:
        lora = tmp_path / "lora.safetensors"
        lora.write_bytes(DEMO_LORA.read_bytes())
        assert main(["--prompt", "a tree", "--lora", f"{lora}:0.8", "--out", str(tmp_path / "d.png")]) == 0
        tensors = load_file(lora)
        save_file({k: v * 1.01 for k, v in tensors.items()}, lora, read_header(DEMO_LORA)[1])
        assert main(["--from-png", str(tmp_path / "d.png"), "--out", str(tmp_path / "e.png")]) == 2
        assert "is not the file the image was made with" in capsys.readouterr().err


def test_from_png_takes_the_noise_row_of_a_many_prompt_run_and_the_run_settings(tmp_path, capsys):
    """An image of a two-prompt run had row 1 of its seed's two-row noise draw; an image made in bf16 on this
    CPU was made in bf16: --from-png draws and computes so again (before: one row, the first prompt's noise, and
    the device's default dtype)."""
    out = tmp_path / "two"
    assert main(["--prompt", "a red circle at the top left", "--prompt", "a blue square at the bottom right",
                 "--steps", "2", "--seed", "3", "--out", str(out)]) == 0
    second = out / "000003_001.png"
    params = read_png_params(second)
    assert (params["noise_row"], params["dtype"], params["fp8"], params["fp8_compute"]) == ([1, 2], "fp32", False,
                                                                                          False)
    assert main(["--from-png", str(second), "--out", str(tmp_path / "again.png")]) == 0
    want, got = (np.asarray(Image.open(p)).astype(int) for p in (second, tmp_path / "again.png"))
    # the same noise; within one level: the first run's GEMMs had two rows of batch, this one's one
    assert np.abs(want - got).max() <= 1 and read_png_params(tmp_path / "again.png") == params
    save_png(Image.fromarray(want.astype(np.uint8)), tmp_path / "row0.png",
             {k: v for k, v in params.items() if k != "noise_row"})
    assert main(["--from-png", str(tmp_path / "row0.png"), "--out", str(tmp_path / "other.png")]) == 0
    assert np.abs(want - np.asarray(Image.open(tmp_path / "other.png")).astype(int)).max() > 32  # the other noise
    bf16 = generate(tmp_path, "bf16.png", "--dtype", "bf16")
    assert main(["--from-png", str(tmp_path / "bf16.png"), "--out", str(tmp_path / "bf16-again.png")]) == 0
    assert np.array_equal(np.asarray(bf16), np.asarray(Image.open(tmp_path / "bf16-again.png")))
    capsys.readouterr()
    assert main(["--prompt", "x", "--cfg", "4", "--out", str(tmp_path / "cfg.png")]) == 2  # no negative: no CFG
    assert "real CFG runs against a negative prompt and none is given" in capsys.readouterr().err


def test_a_peft_folder_is_a_lora_and_a_damaged_scheduler_config_is_one_line(tmp_path, capsys):
    import shutil

    from sampling.demo import DEMO_FOLDER

    peft = tmp_path / "peft"
    peft.mkdir()
    tensors = load_file(DEMO_LORA)
    save_file({"base_model.model." + k.removeprefix("transformer."): v for k, v in tensors.items()},
              peft / "adapter_model.safetensors")
    rank = max(v.shape[1] for k, v in tensors.items() if "lora_B" in k)
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": rank}))
    assert lora_spec(str(peft)) == (str(peft / "adapter_model.safetensors"), 1.0)
    assert lora_spec(f"{peft}:0.5")[1] == 0.5
    folder = tmp_path / "demo"
    shutil.copytree(DEMO_FOLDER, folder)
    (folder / "scheduler" / "scheduler_config.json").write_text("{")
    assert main(["--model", str(folder), "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "scheduler_config.json: unreadable" in err and "restore the pipeline" in err


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One demo PNG of ours (2 steps), for the --from-png refusals."""
    path = tmp_path_factory.mktemp("made") / "a.png"
    assert main(["--prompt", "a red circle above a blue square", "--steps", "2", "--out", str(path)]) == 0
    return path


def refused(capsys, argv: list[str], out) -> str:
    """generate refuses `argv` with one line, writing nothing at `out`."""
    code = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()
    return err


@pytest.mark.parametrize("flags", [["--steps", "7"], ["--seed", "99"], ["--batch-size", "3"], ["--width", "128"],
                                   ["--guidance", "9"], ["--shift", "5"], ["--schedule", "scfm"],
                                   ["--negative-prompt", "ugly", "--true-cfg", "2"], ["--ignore-te-lora"],
                                   ["--max-sequence-length", "8"]])
def test_from_png_refuses_the_generation_flags_it_would_override(made, tmp_path, capsys, flags):
    """They were dropped silently for the PNG's values (exit 0); the run options stay allowed (the dtype: above)."""
    err = refused(capsys, ["--from-png", str(made), *flags], tmp_path / "o")
    named = [f for f in flags if f.startswith("--")]
    assert err.startswith("error: --from-png takes every generation setting from the PNG") and all(
        f in err for f in named), err


@pytest.mark.parametrize("change, expected", [
    ({"width": "64"}, 'its recorded width "64" is not a width from 1 to 4096 px'),  # a TypeError before
    ({"loras": "x"}, 'its recorded loras "x" is not a list of LoRA records'),  # a TypeError
    ({"loras": [{"path": "x", "sha256": "y"}]}, 'its recorded loras [{"path": "x", "sha256": "y"}] is not a list'),
    ({"dtype": "fp64"}, 'its recorded dtype "fp64" is not one of bf16, fp16, fp32'),  # a KeyError
    ({"steps": 0}, "its recorded steps 0 is not a step count from 1 to 1000"),  # "as a --lora recommends"
    ({"noise_row": [5, 2]}, "its recorded noise_row [5, 2] is not [row, rows]"),  # exit 0, nothing written
    ({"family": "sdxl"}, 'its recorded family "sdxl" is not one of'),
    ({"seed": -1}, "its recorded seed -1 is not a seed"),
    ({"shift": "fast"}, 'its recorded shift "fast" is not a positive number'),
    ({"guidance": "high"}, 'its recorded guidance "high" is not a finite number'),
])
def test_from_png_checks_what_the_png_records(made, tmp_path, capsys, change, expected):
    info = PngImagePlugin.PngInfo()  # the JSON edited by hand: its infotext need not parse
    info.add_text("scfm", json.dumps({**read_png_params(made), **change}))
    edited = tmp_path / "edited.png"
    Image.open(made).save(edited, pnginfo=info)
    err = refused(capsys, ["--from-png", str(edited)], tmp_path / "o.png")
    assert f"--from-png {edited}: {expected}" in err and "pass a PNG that sampling.generate" in err, err


def test_from_png_names_a_missing_or_foreign_file(tmp_path, capsys):
    """Before: errno's and PIL's own messages, without the flag or a fix."""
    missing, text, jpeg = tmp_path / "missing.png", tmp_path / "notes.png", tmp_path / "photo.jpg"
    text.write_text("not an image")
    Image.new("RGB", (8, 8)).save(jpeg)
    for path, expected in ((missing, "no such file"), (text, "not a readable image"),
                           (jpeg, "a JPEG image, not a PNG")):
        err = refused(capsys, ["--from-png", str(path)], tmp_path / "o.png")
        assert f"error: --from-png {path}: {expected}" in err and "pass a PNG that sampling.generate" in err, err


def test_a_plain_lora_in_our_layout_is_sampled_as_in_any_other(tmp_path):
    """`scfm_format` only names our layout (write_lora stamps it on any LoRA, tools/convert.py ... --to ours too):
    a style LoRA converted to it is sampled on the model's own grid, the image of the same tensors in kohya's
    layout, and not as an SCFM LoRA (before: the SCFM grid). Our exports and the shipped demo LoRA still are."""
    from sampling.job import lora_recommendations
    from weights.lora import FORMAT, read_lora
    from weights.lora_write import write_lora

    save_file(load_file(DEMO_LORA), tmp_path / "style.safetensors", {"format": "pt"})  # no scfm metadata
    lora = read_lora(tmp_path / "style.safetensors", family="flux")
    ours, kohya = (write_lora(lora, tmp_path / f"{name}.safetensors", name) for name in ("ours", "kohya"))
    assert read_header(ours)[1]["scfm_format"] == FORMAT
    assert lora_recommendations([str(ours)]).schedule is None
    images = [generate(tmp_path, f"{p.stem}.png", "--lora", str(p)) for p in (ours, kohya)]
    assert np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
    assert a1111_parse(images[0].text["parameters"])["Schedule type"] == "Diffusers shift 1"
    # the SCFM LoRAs: the shipped one (scfm_training), and it converted to our layout (its metadata carried)
    demo = read_lora(DEMO_LORA)
    converted = write_lora(demo, tmp_path / "demo-ours.safetensors", "ours", metadata=read_header(DEMO_LORA)[1])
    for path in (DEMO_LORA, converted):
        assert lora_recommendations([str(path)]).schedule == "scfm"
