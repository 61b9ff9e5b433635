"""User errors around weights, each refused in one line that names the fix, and no user file lost: --overwrite on a
folder holding the user's own files (convert.py checkpoint / merge deleted the whole folder), a LoRA OUT that is an
existing folder, a mistyped `--lora FILE:SCALE` scale (read as a missing file), a LoRA of another family."""

import pytest
import torch
from test_convert_refusals import one_line, tiny_flux_file

import weights.convert
from model.flux import FLUX_CONFIGS, Flux
from sampling.demo import DEMO_LORA
from tools.convert import main
from weights.io import WeightsError, parse_lora
from weights.lora import LoRA, LoRAPart, ModuleLoRA
from weights.lora_merge import apply_loras, lora_spec
from weights.lora_write import write_lora


def run(capsys, *argv):
    """(exit code, stderr); argparse's refusals exit through SystemExit, the commands' return 2."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_flux_file(tmp_path_factory)


def lora_file(path, family="flux"):
    g = torch.Generator().manual_seed(0)
    part = LoRAPart(torch.randn(2, 32, generator=g) * 0.3, torch.randn(32, 2, generator=g) * 0.3, 4.0)
    write_lora(LoRA({"double_blocks.0.img_attn.proj": ModuleLoRA([part], (32,))}, family=family, source="random"),
               path, "kohya")
    return path


def user_folder(path):
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    lora_file(path / "other-lora.safetensors")
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_overwrite_never_deletes_a_folder_of_the_users_files(base, tmp_path, capsys):
    """Before: merge / checkpoint --overwrite into such a folder replaced it whole (shutil.rmtree), notes and
    LoRA gone; without --overwrite the refusal sent the user to --overwrite."""
    lora = lora_file(tmp_path / "l.safetensors")
    mine = tmp_path / "mymodels"
    kept = user_folder(mine)
    for argv in (("merge", "--base", base, "--lora", lora, "--out", mine),
                 ("checkpoint", base, mine, "--to", "diffusers"),
                 ("checkpoint", base, mine, "--to", "official", "--shard-size", "2MB")):
        for flags in ((), ("--overwrite",)):
            code, err = run(capsys, *argv, *flags)
            one_line(code, err, f"{mine}: an existing folder holding files a conversion does not write "
                                "(notes.txt, other-lora.safetensors)", "choose a new or empty OUT")
            assert "pass --overwrite" not in err
            assert {p.name: p.read_bytes() for p in mine.iterdir()} == kept
    # a subfolder (a pipeline's transformer/, say) is as foreign; a folder named *.safetensors too
    (mine / "sub").mkdir()
    code, err = run(capsys, "checkpoint", base, tmp_path / "mymodels", "--to", "diffusers", "--overwrite")
    one_line(code, err, "(notes.txt, other-lora.safetensors, sub/)")
    odd = tmp_path / "odd.safetensors"
    user_folder(odd)
    code, err = run(capsys, "merge", "--base", base, "--lora", lora, "--out", odd, "--overwrite")
    one_line(code, err, f"{odd}: an existing folder holding files", "notes.txt")
    assert odd.is_dir() and (odd / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left behind


def test_overwrite_still_replaces_a_folder_a_conversion_wrote(base, tmp_path, capsys):
    """Its own output, in any layout and shard count, is replaced whole (stale shards of the old one go)."""
    out = tmp_path / "conv"
    weights.convert.convert_checkpoint(base, out, "official", shard_bytes=20_000)  # the tiny model: under 1MB
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in names and len(names) > 2  # shards and their index
    assert run(capsys, "checkpoint", base, out, "--to", "diffusers", "--overwrite")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    lora = lora_file(tmp_path / "l.safetensors")
    assert run(capsys, "merge", "--base", out, "--lora", lora, "--out", tmp_path / "m", "--overwrite")[0] == 0
    assert run(capsys, "merge", "--base", base, "--lora", lora, "--out", tmp_path / "m", "--overwrite")[0] == 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.safetensors"]


def test_a_failed_swap_puts_the_old_folder_back(base, tmp_path, capsys, monkeypatch):
    out = tmp_path / "conv"
    assert run(capsys, "checkpoint", base, out, "--to", "diffusers")[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fails(tmp, path):
        raise OSError(28, "No space left on device", str(tmp), None, str(path))

    monkeypatch.setattr(weights.convert, "durable_replace", fails)
    code, err = run(capsys, "checkpoint", base, out, "--to", "official", "--overwrite")
    one_line(code, err, "No space left on device")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["conv"]  # no temp folder left


def test_a_lora_out_that_is_an_existing_folder_names_the_fix_first(tmp_path, capsys):
    """Before: "exists; pass --overwrite", and with --overwrite "Is a directory"."""
    lora = lora_file(tmp_path / "l.safetensors")
    adir = tmp_path / "adir"
    adir.mkdir()
    for flags in ((), ("--overwrite",)):
        code, err = run(capsys, "lora", lora, adir, "--to", "kohya", *flags)
        one_line(code, err, f"{adir}: an existing folder, and a LoRA is one file", f"{adir / 'l.safetensors'}")
        assert "--overwrite" not in err
    assert list(adir.iterdir()) == []


def test_a_mistyped_lora_scale_is_named_not_reported_as_a_missing_file(base, tmp_path, capsys):
    """Before: `X:abc` read as the path `X:abc`: "no such file"."""
    lora = lora_file(tmp_path / "l.safetensors")
    for spec in (f"{lora}:abc", f"{lora}:", f"{lora}:0.8x"):
        tail = spec.rpartition(":")[2]
        with pytest.raises(WeightsError, match="is not a number") as e:
            parse_lora(spec)
        assert str(e.value) == f"{spec}: the scale {tail!r} is not a number; pass {lora}:0.8 (or no ':' for its " \
                               "default scale)"
        with pytest.raises(WeightsError, match="is not a number"):
            lora_spec(spec)  # generate, make_dataset, train --base_loras, evaluate
    out = tmp_path / "m.safetensors"
    code, err = run(capsys, "merge", "--base", base, "--lora", f"{lora}:abc", "--out", out)
    assert code == 2 and err.count("\n") == 1 and f"{lora}:abc: the scale 'abc' is not a number" in err, err
    assert not out.exists()
    # the demo's shorthand, as generate and evaluate expand it
    with pytest.raises(WeightsError, match=f"the scale 'abc' is not a number; pass {DEMO_LORA}:0.8"):
        lora_spec(f"{DEMO_LORA}:abc")
    # unchanged: a number is a scale, a colon before a path's part is the path's (a drive letter), a missing file
    # is left to the reader ("no such file"), and a file really named `x:abc` is that file
    assert parse_lora(f"{lora}:1.5") == (str(lora), 1.5)
    assert parse_lora("C:\\loras\\a.safetensors") == ("C:\\loras\\a.safetensors", None)
    assert parse_lora(f"{tmp_path}:sub/a.safetensors") == (f"{tmp_path}:sub/a.safetensors", None)
    assert parse_lora(f"{tmp_path / 'missing.safetensors'}:abc") == (f"{tmp_path / 'missing.safetensors'}:abc", None)
    colon = lora_file(tmp_path / "l.safetensors:abc")
    assert parse_lora(str(colon)) == (str(colon), None)


def test_a_lora_of_another_family_names_the_fix():
    """Before: "a sd3 LoRA; this model is Flux" (the registry's name, no fix)."""
    g = torch.Generator().manual_seed(0)
    part = LoRAPart(torch.randn(2, 32, generator=g), torch.randn(96, 2, generator=g), 2.0)
    sd3 = LoRA({"joint_blocks.0.x_block.attn.qkv": ModuleLoRA([part], (96,))}, family="sd3", source="sd3.safetensors")
    with pytest.raises(WeightsError) as e:
        apply_loras(Flux(FLUX_CONFIGS["tiny"]), [sd3])
    assert str(e.value) == ("sd3.safetensors: a LoRA for SD3 / SD3.5; this model is Flux: pass a LoRA trained on Flux, "
                            "or use this one with the SD3 / SD3.5 model it was made for")
