"""Folders and files the loaders must refuse in one line, or read the way the Hugging Face loaders do: a key in two
files (the index decides; a `.fp16` variant gives way to its plain file), a weight or buffer stored as an integer
or a packed 4/6-bit type, broken links of a Hugging Face cache, upper-case suffixes, a tokenizer of the wrong
model, and messages that name CLI flags."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from model.clip import CLIP_CONFIGS, CLIPTextEncoder
from model.flux import FLUX_CONFIGS, Flux
from model.tokenizers import CLIPTokenizer, Qwen3Tokenizer
from model.vae import AutoEncoder, VAEConfig
from weights.assign import assign_tensors
from weights.families import detect_family
from weights.io import WeightsError
from weights.keymaps.vae import ours_to_diffusers
from weights.reader import TensorReader, iter_tensors, read_shapes, weight_files
from weights.text import load_clip
from weights.transformer import load_flux
from weights.vae import load_vae

# FLUX.2's VAE at test size (tests/test_flux2_vae.py): BatchNorm running statistics are float buffers
FLUX2_VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, scale_factor=1.0, shift_factor=0.0,
                      quant_conv=True, batch_norm_eps=1e-4)


def _one_line(e: pytest.ExceptionInfo, *parts: str) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    for part in parts:
        assert part in text, text
    return text


def _clip_state() -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in CLIPTextEncoder(CLIP_CONFIGS["tiny"]).state_dict().items()}


# ----- 1: a key in two files ------------------------------------------------------------------------------


def test_the_index_decides_which_shard_a_duplicated_key_comes_from(tmp_path):
    save_file({"a": torch.zeros(2), "x": torch.full((3,), 1.0)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(2), "x": torch.full((4,), 2.0)}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "x": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    files = weight_files(tmp_path)
    assert read_shapes(files)[0]["x"] == ([3], "F32")  # the later shard's [4] before
    assert torch.equal(dict(iter_tensors(files))["x"], torch.full((3,), 1.0))


def test_a_key_in_two_files_without_an_index_is_refused(tmp_path):
    save_file({"x": torch.zeros(2)}, tmp_path / "a.safetensors")
    save_file({"x": torch.ones(2)}, tmp_path / "b.safetensors")
    with pytest.raises(WeightsError) as e:
        read_shapes(weight_files(tmp_path))
    _one_line(e, "a.safetensors and b.safetensors", "both hold x", "pass one file")
    with pytest.raises(WeightsError) as e:
        with TensorReader(weight_files(tmp_path)):
            pass
    _one_line(e, "both hold x")


def test_a_variant_gives_way_to_its_plain_file_as_in_diffusers(tmp_path):
    save_file({"x": torch.ones(2)}, tmp_path / "diffusion_pytorch_model.safetensors")
    save_file({"x": torch.ones(2, dtype=torch.float16)}, tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    assert weight_files(tmp_path) == [tmp_path / "diffusion_pytorch_model.safetensors"]


# ----- 2: dtypes a float model cannot hold ----------------------------------------------------------------


def test_an_integer_batch_norm_statistic_is_refused_not_loaded_as_int(tmp_path):
    state = {k: v.contiguous() for k, v in AutoEncoder(FLUX2_VAE).state_dict().items()}
    state["bn.running_var"] = torch.ones_like(state["bn.running_var"], dtype=torch.int16)
    save_file(state, tmp_path / "ae.safetensors")
    with pytest.raises(WeightsError) as e:
        load_vae(tmp_path / "ae.safetensors")
    _one_line(e, "ae.safetensors", "bn.running_var is stored as I16", "re-download")


def test_an_integer_transformer_weight_is_refused_before_any_read(tmp_path, monkeypatch):
    state = {k: v.contiguous() for k, v in Flux(FLUX_CONFIGS["tiny"]).state_dict().items()}
    state["final_layer.linear.weight"] = state["final_layer.linear.weight"].to(torch.int32)
    save_file(state, tmp_path / "flux.safetensors")
    monkeypatch.setattr(TensorReader, "_get", lambda *a: pytest.fail("a tensor was read"))
    with pytest.raises(WeightsError) as e:
        load_flux(tmp_path / "flux.safetensors")
    _one_line(e, "flux.safetensors", "final_layer.linear.weight is stored as I32")


def test_an_integer_buffer_handed_to_assign_tensors_is_refused():
    """The readers refuse from the header; a caller's own tensors meet the same check at assignment."""
    with torch.device("meta"):
        bn = torch.nn.BatchNorm1d(3)
    state = torch.nn.BatchNorm1d(3).state_dict()
    tensors = [(k, v.to(torch.int16) if k == "running_var" else v) for k, v in state.items()]
    with pytest.raises(WeightsError) as e:
        assign_tensors(bn, tensors, dtype=torch.float32, device="cpu", source="bn.safetensors")
    _one_line(e, "bn.safetensors: tensor running_var is int16")


def test_a_packed_six_bit_tensor_is_one_line(tmp_path):
    raw = json.dumps({"w": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}}).encode()
    (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 3)
    with TensorReader([tmp_path / "w.safetensors"]) as read:  # a LoRA's reader: no dtype check up front
        with pytest.raises(WeightsError) as e:
            read("w")
    _one_line(e, "w.safetensors", "F6_E2M3", "4/6-bit")


# ----- 3: broken links of a Hugging Face cache ------------------------------------------------------------


def test_a_broken_config_json_link_is_refused_not_guessed(tmp_path):
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    save_file(_clip_state(), folder / "model.safetensors")
    (folder / "config.json").symlink_to(tmp_path / "blobs" / "gone")
    with pytest.raises(WeightsError) as e:
        load_clip(folder)
    _one_line(e, "config.json: a broken link (its cache blob is missing); download the model again")


def test_a_broken_model_index_or_shard_link_is_named(tmp_path):
    (tmp_path / "model_index.json").symlink_to(tmp_path / "blobs" / "gone")
    with pytest.raises(WeightsError) as e:
        detect_family(tmp_path)
    _one_line(e, "model_index.json: a broken link")
    shard = tmp_path / "shard"
    shard.mkdir()
    (shard / "model.safetensors").symlink_to(tmp_path / "blobs" / "gone")
    with pytest.raises(WeightsError) as e:
        read_shapes(weight_files(shard))
    _one_line(e, "model.safetensors: a broken link")


def test_a_broken_tokenizer_config_link_is_refused(tmp_path):
    from model.tokenizers import CLIP_BPE_DIR

    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((CLIP_BPE_DIR / name).read_bytes())
    (tmp_path / "tokenizer_config.json").symlink_to(tmp_path / "blobs" / "gone")  # it names the pad token
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json: a broken link"):
        CLIPTokenizer.load(tmp_path)


# ----- 4: upper-case suffixes ------------------------------------------------------------------------------


def test_upper_case_suffixes_are_found(tmp_path):
    save_file({"x": torch.ones(2)}, tmp_path / "MODEL.SAFETENSORS")
    assert weight_files(tmp_path) == [tmp_path / "MODEL.SAFETENSORS"]
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "PYTORCH_MODEL.BIN").write_bytes(b"\x80\x02junk")
    with pytest.raises(WeightsError) as e:
        weight_files(pickled)
    _one_line(e, "found pickled ['PYTORCH_MODEL.BIN']")


# ----- 5: a tokenizer of another model ----------------------------------------------------------------------


def test_a_clip_tokenizer_is_not_taken_for_qwen3s(tmp_path):
    CLIPTokenizer.load().tokenizer.save(str(tmp_path / "tokenizer.json"))  # it has <|endoftext|>, Qwen's pad
    with pytest.raises(ValueError) as e:
        Qwen3Tokenizer.load(tmp_path)
    _one_line(e, "not a Qwen3 tokenizer", "<|im_start|>", "--qwen-tokenizer")


# ----- 6: messages name CLI flags ----------------------------------------------------------------------------


def test_wrong_files_name_the_flag_to_pass_them_with(tmp_path):
    save_file(_clip_state(), tmp_path / "clip.safetensors")
    with pytest.raises(WeightsError) as e:
        load_flux(tmp_path / "clip.safetensors")
    _one_line(e, "a CLIP text encoder; pass it with --clip")
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(WeightsError) as e:
        load_clip(tmp_path)
    _one_line(e, f"--clip {tmp_path / 'text_encoder'}")


def test_a_flux2_diffusers_vae_without_config_is_not_explained_as_flux_or_sd3(tmp_path):
    state = AutoEncoder(FLUX2_VAE).state_dict()
    mapped = {}
    for k, v in state.items():
        name, transform = ours_to_diffusers(k, len(FLUX2_VAE.ch_mult))
        mapped[name] = (transform(v) if transform else v).contiguous()
    save_file(mapped, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError) as e:
        load_vae(tmp_path / "diffusion_pytorch_model.safetensors")
    text = _one_line(e, "a diffusers FLUX.2 VAE file without its config.json", "--vae")
    assert "SD3.5" not in text
