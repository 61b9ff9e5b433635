"""Tiny transformers oracles for the text encoders, built from our configs; tokenizer assets made offline.

Only tests import this file; it may import transformers and diffusers.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import torch
from conftest import randomize_

from model.clip import CLIPConfig, CLIPTextEncoder
from model.t5 import T5Config, T5Encoder

CLIP_BPE_DIR = Path(__file__).resolve().parents[1] / "model" / "assets" / "clip_bpe"


def assert_close_rel(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """docs/models.md §1: fp32 rtol 1e-4 / atol 1e-5*max; low precision (both sides run in it) 3e-2*max."""
    scale = max(1.0, ref.float().abs().max().item())
    if dtype == torch.float32:
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * scale)
    else:
        err = (ours.float() - ref.float()).abs().max().item()
        peak = ref.float().abs().max().item()
        assert err <= 3e-2 * peak, f"{dtype}: max|diff| {err:.3g} vs max|ref| {peak:.3g}"


# ------------------------------------------------------------------------------------------------------ T5


def hf_t5(config: T5Config, sigma: float, seed: int = 0):
    from transformers import T5Config as HFT5Config
    from transformers import T5EncoderModel

    hf_config = HFT5Config(
        vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.d_kv, d_ff=config.d_ff,
        num_layers=config.num_layers, num_heads=config.num_heads, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        layer_norm_epsilon=config.layer_norm_epsilon, dropout_rate=0.0, is_encoder_decoder=False,
    )
    return randomize_(T5EncoderModel(hf_config), sigma, seed).eval()


def t5_state(hf) -> dict[str, torch.Tensor]:
    # transformers ties encoder.embed_tokens to shared and saves only shared.weight; we hold only `shared`.
    return {k: v for k, v in hf.state_dict().items() if k != "encoder.embed_tokens.weight"}


def ours_t5_from(hf, config: T5Config) -> T5Encoder:
    model = T5Encoder(config)
    model.load_state_dict(t5_state(hf), strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------- CLIP


def hf_clip(config: CLIPConfig, sigma: float, seed: int = 0, bos: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    hf_config = CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings, hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps, projection_dim=config.projection_dim or 32,
        eos_token_id=config.eos_token_id, bos_token_id=bos if bos is not None else config.vocab_size - 2,
        pad_token_id=config.eos_token_id,
    )
    cls = CLIPTextModelWithProjection if config.projection_dim is not None else CLIPTextModel
    return randomize_(cls(hf_config), sigma, seed).eval()


def clip_state(hf) -> dict[str, torch.Tensor]:
    # transformers 5 CLIPTextModel has no `text_model.` level (WithProjection keeps it); our names always have
    # it.
    sd = hf.state_dict()
    return {(k if k.startswith("text_model.") or k == "text_projection.weight" else "text_model." + k): v
            for k, v in sd.items()}


def ours_clip_from(hf, config: CLIPConfig) -> CLIPTextEncoder:
    model = CLIPTextEncoder(config)
    model.load_state_dict(clip_state(hf), strict=True)
    return model.eval()


@torch.no_grad()
def run_hf_clip(hf, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four quantities the pipelines read, named as in our CLIPOutput."""
    out = hf(ids, output_hidden_states=True)
    if hasattr(out, "text_embeds"):
        inner = hf.text_model(ids)
        pooled, embeds = inner.pooler_output, out.text_embeds
    else:
        pooled, embeds = out.pooler_output, None
    return dict(last_hidden_state=out.last_hidden_state, penultimate_hidden_state=out.hidden_states[-2],
                pooled_output=pooled, text_embeds=embeds)


# ----------------------------------------------------------------------------------------- sentencepiece

SPM_CORPUS = [
    "a photo of a cat sitting on a red sofa",
    "the quick brown fox jumps over the lazy dog",
    "an astronaut riding a horse on the moon, digital art",
    "Portrait of a woman, oil painting, 4k, highly detailed",
    "café déjà vu naïve façade über straße",
    "neon sign that says HELLO in a rainy street at night",
    "numbers 0123456789 and punctuation !?.,;:'\"()[]{}",
]


def train_spm(folder: Path) -> Path:
    """A tiny unigram sentencepiece model with T5's special ids (pad 0, </s> 1, <unk> 2, no BOS), saved as
    `spiece.model` in `folder`; tests never need the real 32k vocabulary."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS * 20), model_writer=buf, vocab_size=96, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, character_coverage=1.0,
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spiece.model"
    path.write_bytes(buf.getvalue())
    return path


HARD_STRINGS = [
    "a photo of a cat",
    "",
    "   Lots\t of\n\n  whitespace   runs  ",
    "Ünïcödé café naïve ﬁ Straße ΑΒΓ Привет 日本語 テスト",
    "e\u0301 vs \u00e9 (combining accent, NFC)",
    "emoji 🐱🚀 👩‍👩‍👧 ok",
    "hello! wow!!! 'quoted' don't it's we're I'M",
    "<|endoftext|> in the middle <|startoftext|> and <|ENDOFTEXT|>x",
    "</s> <pad> <unk> <extra_id_0> <extra_id_99> <extra_id_100> x</s>y",
    "numbers 12345 3.14 1e-5, punctuation (a)[b]{c} -- ...",
    "an astronaut riding a horse on the moon, highly detailed, " * 12,
]


# Building a tokenizer over the 49k-entry vocabulary takes ~0.1 s; the suite builds each kind once per
# process.
@functools.cache
def ours_clip_tokenizer(pad: str = "<|endoftext|>"):
    from model.tokenizers import CLIPTokenizer

    return CLIPTokenizer.load(pad_token=pad)


@functools.cache
def hf_clip_tokenizer(pad: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    return HFCLIPTokenizer(vocab=str(CLIP_BPE_DIR / "vocab.json"), merges=str(CLIP_BPE_DIR / "merges.txt"),
                           pad_token=pad, model_max_length=77)

