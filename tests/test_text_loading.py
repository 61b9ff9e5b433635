"""load_t5 / load_clip: every file layout, dtype handling without an fp32 copy, and the one-line errors."""

import dataclasses
import json

import pytest
import torch
from conftest import comfy_scaled_fp8
from safetensors.torch import save_file
from text_fixtures import assert_close_rel, hf_clip, hf_t5, run_hf_clip, t5_state
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from model.clip import CLIP_CONFIGS, CLIPTextEncoder
from model.t5 import T5_CONFIGS, T5Encoder
from weights.io import WeightsError
from weights.text import clip_config_from_shapes, load_clip, load_t5, t5_config_from_shapes

T5_TINY = T5_CONFIGS["tiny"]
# Head count and activation cannot be read from shapes: this config is what inference must reproduce (width
# 128 -> 2 heads of 64, a non-OpenAI width -> gelu, default eos).
CLIP_SRC = dataclasses.replace(CLIP_CONFIGS["tiny"], hidden_size=128, num_attention_heads=2,
                               hidden_act="gelu", eos_token_id=49407)


def _save(tensors: dict, path, dtype=None):
    save_file({k: (v.to(dtype) if dtype and v.is_floating_point() else v).contiguous().clone()
               for k, v in tensors.items()},
              str(path))
    return path


def _assert_same_state(model, expected: dict, dtype=torch.float32):
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k].dtype == dtype, k
        assert torch.equal(got[k], v.to(dtype)), k


class _Float32Allocations(TorchDispatchMode):
    """Records every non-meta fp32 tensor of more than 64 elements produced by any op."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and not t.is_meta and t.numel() > 64:
                self.seen.append((str(func), tuple(t.shape)))
        return out


def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab - 3, (2, 50), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------- T5


def test_t5_transformers_folder_single_and_sharded(tmp_path):
    hf = hf_t5(T5_TINY, 0.2)
    hf.save_pretrained(tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert list((tmp_path / "sharded").glob("*.index.json"))
    ids = _ids(T5_TINY.vocab_size)
    with torch.no_grad():
        ref = hf(input_ids=ids).last_hidden_state
    for name in ("single", "sharded"):
        model = load_t5(tmp_path / name)
        assert model.config == T5_TINY
        with torch.no_grad():
            assert_close_rel(model(ids), ref, torch.float32)


def test_t5_comfy_fp16_file_to_bf16_never_makes_fp32(tmp_path):
    hf = hf_t5(T5_TINY, 0.2)
    state = t5_state(hf)
    path = _save(state, tmp_path / "t5xxl_fp16.safetensors", torch.float16)
    with _Float32Allocations() as watch:
        model = load_t5(path, dtype=torch.bfloat16)
    assert watch.seen == []
    assert model.config == T5_TINY  # inferred from shapes: no config.json next to a single file
    _assert_same_state(model, {k: v.half() for k, v in state.items()}, torch.bfloat16)
    with _Float32Allocations() as control:  # the watcher does see fp32 tensors when there are some
        load_t5(path, dtype=torch.float32)
    assert control.seen


def test_t5_comfy_scaled_fp8_file(tmp_path):
    """t5xxl_fp8_e4m3fn_scaled-style: every 2-D weight fp8 with a scalar scale; the model gets the products."""
    state = t5_state(hf_t5(T5_TINY, 0.2))
    tensors, real = comfy_scaled_fp8(state)
    model = load_t5(_save(tensors, tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"))
    assert model.config == T5_TINY
    _assert_same_state(model, real)


def test_t5_prefixed_file_with_embed_tokens_name(tmp_path):
    state = t5_state(hf_t5(T5_TINY, 0.2))
    prefix = "text_encoders.t5xxl.transformer."
    renamed = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in state.items()}
    tensors = {prefix + k: v for k, v in renamed.items()}
    tensors["model.diffusion_model.img_in.weight"] = torch.zeros(4, 4)  # the rest of an all-in-one file
    model = load_t5(_save(tensors, tmp_path / "all_in_one.safetensors"))
    _assert_same_state(model, state)


def test_t5_config_from_full_size_shapes():
    with torch.device("meta"):
        sd = T5Encoder(T5_CONFIGS["t5-v1.1-xxl"]).state_dict()
    shapes = {k: (list(v.shape), "F16") for k, v in sd.items()}
    assert t5_config_from_shapes(shapes) == T5_CONFIGS["t5-v1.1-xxl"]


def test_t5_errors(tmp_path):
    state = t5_state(hf_t5(T5_TINY, 0.02))
    bad = dict(state)
    del bad["encoder.block.2.layer.0.SelfAttention.k.weight"]
    with pytest.raises(WeightsError, match="1 keys missing.*SelfAttention.k.weight"):
        load_t5(_save(bad, tmp_path / "missing.safetensors"))
    with pytest.raises(WeightsError, match="shape mismatch"):
        load_t5(_save(state, tmp_path / "ok.safetensors"), config=dataclasses.replace(T5_TINY, d_ff=256))
    no_bias = {k: v for k, v in state.items() if "relative_attention_bias" not in k}
    with pytest.raises(WeightsError, match="cannot infer the T5 config.*relative_attention_bias"):
        load_t5(_save(no_bias, tmp_path / "no_bias.safetensors"))
    relu = {k.replace("wi_0", "wi"): v for k, v in state.items() if "wi_1" not in k}
    with pytest.raises(WeightsError, match="original T5"):
        load_t5(_save(relu, tmp_path / "relu.safetensors"))
    two = {p + k: v for p in ("a.", "b.") for k, v in state.items()}
    with pytest.raises(WeightsError, match="pass prefix="):
        load_t5(_save(two, tmp_path / "two.safetensors"))
    assert load_t5(tmp_path / "two.safetensors", prefix="b.").config == T5_TINY
    clip = CLIPTextEncoder(CLIP_CONFIGS["tiny"]).state_dict()
    with pytest.raises(WeightsError, match="pass it with --clip"):
        load_t5(_save(clip, tmp_path / "clip.safetensors"))
    (tmp_path / "model.bin").write_bytes(b"\x80\x02junk")
    with pytest.raises(WeightsError, match="pickled"):
        load_t5(tmp_path / "model.bin")
    with pytest.raises(WeightsError, match="no such file"):
        load_t5(tmp_path / "nope.safetensors")
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(WeightsError, match="pass its text encoder.s own folder, e.g. --clip"):
        load_t5(tmp_path / "pipe")
    with pytest.raises(WeightsError, match="no text_encoder_3/ subfolder"):
        load_t5(tmp_path / "pipe", subfolder="text_encoder_3")


# -------------------------------------------------------------------------------------------------- CLIP


@pytest.mark.parametrize("legacy", [False, True], ids=["clip_text_model", "with_projection_legacy_eos"])
def test_clip_transformers_folders(tmp_path, legacy):
    # transformers 5 saves CLIPTextModel (Flux's CLIP-L) without the `text_model.` level, WithProjection with
    # it.
    cfg = dataclasses.replace(CLIP_CONFIGS["tiny"], eos_token_id=2 if legacy else 500,
                              projection_dim=32 if legacy else None)
    hf = hf_clip(cfg, 0.2, bos=998)
    hf.save_pretrained(tmp_path)
    model = load_clip(tmp_path)
    assert model.config == cfg
    ids = _ids(cfg.vocab_size)
    ids[:, 30] = 500
    ids[0, 5] = 999  # the two eos rules disagree on row 0, so the config's rule must have been read
    ref = run_hf_clip(hf, ids)
    with torch.no_grad():
        out = model(ids)
    for name, value in ref.items():
        if value is None:
            assert getattr(out, name) is None
        else:
            assert_close_rel(getattr(out, name), value, torch.float32)


def test_clip_comfy_single_file_fp16(tmp_path):
    state = CLIPTextEncoder(CLIP_SRC).state_dict()
    state = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) for i, (k, v) in
             enumerate(state.items())}
    # plus the stale position_ids buffer that old transformers versions saved
    tensors = {**state, "text_model.embeddings.position_ids": torch.arange(77)[None]}
    path = _save(tensors, tmp_path / "clip_g.safetensors", torch.float16)
    with _Float32Allocations() as watch:
        model = load_clip(path, dtype=torch.bfloat16)
    assert watch.seen == []
    assert model.config == CLIP_SRC
    _assert_same_state(model, {k: v.half() for k, v in state.items()}, torch.bfloat16)


def _to_openclip(state: dict, width: int) -> dict:
    """Our names -> OpenCLIP's, written independently of the loader: fused q/k/v, [width, proj] projection."""
    out = {"token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": state["text_model.final_layer_norm.weight"],
           "ln_final.bias": state["text_model.final_layer_norm.bias"],
           "text_projection": state["text_projection.weight"].t(), "logit_scale": torch.tensor(4.6)}
    for i in range(CLIP_SRC.num_hidden_layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            qkv = [state[src + f"self_attn.{n}_proj.{p}"] for n in "qkv"]
            out[dst + f"attn.in_proj_{p}"] = torch.cat(qkv)  # (3 * width, ...)
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                         ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[dst + f"{a}.{p}"] = state[src + f"{b}.{p}"]
    assert sum(v.numel() for v in out.values()) == sum(v.numel() for v in state.values()) + 1
    return out


def test_clip_openclip_native_layout(tmp_path):
    state = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) for i, (k, v) in
             enumerate(CLIPTextEncoder(CLIP_SRC).state_dict().items())}
    prefix = "conditioner.embedders.1.model."  # bigG inside an SDXL checkpoint
    tensors = {prefix + k: v for k, v in _to_openclip(state, CLIP_SRC.hidden_size).items()}
    tensors[prefix + "visual.proj"] = torch.zeros(8, 8)
    model = load_clip(_save(tensors, tmp_path / "sdxl.safetensors"))
    assert model.config == CLIP_SRC
    _assert_same_state(model, state)


def test_clip_all_in_one_file_needs_prefix(tmp_path):
    state = CLIPTextEncoder(CLIP_SRC).state_dict()
    small = CLIPTextEncoder(CLIP_CONFIGS["tiny"]).state_dict()
    tensors = {**{"text_encoders.clip_g.transformer." + k: v for k, v in state.items()},
               **{"text_encoders.clip_l.transformer." + k: v for k, v in small.items()}}
    path = _save(tensors, tmp_path / "sd3.safetensors")
    with pytest.raises(WeightsError, match="pass prefix="):
        load_clip(path)
    assert load_clip(path, prefix="text_encoders.clip_g.transformer.").config == CLIP_SRC


def test_clip_config_from_full_size_shapes():
    for name in ("clip-l", "clip-bigg"):
        with torch.device("meta"):
            sd = CLIPTextEncoder(CLIP_CONFIGS[name]).state_dict()
        assert clip_config_from_shapes({k: tuple(v.shape) for k, v in sd.items()}) == CLIP_CONFIGS[name]


def test_clip_errors(tmp_path):
    state = CLIPTextEncoder(CLIP_SRC).state_dict()
    with pytest.raises(WeightsError, match="unexpected keys.*text_model.extra.weight"):
        load_clip(_save({**state, "text_model.extra.weight": torch.zeros(2)}, tmp_path / "extra.safetensors"))
    with pytest.raises(WeightsError, match="shape mismatch"):
        load_clip(_save(state, tmp_path / "ok.safetensors"), config=dataclasses.replace(CLIP_SRC,
                                                                                        intermediate_size=64))
    no_fc1 = {k: v for k, v in state.items() if k != "text_model.encoder.layers.0.mlp.fc1.weight"}
    with pytest.raises(WeightsError, match="cannot infer the CLIP config"):
        load_clip(_save(no_fc1, tmp_path / "no_fc1.safetensors"))
    t5 = T5Encoder(T5_TINY).state_dict()
    with pytest.raises(WeightsError, match="pass it with --t5"):
        load_clip(_save(t5, tmp_path / "t5.safetensors"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text(json.dumps({"hidden_act": "relu"}))
    _save(state, tmp_path / "folder" / "model.safetensors")
    with pytest.raises(WeightsError, match="hidden_act='relu'"):
        load_clip(tmp_path / "folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no .safetensors files"):
        load_clip(tmp_path / "empty")
