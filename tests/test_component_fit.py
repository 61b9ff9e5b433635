"""Components that do not fit together are refused in one line before any weight is read (sampling/components.py
check_vae_fit, the pipelines' check_components): another family's VAE, swapped or foreign text encoders. Also the
parts an SD3.5 all-in-one file holds, an SD3 folder whose listed T5 is missing, broken cache links and the scheduler
configs FLUX.1 and klein read. Tiny random components written as files; nothing runs but the last CLI test."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.clip import CLIP_CONFIGS, CLIPTextEncoder
from model.flux import FLUX_CONFIGS, Flux
from model.flux2 import FLUX2_CONFIGS, Flux2
from model.mmdit import MMDIT_CONFIGS, MMDiT
from model.qwen3 import Qwen3Config, Qwen3TextEncoder
from model.t5 import T5_CONFIGS, T5Config, T5Encoder
from model.vae import VAE_CONFIGS, AutoEncoder
from sampling.components import load_tokenizer
from sampling.flux2 import Flux2KleinPipeline
from sampling.pipeline import FluxPipeline, schedule_from_diffusers
from sampling.sd3 import SD3Pipeline, SD3Sources
from weights.io import WeightsError
from weights.transformer import save_transformer

torch.manual_seed(0)
CLIP = dataclasses.replace(CLIP_CONFIGS["tiny"], vocab_size=49408, hidden_size=8, num_attention_heads=2,
                           num_hidden_layers=1, intermediate_size=16, projection_dim=8, eos_token_id=49407)
CLIP_G = dataclasses.replace(CLIP, hidden_size=16, projection_dim=16, hidden_act="gelu")  # 8 + 16: SD3 tiny's 24
T5 = dataclasses.replace(T5_CONFIGS["tiny"], vocab_size=256, d_model=32, num_layers=1)  # tiny MMDiT's context


def _save(state: dict, path: Path, prefix: str = "") -> Path:
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def vae_state(kind: str, z: int) -> dict:
    """A 2-level VAE (downscale 2) of `kind`'s statistics: "flux2" has its quant convs and BatchNorm."""
    preset = VAE_CONFIGS["flux2-ae" if kind == "flux2" else "flux1"]
    return AutoEncoder(dataclasses.replace(preset, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=z)).state_dict()


def vae_file(tmp: Path, kind: str, z: int) -> Path:
    """BFL names are read as FLUX.1's (or FLUX.2's with BatchNorm), SAI's first_stage_model. as SD3.5's."""
    prefix = "first_stage_model." if kind == "sd3.5" else ""
    return _save(vae_state(kind, z), tmp / f"vae-{kind}-{z}.safetensors", prefix)


def clip_state(config) -> dict:
    return CLIPTextEncoder(config).state_dict()


def t5_state(config: T5Config) -> dict:
    return T5Encoder(config).state_dict()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parts")
    out = {"flux": save_transformer(Flux(FLUX_CONFIGS["tiny"]), tmp / "flux.safetensors"),  # 4 x 2 x 2 channels
           "clip": _save(clip_state(CLIP), tmp / "clip_l.safetensors"),
           "clip_g": _save(clip_state(CLIP_G), tmp / "clip_g.safetensors"),
           "clip_flux": _save(clip_state(dataclasses.replace(CLIP, hidden_size=24, projection_dim=None)),
                              tmp / "clip_flux.safetensors"),  # FLUX.1 tiny's vec_in_dim
           "t5": _save(t5_state(T5), tmp / "t5.safetensors"),
           "t5_64": _save(t5_state(dataclasses.replace(T5, d_model=64)), tmp / "t5_64.safetensors")}
    mmdit = MMDiT(MMDIT_CONFIGS["tiny"])  # 16 channels, pooled 24, context 32
    out["sd3"] = save_transformer(mmdit, tmp / "sd3.safetensors")
    # SAI's all-in-one SD3.5 file: transformer, VAE and the three text encoders, each under its prefix
    aio = {"model.diffusion_model." + k: v for k, v in mmdit.state_dict().items()}
    aio |= {"first_stage_model." + k: v for k, v in vae_state("sd3.5", 16).items()}
    for role, state in (("clip_l", clip_state(CLIP)), ("clip_g", clip_state(CLIP_G)), ("t5xxl", t5_state(T5))):
        aio |= {f"text_encoders.{role}.transformer.{k}": v for k, v in state.items()}
    out["sd3_aio"] = _save(aio, tmp / "sd3.5_medium_incl_clips_t5.safetensors")
    out["klein"] = save_transformer(Flux2(FLUX2_CONFIGS["tiny"]), tmp / "flux-2-klein-tiny.safetensors")  # 2x2x2
    qwen = Qwen3Config(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=28, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=4)
    out["qwen"] = _save(Qwen3TextEncoder(qwen).state_dict(), tmp / "qwen.safetensors")
    out["qwen_wide"] = _save(Qwen3TextEncoder(dataclasses.replace(qwen, hidden_size=16)).state_dict(),
                             tmp / "qwen_wide.safetensors")
    for kind, z in (("flux1", 4), ("flux1", 2), ("sd3.5", 4), ("sd3.5", 16), ("flux1", 16), ("flux2", 2),
                    ("flux2", 4), ("flux2", 8)):
        out[f"vae_{kind}_{z}"] = vae_file(tmp, kind, z)
    return out


def fit(cls, model: Path, **files):
    """The pipeline's checks as `generate` runs them (sources, then check_components), nothing loaded (FLUX.1's
    T5 tokenizer need only exist here: a stand-in)."""
    if cls is FluxPipeline:
        files.setdefault("t5_tokenizer", files["t5"])
    pipe = cls.from_files(model, {k: str(v) for k, v in files.items()})
    pipe.sources.check()
    pipe.check_components()
    return pipe


def refused(cls, model, **files) -> str:
    with pytest.raises(WeightsError) as e:
        fit(cls, model, **files)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --- the VAE -------------------------------------------------------------------------------------------------


def test_flux1_takes_its_own_parts(parts):
    fit(FluxPipeline, parts["flux"], vae=parts["vae_flux1_4"], clip=parts["clip_flux"], t5=parts["t5"])


@pytest.mark.parametrize("vae,said", [("vae_flux2_8", "8 x 2 x 2 = 32 channels"), ("vae_flux2_4", "FLUX.2's VAE"),
                                      ("vae_sd3.5_4", "SD3.5's VAE (latent scale 1.5305, shift 0.0609)")])
def test_flux1_refuses_another_familys_vae(parts, vae, said):
    msg = refused(FluxPipeline, parts["flux"], vae=parts[vae], clip=parts["clip_flux"], t5=parts["t5"])
    assert f"--vae {parts[vae]}: " in msg and said in msg and f"--model {parts['flux']}" in msg


def test_sd3_refuses_flux1s_vae_of_the_same_channels(parts):
    msg = refused(SD3Pipeline, parts["sd3"], vae=parts["vae_flux1_16"], clip=parts["clip"], clip_g=parts["clip_g"])
    assert "FLUX.1's VAE (latent scale 0.3611, shift 0.1159)" in msg and "pass SD3.5's VAE" in msg
    fit(SD3Pipeline, parts["sd3"], vae=parts["vae_sd3.5_16"], clip=parts["clip"], clip_g=parts["clip_g"])


@pytest.mark.parametrize("vae,said", [("vae_flux1_2", "FLUX.1's VAE"), ("vae_flux2_4", "4 x 2 x 2 = 16 channels")])
def test_klein_refuses_flux1s_vae_and_another_qwen(parts, vae, said):
    model, good = parts["klein"], dict(qwen=parts["qwen"], qwen_tokenizer=parts["qwen"])
    fit(Flux2KleinPipeline, model, vae=parts["vae_flux2_2"], **good)
    assert said in refused(Flux2KleinPipeline, model, vae=parts[vae], **good)
    msg = refused(Flux2KleinPipeline, model, vae=parts["vae_flux2_2"], qwen=parts["qwen_wide"],
                  qwen_tokenizer=parts["qwen"])
    assert f"--qwen {parts['qwen_wide']}: Qwen3 (3 stacked states) is 48 wide" in msg and "takes 24" in msg


# --- the text encoders ---------------------------------------------------------------------------------------


def test_flux1_refuses_sd3s_clip_g_and_another_t5(parts):
    common = dict(vae=parts["vae_flux1_4"])
    msg = refused(FluxPipeline, parts["flux"], clip=parts["clip_g"], t5=parts["t5"], **common)
    assert f"--clip {parts['clip_g']}: its pooled output is 16 wide" in msg and "(vec_in_dim)" in msg
    msg = refused(FluxPipeline, parts["flux"], clip=parts["clip_flux"], t5=parts["t5_64"], **common)
    assert f"--t5 {parts['t5_64']}: T5 (d_model) is 64 wide" in msg and "takes 32" in msg


def test_sd3_refuses_swapped_clips_naming_both_flags(parts):
    msg = refused(SD3Pipeline, parts["sd3"], vae=parts["vae_sd3.5_16"], clip=parts["clip_g"], clip_g=parts["clip"])
    assert f"--clip {parts['clip_g']} is 16 wide and --clip-g {parts['clip']} 8: swapped?" in msg
    assert f"pass --clip {parts['clip']} --clip-g {parts['clip_g']}" in msg
    msg = refused(SD3Pipeline, parts["sd3"], vae=parts["vae_sd3.5_16"], clip=parts["clip"], clip_g=parts["clip_g"],
                  t5=parts["t5_64"], t5_tokenizer=parts["t5_64"])
    assert f"--t5 {parts['t5_64']}: T5 (d_model) is 64 wide" in msg


# --- SD3.5's all-in-one file and pipeline folders --------------------------------------------------------------


def test_sd35_all_in_one_file_lends_its_vae_and_text_encoders(parts, tmp_path):
    from text_fixtures import train_spm

    aio = parts["sd3_aio"]
    pipe = fit(SD3Pipeline, aio, t5_tokenizer=train_spm(tmp_path / "spm"))
    s = pipe.sources
    assert (s.vae, s.clip_l, s.clip_g, s.t5) == (aio,) * 4
    # the file holds two CLIPs: each role reads its own (the loaders alone would ask for prefix=)
    encode = pipe.text_encoder(8)
    cond = encode(["a cat"])
    assert cond["pooled"].shape == (1, 24) and cond["context"].shape == (1, 77 + 8, 32)
    # as --clip / --clip-g of another model, the same file's encoders are found by role
    fit(SD3Pipeline, parts["sd3"], vae=aio, clip=aio, clip_g=aio)
    # T5 inside but no tokenizer for it: said, with --no-t5 as the way out
    with pytest.raises(WeightsError, match="--no-t5"):
        fit(SD3Pipeline, aio)
    assert fit(SD3Pipeline, aio, no_t5=True).sources.t5 is None


def _sd3_folder(tmp: Path, parts, t5_entry) -> Path:
    folder = tmp / "sd3"
    (folder / "scheduler").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline",
                                                         "text_encoder_3": t5_entry}))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"shift": 3.0}))
    return folder


def test_sd3_folder_missing_its_listed_t5_or_vae_says_so(parts, tmp_path):
    folder = _sd3_folder(tmp_path, parts, ["transformers", "T5EncoderModel"])
    with pytest.raises(WeightsError, match=r"lists text_encoder_3 \(T5\) but the folder has no text_encoder_3/"):
        SD3Sources.from_folder(folder)
    assert SD3Sources.from_folder(folder, without_t5=True).t5 is None
    (folder / "model_index.json").write_text(json.dumps({"text_encoder_3": [None, None]}))
    sources = SD3Sources.from_folder(folder, clip_l=parts["clip"], clip_g=parts["clip_g"])
    assert sources.t5 is None
    with pytest.raises(WeightsError, match=r"the pipeline folder has no vae/; download it again, or pass --vae"):
        sources.check()


def test_broken_cache_links_are_refused(parts, tmp_path):
    folder = _sd3_folder(tmp_path, parts, [None, None])
    config = folder / "scheduler" / "scheduler_config.json"
    config.unlink()
    config.symlink_to(tmp_path / "blobs" / "gone")
    with pytest.raises(WeightsError, match="scheduler_config.json: a broken link .*download the model again"):
        SD3Sources.from_folder(folder)
    index = folder / "model_index.json"
    index.unlink()
    index.symlink_to(tmp_path / "blobs" / "gone-too")
    with pytest.raises(WeightsError, match="model_index.json: a broken link"):
        SD3Pipeline.from_files(folder, {})


# --- scheduler configs and tokenizer reasons --------------------------------------------------------------------


@pytest.mark.parametrize("config,said", [
    ({"use_karras_sigmas": True}, "use_karras_sigmas"), ({"shift_terminal": 0.02}, "shift_terminal"),
    ({"stochastic_sampling": True}, "stochastic_sampling"), ({"time_shift_type": "linear"}, "time_shift_type"),
    ({"shift": None}, "shift is null, not a number"), ({"shift": "abc"}, 'shift is "abc", not a number'),
    ({"use_dynamic_shifting": "false"}, "not true or false")])
def test_flux_and_klein_scheduler_configs_are_checked(tmp_path, config, said):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(WeightsError) as e:
        schedule_from_diffusers(path)
    assert str(e.value).startswith(f"{path}: ") and said in str(e.value)


def test_a_tokenizers_reason_is_not_cut_mid_sentence():
    first = "This is not a tokenizer file because its header is " + "very " * 20 + "long."

    def load(path):
        raise RuntimeError(first + " Second sentence here.")

    with pytest.raises(WeightsError) as e:
        load_tokenizer(load, "x.model", "--t5-tokenizer")
    assert f"({first});" in str(e.value)


def test_generate_refuses_a_foreign_vae_before_sampling(parts, tmp_path, capsys):
    from text_fixtures import train_spm

    from sampling.generate import main

    rc = main(["--model", str(parts["flux"]), "--vae", str(parts["vae_flux2_8"]), "--clip", str(parts["clip_flux"]),
               "--t5", str(parts["t5"]), "--t5-tokenizer", str(train_spm(tmp_path / "spm")), "--prompt", "a cat",
               "--width", "32", "--height", "32", "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and f"error: --vae {parts['vae_flux2_8']}: its latents have 8 x 2 x 2 = 32 channels" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
