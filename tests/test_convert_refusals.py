"""tools/convert.py refuses, in one line, what would write a wrong file or destroy an input: a non-finite --lora
scale, an OUT that is one of the files read (a folder's weights, a merge's LoRA) even with --overwrite, a shard
size that is no size, a base model given as a LoRA; OUT's suffix is read in any case and a LoRA's OUT is a file;
info says what a scaled-fp8 file stores."""

import json

import pytest
import torch
from conftest import comfy_scaled_fp8, randomize_
from safetensors.torch import load_file, save_file

from model.flux import FLUX_CONFIGS, Flux
from tools.convert import main
from weights import load_flux
from weights.lora import LoRA, LoRAPart, ModuleLoRA
from weights.lora_write import write_lora
from weights.transformer import save_transformer, transformer_state_dict


def run(capsys, *argv):
    """(exit code, stdout, stderr); argparse's refusals exit through SystemExit, the commands' return 2."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code, err, *words):
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err


def tiny_flux_file(tmp_path_factory):
    model = randomize_(Flux(FLUX_CONFIGS["tiny"]), 0.2, seed=4)
    return save_transformer(model, tmp_path_factory.mktemp("flux") / "flux-tiny.safetensors")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_flux_file(tmp_path_factory)


def lora_file(path):
    g = torch.Generator().manual_seed(0)
    part = LoRAPart(torch.randn(2, 32, generator=g) * 0.3, torch.randn(32, 2, generator=g) * 0.3, 4.0)
    write_lora(LoRA({"double_blocks.0.img_attn.proj": ModuleLoRA([part], (32,))}, source="random"), path, "kohya")
    return path


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf", "1e999"])
def test_merge_refuses_a_scale_that_is_not_finite(base, tmp_path, capsys, scale):
    """Before: a checkpoint of NaN / infinite weights, exit code 0."""
    lora, out = lora_file(tmp_path / "l.safetensors"), tmp_path / "m.safetensors"
    code, _, err = run(capsys, "merge", "--base", base, "--lora", f"{lora}:{scale}", "--out", out)
    one_line(code, err, f"{lora}:{scale}: the scale must be a finite number", f"--lora {lora}:1")
    assert not out.exists()


def test_an_output_that_is_an_input_is_refused_even_with_overwrite(base, tmp_path, capsys):
    """A diffusers folder's own weights file, a new file inside that folder (it would join the folder's weights) and
    a merge's LoRA: refused, with --overwrite too, and left as they were. Before, the first and last were replaced."""
    folder = tmp_path / "d"
    assert run(capsys, "checkpoint", base, folder, "--to", "diffusers")[0] == 0
    weights = folder / "diffusion_pytorch_model.safetensors"
    before = weights.read_bytes()
    code, _, err = run(capsys, "checkpoint", folder, weights, "--to", "official", "--overwrite")
    one_line(code, err, f"{weights}: is the input {weights}")
    code, _, err = run(capsys, "checkpoint", folder, folder / "official.safetensors", "--to", "official")
    one_line(code, err, f"is inside the input folder {folder}")
    assert weights.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]

    first, second = lora_file(tmp_path / "a.safetensors"), lora_file(tmp_path / "b.safetensors")
    kept = {p: p.read_bytes() for p in (first, second)}
    for out in (first, second):
        code, _, err = run(capsys, "merge", "--base", base, "--lora", f"{first}:0.5", "--lora", second, "--out", out,
                           "--overwrite")
        one_line(code, err, f"{out}: is the input {out}")
    assert all(p.read_bytes() == b for p, b in kept.items())


@pytest.mark.parametrize("size", ["infGB", "1e400GB", "nanGB", "0GB", "-5GB", "0.5B", "5KB"])
def test_a_shard_size_must_be_finite_and_at_least_1mb(base, tmp_path, capsys, size):
    """Before: inf a traceback (OverflowError), 0 / negative / sub-byte / 5KB one shard per tensor."""
    out = tmp_path / "d"
    code, _, err = run(capsys, "checkpoint", base, out, "--to", "diffusers", f"--shard-size={size}")
    one_line(code, err, f"'{size}': a shard size must be finite and at least 1MB")
    assert not out.exists()


def test_a_base_model_given_as_a_lora_is_named_as_one(base, tmp_path, capsys):
    """Before: "a BFL control LoRA (it replaces norm weights)" (a Flux model's q / k norm keys), and for other files
    without LoRA tensors a hint naming Python functions rather than a command."""
    for argv in (("lora", base, tmp_path / "x.safetensors", "--to", "kohya"),
                 ("merge", "--base", base, "--lora", base, "--out", tmp_path / "x.safetensors")):
        code, _, err = run(capsys, *argv)
        one_line(code, err, "this is a Flux base model, not a LoRA", "--base (convert.py merge)",
                 "convert.py checkpoint")
        assert "control LoRA" not in err
    assert not (tmp_path / "x.safetensors").exists()

    other = tmp_path / "t5.safetensors"  # a text encoder: no family's transformer, no LoRA
    save_file({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2, 2), "shared.weight": torch.zeros(2, 2)},
              other)
    code, _, err = run(capsys, "lora", other, tmp_path / "x.safetensors", "--to", "kohya")
    one_line(code, err, "no LoRA tensors in this file", f"python tools/convert.py info {other}")

    control = tmp_path / "control.safetensors"  # a real control LoRA still is one: LoRA tensors beside the norms
    stem = "double_blocks.0.img_attn"
    save_file({f"{stem}.proj.lora_A.weight": torch.zeros(2, 32), f"{stem}.proj.lora_B.weight": torch.zeros(32, 2),
               f"{stem}.norm.query_norm.scale": torch.ones(16)}, control)
    code, _, err = run(capsys, "lora", control, tmp_path / "x.safetensors", "--to", "kohya")
    one_line(code, err, "a BFL control LoRA")


def test_out_suffix_in_any_case_is_a_file_and_a_lora_out_is_never_a_folder(base, tmp_path, capsys):
    """Before: UP.SAFETENSORS became a folder, `x.safetensors/` a file and `newdir/` a LoRA file named newdir."""
    upper = tmp_path / "UP.SAFETENSORS"
    assert run(capsys, "checkpoint", base, upper, "--to", "official")[0] == 0
    assert upper.is_file() and load_file(upper).keys() == load_file(base).keys()
    slash = tmp_path / "x.safetensors"
    assert run(capsys, "checkpoint", base, f"{slash}/", "--to", "official")[0] == 0
    assert (slash / "model.safetensors").is_file()

    lora = lora_file(tmp_path / "l.safetensors")
    code, _, err = run(capsys, "lora", lora, f"{tmp_path / 'newdir'}/", "--to", "diffusers")
    one_line(code, err, "a LoRA is one file, not a folder", f"{tmp_path / 'newdir'}/l.safetensors")
    assert not (tmp_path / "newdir").exists()


def test_info_on_a_scaled_fp8_file_says_what_it_stores(base, tmp_path, capsys):
    """Before: `dtypes: {'F32': 84}`, the dequantized view, no word of fp8 or of the scales."""
    plain = {k: v.contiguous() for k, v in transformer_state_dict(load_flux(base)).items()}
    tensors, _ = comfy_scaled_fp8(plain)
    path = tmp_path / "fp8.safetensors"
    save_file(tensors, path, metadata={"scfm_config": json.dumps({"family": "flux",
                                                                  "config": FLUX_CONFIGS["tiny"].to_dict()})})
    weights = sum(t.dtype == torch.float8_e4m3fn and k.endswith(".weight") for k, t in tensors.items())
    code, out, _ = run(capsys, "info", path)
    assert code == 0
    want = {"F8_E4M3": weights + 1, "F32": len(tensors) - weights - 1}  # + 1: the empty scaled_fp8 marker
    assert f"dtypes: {want}" in out or f"dtypes: {dict(reversed(want.items()))}" in out, out
    sides = len(tensors) - len(plain)
    assert f"scaled fp8 (ComfyUI): {weights} fp8 weights, read times their scales in fp32; {sides} scale" in out, out
    assert f"parameters: {sum(t.numel() for t in plain.values()):,} in {len(plain)} tensors" in out, out
