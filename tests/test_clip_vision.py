"""CLIP vision tower, preprocessing and CLIP score against transformers (a tiny random CLIPModel saved to disk), the
layouts load_clip_vision reads, and its one-line errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import randomize_
from PIL import Image
from safetensors.torch import load_file, save_file

from model.clip import CLIP_CONFIGS
from model.clip_vision import (
    CLIP_VISION_CONFIGS,
    CLIPVisionConfig,
    CLIPVisionTower,
    clip_score,
    embed_images,
    preprocess,
)
from weights.io import WeightsError
from weights.text import load_clip
from weights.vision import load_clip_vision, vision_config_from_shapes

TEXT = CLIP_CONFIGS["tiny"]
VISION = dataclasses.replace(CLIP_VISION_CONFIGS["tiny"], image_size=30, patch_size=7)  # 30 % 7: a dropped rim


def _hf_clip_model():
    from transformers import CLIPConfig as HFCLIPConfig
    from transformers import CLIPModel

    names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings", "hidden_act", "eos_token_id")
    text = {n: getattr(TEXT, n) for n in names}
    text |= {"bos_token_id": TEXT.vocab_size - 2, "pad_token_id": TEXT.eos_token_id}
    vision = {f.name: getattr(VISION, f.name) for f in dataclasses.fields(VISION)}
    config = HFCLIPConfig(text_config=text, vision_config=vision, projection_dim=VISION.projection_dim)
    return randomize_(CLIPModel(config), 0.2, seed=3).eval()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    hf = _hf_clip_model()
    folder = tmp_path_factory.mktemp("clip")
    hf.save_pretrained(folder)
    return hf, folder


def _images() -> list:
    g = np.random.default_rng(0)
    arrays = [g.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((53, 37), (40, 80), (30, 30), (31, 97))]
    rgba = Image.fromarray(g.integers(0, 256, (45, 29, 4), dtype=np.uint8), "RGBA")
    grey = Image.fromarray(g.integers(0, 256, (33, 61), dtype=np.uint8), "L")
    rgba_array = g.integers(0, 256, (27, 44, 4), dtype=np.uint8)
    return [Image.fromarray(arrays[0]), Image.fromarray(arrays[1]), arrays[2], arrays[3], rgba, grey, rgba_array]


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("size", [30, 224])
def test_preprocess_matches_transformers(size):
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    images = _images()
    ref = processor(images=images, return_tensors="pt")["pixel_values"]
    ours = preprocess(images, size)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape == (len(images), 3, size, size)
    assert (ours - ref).abs().max().item() <= 1e-6


def test_image_embeds_match_transformers(hf_folder):
    hf, folder = hf_folder
    vision = load_clip_vision(folder)
    assert vision.config == VISION
    pixels = vision.preprocess(_images())
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=pixels).pooler_output
        ours = vision(pixels)
    assert _rel_err(ours, ref) <= 1e-5


def test_single_files_and_vision_only_model(hf_folder, tmp_path):
    from transformers import CLIPVisionModelWithProjection

    hf, folder = hf_folder
    state = load_file(str(folder / "model.safetensors"))
    pixels = preprocess(_images()[:2], VISION.image_size)
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=pixels).pooler_output
    # a full CLIPModel file without config.json, under a prefix; the config passed (heads are not in the shapes)
    save_file({"clip." + k: v for k, v in state.items()}, str(tmp_path / "clip.safetensors"))
    vision = load_clip_vision(tmp_path / "clip.safetensors", config=VISION)
    assert _rel_err(vision(pixels), ref) <= 1e-5
    # CLIPVisionModelWithProjection folder (also what a pipeline's image_encoder/ holds)
    only = CLIPVisionModelWithProjection(hf.config.vision_config).eval()
    only.load_state_dict({k: v for k, v in state.items() if k.startswith("vis")}, strict=True)
    only.save_pretrained(tmp_path / "pipe" / "image_encoder")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    vision = load_clip_vision(tmp_path / "pipe", subfolder="image_encoder", dtype=torch.bfloat16)
    assert vision.config == VISION and vision.visual_projection.weight.dtype == torch.bfloat16


def _to_openclip(state: dict) -> dict:
    """transformers names -> OpenCLIP's, written independently of the loader: fused q/k/v, [width, proj] proj."""
    v = "vision_model."
    out = {"visual.class_embedding": state[v + "embeddings.class_embedding"],
           "visual.positional_embedding": state[v + "embeddings.position_embedding.weight"],
           "visual.conv1.weight": state[v + "embeddings.patch_embedding.weight"],
           "visual.proj": state["visual_projection.weight"].t().contiguous(), "logit_scale": torch.tensor(4.6),
           "token_embedding.weight": torch.zeros(4, 4)}  # the text tower's keys are skipped
    for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for p in ("weight", "bias"):
            out[f"visual.{theirs}.{p}"] = state[f"{v}{ours}.{p}"]
    for i in range(VISION.num_hidden_layers):
        src, dst = f"{v}encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[dst + f"attn.in_proj_{p}"] = torch.cat([state[src + f"self_attn.{n}_proj.{p}"] for n in "qkv"])
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[dst + f"{a}.{p}"] = state[src + f"{b}.{p}"]
    return out


def test_openclip_layout(hf_folder, tmp_path):
    _, folder = hf_folder
    state = load_file(str(folder / "model.safetensors"))
    save_file(_to_openclip(state), str(tmp_path / "open_clip.safetensors"))
    vision = load_clip_vision(tmp_path / "open_clip.safetensors", config=VISION)
    got = vision.state_dict()
    assert got.keys() == {k for k in state if k.startswith("vision") or k == "visual_projection.weight"}
    assert all(torch.equal(got[k], state[k]) for k in got)
    attn_pool = {**_to_openclip(state), "visual.attn_pool.query": torch.zeros(2, 2)}
    save_file(attn_pool, str(tmp_path / "coca.safetensors"))
    with pytest.raises(WeightsError, match="only transformers' CLIP layout and OpenCLIP's plain ViT"):
        load_clip_vision(tmp_path / "coca.safetensors", config=VISION)


def test_clip_score(hf_folder):
    hf, folder = hf_folder
    g = torch.Generator().manual_seed(1)
    images = _images()
    ids = torch.randint(0, TEXT.eos_token_id - 1, (len(images), 12), generator=g)
    for row, eos in enumerate((3, 11, 5, 7, 8, 2, 9)):
        ids[row, eos:] = TEXT.eos_token_id  # EOS, then EOS padding as CLIP-L pads
    text = load_clip(folder)  # the text half of the same file, text_projection kept
    vision = load_clip_vision(folder)
    pixels = preprocess(images, VISION.image_size)
    with torch.no_grad():
        text_embeds = text(ids).text_embeds
        hf_text = hf.get_text_features(input_ids=ids).pooler_output
        hf_image = hf.get_image_features(pixel_values=pixels).pooler_output
    assert _rel_err(text_embeds, hf_text) <= 1e-5
    for sign in (1, -1):  # negating the prompts flips every cosine: each pair is clipped under one of the signs
        cos = torch.nn.functional.normalize(hf_image, dim=-1) @ torch.nn.functional.normalize(sign * hf_text, dim=-1).T
        want = (100 * cos.diagonal().clamp(min=0)).tolist()
        got = clip_score(embed_images(vision, images), sign * text_embeds)
        assert got == pytest.approx(want, abs=1e-3)
    assert clip_score(embed_images(vision, images[:1]), -hf_image[0]) == [0.0]  # the exact opposite
    shared = clip_score(embed_images(vision, images), text_embeds[0])  # one prompt for every image
    assert shared == pytest.approx((100 * (torch.nn.functional.normalize(hf_image, dim=-1)
                                           @ torch.nn.functional.normalize(hf_text[0], dim=-1)).clamp(min=0)).tolist(),
                                   abs=1e-3)
    with pytest.raises(ValueError, match=r"pass \(7, 32\)"):
        clip_score(embed_images(vision, images), text_embeds[:2])


def test_vit_l_config_from_shapes():
    with torch.device("meta"):
        sd = CLIPVisionTower(CLIPVisionConfig.preset("vit-l-14")).state_dict()
    assert vision_config_from_shapes({k: tuple(v.shape) for k, v in sd.items()}) == CLIP_VISION_CONFIGS["vit-l-14"]


def _one_line_error(source, match: str, **kw):
    with pytest.raises(WeightsError, match=match) as e:
        load_clip_vision(source, **kw)
    assert "\n" not in str(e.value)


def test_errors(hf_folder, tmp_path):
    from transformers import CLIPVisionModel

    hf, folder = hf_folder
    state = load_file(str(folder / "model.safetensors"))
    torch.save(state, tmp_path / "clip.pt")
    _one_line_error(tmp_path / "clip.pt", "safetensors only")
    save_file({k: v for k, v in state.items() if k.startswith("text")}, str(tmp_path / "clip_l.safetensors"))
    _one_line_error(tmp_path / "clip_l.safetensors", "text-only CLIP file .*the image tower is missing")
    CLIPVisionModel(hf.config.vision_config).save_pretrained(tmp_path / "no_proj")
    _one_line_error(tmp_path / "no_proj", "without visual_projection.weight")
    save_file({k: v for k, v in state.items() if ".layers.1.mlp.fc2" not in k}, str(tmp_path / "cut.safetensors"))
    _one_line_error(tmp_path / "cut.safetensors", "2 keys missing .*vision_model.encoder.layers.1.mlp.fc2",
                    config=VISION)
    save_file({k: v for k, v in state.items() if ".layers.1." not in k}, str(tmp_path / "one.safetensors"))
    (tmp_path / "one").mkdir()
    (tmp_path / "one.safetensors").rename(tmp_path / "one" / "model.safetensors")
    (tmp_path / "one" / "config.json").write_text(json.dumps({"vision_config": {"num_hidden_layers": 2}}))
    _one_line_error(tmp_path / "one", "keys missing for the transformers CLIP vision layout")
    (tmp_path / "one" / "config.json").write_text(json.dumps({"vision_config": {"hidden_act": "relu"}}))
    _one_line_error(tmp_path / "one", "config.json: hidden_act must be one of")
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    _one_line_error(tmp_path / "pipe", r"pass subfolder= \(image_encoder\)")
