"""Text-encoder parts of LoRA files (weights/lora_text.py), merged into our CLIP-L, CLIP-bigG and T5 by every CLI:
a kohya FLUX.1 LoRA with CLIP-L keys gives the latents of diffusers' FluxPipeline with that file loaded; an SD3 LoRA
as diffusers writes it (CLIP-L and bigG parts, alphas in its metadata) gives StableDiffusion3Pipeline's, and the same
LoRA in kohya names (lora_te1_ / lora_te2_, which diffusers cannot read for SD3) gives the same latents; T5 parts
(which diffusers drops) and the other spellings equal a hand merge into transformers' models; --ignore-te-lora; the
training text cache's key and embeddings."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from flux_fixtures import save_tiny_flux_pipeline
from safetensors.torch import save_file
from test_pipeline import CLIP, PROMPTS, T5, T5_LEN
from test_sd3_pipeline import CLIP_G, CLIP_L, HEIGHT, WIDTH, folders  # noqa: F401  (folders: a fixture)
from text_fixtures import assert_close_rel, clip_state, hf_clip, hf_t5, t5_state

from model.layers import pack
from sampling.pipeline import FluxPipeline, FluxSources, GenerationConfig
from sampling.sd3 import SD3GenerationConfig, SD3Pipeline, SD3Sources
from weights.io import WeightsError
from weights.lora import read_lora
from weights.lora_text import split_loras
from weights.lora_write import write_lora
from weights.text import load_clip, load_t5

SCALE = 0.7  # the LoRAs' strength: diffusers' joint_attention_kwargs scale, which reaches its text encoders too
RANK = 2
CLIP_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                "mlp.fc2")


def _pair(g: torch.Generator, out: int, inn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) large enough that every module's delta shows in the image."""
    return torch.randn(RANK, inn, generator=g) * 0.3, torch.randn(out, RANK, generator=g) * 0.3


def _clip_shapes(config) -> dict[str, tuple[int, int]]:
    """Our (transformers') CLIP module path -> (out, in), both layers."""
    h, i = config.hidden_size, config.intermediate_size
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
              "self_attn.out_proj": (h, h), "mlp.fc1": (i, h), "mlp.fc2": (h, i)}
    return {f"text_model.encoder.layers.{n}.{m}": shapes[m] for n in range(config.num_hidden_layers) for m in shapes}


def _kohya(stem: str, down, up, alpha: float) -> dict[str, torch.Tensor]:
    return {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(alpha)}


# ----- FLUX.1: kohya file against diffusers' FluxPipeline -----------------------------------------------------------

FLUX_UNET = {"double_blocks_0_img_attn_qkv": (96, 32), "double_blocks_0_img_attn_proj": (32, 32),
             "double_blocks_0_txt_mlp_0": (128, 32), "single_blocks_1_linear2": (32, 160)}  # not linear1: diffusers
# splits it at FLUX.1-dev's full widths (docs/models.md §7.3)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("flux"), True, CLIP, T5)


@pytest.fixture(scope="module")
def flux_loras(tmp_path_factory):
    """sd-scripts' layout: lora_unet_ blocks and lora_te1_ CLIP-L modules, alpha 3 at rank 2 (scale 1.5); and the
    same file without its CLIP-L part."""
    g = torch.Generator().manual_seed(0)
    unet = {k: v for stem, (o, i) in FLUX_UNET.items() for k, v in _kohya(f"lora_unet_{stem}", *_pair(g, o, i), 3.0).items()}
    te = {k: v for module, (o, i) in _clip_shapes(CLIP).items()
          for k, v in _kohya("lora_te1_" + module.replace(".", "_"), *_pair(g, o, i), 3.0).items()}
    root = tmp_path_factory.mktemp("loras")
    save_file(unet | te, root / "style.safetensors")
    save_file(unet, root / "unet-only.safetensors")
    return root / "style.safetensors", root / "unet-only.safetensors"


FLUX_CFG = GenerationConfig(height=32, width=48, steps=3, guidance=4.0, seed=7, max_sequence_length=T5_LEN)


def test_kohya_flux_lora_with_a_clip_l_part_gives_the_latents_of_diffusers(flux, flux_loras, capsys):
    folder, pipe = flux
    style, _ = flux_loras
    ours = pack(FluxPipeline(FluxSources.from_folder(folder), loras=[(str(style), SCALE)])(PROMPTS, FLUX_CFG,
                                                                                              output="latent"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(style), adapter_name="style")  # its kohya converter: lora_te1_ -> text_encoder
        try:
            ref = pipe(PROMPTS, height=32, width=48, num_inference_steps=3, guidance_scale=4.0,
                       generator=torch.Generator().manual_seed(7), output_type="latent", max_sequence_length=T5_LEN,
                       joint_attention_kwargs={"scale": SCALE}).images
        finally:
            pipe.unload_lora_weights()
    peak = ref.abs().max().item()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5 * peak)
    # without the CLIP-L part (what the old refusal forced) the latents are far off that tolerance
    skipped = FluxPipeline(FluxSources.from_folder(folder), loras=[(str(style), SCALE)], ignore_te_lora=True)
    assert (pack(skipped(PROMPTS, FLUX_CFG, output="latent")) - ref).abs().max() > 1e-2 * peak
    assert capsys.readouterr().err.count("--ignore-te-lora: the text-encoder part of style.safetensors") == 1


def test_generate_applies_the_text_encoder_part_unless_ignore_te_lora(flux, flux_loras, tmp_path, capsys):
    from PIL import Image

    from distill import teacher_data
    from sampling.flags import build_parser
    from sampling.generate import main
    from sampling.png_record import read_png_params

    folder, _ = flux
    style, unet_only = flux_loras
    args = ["--model", str(folder), "--prompt", PROMPTS[0], "--steps", "2", "--width", "48", "--height", "32",
            "--max-sequence-length", str(T5_LEN), "--dtype", "fp32"]

    def image(lora, name, *flags):
        assert main([*args, "--lora", f"{lora}:{SCALE}", "--out", str(tmp_path / name), *flags]) == 0
        return np.asarray(Image.open(tmp_path / name)).astype(int)

    with_te = image(style, "te.png")
    assert "ignore-te-lora" not in capsys.readouterr().err
    skipped = image(style, "skipped.png", "--ignore-te-lora")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "te-lora" in ln]
    assert lines == ["--ignore-te-lora: the text-encoder part of style.safetensors (36 keys) is not applied"]
    assert np.array_equal(skipped, image(unet_only, "unet.png"))  # the transformer part alone
    assert np.abs(with_te - skipped).max() > 2
    assert read_png_params(tmp_path / "skipped.png")["ignore_te_lora"] is True
    assert "ignore_te_lora" not in read_png_params(tmp_path / "te.png")
    # one spelling everywhere, the underscore one accepted too, as --fp8-compute / --fp8_compute
    assert build_parser().parse_args(["--ignore_te_lora"]).ignore_te_lora
    dataset = teacher_data.build_parser().parse_args(["--model", str(folder), "--prompts", "p", "--out", "o",
                                                      "--images-per-bucket", "1", "--ignore-te-lora"])
    assert teacher_data.make_pipeline(dataset).ignore_te_lora


# ----- training: the text cache ---------------------------------------------------------------------------------


def test_train_caches_embeddings_with_the_text_part_and_keys_the_cache_by_it(flux, flux_loras, tmp_path):
    from distill.config import DistillConfig
    from distill.dataset import DataError
    from distill.run_setup import _text_encoder, cache_key, prepare_cache
    from distill.train import build_parser
    from weights.families.flux import FLUX

    folder, _ = flux
    style, unet_only = flux_loras
    base = {"model": "tiny", "output": str(tmp_path / "run"), "cache": str(tmp_path / "cache"), "dtype": "fp32",
            "device": "cpu", "t5_length": T5_LEN}

    def key(*loras, **kw):
        return cache_key(DistillConfig.from_flat(**{**base, **kw}, base_loras=loras))

    half, more = key(f"{style}:0.5"), key(f"{style}:0.8")
    assert half != more and [r["scale"] for r in half["text_loras"]] == [0.5]
    assert half["text_loras"][0]["file"] == "style.safetensors" and len(half["text_loras"][0]["sha256"]) == 64
    # no text part applied, no entry: such caches keep the key they had before
    assert key() == key(f"{unet_only}:0.5") == key(f"{style}:0.5", ignore_te_lora=True)
    # an fp16 T5 computes `wo` in fp32 since 2026-12-05: fp16 caches from before are not reused; others keep theirs
    assert key(dtype="fp16")["t5_wo"] == "fp32" and "t5_wo" not in key() and "t5_wo" not in key(dtype="bf16")
    assert vars(build_parser().parse_args(["--ignore-te-lora"]))["ignore_te_lora"] is True

    # the embeddings the cache is built from are the pipeline's, the CLIP-L part merged
    cfg = DistillConfig.from_flat(**base, base_loras=(f"{style}:{SCALE}",), clip=str(folder / "text_encoder"),
                        t5=str(folder / "text_encoder_2"), t5_tokenizer=str(folder / "tokenizer_2"),
                        clip_tokenizer=str(folder / "tokenizer"))
    got = _text_encoder(cfg, torch.device("cpu"), torch.float32, FLUX)(PROMPTS)
    pipe = FluxPipeline(FluxSources.from_folder(folder), loras=[(str(style), SCALE)])
    want = pipe.encode(PROMPTS, T5_LEN)
    assert all(torch.equal(got[k], want[k]) for k in ("txt", "y"))
    assert not torch.equal(got["y"], FluxPipeline(FluxSources.from_folder(folder)).encode(PROMPTS, T5_LEN)["y"])

    # a cache built before, used without the encoders: its text LoRAs must be this run's
    (tmp_path / "cache").mkdir()
    plan = {"key": half, "items": [], "prompts": [], "shard_size": 8}
    (tmp_path / "cache" / "cache.json").write_text(json.dumps(plan))
    cpu = torch.device("cpu")
    prepare_cache(DistillConfig.from_flat(**base, base_loras=(f"{style}:0.5",)), cpu, 0)
    with pytest.raises(DataError, match=r"style.safetensors @ 0.5, this run's base_loras give style.safetensors @ 0.8"):
        prepare_cache(DistillConfig.from_flat(**base, base_loras=(f"{style}:0.8",)), cpu, 0)
    with pytest.raises(DataError, match="give none"):
        prepare_cache(DistillConfig.from_flat(**base, base_loras=(f"{style}:0.5",), ignore_te_lora=True), cpu, 0)


# ----- SD3: CLIP-L and CLIP-bigG, diffusers' layout against StableDiffusion3Pipeline ------------------------------

SD3_UNET = {"transformer_blocks.0.attn.to_out.0": ("joint_blocks_0_x_block_attn_proj", (32, 32)),
            "transformer_blocks.1.ff.net.0.proj": ("joint_blocks_1_x_block_mlp_fc1", (128, 32))}
# component -> (kohya prefix, lora_alpha); text_encoder_2's fc2 of layer 1 has its own alpha (peft alpha_pattern)
SD3_PARTS = {"transformer": ("lora_unet_", 4.0), "text_encoder": ("lora_te1_", 3.0), "text_encoder_2": ("lora_te2_", 5.0)}
PATTERN = "text_model.encoder.layers.1.mlp.fc2"


@pytest.fixture(scope="module")
def sd3_loras(tmp_path_factory):
    """One SD3 LoRA twice: as diffusers' save_lora_weights writes it (PEFT names, alphas in lora_adapter_metadata)
    and in kohya names with .alpha keys; the kohya one also has a T5 module (lora_te3_)."""
    g = torch.Generator().manual_seed(1)
    modules = {"transformer": {m: shape for m, (_, shape) in SD3_UNET.items()},
               "text_encoder": _clip_shapes(CLIP_L), "text_encoder_2": _clip_shapes(CLIP_G)}
    peft, kohya, meta = {}, {}, {}
    for component, (prefix, alpha) in SD3_PARTS.items():
        meta |= {f"{component}.r": RANK, f"{component}.lora_alpha": alpha,
                 f"{component}.target_modules": sorted(modules[component])}
        for module, (o, i) in modules[component].items():
            down, up = _pair(g, o, i)
            peft |= {f"{component}.{module}.lora_A.weight": down, f"{component}.{module}.lora_B.weight": up}
            stem = SD3_UNET[module][0] if component == "transformer" else module.replace(".", "_")
            own = 7.0 if component == "text_encoder_2" and module == PATTERN else alpha
            kohya |= _kohya(prefix + stem, down, up, own)
    meta["text_encoder_2.alpha_pattern"] = {PATTERN: 7.0}
    kohya |= _kohya("lora_te3_encoder_block_0_layer_0_SelfAttention_q", *_pair(g, 64, 96), 2.0)
    root = tmp_path_factory.mktemp("sd3-loras")
    save_file(peft, root / "peft.safetensors", metadata={"lora_adapter_metadata": json.dumps(meta)})
    save_file(kohya, root / "kohya.safetensors")
    return root / "peft.safetensors", root / "kohya.safetensors"


def test_sd3_clip_l_and_bigg_parts_give_the_latents_of_diffusers_in_both_layouts(folders, sd3_loras,  # noqa: F811
                                                                                  tmp_path, capsys):
    """Also the diffusers file as write_lora writes it in the diffusers layout (both encoders' alphas folded, their
    configs in its metadata): diffusers and we apply it as the source."""
    folder, pipe = folders["no-t5"]
    peft, kohya = sd3_loras
    written = write_lora(read_lora(peft, family="sd3"), tmp_path / "written.safetensors", "diffusers")
    cfg = SD3GenerationConfig(height=HEIGHT, width=WIDTH, steps=3, guidance=1.0, seed=7, max_sequence_length=T5_LEN)

    def diffusers(pipe, path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.load_lora_weights(str(path), adapter_name="style")
            try:
                return pipe(PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=3, guidance_scale=1.0,
                            generator=torch.Generator().manual_seed(7), output_type="latent",
                            max_sequence_length=T5_LEN, joint_attention_kwargs={"scale": SCALE}).images
            finally:
                pipe.unload_lora_weights()

    # a pipeline that has loaded and unloaded a LoRA gives other latents for the next (diffusers 0.42.1): one each
    ref, again = diffusers(copy.deepcopy(pipe), peft), diffusers(copy.deepcopy(pipe), written)
    peak = ref.abs().max().item()
    torch.testing.assert_close(again, ref, rtol=0, atol=1e-5 * peak)
    capsys.readouterr()  # diffusers' progress bars
    for path in (peft, kohya, written):
        ours = SD3Pipeline(SD3Sources.from_folder(folder), loras=[(str(path), SCALE)])
        torch.testing.assert_close(ours(PROMPTS, cfg, output="latent"), ref, rtol=0, atol=1e-5 * peak)
    # this run loads no T5: the kohya file's T5 module is not applied, which one line says
    assert capsys.readouterr().err.splitlines() == [
        "kohya.safetensors: its T5 part (1 module) is not applied: no T5 is loaded"]
    # each CLIP's part shows in its half of the pooled vector (16 + 24 wide)
    plain = SD3Pipeline(SD3Sources.from_folder(folder)).encode(PROMPTS, T5_LEN)["pooled"]
    pooled = ours.encode(PROMPTS, T5_LEN)["pooled"]
    assert not torch.allclose(plain[:, :16], pooled[:, :16]) and not torch.allclose(plain[:, 16:], pooled[:, 16:])
    skipped = SD3Pipeline(SD3Sources.from_folder(folder), loras=[(str(kohya), SCALE)], ignore_te_lora=True)
    assert (skipped(PROMPTS, cfg, output="latent") - ref).abs().max() > 1e-3 * peak


# ----- T5 and the other spellings against a hand merge into transformers' models -----------------------------------


def _merge(hf, module: str, down, up, alpha: float, scale: float) -> None:
    """W += scale * alpha / r * up @ down in transformers' own model: the rule every tool states."""
    with torch.no_grad():
        hf.get_submodule(module).weight += scale * alpha / down.shape[0] * (up @ down)


def test_t5_and_clip_parts_in_every_spelling_equal_a_hand_merge(tmp_path):
    g = torch.Generator().manual_seed(2)
    hf_l, hf_5 = hf_clip(CLIP, 0.1, seed=1, bos=49406), hf_t5(T5, 0.1, seed=2)
    save_file(clip_state(hf_l), tmp_path / "clip.safetensors")
    save_file(t5_state(hf_5), tmp_path / "t5.safetensors")
    tensors = _kohya("lora_unet_double_blocks_0_img_attn_proj", *_pair(g, 32, 32), 2.0)  # a transformer part too
    want = []  # (model, module as transformers 5 names it, down, up, alpha)
    for stem, model, module, (o, i), alpha in [
            ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", hf_5, "encoder.block.0.layer.0.SelfAttention.q",
             (64, 96), 3.0),
            ("lora_te2_encoder_block_1_layer_1_DenseReluDense_wi_1", hf_5,  # OneTrainer's Flux T5 prefix
             "encoder.block.1.layer.1.DenseReluDense.wi_1", (128, 96), 1.0),
            ("lora_te_text_model_encoder_layers_1_mlp_fc1", hf_l, "encoder.layers.1.mlp.fc1", (64, 32), 4.0)]:
        down, up = _pair(g, o, i)  # (an alpha of 0: test_foreign_loras.py, against diffusers' converter)
        tensors |= _kohya(stem, down, up, alpha)
        want.append((model, module, down, up, alpha))
    # diffusers' names without CLIP's text_model. level (transformers 5), alpha as a key; ComfyUI's own spelling
    down, up = _pair(g, 32, 32)
    tensors |= {"text_encoder.encoder.layers.0.self_attn.v_proj.lora_A.weight": down,
                "text_encoder.encoder.layers.0.self_attn.v_proj.lora_B.weight": up,
                "text_encoder.encoder.layers.0.self_attn.v_proj.alpha": torch.tensor(5.0)}
    want.append((hf_l, "encoder.layers.0.self_attn.v_proj", down, up, 5.0))
    down, up = _pair(g, 96, 64)
    tensors |= {f"text_encoders.t5xxl.transformer.encoder.block.1.layer.0.SelfAttention.o.lora_{k}.weight": t
                for k, t in (("down", down), ("up", up))}
    want.append((hf_5, "encoder.block.1.layer.0.SelfAttention.o", down, up, RANK))
    bias = torch.randn(32, generator=g)  # ComfyUI's full difference of a bias, added times the scale
    tensors["text_encoders.clip_l.transformer.text_model.encoder.layers.1.mlp.fc2.diff_b"] = bias
    save_file(tensors, tmp_path / "lora.safetensors")

    split = split_loras([(str(tmp_path / "lora.safetensors"), SCALE)], "flux", encoders=("clip_l", "t5"))
    assert split.notes == [] and [list(lora.modules) for lora, _ in split.transformer] == [["double_blocks.0.img_attn.proj"]]
    clip = load_clip(tmp_path / "clip.safetensors", config=CLIP, loras=split.text_for("clip_l"))
    t5 = load_t5(tmp_path / "t5.safetensors", loras=split.text_for("t5"))
    ids = torch.randint(0, 256, (2, 12), generator=g)
    with torch.no_grad():
        plain = hf_5(ids).last_hidden_state, hf_l(ids).last_hidden_state  # before the hand merge
        for args in want:
            _merge(*args, SCALE)
        hf_l.encoder.layers[1].mlp.fc2.bias += SCALE * bias
        assert_close_rel(t5(ids), hf_5(ids).last_hidden_state, torch.float32)
        assert_close_rel(clip(ids).last_hidden_state, hf_l(ids).last_hidden_state, torch.float32)
        assert not torch.allclose(plain[0], t5(ids)) and not torch.allclose(plain[1], clip(ids).last_hidden_state)


def test_text_parts_that_fit_no_loaded_encoder_are_refused_in_one_line(tmp_path):
    g = torch.Generator().manual_seed(3)
    save_file(clip_state(hf_clip(CLIP, 0.1, seed=1, bos=49406)), tmp_path / "clip.safetensors")
    unet = _kohya("lora_unet_double_blocks_0_img_attn_proj", *_pair(g, 32, 32), 2.0)

    def split(te: dict, family: str = "flux"):
        save_file(unet | te, tmp_path / "bad.safetensors")
        return split_loras([str(tmp_path / "bad.safetensors")], family, encoders=("clip_l", "t5"))

    deep = split(_kohya("lora_te1_text_model_encoder_layers_7_mlp_fc1", *_pair(g, 64, 32), 2.0))
    with pytest.raises(WeightsError, match=r"bad.safetensors: lora_te1_text_model_encoder_layers_7_mlp_fc1 names "
                                           r"no weight of the CLIP-L being loaded \(2 layers\); a LoRA for another"):
        load_clip(tmp_path / "clip.safetensors", loras=deep.text_for("clip_l"))
    wide = split(_kohya("lora_te1_text_model_encoder_layers_0_mlp_fc1", *_pair(g, 64, 48), 2.0))
    with pytest.raises(WeightsError, match=r"has shape \[64, 48\], the CLIP-L's weight \[64, 32\]"):
        load_clip(tmp_path / "clip.safetensors", loras=wide.text_for("clip_l"))
    with pytest.raises(WeightsError, match="are for a CLIP-bigG, which FLUX.1 does not have"):
        split(_kohya("text_encoders.clip_g.transformer.text_model.encoder.layers.0.mlp.fc1", *_pair(g, 64, 32), 2.0))
    full = "text_encoder.text_model.encoder.layers.0.mlp.fc1.weight"  # a whole weight, not a LoRA
    with pytest.raises(WeightsError, match=f"text-encoder key {full} is not one scfm reads"):
        split({full: torch.zeros(64, 32)})
