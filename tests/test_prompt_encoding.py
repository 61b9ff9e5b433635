"""encode_flux / encode_sd3 against FluxPipeline.encode_prompt / StableDiffusion3Pipeline.encode_prompt built
from the same tiny parts, with the real CLIP BPE and a T5 sentencepiece model trained on the fly (docs/models.md
§9 row 16)."""

import dataclasses
import functools
import warnings

import pytest
import torch
from text_fixtures import (
    assert_close_rel,
    hf_clip,
    hf_clip_tokenizer,
    hf_t5,
    ours_clip_from,
    ours_clip_tokenizer,
    ours_t5_from,
    train_spm,
)

from model.clip import CLIP_CONFIGS
from model.t5 import T5_CONFIGS
from model.text import encode_flux, encode_sd3
from model.tokenizers import T5Tokenizer

# Real CLIP vocabulary (49408) so the real BPE ids index it; narrow widths keep it fast. The T5 vocabulary
# covers the 96 trained pieces plus the 100 sentinels.
CLIP_L = dataclasses.replace(CLIP_CONFIGS["tiny"], vocab_size=49408, hidden_size=32, num_attention_heads=2,
                             num_hidden_layers=2, intermediate_size=64, projection_dim=16, eos_token_id=49407)
CLIP_G = dataclasses.replace(CLIP_L, hidden_size=48, num_attention_heads=3, hidden_act="gelu",
                             projection_dim=24, eos_token_id=2)  # legacy rule, as old bigG configs
T5 = dataclasses.replace(T5_CONFIGS["tiny"], vocab_size=256, d_model=96, num_layers=2)
@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5_tokenizer")
    train_spm(folder)
    return folder


PROMPTS = ["a photo of a cat!", "", "an astronaut riding a horse on the moon, highly detailed, " * 12]


def _hf_tokenizers(spm_folder):
    from transformers import T5Tokenizer as HFT5Tokenizer

    return hf_clip_tokenizer(), hf_clip_tokenizer("!"), HFT5Tokenizer.from_pretrained(str(spm_folder))


def _ours_tokenizers(spm_folder):
    return ours_clip_tokenizer(), ours_clip_tokenizer("!"), T5Tokenizer.load(spm_folder / "spiece.model")


FLUX_CLIP = dataclasses.replace(CLIP_L, projection_dim=None)  # Flux's CLIP-L is a CLIPTextModel


@functools.cache
def _flux_parts(spm_folder):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    hf_l, hf_t5_model = hf_clip(FLUX_CLIP, 0.1, seed=1, bos=49406), hf_t5(T5, 0.1, seed=2)
    tok_l, _, tok_t5 = _hf_tokenizers(spm_folder)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=hf_l,
                        tokenizer=tok_l, text_encoder_2=hf_t5_model, tokenizer_2=tok_t5, transformer=None)
    ours_l, _, ours_tok_t5 = _ours_tokenizers(spm_folder)
    ours = dict(clip=ours_clip_from(hf_l, FLUX_CLIP), clip_tokenizer=ours_l, t5=ours_t5_from(hf_t5_model, T5),
                t5_tokenizer=ours_tok_t5)
    return pipe, ours


@pytest.mark.parametrize("max_length", [48, 64])
def test_encode_flux_matches_diffusers(spm_dir, max_length):
    pipe, ours = _flux_parts(spm_dir)
    with torch.no_grad():
        ref_txt, ref_y, ref_ids = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=max_length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long prompt is truncated on purpose
        txt, txt_ids, y = encode_flux(PROMPTS, max_length=max_length, **ours)
    assert txt.shape == (3, max_length, T5.d_model) and y.shape == (3, 32)
    assert_close_rel(txt, ref_txt, torch.float32)
    assert_close_rel(y, ref_y, torch.float32)
    assert torch.equal(txt_ids, ref_ids) and txt_ids.shape == (max_length, 3)


@functools.cache
def _sd3_parts(spm_folder, with_t5: bool = True):
    hf_l, hf_g = hf_clip(CLIP_L, 0.1, seed=1, bos=49406), hf_clip(CLIP_G, 0.1, seed=3, bos=49406)
    hf_t5_model = hf_t5(T5, 0.1, seed=2) if with_t5 else None
    tok_l, tok_g, tok_t5 = _hf_tokenizers(spm_folder)
    ours_l, ours_g, ours_t5 = _ours_tokenizers(spm_folder)
    ours = dict(clip_l=ours_clip_from(hf_l, CLIP_L), clip_l_tokenizer=ours_l,
                clip_g=ours_clip_from(hf_g, CLIP_G), clip_g_tokenizer=ours_g,
                t5=ours_t5_from(hf_t5_model, T5) if with_t5 else None,
                t5_tokenizer=ours_t5 if with_t5 else None)
    hf = dict(text_encoder=hf_l, tokenizer=tok_l, text_encoder_2=hf_g, tokenizer_2=tok_g,
              text_encoder_3=hf_t5_model, tokenizer_3=tok_t5 if with_t5 else None)
    return hf, ours


def _sd3_pipe(hf, joint_dim):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    # Only consulted for joint_attention_dim when T5 is absent; a 1-layer model is enough.
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=joint_dim, caption_projection_dim=16, pooled_projection_dim=40, out_channels=4,
        pos_embed_max_size=8)
    return StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                    transformer=transformer, **hf)


def test_encode_sd3_matches_diffusers_with_empty_negative(spm_dir):
    hf, ours = _sd3_parts(spm_dir)
    pipe = _sd3_pipe(hf, T5.d_model)
    with torch.no_grad():
        ref, ref_neg, ref_pooled, ref_neg_pooled = pipe.encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=True, max_sequence_length=48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        context, pooled = encode_sd3(PROMPTS, max_length=48, **ours)
        neg, neg_pooled = encode_sd3([""] * len(PROMPTS), max_length=48, **ours)
    assert context.shape == (3, 77 + 48, T5.d_model) and pooled.shape == (3, 16 + 24)
    assert (context[:, :77, 32 + 48:] == 0).all()  # CLIP part zero-padded from 80 channels to T5's 96
    for got, want in ((context, ref), (pooled, ref_pooled), (neg, ref_neg), (neg_pooled, ref_neg_pooled)):
        assert_close_rel(got, want, torch.float32)


def test_encode_sd3_without_t5_matches_diffusers(spm_dir):
    hf, ours = _sd3_parts(spm_dir, with_t5=False)
    pipe = _sd3_pipe(hf, 128)
    with torch.no_grad():
        ref, _, ref_pooled, _ = pipe.encode_prompt(PROMPTS[:2], None, None, do_classifier_free_guidance=False,
                                                   max_sequence_length=48)
    context, pooled = encode_sd3(PROMPTS[:2], max_length=48, joint_dim=128, **ours)
    assert context.shape == (2, 77 + 48, 128) and (context[:, 77:] == 0).all()
    assert_close_rel(context, ref, torch.float32)
    assert_close_rel(pooled, ref_pooled, torch.float32)


def test_encode_sd3_rejects_clip_without_projection(spm_dir):
    from model.clip import CLIPTextEncoder

    ours = dict(_sd3_parts(spm_dir)[1])
    ours["clip_g"] = CLIPTextEncoder(dataclasses.replace(CLIP_G, projection_dim=None))
    with pytest.raises(ValueError, match="text_projection"):
        encode_sd3(["x"], max_length=48, **ours)
