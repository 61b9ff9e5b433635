"""LoRAs merged as the weights are read (`load_flux` / `load_mmdit(..., loras=)`, weights/lora_merge.py
`merge_while_reading`): bit for bit what merging after loading gives, before fp8 rounds the weights, and refused
before anything is read when they do not fit."""

import dataclasses

import pytest
import torch
from conftest import assert_same_bits, random_lora, randomize_
from mmdit_fixtures import SD35_TINY

from model.flux import FLUX_CONFIGS, Flux
from model.fp8 import E4M3, quantize_linears_
from model.mmdit import MMDiT
from weights import WeightsError, load_flux, load_mmdit, save_transformer
from weights.lora_merge import applied_loras, apply_loras, unload_loras
from weights.lora_write import write_lora

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    """A tiny Flux saved in the BFL and diffusers layouts, and two LoRAs for it: a LoRA object and a kohya file."""
    root = tmp_path_factory.mktemp("flux")
    model = randomize_(Flux(FLUX_CONFIGS["tiny"]), 0.2, seed=1).eval()
    for layout in ("official", "diffusers"):
        save_transformer(model, root / f"{layout}.safetensors", layout=layout)
    a = random_lora(randomize_(Flux(FLUX_CONFIGS["tiny"]), 0.2, seed=2), seed=3)
    b = random_lora(randomize_(Flux(FLUX_CONFIGS["tiny"]), 0.2, seed=4), seed=5, rank=3, alpha=1.5)
    write_lora(b, root / "b.safetensors", "kohya")
    return root, [(a, 0.7), (root / "b.safetensors", -1.3)]


@pytest.mark.parametrize("layout", ["official", "diffusers"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_flux_loras_merged_while_reading_equal_merging_after_loading(flux_files, layout, fp8):
    root, loras = flux_files
    path = root / f"{layout}.safetensors"
    got = load_flux(path, dtype=BF16, loras=loras, fp8=fp8)
    want = load_flux(path, dtype=BF16)
    apply_loras(want, loras, restorable=False)
    if fp8:
        quantize_linears_(want)  # merged in bf16, then rounded to e4m3: never the other way round
        assert got.double_blocks[0].img_attn.qkv.weight.dtype == E4M3
    assert_same_bits(got.state_dict(), want.state_dict())
    assert not torch.equal(want.img_in.weight, load_flux(path, dtype=BF16).img_in.weight)  # the LoRAs did apply
    assert len(applied_loras(got)) == 2
    with pytest.raises(WeightsError, match="restorable=False"):
        unload_loras(got)  # nothing was kept to undo them


def test_sd35_loras_merged_while_reading_include_the_conv_patch_embedding(tmp_path):
    model = randomize_(MMDiT(SD35_TINY), 0.2, seed=1).eval()
    save_transformer(model, tmp_path / "sd35.safetensors", layout="diffusers")
    lora = random_lora(randomize_(MMDiT(SD35_TINY), 0.2, seed=2), seed=3, family="sd3")
    assert isinstance(model.x_embedder.proj, torch.nn.Conv2d) and "x_embedder.proj" in lora.modules
    for fp8 in (False, True):
        got = load_mmdit(tmp_path / "sd35.safetensors", dtype=BF16, loras=[(lora, 1.5)], fp8=fp8)
        want = load_mmdit(tmp_path / "sd35.safetensors", dtype=BF16)
        apply_loras(want, [(lora, 1.5)], restorable=False)
        if fp8:
            quantize_linears_(want)
        assert_same_bits(got.state_dict(), want.state_dict())


def test_loras_that_do_not_fit_are_refused_before_anything_is_read(flux_files, monkeypatch):
    import weights.assign

    root, _ = flux_files
    read = []
    monkeypatch.setattr(weights.assign, "quantize_rows", lambda t: read.append(t))  # no weight may arrive
    sd3 = random_lora(randomize_(MMDiT(SD35_TINY), 0.2, seed=2), seed=3, family="sd3")
    with pytest.raises(WeightsError, match="a LoRA for SD3 / SD3.5; this model is Flux: pass a LoRA trained on "
                                           "Flux") as e:
        load_flux(root / "official.safetensors", fp8=True, loras=[sd3])
    assert "\n" not in str(e.value) and read == []
    wider = dataclasses.replace(FLUX_CONFIGS["tiny"], hidden_size=64, num_heads=4)
    big = random_lora(randomize_(Flux(wider), 0.2, seed=2), seed=3)
    with pytest.raises(WeightsError, match="different model size"):
        load_flux(root / "official.safetensors", fp8=True, loras=[big])
    assert read == []


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_meta_device_runs_every_check_and_reads_no_tensor(flux_files, layout, monkeypatch):
    import weights.reader

    root, loras = flux_files
    read = weights.reader.TensorReader.__call__

    def only_loras(reader, key):  # the LoRA file is read; the model's must not be
        assert all(f.name == "b.safetensors" for f in reader.files), f"{key} was read"
        return read(reader, key)

    monkeypatch.setattr(weights.reader.TensorReader, "__call__", only_loras)
    model = load_flux(root / f"{layout}.safetensors", device="meta", fp8=True, loras=loras)
    assert model.img_in.weight.is_meta and model.double_blocks[0].img_attn.qkv.weight.dtype == E4M3
    assert model.config == FLUX_CONFIGS["tiny"] and len(applied_loras(model)) == 2
