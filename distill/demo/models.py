"""The demo models: tiny configs of the real classes, and the diffusers-style pipeline folder they ship in.

    sampling/demo_assets/flux-demo/    (where: sampling/demo.py)
        model_index.json                       FluxPipeline
        scheduler/scheduler_config.json        FlowMatchEulerDiscreteScheduler, shift 1, no dynamic shift
        transformer/                           diffusers FluxTransformer2DModel layout + config.json (no guidance)
        vae/                                   diffusers AutoencoderKL layout + config.json (downscale 4)
        text_encoder/, tokenizer/              tiny CLIP-L-like tower on the real CLIP BPE (frozen, random init)
        text_encoder_2/, tokenizer_2/          tiny T5 v1.1 on a sentencepiece model of the world's captions

`sampling.pipeline.FluxSources.from_folder(DEMO_FOLDER)` loads it like any Flux folder. The demo's T5 length is
T5_LENGTH, not Flux's 512: T5 runs without a mask, so the length is part of the conditioning, and the teacher was
trained with this one. Rebuild with `python -m tools.make_demo`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path

import torch

from model.clip import CLIPConfig, CLIPTextEncoder
from model.flux import Flux, FluxConfig
from model.t5 import T5Config, T5Encoder
from model.tokenizers import CLIP_BPE_DIR, T5_EXTRA_IDS
from model.vae import AutoEncoder, VAEConfig
from sampling.demo import DEMO_FOLDER, IMAGE_SIZE, T5_LENGTH
from weights.atomic import atomic_save
from weights.families.flux import config_to_diffusers
from weights.keymaps.vae import ours_to_diffusers
from weights.transformer import save_transformer

# CLIP-L's interface (vocabulary, 77 positions, EOS pooling, no projection as in Flux) at width 32: the 49,408-row
# embedding is most of its size, so it ships in fp16.
CLIP_CONFIG = CLIPConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, projection_dim=None, eos_token_id=49407)


def t5_config(pieces: int) -> T5Config:
    """The demo T5 for a sentencepiece model of `pieces` pieces (plus T5's 100 sentinel ids, rounded up to 8)."""
    vocab = -(-(pieces + T5_EXTRA_IDS) // 8) * 8
    return T5Config(vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)


# Downscale 4 (three levels), 16 latent channels as Flux expects; scale and shift are measured on the world's
# latents after training (make_demo replaces them) so the transformer sees roughly unit-variance latents.
VAE_CONFIG = VAEConfig(ch=16, ch_mult=(1, 1, 2), num_res_blocks=1, norm_groups=8, scale_factor=1.0, shift_factor=0.0)

# Flux-schnell-like: no guidance embedding. 64 packed channels = 16 latent channels x 2 x 2. Flux has no absolute
# position embedding, only RoPE (theta 10000, fixed by diffusers): an 8x8 token grid is told apart only by the
# frequencies that turn by a useful angle over 8 positions, so the head is 32 wide and the row / column axes get 14
# dims each (7 frequencies: 1, 0.27, 0.07, ...). With 16-wide heads (3 frequencies per axis) the teacher drew
# colours but scattered blobs instead of one placed shape. Width and depth: in a sweep at equal steps, 64 wide with
# 2 + 4 blocks reached 39% checker adherence at 32 steps, 128 wide 47%, 128 wide with 3 + 6 blocks 51% (3.4 M
# parameters, 6.8 MB in fp16).
FLUX_CONFIG = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=CLIP_CONFIG.hidden_size, context_in_dim=64,
                         hidden_size=128, num_heads=4, depth=3, depth_single_blocks=6, axes_dim=(4, 14, 14),
                         guidance_embed=False)

SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0", "num_train_timesteps": 1000,
    "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
MODEL_INDEX = {
    "_class_name": "FluxPipeline", "_diffusers_version": "0.30.0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


# ---------------------------------------------------------------------------------------------- building


def train_spiece(captions: list[str], seed: int, vocab_size: int = 64) -> bytes:
    """A unigram sentencepiece model of the captions with T5's special ids (pad 0, </s> 1, <unk> 2, no BOS).

    On the captions alone the unigram seeding keeps whole pieces only for the most frequent words ("red" becomes
    r-e-d); adding as many sentences of shuffled caption words makes every word of the world one piece.
    """
    import random

    import sentencepiece as spm

    words = sorted({w for c in captions for w in c.split()})
    rng = random.Random(seed)
    shuffled = [" ".join(rng.sample(words, min(6, len(words)))) for _ in captions]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions + shuffled), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, character_coverage=1.0, minloglevel=2,
        num_threads=1,
    )
    return buf.getvalue()


def spiece_pieces(model: bytes) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=model).get_piece_size()


def build_text_encoders(pieces: int, seed: int) -> tuple[CLIPTextEncoder, T5Encoder]:
    """Both encoders at random init, seeded. They stay frozen: the teacher learns to read them.

    CLIP's embeddings get the std of OpenAI's init (0.02 tokens, 0.01 positions) instead of nn.Embedding's 1: with
    unit-scale embeddings the EOS token's own vector dominates the pooled output and every prompt pools to nearly
    the same vector (cosine 0.999); with small ones the attention over the prompt dominates (cosine 0.6-0.95).
    """
    torch.manual_seed(seed)
    clip, t5 = CLIPTextEncoder(CLIP_CONFIG).eval(), T5Encoder(t5_config(pieces)).eval()
    with torch.no_grad():
        clip.text_model.embeddings.token_embedding.weight.normal_(0, 0.02)
        clip.text_model.embeddings.position_embedding.weight.normal_(0, 0.01)
        for p in clip.parameters():  # CLIP ships in fp16: train the teacher on exactly the values that ship
            p.copy_(p.half().float())
    return clip.requires_grad_(False), t5.requires_grad_(False)


# ---------------------------------------------------------------------------------------------- saving


def _config_json(folder: Path, d: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(d, indent=2) + "\n")


def clip_config_json(cfg: CLIPConfig) -> dict:
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "projection_dim"}
    return {"_class_name": "CLIPTextModel", "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
            "bos_token_id": 49406, "pad_token_id": 1, "projection_dim": 768, **fields}


def t5_config_json(cfg: T5Config) -> dict:
    return {"architectures": ["T5EncoderModel"], "model_type": "t5", "feed_forward_proj": "gated-gelu",
            "is_gated_act": True, "dense_act_fn": "gelu_new", "tie_word_embeddings": False, "pad_token_id": 0,
            "eos_token_id": 1, "decoder_start_token_id": 0, **dataclasses.asdict(cfg)}


def vae_config_json(cfg: VAEConfig) -> dict:
    widths = [cfg.ch * m for m in cfg.ch_mult]
    return {"_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0", "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels, "down_block_types": ["DownEncoderBlock2D"] * len(widths),
            "up_block_types": ["UpDecoderBlock2D"] * len(widths), "block_out_channels": widths,
            "layers_per_block": cfg.num_res_blocks, "act_fn": "silu", "latent_channels": cfg.z_channels,
            "norm_num_groups": cfg.norm_groups, "sample_size": IMAGE_SIZE, "scaling_factor": cfg.scale_factor,
            "shift_factor": cfg.shift_factor, "use_quant_conv": False, "use_post_quant_conv": False,
            "mid_block_add_attention": True, "force_upcast": False}


def vae_diffusers_state(vae: AutoEncoder) -> dict[str, torch.Tensor]:
    levels = len(vae.config.ch_mult)
    out = {}
    for k, t in vae.state_dict().items():
        name, transform = ours_to_diffusers(k, levels)
        out[name] = transform(t) if transform is not None else t
    return out


def save_pipeline(folder: Path, *, transformer: Flux, vae: AutoEncoder, clip: CLIPTextEncoder, t5: T5Encoder,
                  spiece: bytes, overwrite: bool = False) -> Path:
    """Write the demo as a diffusers FluxPipeline folder. The transformer and CLIP are stored in fp16 (half the
    bytes; the loaders cast back to the requested dtype), the small VAE and T5 in fp32."""
    folder = Path(folder)
    if folder.exists():
        if not overwrite:
            raise FileExistsError(f"{folder} exists; pass overwrite=True (make_demo --overwrite)")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    _config_json(folder / "scheduler", SCHEDULER_CONFIG)
    (folder / "scheduler" / "config.json").rename(folder / "scheduler" / "scheduler_config.json")

    half = Flux(transformer.config).half()
    half.load_state_dict(transformer.state_dict())
    save_transformer(half, folder / "transformer" / "diffusion_pytorch_model.safetensors", layout="diffusers")
    _config_json(folder / "transformer", {"_diffusers_version": "0.30.0", **config_to_diffusers(transformer.config)})

    atomic_save(vae_diffusers_state(vae), folder / "vae" / "diffusion_pytorch_model.safetensors")
    _config_json(folder / "vae", vae_config_json(vae.config))

    atomic_save({k: v.half() for k, v in clip.state_dict().items()}, folder / "text_encoder" / "model.safetensors",
                {"format": "pt"})
    _config_json(folder / "text_encoder", clip_config_json(clip.config))
    tok = folder / "tokenizer"
    tok.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(CLIP_BPE_DIR / name, tok / name)
    (tok / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
         "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, indent=2) + "\n")

    # T5EncoderModel files carry the tied embedding under both names; our loader accepts either, diffusers wants both
    t5_state = dict(t5.state_dict())
    t5_state["encoder.embed_tokens.weight"] = t5_state["shared.weight"].clone()
    atomic_save(t5_state, folder / "text_encoder_2" / "model.safetensors", {"format": "pt"})
    _config_json(folder / "text_encoder_2", t5_config_json(t5.config))
    tok2 = folder / "tokenizer_2"
    tok2.mkdir()
    (tok2 / "spiece.model").write_bytes(spiece)
    (tok2 / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "model_max_length": T5_LENGTH, "eos_token": "</s>", "unk_token": "<unk>",
         "pad_token": "<pad>", "extra_ids": T5_EXTRA_IDS}, indent=2) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------- loading


def demo_sources(folder: Path | str = DEMO_FOLDER):
    """FluxSources of the shipped demo (a clear error when it has not been built)."""
    from sampling.pipeline import FluxSources

    folder = Path(folder)
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(f"{folder}: no demo pipeline; build it with `python -m tools.make_demo`")
    return FluxSources.from_folder(folder)


def demo_pipeline(folder: Path | str = DEMO_FOLDER, **kwargs):
    """A FluxPipeline on the demo folder. Sample with GenerationConfig(height=64, width=64,
    max_sequence_length=T5_LENGTH)."""
    from sampling.pipeline import FluxPipeline

    return FluxPipeline(demo_sources(folder), **kwargs)


def folder_size(folder: Path | str = DEMO_FOLDER) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
