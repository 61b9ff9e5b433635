"""The Flux pipeline against diffusers' FluxPipeline on a tiny pipeline folder saved by `save_pretrained`
(docs/models.md §9 row 17): same latents for the same seed, and the same 8-bit image within one level."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from conftest import random_lora
from flux_fixtures import save_tiny_flux_pipeline

from model.clip import CLIP_CONFIGS
from model.layers import pack
from model.t5 import T5_CONFIGS
from sampling.pipeline import FluxPipeline, FluxSources, GenerationConfig

CLIP = dataclasses.replace(CLIP_CONFIGS["tiny"], vocab_size=49408, hidden_size=32, num_attention_heads=2,
                           num_hidden_layers=2, intermediate_size=64, projection_dim=None, eos_token_id=49407)
T5 = dataclasses.replace(T5_CONFIGS["tiny"], vocab_size=256, d_model=96, num_layers=2)
PROMPTS = ["a red circle at the top left", "a blue square"]
T5_LEN = 48


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "schnell"])
def pipeline_folder(request, tmp_path_factory):
    folder, pipe = save_tiny_flux_pipeline(tmp_path_factory.mktemp("pipe"), request.param, CLIP, T5)
    return folder, pipe, request.param


def _diffusers(pipe, output_type, steps=3):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe(PROMPTS, height=32, width=48, num_inference_steps=steps, guidance_scale=4.0,
                    generator=torch.Generator().manual_seed(7), output_type=output_type,
                    max_sequence_length=T5_LEN).images


def test_same_latents_and_image_as_diffusers(pipeline_folder):
    folder, pipe, guidance = pipeline_folder
    ours = FluxPipeline(FluxSources.from_folder(folder))
    cfg = GenerationConfig(height=32, width=48, steps=3, guidance=4.0, seed=7, max_sequence_length=T5_LEN)
    latents = ours(PROMPTS, cfg, output="latent")  # (B, 16, 8, 12)
    ref = _diffusers(pipe, "latent")  # packed (B, 24, 64)
    assert latents.shape == (2, 16, 8, 12)
    scale = ref.abs().max().item()
    torch.testing.assert_close(pack(latents), ref, rtol=0, atol=1e-4 * scale)

    images = np.stack([np.asarray(im) for im in ours(PROMPTS, cfg)]).astype(int)
    ref_images = (_diffusers(pipe, "np") * 255).round().astype(int)
    assert images.shape == ref_images.shape == (2, 32, 48, 3)
    assert images.std() > 1, "the tiny pipeline should not draw a flat image"
    assert np.abs(images - ref_images).max() <= 1


def test_fp8_pipeline_stays_close_and_merges_its_loras_before_quantizing(pipeline_folder):
    from model.fp8 import E4M3, Float8Linear, quantize_linears_
    from weights import load_flux
    from weights.lora_merge import applied_loras, apply_loras

    folder, _, _ = pipeline_folder
    cfg = GenerationConfig(height=32, width=48, steps=3, guidance=4.0, seed=7, max_sequence_length=T5_LEN)
    ref = FluxPipeline(FluxSources.from_folder(folder))(PROMPTS, cfg, output="latent")
    pipe = FluxPipeline(FluxSources.from_folder(folder), fp8=True)
    latents = pipe(PROMPTS, cfg, output="latent")
    assert isinstance(pipe.transformer.single_blocks[0].linear1, Float8Linear)
    assert pipe.transformer.double_blocks[0].img_attn.qkv.weight.dtype == E4M3
    err = ((latents - ref).abs().max() / ref.abs().max()).item()
    assert 0 < err < 0.1, err  # e4m3 rounding of the block weights: visible, small
    # the same as quantizing the full-precision model: the weights were quantized as they were read
    want = load_flux(folder)
    quantize_linears_(want)
    assert all(torch.equal(a.float(), b.float()) for a, b in zip(pipe.transformer.state_dict().values(),
                                                                  want.state_dict().values()))
    # with a LoRA: merged into each weight in full precision as it is read, then quantized
    lora = random_lora(load_flux(folder), seed=1)
    with_lora = FluxPipeline(FluxSources.from_folder(folder), fp8=True, loras=[(lora, 0.8)])
    want = load_flux(folder)
    apply_loras(want, [(lora, 0.8)], restorable=False)
    quantize_linears_(want)
    got = with_lora.transformer
    assert applied_loras(got) == ["LoRA @ 0.8"]
    assert all(torch.equal(a.float(), b.float()) for a, b in zip(got.state_dict().values(),
                                                                  want.state_dict().values()))
    assert not torch.equal(with_lora(PROMPTS, cfg, output="latent"), latents)


def test_dynamic_shift_is_read_from_the_scheduler_config(pipeline_folder):
    folder, _, guidance = pipeline_folder
    assert FluxSources.from_folder(folder).schedule.dynamic == guidance


def test_size_must_be_a_multiple_of_the_packed_patch(pipeline_folder):
    folder, _, _ = pipeline_folder
    ours = FluxPipeline(FluxSources.from_folder(folder))
    with pytest.raises(ValueError, match=r"width 50 is not a multiple of 8; use 48 or 56"):
        ours(PROMPTS, GenerationConfig(height=32, width=50))


def test_cli_refuses_a_lora_for_another_model_before_encoding(pipeline_folder, tmp_path, capsys, monkeypatch):
    from model.flux import FLUX_CONFIGS, Flux
    from sampling.generate import main
    from weights.lora_write import write_lora

    folder, _, _ = pipeline_folder
    path = write_lora(random_lora(Flux(FLUX_CONFIGS["tiny"])), tmp_path / "other.safetensors", "kohya")
    monkeypatch.setattr(FluxPipeline, "encode", lambda *a: pytest.fail("the text encoders ran"))
    args = ["--model", str(folder), "--prompt", PROMPTS[0], "--steps", "2", "--width", "48", "--height", "32",
            "--lora", f"{path}:0.5", "--out", str(tmp_path / "x.png")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "is not in this model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_cli_out_of_memory_is_one_line(pipeline_folder, tmp_path, capsys, monkeypatch):
    from sampling.generate import main

    folder, _, _ = pipeline_folder

    def oom(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(FluxPipeline, "sample", oom)
    args = ["--model", str(folder), "--prompt", PROMPTS[0], "--steps", "2", "--width", "48", "--height", "32",
            "--max-sequence-length", str(T5_LEN), "--out", str(tmp_path / "x.png")]
    for extra, tip, swap in (([], True, "N"), (["--fp8", "--blocks-to-swap", "2"], False, "more than 2")):
        assert main(args + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar: one line, no traceback
        assert err.startswith("error: out of GPU memory") and ("--fp8 (" in err) == tip
        assert f"--blocks-to-swap {swap} (" in err


def test_cli_writes_pngs_with_parameters_and_never_overwrites(pipeline_folder, tmp_path, capsys):
    from PIL import Image

    from sampling.generate import main
    from sampling.png_record import read_png_params
    from weights.io import parse_lora

    folder, _, _ = pipeline_folder
    args = ["--model", str(folder), "--prompt", PROMPTS[0], "--steps", "2", "--width", "48", "--height", "32",
            "--seed", "11", "--max-sequence-length", str(T5_LEN), "--out", str(tmp_path / "one.png"), "--dtype", "fp32"]
    assert main(args) == 0
    first = np.asarray(Image.open(tmp_path / "one.png"))
    meta = read_png_params(tmp_path / "one.png")
    assert meta["seed"] == 11 and meta["prompt"] == PROMPTS[0] and meta["steps"] == 2
    assert main(args) == 2 and "exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert main(args[:-4] + ["--out", str(tmp_path / "fp8.png"), "--fp8"]) == 0  # e4m3 block weights
    fp8 = np.asarray(Image.open(tmp_path / "fp8.png")).astype(int)
    assert 0 < np.abs(fp8 - np.asarray(Image.open(tmp_path / "one.png")).astype(int)).max() <= 32
    # block swap moves weights, not bits; a count the model cannot take is one line
    assert main(args + ["--overwrite", "--blocks-to-swap", "2"]) == 0  # of the 3 blocks
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one.png")), first)
    capsys.readouterr()
    assert main(args + ["--overwrite", "--blocks-to-swap", "3"]) == 2
    err = capsys.readouterr().err
    assert "blocks_to_swap must be between 1 and 2" in err and "sampling" not in err  # before any work
    assert main(args[:-4] + ["--width", "50", "--out", str(tmp_path / "bad.png")]) == 2
    assert "not a multiple of 8" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert parse_lora("C:\\loras\\a.safetensors") == ("C:\\loras\\a.safetensors", None)  # None: not given
    assert parse_lora("a.safetensors:1.5") == ("a.safetensors", 1.5)


def test_a_folder_without_tokenizer_encodes_with_the_vendored_clip_vocabulary(tmp_path):
    """FLUX.1's tokenizer/ is CLIP-L's vocabulary, which model/assets/clip_bpe vendors: a folder without it (a
    partial download, a hand-made folder) gives the same conditioning, as SD3's folder rule already did."""
    from sampling.demo import DEMO_FOLDER

    for part in DEMO_FOLDER.iterdir():
        if part.name != "tokenizer":
            (tmp_path / part.name).symlink_to(part)
    sources = FluxSources.from_folder(tmp_path)
    assert sources.clip_tokenizer is None
    ours = FluxPipeline(sources).encode(PROMPTS, T5_LEN)
    ref = FluxPipeline(FluxSources.from_folder(DEMO_FOLDER)).encode(PROMPTS, T5_LEN)
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=0)
