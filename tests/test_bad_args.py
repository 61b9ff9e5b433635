"""Bad input to the sampling commands and the datasets (issue 21, items 7, 9, 10 and 13): each is refused before any
model weight is read, as one line that names the flag, file or row and the fix, with a non-zero exit, and leaves
every existing file as it was. The built-in demo model (generate without --model) keeps these runs cheap; none of
them gets as far as reading a tensor (`nothing_read` fails the test if one does)."""

from __future__ import annotations

import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from test_evaluate_refusals import refused

from distill import make_dataset, teacher_data
from distill.data import plan_cache
from distill.dataset import DataError, inside_folder, load_image, read_folder
from sampling import generate
from sampling.demo import DEMO_FOLDER, DEMO_LORA, DEMO_PROMPTS

PROMPT = "a red circle at the top left"


@pytest.fixture
def nothing_read(monkeypatch):
    """Fail the test if any tensor of a weight file is read (headers and "meta" builds are fine): every refusal here
    comes before that."""
    from weights.reader import TensorReader

    def refuse(self, key):
        raise AssertionError(f"{key} was read before the bad input was refused")

    monkeypatch.setattr(TensorReader, "_get", refuse)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def run_generate(capsys, tmp_path, *flags, out: str | None = None) -> str:
    """generate on the demo model; returns the one error line."""
    mine = tmp_path / "mine.txt"
    mine.write_text("the user's file")
    before = snapshot(tmp_path)
    argv = ["--prompt", PROMPT, "--out", out or str(tmp_path / "out"), *flags]
    msg = one_line(capsys, generate.main(argv))
    assert snapshot(tmp_path) == before  # nothing written, nothing changed
    return msg


# ----- generate --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, expected", [
    (["--width", "0"], "--width 0: image sizes are positive; pass --width 64"),
    (["--height", "-64"], "--height -64: image sizes are positive; pass --height 64"),
    (["--width", "100000", "--height", "100000"], "--width 100000: over 4096 px"),
    (["--width", "60"], "--width 60 is not a multiple of 8; use 56 or 64"),
    (["--width", "4"], "--width 4 is not a multiple of 8; use 8"),
])
def test_generate_refuses_sizes_before_reading_weights(capsys, tmp_path, nothing_read, flags, expected):
    assert expected in run_generate(capsys, tmp_path, *flags)


def test_generate_refuses_sizes_whose_activations_exceed_the_device(capsys, tmp_path, nothing_read, monkeypatch):
    import sampling.sizes

    monkeypatch.setattr(sampling.sizes, "device_memory", lambda device: 100_000_000)  # a 0.1 GB device
    msg = run_generate(capsys, tmp_path, "--width", "1024", "--height", "1024")
    assert "--width 1024 --height 1024" in msg and "GB of activations" in msg and "0.1 GB of cpu" in msg
    fix = msg.split("pass ")[-1].split()
    assert fix[0] == "--width" and 0 < int(fix[1]) < 1024 and int(fix[1]) % 8 == 0


def test_activation_estimate_at_flux_dev_scale():
    """Flux-dev in bf16 (sizes from the configs alone): 1024 px needs a few GB, 4096 px fits an 80 GB GPU; the
    SD3.5-large position table stops at 3072 px, which the size check says before the first step."""
    from model.flux import FLUX_CONFIGS
    from model.mmdit import MMDIT_CONFIGS
    from model.vae import VAE_CONFIGS
    from sampling.pipeline import FluxPipeline, FluxSources
    from sampling.sd3 import SD3Pipeline, SD3Sources

    flux, on_cpu = (FluxPipeline(FluxSources(transformer=Path("unused")), dtype=torch.bfloat16, device=d)
                    for d in ("cuda", "cpu"))  # a device name only: nothing runs
    for pipe in (flux, on_cpu):
        pipe.transformer_config = lambda: FLUX_CONFIGS["flux-dev"]
        pipe.vae_config = lambda: VAE_CONFIGS["flux1"]
    assert 1e9 < flux.activation_bytes(1, 1024, 1024) < 4e9
    assert 4e9 < flux.activation_bytes(1, 4096, 4096) < 80e9
    # the CPU's SDPA holds the VAE attention's scores whole: two fp32 (128^2)^2 matrices at 1024 px (where the
    # decode is the peak)
    assert on_cpu.activation_bytes(1, 1024, 1024) - flux.activation_bytes(1, 1024, 1024) == 8 * (128 * 128) ** 2
    sd3 = SD3Pipeline(SD3Sources(transformer=Path("unused")))
    sd3.transformer_config = lambda: MMDIT_CONFIGS["sd3.5-large"]
    sd3.vae_config = lambda: VAE_CONFIGS["sd3.5"]
    with pytest.raises(ValueError, match=r"--height 3584: over 3072 px.*192 patches.*pass --height 3072"):
        sd3.latent_size(3584, 1024)


@pytest.mark.parametrize("flags, expected", [
    (["--shift", "abc"], "--shift abc: expected a positive number"),
    (["--shift", "0"], "--shift 0: expected a positive number"),
    (["--batch-size", "0"], "--batch-size 0: must be 1 or more"),
    (["--steps", "0"], "--steps 0: must be 1 or more"),
    (["--max-sequence-length", "0"], "--max-sequence-length 0: must be 1 or more"),
    (["--max-sequence-length", "1000"], "pass --max-sequence-length 512"),
    (["--image", "ref.png"], "--image ref.png: image editing (reference images) is not supported"),
    (["--seed", "-1"], "--seed -1: seeds are 0 or more"),
    (["--seed", str(2**64)], "over torch's largest seed"),
    (["--cfg", "nan"], "--cfg nan: must be a finite number"),
    (["--guidance", "inf"], "--guidance inf: must be a finite number"),
    (["--slg-stop", "2"], "--slg-stop 2.0: a fraction of the steps"),
    (["--device", "foo"], "--device foo: not a device name"),
    (["--blocks-to-swap", "-1"], "--blocks-to-swap -1: must be 0"),
    (["--lora", "demo:nan"], "the scale must be a finite number"),
    (["--prompts-file", "/nonexistent/prompts.txt"], "--prompts-file /nonexistent/prompts.txt: No such file"),
    # torch parses these device names, but nothing runs there: a deep traceback when the first weight moved
    (["--device", "xpu"], "--device xpu: scfm runs on cpu, cuda"),
    (["--device", "meta"], "--device meta: scfm runs on cpu, cuda"),
    # PNG only (with its settings): a .jpg name used to become a folder of PNGs
    (["--out", "img.jpg"], "--out img.jpg: generate writes PNG files (their settings inside), not .jpg; pass --out "
                           "img.png"),
    (["--out", "x/img.WEBP"], "not .WEBP"),
    # failed only after the model loaded ("Maximum allowed size exceeded")
    (["--steps", str(10**20)], f"--steps {10**20}: over 1000, the most sampled"),
    (["--steps", "1001"], "--steps 1001: over 1000"),
    # SD3's flags on the demo (Flux): their defaults were SD3's numbers, so they passed the family check
    (["--slg-scale", "5"], "--slg-scale: SD3 / SD3.5 options, but"),
    (["--slg-start", "0.1"], "--slg-start: SD3 / SD3.5 options"),
    (["--slg-stop", "0.5"], "--slg-stop: SD3 / SD3.5 options"),
    (["--slg-scale", "0"], "--slg-scale: SD3 / SD3.5 options"),
    # Flux settings that would do nothing
    (["--negative-prompt", "ugly"], "--negative-prompt: FLUX.1 reads a negative prompt only for real CFG"),
    (["--true-cfg", "0.5", "--negative-prompt", "x"], "--true-cfg 0.5: below 1 real CFG is off"),
    (["--true-cfg", "-5"], "--true-cfg -5: below 1 real CFG is off"),
    (["--cfg", "0", "--negative-prompt", ""], "--cfg 0: below 1 real CFG is off"),
    # the demo transformer has no guidance embedding (FLUX.1-schnell neither): diffusers ignores it silently
    (["--guidance", "4"], "--guidance 4: " + str(DEMO_FOLDER) + " has no guidance embedding"),
])
def test_generate_refuses_bad_flags(capsys, tmp_path, nothing_read, monkeypatch, flags, expected):
    monkeypatch.chdir(tmp_path)  # a relative --out that is not refused lands where run_generate sees it
    assert expected in run_generate(capsys, tmp_path, *flags)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an MPS device")
def test_generate_refuses_mps_where_pytorch_has_none(capsys, tmp_path, nothing_read):
    assert "--device mps: this PyTorch has no MPS (Apple GPU) device; pass --device cpu" in run_generate(
        capsys, tmp_path, "--device", "mps")


@pytest.mark.parametrize("where", ["file", "inside"])
def test_generate_refuses_a_folder_where_a_png_would_go_before_loading(capsys, tmp_path, nothing_read, where):
    """--overwrite replaces files, not folders: a folder named like the output used to fail after sampling."""
    if where == "file":
        folder = tmp_path / "x.png"
        folder.mkdir()
        out = folder
    else:
        out = tmp_path / "out"
        folder = out / "000000_000.png"
        folder.mkdir(parents=True)
    msg = run_generate(capsys, tmp_path, "--overwrite", out=str(out))
    assert f"--out {out}: {folder} is a folder, where a PNG would be written; pass another --out" in msg
    assert folder.is_dir() and not any(folder.iterdir())


def test_a_prompts_file_with_a_bom_reads_as_without(tmp_path):
    """Windows editors start UTF-8 files with a BOM: it is not part of the first prompt."""
    from sampling.options import read_prompt_lines

    path = tmp_path / "prompts.txt"
    path.write_bytes(b"\xef\xbb\xbfa fox\r\na cat\r\n")
    assert read_prompt_lines(path, "--prompts-file") == ["a fox", "a cat"]
    path.write_bytes(b"\xef\xbb\xbfab\xff")
    with pytest.raises(ValueError, match="not UTF-8 text \\(byte 5\\)"):  # counted in the file, BOM included
        read_prompt_lines(path, "--prompts-file")


@pytest.mark.parametrize("flag", ["--t5-tokenizer", "--clip-tokenizer"])
def test_generate_refuses_a_file_that_is_no_tokenizer_before_the_encoders_load(capsys, tmp_path, nothing_read, flag):
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\xff\xfe\x00 not a tokenizer")
    msg = run_generate(capsys, tmp_path, "--model", str(DEMO_FOLDER), flag, str(garbage))
    assert f"{flag} {garbage}: not a tokenizer" in msg


def test_generate_refuses_a_binary_prompts_file_naming_it(capsys, tmp_path, nothing_read):
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    msg = run_generate(capsys, tmp_path, "--prompts-file", str(binary))
    assert f"--prompts-file {binary}: not UTF-8 text" in msg


def test_generate_refuses_an_unwritable_out_before_loading(capsys, tmp_path, nothing_read, monkeypatch):
    import sampling.job

    monkeypatch.setattr(sampling.job, "detect_family", lambda model: pytest.fail("the model was looked at"))
    blocker = tmp_path / "mine.txt"
    msg = run_generate(capsys, tmp_path, out=str(blocker / "x.png"))
    assert f"--out {blocker / 'x.png'}: {blocker} is a file, not a folder" in msg
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9, 1000))
    msg = run_generate(capsys, tmp_path)
    assert "MB free on its disk" in msg and "pass another --out" in msg


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_generate_refuses_a_read_only_out(capsys, tmp_path, nothing_read):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        msg = run_generate(capsys, tmp_path, out=str(locked / "sub"))
    finally:
        locked.chmod(0o755)
    assert f"cannot write in {locked}" in msg


def damaged_copy(path: Path, **metadata: str) -> Path:
    """The demo LoRA with some metadata replaced."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(DEMO_LORA), "pt") as f:
        meta = f.metadata()
    save_file(load_file(DEMO_LORA), path, metadata={**meta, **metadata})
    return path


@pytest.mark.parametrize("training", ["{not json", "[1, 2]", '{"base_loras": [{"file": "style.safetensors"}]}',
                                      '{"base_loras": "style.safetensors"}'])
def test_generate_names_the_lora_with_damaged_scfm_training(capsys, tmp_path, training):
    lora = damaged_copy(tmp_path / "damaged.safetensors", scfm_training=training)
    msg = run_generate(capsys, tmp_path, "--lora", str(lora))
    assert f"--lora {lora}: its scfm_training metadata is damaged" in msg and "distill.export" in msg


def test_generate_names_the_lora_with_an_unreadable_shift(capsys, tmp_path):
    lora = damaged_copy(tmp_path / "shift.safetensors", scfm_shift="abc")
    msg = run_generate(capsys, tmp_path, "--lora", str(lora))
    assert f"--lora {lora}: its scfm_shift abc" in msg and "pass --shift 3 to override it" in msg


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        generate.main(["--prompt", PROMPT, "--width", "abc"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1
    assert "argument --width: invalid int value: 'abc'" in err


# ----- make_dataset ----------------------------------------------------------------------------------------------


def run_make_dataset(capsys, tmp_path, *flags, out: Path | None = None) -> str:
    out = out or tmp_path / "data"
    argv = ["--model", str(DEMO_FOLDER), "--prompts", str(DEMO_PROMPTS), "--out", str(out),
            "--images-per-bucket", "1", "--steps", "1", *flags]
    before = snapshot(tmp_path)
    msg = one_line(capsys, make_dataset.main(argv))
    assert snapshot(tmp_path) == before and not (tmp_path / "data").exists()
    return msg


@pytest.mark.parametrize("flags, expected", [
    (["--resolution", "0"], "--resolution 0: no bucket"),
    (["--resolution", "100000"], "--resolution 100000: over the 4096 px"),
    (["--resolution", "4000"], "--resolution 4000: its buckets reach"),
    (["--guidance", "nan"], "--guidance nan: must be a finite number"),
    (["--seed", "-1"], "--seed -1: seeds are 0 or more"),
    (["--batch-size", "0"], "--batch-size 0: must be 1 or more"),
    (["--max-sequence-length", "0"], "--max-sequence-length 0: must be 1 or more"),
    (["--device", "cuda:99"], "--device cuda:99: no such CUDA device"),
])
def test_make_dataset_refuses_bad_flags(capsys, tmp_path, nothing_read, flags, expected):
    assert expected in run_make_dataset(capsys, tmp_path, *flags)


def test_make_dataset_refuses_a_file_that_is_no_tokenizer_before_writing(capsys, tmp_path, nothing_read):
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\xff\xfe\x00 not a tokenizer")
    msg = run_make_dataset(capsys, tmp_path, "--t5-tokenizer", str(garbage))
    assert f"--t5-tokenizer {garbage}: not a tokenizer" in msg


def test_make_dataset_refuses_an_unwritable_out(capsys, tmp_path, nothing_read):
    (tmp_path / "file").write_text("mine")
    msg = run_make_dataset(capsys, tmp_path, out=tmp_path / "file" / "data")
    assert f"{tmp_path / 'file'} is a file, not a folder" in msg


def test_make_dataset_resume_drops_a_torn_row_and_refuses_rows_outside(tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    (out / "a.png").write_bytes(b"png")
    meta = out / "metadata.jsonl"
    meta.write_text('{"file_name": "a.png", "prompt": "x"}\n{"file_name": "b.pn')  # killed mid-row
    assert teacher_data.done_files(out) == {"a.png"}
    assert meta.read_text() == '{"file_name": "a.png", "prompt": "x"}\n' and "cut off" in capsys.readouterr().err
    (tmp_path / "outside.png").write_bytes(b"png")
    for name in ("../outside.png", str(tmp_path / "outside.png")):
        meta.write_text(json.dumps({"file_name": name, "prompt": "x"}) + "\n")
        with pytest.raises(DataError, match=r"metadata.jsonl:1: file_name .* is outside the dataset folder"):
            teacher_data.done_files(out)
    meta.write_text("not json\n")
    with pytest.raises(DataError, match=r"metadata.jsonl:1: not a row"):
        teacher_data.done_files(out)


# ----- datasets ----------------------------------------------------------------------------------------------


def write_png(path: Path, size=(64, 64)) -> Path:
    from PIL import Image

    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


@pytest.mark.parametrize("name", ["../outside.png", "/tmp/outside.png", "sub/../../outside.png", "C:\\outside.png",
                                  "..\\outside.png"])
def test_read_folder_refuses_rows_that_leave_the_folder(tmp_path, name):
    data = tmp_path / "data"
    data.mkdir()
    write_png(tmp_path / "outside.png")
    write_png(data / "in.png")
    rows = [{"file_name": "in.png", "prompt": "ok"}, {"file_name": name, "prompt": "stolen"}]
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as exc:
        read_folder(data)
    assert "metadata.jsonl:2: file_name" in str(exc.value) and "outside the dataset folder" in str(exc.value)
    assert inside_folder(data, "sub/in.png", "row") == data / "sub" / "in.png"  # subfolders stay fine


def test_corrupt_images_are_named(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "garbage.png").write_bytes(b"not an image at all")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "garbage.png", "prompt": "x"}) + "\n")
    with pytest.raises(DataError, match=r"garbage.png: not a readable image .*replace it"):
        plan_cache(data, {"vae": "v"}, 512)
    truncated = data / "truncated.png"
    whole = write_png(tmp_path / "whole.png", (256, 256)).read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])  # the header reads; the pixels do not
    with pytest.raises(DataError, match=r"truncated.png: not a readable image"):
        load_image(truncated, (64, 64))
    (data / "metadata.jsonl").write_bytes(b"\xff\xfe garbage\n")
    with pytest.raises(DataError, match=r"metadata.jsonl: not UTF-8 text"):
        read_folder(data)


# ----- evaluate --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, expected", [
    (["--seed", "-1"], "--seed -1: must be from 0"),
    (["--lora-scale", "nan"], "--lora-scale nan: must be a finite number"),
    (["--shift", "inf"], "--shift inf: must be a positive number"),
    (["--grid-scale", "100000"], "--grid-scale 100000: the grid would be"),
    (["--device", "foo"], "--device foo: not a device name"),
])
def test_evaluate_refuses_bad_flags(tmp_path, nothing_read, flags, expected):
    msg = refused(["--per-prompt", "1", "--steps", "1", "--grid", str(tmp_path / "g.png"), *flags])
    assert expected in msg, msg
    assert not any(tmp_path.iterdir())


def test_evaluate_refuses_unwritable_outputs_before_sampling(tmp_path, nothing_read):
    blocker = tmp_path / "mine.txt"
    blocker.write_text("the user's file")
    for flags in (["--no-grid", "--json"], ["--grid"]):  # the default grid is evaluate_grid.png in the cwd
        flag, name = flags[-1], "out.png" if flags[-1] == "--grid" else "out.json"
        msg = refused(["--per-prompt", "1", "--steps", "1", *flags, str(blocker / name)])
        assert msg == f"error: {flag} {blocker / name}: {blocker} is a file, not a folder; pass another {flag}", msg
    assert blocker.read_text() == "the user's file"


@pytest.mark.parametrize("flags, expected", [
    (["--cfg", "0.5"], "--cfg 0.5: below 1 CFG is off, as at 1"),
    (["--guidance", "-2"], "--guidance -2: below 1 CFG is off"),
    (["--cfg", "1", "--negative-prompt", "blurry"], "--negative-prompt: used only with CFG on, and it is off "
                                                    "(--cfg 1)"),
])
def test_klein_base_refuses_cfg_settings_that_would_do_nothing(flags, expected):
    """As SD3's: klein base runs CFG (and reads the negative prompt) only above scale 1."""
    from sampling.flags import build_parser
    from sampling.job import generation_config
    from weights.lora import Recommended

    args = build_parser().parse_args(["--model", "klein.safetensors", "--variant", "base", "--prompt", "p", *flags])
    with pytest.raises(ValueError) as exc:
        generation_config(args, "flux2", Recommended())
    assert expected in str(exc.value)
