"""Damaged and hostile safetensors files fail in one line that names the file and the fix, before any tensor is
read (issue 21: #1 NaN LoRAs, #5 truncated files and odd headers, #8 the header-length cap), and writers remove
the temp files of killed writes, never a live one (#14)."""

from __future__ import annotations

import json
import math
import os
import re
import struct
import subprocess
import sys
import tracemalloc

import pytest
import torch
from conftest import random_lora
from safetensors.torch import save_file

from model.flux import FLUX_CONFIGS, Flux
from tools.convert import main as convert_main
from weights.atomic import atomic_save
from weights.io import WeightsError, read_header
from weights.lora import read_lora
from weights.lora_write import lora_state_dict, write_lora
from weights.stream import write_streaming


@pytest.fixture(scope="module")
def lora():
    torch.manual_seed(0)
    return random_lora(Flux(FLUX_CONFIGS["tiny"]), rank=2)


def _raw(path, header, data: bytes = b""):
    """A file with `header` (a dict, or raw bytes) as its safetensors header, then `data`."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _one_line_error(argv, capsys, *contains) -> str:
    assert convert_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for text in contains:
        assert text in err, err
    return err


# ----- #5: truncated files and odd headers ----------------------------------------------------------------


def _loaders():
    from weights.convert_plan import detect
    from weights.text import load_clip, load_t5
    from weights.transformer import load_flux, load_mmdit
    from weights.vae import load_vae

    return [load_flux, load_mmdit, load_t5, load_clip, load_vae, read_lora, read_header, detect]


@pytest.mark.parametrize("loader", _loaders(), ids=lambda f: f.__name__)
def test_a_truncated_file_is_one_line_in_every_loader(loader, lora, tmp_path):
    whole = write_lora(lora, tmp_path / "whole.safetensors", "diffusers")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole.read_bytes()[:-10])  # an interrupted download: the header is whole, the data is not
    with pytest.raises(WeightsError, match=r"cut.safetensors: truncated \(header says [\d,]+ bytes of tensors, "
                                           r"the file has [\d,]+\); re-download it"):
        loader(cut)


def test_convert_refuses_a_truncated_file_in_every_command(lora, tmp_path, capsys):
    whole = write_lora(lora, tmp_path / "whole.safetensors", "kohya")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole.read_bytes()[:-10])
    before = sorted(p.name for p in tmp_path.iterdir())
    out = str(tmp_path / "out.safetensors")
    for argv in (["info", str(cut)], ["lora", str(cut), out, "--to", "ours"],
                 ["checkpoint", str(cut), out, "--to", "diffusers"],
                 ["merge", "--base", str(cut), "--lora", str(whole), "--out", out],
                 ["merge", "--base", str(whole), "--lora", str(cut), "--out", out]):
        _one_line_error(argv, capsys, "cut.safetensors: truncated")  # `info` exited 0 before
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_file_cut_inside_its_header_is_truncated(tmp_path):
    raw = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "f.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw[:10])
    with pytest.raises(WeightsError, match=r"f.safetensors: truncated \(its header alone should be 61 bytes, the file has 10 "):
        read_header(path)


_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header, data, message", [
    ({"x": {"dtype": "F32", "data_offsets": [0, 8]}}, 8, "tensor 'x' has no valid dtype, shape and data_offsets"),
    ({"x": {"shape": [2], "data_offsets": [0, 8]}}, 8, "tensor 'x' has no valid"),
    ({"x": {"dtype": "F32", "shape": [2]}}, 8, "tensor 'x' has no valid"),
    ({"x": "F32"}, 8, "tensor 'x' has no valid"),
    ({"x": {**_ENTRY, "dtype": "F33"}}, 8, "tensor 'x' has no valid"),
    ({"x": {**_ENTRY, "shape": [3]}}, 8, "tensor 'x' has no valid"),  # 12 bytes of F32 in an 8-byte range
    ({"x": {**_ENTRY, "shape": [-2]}}, 8, "tensor 'x' has no valid"),
    ({"x": {**_ENTRY, "data_offsets": [8, 0]}}, 8, "tensor 'x' has no valid"),
    ({"x": {**_ENTRY, "data_offsets": [0]}}, 8, "tensor 'x' has no valid"),
    ({"x": _ENTRY, "y": _ENTRY}, 16, "overlaps another or leaves a gap"),
    ({"x": {**_ENTRY, "data_offsets": [8, 16]}}, 16, "overlaps another or leaves a gap"),
    ({"x": _ENTRY}, 4, "truncated (header says 8 bytes of tensors, the file has 4)"),
    ({"x": _ENTRY}, 12, "damaged (4 bytes after the last tensor"),
    ({"x": _ENTRY, "__metadata__": {"a": 1}}, 8, "__metadata__ is not a map of strings"),
    (b"{not json", 0, "header is not a JSON object"),
    (b"{\xff\xfe}", 0, "header is not a JSON object"),
], ids=["no-shape", "no-dtype", "no-offsets", "entry-not-object", "unknown-dtype", "size-mismatch", "negative-dim",
        "reversed-offsets", "one-offset", "overlap", "gap", "truncated", "trailing-bytes", "metadata-not-strings",
        "not-json", "not-utf8"])
def test_odd_headers_are_one_line(header, data, message, tmp_path, capsys):
    path = _raw(tmp_path / "odd.safetensors", header, b"\0" * data)
    with pytest.raises(WeightsError, match=re.escape(message)):
        read_header(path)
    _one_line_error(["info", str(path)], capsys, "odd.safetensors")  # KeyError: 'shape' before
    with pytest.raises(WeightsError, match="odd.safetensors"):
        read_lora(path)


def test_a_valid_header_still_reads(tmp_path):
    path = _raw(tmp_path / "ok.safetensors", {"x": _ENTRY, "e": {"dtype": "BF16", "shape": [0, 3],
                                                                  "data_offsets": [8, 8]},
                                              "__metadata__": {"a": "b"}}, b"\0" * 8)
    assert read_header(path) == ({"x": ([2], "F32"), "e": ([0, 3], "BF16")}, {"a": "b"})


# ----- #8: the header length is capped before anything is read --------------------------------------------


def test_a_huge_header_length_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "sparse.safetensors"
    n = 300_000_000  # over safetensors' 100 MB cap; the file is as long as it claims, but sparse
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + b"{")
        f.truncate(8 + n)
    tracemalloc.start()
    try:
        with pytest.raises(WeightsError, match=r"sparse.safetensors: header length 300,000,000 bytes is over "
                                               r"safetensors' limit of 100 MB"):
            read_header(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # the header was never read into memory (it took 2x its size before)


# ----- bad PEFT metadata ------------------------------------------------------------------------------------


def _with_meta(lora, path, key, value):
    src = write_lora(lora, path.with_suffix(".src.safetensors"), "diffusers")
    with open(src, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    header["__metadata__"][key] = value
    return _raw(path, header, data)


@pytest.mark.parametrize("value, message", [
    ("{not json", "its lora_adapter_metadata metadata is not JSON"),
    ("[1, 2]", "is not a JSON object (a PEFT LoraConfig)"),
    ('{"lora_alpha": NaN}', "lora_alpha is nan, not a finite number"),
    ('{"lora_alpha": "8"}', "lora_alpha is '8', not a finite number"),
    ('{"transformer.alpha_pattern": {"to_q": Infinity}}', "transformer.alpha_pattern['to_q'] is inf"),
    ('{"alpha_pattern": [1]}', "alpha_pattern is not a JSON object"),
])
def test_bad_peft_metadata_is_one_line(value, message, lora, tmp_path, capsys):
    path = _with_meta(lora, tmp_path / "peft.safetensors", "lora_adapter_metadata", value)
    with pytest.raises(WeightsError, match=r"peft.safetensors: its lora_adapter_metadata") as e:
        read_lora(path)
    assert message in str(e.value)
    _one_line_error(["info", str(path)], capsys, message)


@pytest.mark.parametrize("text, message", [("{broken", "unreadable"), ("[]", "is not a JSON object"),
                                           ('{"lora_alpha": null}', "lora_alpha is None")])
def test_a_broken_adapter_config_is_one_line(text, message, lora, tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    tensors, _ = lora_state_dict(lora, "diffusers")  # no lora_adapter_metadata: adapter_config.json is read
    save_file({f"base_model.model.{k.removeprefix('transformer.')}": v for k, v in tensors.items()},
              folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(text)
    with pytest.raises(WeightsError, match=f"adapter_config.json.*{message}"):
        read_lora(folder)


def test_malformed_old_scfm_lora_metadata_is_one_line(lora, tmp_path):
    tensors, _ = lora_state_dict(lora, "ours")
    path = tmp_path / "old.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.endswith(".alpha")}, path, {"scfm_lora": "{oops"})
    with pytest.raises(WeightsError, match="old.safetensors: its scfm_lora metadata holds no finite alpha"):
        read_lora(path)


def test_non_finite_recommended_settings_are_no_hint(lora, tmp_path):
    path = write_lora(lora, tmp_path / "hint.safetensors", "ours",
                      metadata={"scfm_lora_scale": "nan", "scfm_guidance": "inf", "scfm_steps": "4"})
    recommended = read_lora(path).recommended
    assert (recommended.lora_scale, recommended.guidance, recommended.steps) == (None, None, 4)


# ----- #1: a LoRA with a NaN is refused when read ---------------------------------------------------------


@pytest.mark.parametrize("layout", ["ours", "diffusers", "kohya"])
def test_a_lora_with_one_nan_is_refused_naming_the_tensor(layout, lora, tmp_path, capsys):
    tensors, meta = lora_state_dict(lora, layout)
    key = sorted(k for k in tensors if tensors[k].ndim == 2)[3]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[5] = math.nan
    path = tmp_path / "nan.safetensors"
    save_file(tensors, path, meta)
    with pytest.raises(WeightsError, match=rf"nan.safetensors: tensor {key} holds 1 NaN / infinite value\(s\)"):
        read_lora(path)
    out = tmp_path / "out.safetensors"
    _one_line_error(["lora", str(path), str(out), "--to", "ours", "--rank", "1"], capsys, key)  # the SVD crashed
    assert not out.exists()


@pytest.mark.parametrize("extra", ["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
                                   "lora_unet_final_layer_linear.diff_b", "lora_unet_img_in.alpha"])
def test_text_encoder_parts_full_differences_and_alphas_are_checked_too(extra, lora, tmp_path):
    tensors, meta = lora_state_dict(lora, "kohya")
    tensors[extra] = torch.tensor(math.inf) if extra.endswith("alpha") else torch.full((4, 2), math.inf)
    path = tmp_path / "inf.safetensors"
    save_file(tensors, path, meta)
    with pytest.raises(WeightsError, match=f"inf.safetensors: tensor {extra} holds"):
        read_lora(path)


# ----- #14: temp files of killed writes ---------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leftovers(target, writer: str, dead: int) -> dict[str, bool]:
    """Temp names beside `target` -> whether a writer of `target` must remove them."""
    name = target.name
    return {f".{name}.{writer}.{dead}.0badc0de.tmp": True,  # a killed write of this very file
            f".{name}.{writer}.{dead}.0badf01d.tmp/": True,  # ... that made a folder (a diffusers conversion)
            f".{name}.{writer}.{os.getpid()}.0a11ce00.tmp": False,  # a live writer (ourselves)
            f".{name}.other-host.{dead}.0b0b0b0b.tmp": False,  # another host's: its pids are not ours
            f".{name}.0ddba11a.tmp": False,  # the older form: no pid to judge
            f".{name}.partial.{writer}.{dead}.0badc0de.tmp": False,  # another target's
            f".other.safetensors.{writer}.{dead}.0badc0de.tmp": False,
            f"{name}.{writer}.{dead}.0badc0de.tmp": False}  # not hidden: not ours


def _writer(tmp_path) -> str:
    from weights.atomic import temp_beside

    tmp = temp_beside(tmp_path / "probe")
    tmp.unlink()
    return tmp.name.rsplit(".", 4)[1]


def test_temp_names_carry_host_and_pid(tmp_path):
    from weights.atomic import temp_beside, temp_writer_gone

    tmp = temp_beside(tmp_path / "a.safetensors")
    stem, host, pid, rand, suffix = tmp.name.rsplit(".", 4)
    assert (stem, suffix, len(rand), int(pid)) == (".a.safetensors", "tmp", 8, os.getpid()) and host
    assert not temp_writer_gone(tmp)  # we are alive
    dead = tmp.with_name(tmp.name.replace(f".{pid}.", f".{_dead_pid()}."))
    assert temp_writer_gone(dead) and not temp_writer_gone(dead.with_name(dead.name.replace(host, "elsewhere")))


@pytest.mark.parametrize("write", ["atomic_save", "write_streaming"])
def test_writers_remove_only_dead_temps_of_their_own_file(write, tmp_path):
    target = tmp_path / "x.safetensors"
    expected = _leftovers(target, _writer(tmp_path), _dead_pid())
    for name in expected:
        (tmp_path / name.rstrip("/")).mkdir() if name.endswith("/") else (tmp_path / name).write_text("part")
    t = torch.ones(2)
    if write == "atomic_save":
        atomic_save({"x": t}, target)
    else:
        write_streaming(target, [("x", t.dtype, tuple(t.shape))], [("x", t)])
    left = {p.name for p in tmp_path.iterdir()}
    assert {n.rstrip("/") for n, gone in expected.items() if not gone} | {target.name} == left


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_killed_write_is_cleaned_by_the_next_one(tmp_path):
    from weights.atomic import atomic_path

    target = tmp_path / "lora.safetensors"
    pid = os.fork()  # a child killed mid-write (a fork, not a new interpreter: no second torch import)
    if pid == 0:
        try:
            with atomic_path(target) as t:
                t.write_bytes(b"half")
                os._exit(9)
        finally:
            os._exit(1)  # never back into pytest
    assert os.waitpid(pid, 0)[1] >> 8 == 9
    assert [p.name.startswith(".lora.safetensors.") for p in tmp_path.iterdir()] == [True]  # the kill's leftover
    atomic_save({"x": torch.ones(1)}, target)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_conversion_to_a_folder_removes_its_dead_temp_folders(tmp_path):
    from weights.convert import convert_checkpoint
    from weights.transformer import save_transformer

    base = save_transformer(Flux(FLUX_CONFIGS["tiny"]), tmp_path / "flux.safetensors")
    out = tmp_path / "flux-diffusers"
    dead, live = (tmp_path / f".{out.name}.{_writer(tmp_path)}.{pid}.0badf01d.tmp" for pid in (_dead_pid(), os.getpid()))
    for folder in (dead, live):
        folder.mkdir()
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
    convert_checkpoint(base, out, "diffusers")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([base.name, out.name, live.name])
