"""The SD3.5 pipeline against diffusers' StableDiffusion3Pipeline on a tiny pipeline folder saved by `save_pretrained`
(issue 8 item 3): for the same seed, steps and guidance scale, the same latents (atol 1e-4 * max) and the same 8-bit
image within one level, with CFG off and on (explicit and default negative prompt), with skip-layer guidance, and
without T5; the CLI picks the SD3 family from the folder and writes the same image."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from conftest import randomize_, tiny_diffusers_vae
from test_evaluate_refusals import refused
from text_fixtures import hf_clip, hf_clip_tokenizer, hf_t5, train_spm

from model.clip import CLIP_CONFIGS
from model.t5 import T5_CONFIGS
from sampling.base import to_pil
from sampling.sd3 import SD3GenerationConfig, SD3Pipeline, SD3Sources, slg_steps

# Real CLIP vocabulary so the vendored BPE ids index it; bigG with gelu and the legacy eos rule, as its configs.
CLIP_L = dataclasses.replace(CLIP_CONFIGS["tiny"], vocab_size=49408, hidden_size=32, num_attention_heads=2,
                             num_hidden_layers=2, intermediate_size=64, projection_dim=16, eos_token_id=49407)
CLIP_G = dataclasses.replace(CLIP_L, hidden_size=48, num_attention_heads=3, hidden_act="gelu", projection_dim=24,
                             eos_token_id=2)
T5 = dataclasses.replace(T5_CONFIGS["tiny"], vocab_size=256, d_model=96, num_layers=2)
PROMPTS = ["a red circle at the top left", "a blue square"]
T5_LEN = 48
HEIGHT, WIDTH = 32, 48  # the tiny VAE downsamples 4x: 8 x 12 latents, a 4 x 6 patch grid


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The same tiny SD3.5 parts saved twice: with T5 and, as diffusers allows, without."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Tokenizer as HFT5Tokenizer

    root = tmp_path_factory.mktemp("sd3")
    # SD3.5-medium's features: RMS QK-norm, dual-attention blocks 0 and 1, a pre-only last block.
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5.d_model, caption_projection_dim=32,
        pooled_projection_dim=CLIP_L.projection_dim + CLIP_G.projection_dim, pos_embed_max_size=8,
        qk_norm="rms_norm", dual_attention_layers=(0, 1),
    )
    vae = tiny_diffusers_vae(1.5305, 0.0609)
    randomize_(transformer, 0.1, seed=3)
    train_spm(root / "spm")
    parts = dict(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=hf_clip(CLIP_L, 0.1, seed=1, bos=49406), tokenizer=hf_clip_tokenizer(),
        text_encoder_2=hf_clip(CLIP_G, 0.1, seed=5, bos=49406), tokenizer_2=hf_clip_tokenizer("!"),
    )
    pipes = {
        "t5": StableDiffusion3Pipeline(**parts, text_encoder_3=hf_t5(T5, 0.1, seed=2),
                                       tokenizer_3=HFT5Tokenizer.from_pretrained(str(root / "spm"))),
        "no-t5": StableDiffusion3Pipeline(**parts, text_encoder_3=None, tokenizer_3=None),
    }
    for name, pipe in pipes.items():
        pipe.save_pretrained(root / name)
    return {name: (root / name, pipe) for name, pipe in pipes.items()}


def _diffusers(pipe, output_type, cfg: SD3GenerationConfig):
    kwargs = dict(skip_guidance_layers=list(cfg.slg_layers), skip_layer_guidance_scale=cfg.slg_scale,
                  skip_layer_guidance_start=cfg.slg_start, skip_layer_guidance_stop=cfg.slg_stop) \
        if cfg.slg_layers else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe(PROMPTS, height=cfg.height, width=cfg.width, num_inference_steps=cfg.steps,
                    guidance_scale=cfg.guidance, negative_prompt=cfg.negative_prompt or None,
                    generator=torch.Generator().manual_seed(cfg.seed), output_type=output_type,
                    max_sequence_length=T5_LEN, **kwargs).images


def _compare(folder, pipe, cfg: SD3GenerationConfig, **sources) -> torch.Tensor:
    """Assert our latents and image match diffusers' for `cfg`; return our latents."""
    ours = SD3Pipeline(SD3Sources.from_folder(folder, **sources))
    latents = ours(PROMPTS, cfg, output="latent")
    ref = _diffusers(pipe, "latent", cfg)
    assert latents.shape == ref.shape == (2, 16, HEIGHT // 4, WIDTH // 4)
    torch.testing.assert_close(latents, ref, rtol=0, atol=1e-4 * ref.abs().max().item())

    # decode our latents as SD3Pipeline.__call__ does (output="pil"), without sampling a second time
    images = np.stack([np.asarray(im) for im in to_pil(ours.decode(latents))]).astype(int)
    ref_images = (_diffusers(pipe, "np", cfg) * 255).round().astype(int)
    assert images.shape == ref_images.shape == (2, HEIGHT, WIDTH, 3)
    assert images.std() > 1, "the tiny pipeline should not draw a flat image"
    assert np.abs(images - ref_images).max() <= 1
    return latents


CASES = {
    "no-cfg": SD3GenerationConfig(guidance=1.0),
    "cfg-negative": SD3GenerationConfig(guidance=5.0, negative_prompt="blurry, low quality"),
    "cfg-empty-negative": SD3GenerationConfig(guidance=4.5, steps=4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_latents_and_image_as_diffusers(folders, case):
    cfg = dataclasses.replace(CASES[case], height=HEIGHT, width=WIDTH, seed=7, max_sequence_length=T5_LEN,
                              steps=CASES[case].steps if case == "cfg-empty-negative" else 3)
    _compare(*folders["t5"], cfg)


def test_skip_layer_guidance_matches_diffusers(folders):
    # 4 steps with start 0.25 / stop 0.75: diffusers' strict rule runs the skip pass on step 2 only, where a
    # non-strict one would also run it on steps 1 and 3, so the window itself is under test.
    cfg = SD3GenerationConfig(height=HEIGHT, width=WIDTH, steps=4, guidance=4.0, seed=7, max_sequence_length=T5_LEN,
                              slg_layers=(1,), slg_scale=2.8, slg_start=0.25, slg_stop=0.75)
    assert slg_steps(4, 0.25, 0.75) == [2]
    with_slg = _compare(*folders["t5"], cfg)
    without = SD3Pipeline(SD3Sources.from_folder(folders["t5"][0]))(
        PROMPTS, dataclasses.replace(cfg, slg_layers=()), output="latent")
    # the skip pass must matter far beyond the tolerance, or the comparison above proves nothing
    assert (with_slg - without).abs().max() > 100 * 1e-4 * with_slg.abs().max()
    with pytest.raises(ValueError, match=r"layers \[3\] are outside the model's 3 blocks"):
        SD3Pipeline(SD3Sources.from_folder(folders["t5"][0]))(PROMPTS, dataclasses.replace(cfg, slg_layers=(3,)))


def test_without_t5_matches_diffusers(folders):
    folder, pipe = folders["no-t5"]
    assert SD3Sources.from_folder(folder).t5 is None
    cfg = SD3GenerationConfig(height=HEIGHT, width=WIDTH, steps=3, guidance=3.0, seed=7, max_sequence_length=T5_LEN)
    _compare(folder, pipe, cfg)
    # the T5 folder with T5 switched off is the same model: diffusers' zeros
    _compare(folders["t5"][0], pipe, cfg, without_t5=True)


def test_size_must_be_a_multiple_of_vae_scale_times_patch(folders):
    ours = SD3Pipeline(SD3Sources.from_folder(folders["t5"][0]))
    with pytest.raises(ValueError, match=r"width 50 is not a multiple of 8; use 48 or 56"):
        ours(PROMPTS, SD3GenerationConfig(height=HEIGHT, width=50))


def test_cli_picks_sd3_and_writes_diffusers_image(folders, tmp_path, capsys):
    from PIL import Image

    from sampling.generate import main
    from sampling.png_record import read_png_params
    from weights.families import detect_family

    folder, pipe = folders["t5"]
    assert detect_family(folder).name == detect_family(folder / "transformer").name == "sd3"
    out = tmp_path / "one.png"
    args = ["--model", str(folder), "--prompt", PROMPTS[0], "--steps", "3", "--width", str(WIDTH), "--height",
            str(HEIGHT), "--seed", "7", "--max-sequence-length", str(T5_LEN), "--cfg", "4.5", "--slg-layers", "1",
            "--slg-start", "0", "--slg-stop", "0.5", "--out", str(out), "--dtype", "fp32", "--device", "cpu"]
    assert main(args) == 0, capsys.readouterr().err
    meta = read_png_params(out)
    assert meta["family"] == "sd3" and meta["guidance"] == 4.5 and meta["slg_layers"] == [1]
    assert meta["schedule"] == "diffusers" and meta["seed"] == 7 and meta["negative_prompt"] == ""
    # SLG's scale is recorded as before, though its flag now defaults to None (SD3's 2.8 filled in here)
    assert (meta["slg_scale"], meta["slg_start"], meta["slg_stop"]) == (2.8, 0.0, 0.5)
    with warnings.catch_warnings():  # the same run in diffusers: SLG on step 1 of 3
        warnings.simplefilter("ignore")
        ref = pipe(PROMPTS[0], height=HEIGHT, width=WIDTH, num_inference_steps=3, guidance_scale=4.5,
                   generator=torch.Generator().manual_seed(7), output_type="np", max_sequence_length=T5_LEN,
                   skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=0.5).images
    assert np.abs(np.asarray(Image.open(out)).astype(int) - (ref[0] * 255).round().astype(int)).max() <= 1
    assert main(args[:-6] + ["--guidance", "3", "--out", str(tmp_path / "x.png")]) == 2
    assert "--cfg and --guidance" in capsys.readouterr().err
    assert main(args[:-6] + ["--true-cfg", "3", "--out", str(tmp_path / "x.png")]) == 2
    assert "--true-cfg: Flux options" in (err := capsys.readouterr().err) and "guidance scale is --cfg" in err


REFUSED = [
    (["--slg-layers", "1", "--cfg", "1"], "--slg-layers: used only with CFG on, and it is off (--cfg 1)"),
    (["--negative-prompt", "ugly", "--cfg", "1"], "--negative-prompt: used only with CFG on, and it is off (--cfg 1)"),
    (["--negative-prompt", "", "--slg-layers", "1", "--guidance", "1"], "--negative-prompt, --slg-layers: used only"),
    (["--cfg", "0"], "--cfg 0: below 1 CFG is off, as at 1"),
    (["--cfg", "-3"], "--cfg -3: below 1 CFG is off"),
    (["--guidance", "0.5"], "--guidance 0.5: below 1 CFG is off"),
    (["--slg-layers", "1", "--slg-start", "0.9", "--slg-stop", "0.1"], "--slg-start 0.9 --slg-stop 0.1 with 28 "
     "steps: no step i has 28 x 0.9 < i < 28 x 0.1 (diffusers' rule), so skip-layer guidance would never run; pass "
     "--slg-start below --slg-stop"),
    (["--slg-layers", "1", "--steps", "3"], "--slg-start 0.01 --slg-stop 0.2 with 3 steps: no step i"),
    (["--slg-layers", "1", "--steps", "1", "--slg-start", "0", "--slg-stop", "1"], "pass --steps 2 or more"),
    (["--slg-scale", "4"], "--slg-scale: skip-layer guidance runs only with --slg-layers"),
    (["--slg-start", "0", "--slg-stop", "0.5"], "--slg-start, --slg-stop: skip-layer guidance runs only with"),
    (["--slg-layers", "1", "--slg-scale", "0"], "--slg-scale 0: skip-layer guidance would add nothing"),
]


@pytest.mark.parametrize("flags, expected", REFUSED)
def test_settings_that_would_do_nothing_are_refused(flags, expected):
    """diffusers accepts each of these silently (and the PNG recorded them as if used): SLG and the negative prompt
    without CFG, a CFG scale below 1 (off, as 1 is), a skip-layer window no step falls in, SLG tuned without
    layers or at scale 0."""
    from sampling.flags import build_parser
    from sampling.job import generation_config
    from weights.lora import Recommended

    args = build_parser().parse_args(["--model", "m", "--prompt", "p", *flags])
    with pytest.raises(ValueError) as exc:
        generation_config(args, "sd3", Recommended())
    assert expected in str(exc.value) and "\n" not in str(exc.value)


def test_sd3_refusals_name_a_loras_guidance_and_keep_what_works(folders, tmp_path, capsys):
    from sampling.flags import build_parser
    from sampling.generate import main
    from sampling.job import generation_config
    from weights.lora import Recommended

    parse = build_parser().parse_args
    with pytest.raises(ValueError, match=r"it is off \(guidance 1, as a --lora recommends\)"):
        generation_config(parse(["--model", "m", "--prompt", "p", "--negative-prompt", "x"]), "sd3",
                          Recommended(guidance=1.0))
    cfg = generation_config(parse(["--model", "m", "--prompt", "p", "--slg-layers", "7,8,9"]), "sd3", Recommended())
    assert (cfg.slg_layers, cfg.slg_scale, cfg.slg_start, cfg.slg_stop) == ((7, 8, 9), 2.8, 0.01, 0.2)
    cfg = generation_config(parse(["--model", "m", "--prompt", "p", "--cfg", "1"]), "sd3", Recommended())
    assert cfg.guidance == 1.0  # --cfg 1 is how CFG is turned off
    # from the command line: one line, before any weight is read
    folder, _ = folders["t5"]
    out = tmp_path / "x.png"
    assert main(["--model", str(folder), "--prompt", "p", "--slg-layers", "1", "--cfg", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --slg-layers: used only with CFG on") and "\n" not in err and not out.exists()


def test_family_is_read_from_single_files(folders, tmp_path):
    from model.flux import FLUX_CONFIGS, Flux
    from weights.families import detect_family
    from weights.io import WeightsError
    from weights.transformer import load_mmdit, save_transformer

    sai = save_transformer(load_mmdit(folders["t5"][0]), tmp_path / "sd35.safetensors")  # SAI names, no config.json
    flux = save_transformer(Flux(FLUX_CONFIGS["tiny"]), tmp_path / "flux.safetensors")
    assert detect_family(sai).name == "sd3" and detect_family(flux).name == "flux"
    with pytest.raises(WeightsError, match="not the transformer of any family"):
        detect_family(folders["t5"][0] / "vae")


def test_scfm_lora_metadata_sets_the_grid_and_guidance(tmp_path):
    from safetensors.torch import save_file

    from sampling.flags import build_parser
    from sampling.job import generation_config, lora_recommendations
    from weights.lora import FORMAT

    scfm, plain = tmp_path / "scfm.safetensors", tmp_path / "style.safetensors"
    save_file({"x.lora_down": torch.zeros(1, 1)}, scfm, {"scfm_format": FORMAT, "scfm_family": "mmdit",
                                                        "scfm_steps": "4", "scfm_guidance": "4.5"})
    save_file({"x.lora_down": torch.zeros(1, 1)}, plain)
    parse = build_parser().parse_args
    base = ["--model", "m", "--prompt", "p"]

    cfg = generation_config(parse(base), "sd3", lora_recommendations([str(plain), str(scfm)]))
    assert (cfg.grid, cfg.steps, cfg.guidance, cfg.max_sequence_length) == ("scfm", 4, 4.5, 256)
    cfg = generation_config(parse(base + ["--schedule", "diffusers", "--cfg", "2", "--steps", "8"]), "sd3",
                            lora_recommendations([str(scfm)]))
    assert (cfg.grid, cfg.steps, cfg.guidance) == ("diffusers", 8, 2.0)
    cfg = generation_config(parse(base), "sd3", lora_recommendations([str(plain)]))
    assert (cfg.grid, cfg.steps, cfg.guidance) == ("diffusers", 28, 7.0)
    flux = generation_config(parse(base), "flux", lora_recommendations([str(plain)]))
    assert (flux.grid, flux.guidance, flux.true_cfg, flux.max_sequence_length) == ("diffusers", 3.5, 1.0, 512)


def test_evaluate_judges_an_sd3_pipeline_folder(folders, tmp_path):
    """distill.evaluate --out on SD3.5 (through the family registry): its teacher rows, CFG counted in the NFE."""
    import json

    from distill.evaluate import main

    folder, _ = folders["t5"]
    assert main(["--model", str(folder), "--prompts", *PROMPTS[:2], "--per-prompt", "2", "--steps", "2",
                 "--teacher-steps", "4", "--width", str(WIDTH), "--height", str(HEIGHT), "--device", "cpu",
                 "--dtype", "fp32", "--out", str(tmp_path / "eval")]) == 0
    rows = json.loads((tmp_path / "eval" / "report.json").read_text())["rows"]
    assert [(r["name"], r["nfe"]) for r in rows] == [("teacher 4", 8), ("teacher 2", 4)]  # cond + uncond per step
    assert rows[0]["fd"] == 0 and rows[1]["mean|d|"] > 0


def test_evaluate_samples_the_teacher_at_the_loras_guidance(folders, tmp_path, capsys):
    """The teacher rows sample at the CFG the student's LoRA recommends (SD3.5's 4.5, not generate's default 7), or
    at --guidance; the manifest records it, so rows rendered at another are refused or re-rendered, while a manifest
    from before it was recorded still matches when its row was rendered at the same guidance."""
    import json

    from conftest import random_lora

    from distill.evaluate import main
    from sampling.png_record import read_png_params
    from weights.lora import Recommended
    from weights.lora_write import write_lora
    from weights.transformer import load_mmdit

    folder, _ = folders["t5"]
    lora = write_lora(random_lora(load_mmdit(folder), family="sd3", recommended=Recommended(guidance=4.5)),
                      tmp_path / "student.safetensors")
    out = tmp_path / "eval"
    args = ["--model", str(folder), "--prompts", PROMPTS[0], "--per-prompt", "1", "--steps", "1", "--teacher-steps",
            "2", "--width", str(WIDTH), "--height", str(HEIGHT), "--device", "cpu", "--dtype", "fp32", "--lora",
            str(lora), "--out", str(out)]

    def guidance(row):
        return read_png_params(out / row / "000_000.png")["guidance"]

    assert main(args) == 0
    assert [guidance(r) for r in ("teacher_2", "teacher_1", "student_1")] == [4.5, 4.5, 4.5]
    assert json.loads((out / "report.json").read_text())["config"]["teacher_guidance"] == 4.5
    for row in ("teacher_2", "student_1"):  # as a manifest written before the guidance was recorded
        manifest = json.loads((out / row / "manifest.json").read_text())
        assert manifest.pop("guidance") == 4.5
        (out / row / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    # rendered then at generate's CFG 7
    assert "teacher 2: its guidance differ" in refused(args, during_run=True)
    student = (out / "student_1" / "000_000.png").stat().st_mtime_ns
    assert main(args + ["--guidance", "6", "--overwrite"]) == 0
    assert [guidance(r) for r in ("teacher_2", "teacher_1", "student_1")] == [6, 6, 4.5]
    assert "rendering student" not in capsys.readouterr().err  # its older manifest matches: 4.5 is its guidance
    assert (out / "student_1" / "000_000.png").stat().st_mtime_ns == student
    assert json.loads((out / "report.json").read_text())["config"]["teacher_guidance"] == 6


def test_train_builds_the_cache_from_an_sd3_pipeline_folder_as_the_flags_would(folders, tmp_path):
    """`distill.train --model FOLDER --targets sd3` with no component flag: the folder's VAE, CLIP-L, bigG and T5
    build the cache, as naming them does (same cache key, same loss)."""
    import json

    from test_data import write_images

    from distill.train import main as train

    folder, _ = folders["t5"]
    write_images(tmp_path / "data", [((64, 64), "a red fox"), ((64, 64), "a blue square")])
    common = ["--model", str(folder), "--targets", "sd3", "--data", str(tmp_path / "data"), "--resolution", "64",
              "--device", "cpu", "--dtype", "fp32", "--rank", "2", "--batch_size", "1", "--steps", "1",
              "--sample_every", "0", "--export_formats", "ours", "--t5_length", "16"]
    flags = ["--vae", str(folder / "vae"), "--clip", str(folder / "text_encoder"), "--clip_g",
             str(folder / "text_encoder_2"), "--t5", str(folder / "text_encoder_3"), "--t5_tokenizer",
             str(folder / "tokenizer_3")]
    runs = {}
    for name, extra in (("folder", []), ("flags", flags)):
        out = tmp_path / name
        assert train([*common, *extra, "--output", str(out)]) == 0
        key = json.loads((out / "cache" / "cache.json").read_text())["key"]
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        runs[name] = key, [row["loss"] for row in log if "loss" in row]
    assert runs["folder"] == runs["flags"] and runs["folder"][1]
    assert all(runs["folder"][0][k] for k in ("vae", "clip", "clip_g", "t5"))


def test_a_folder_run_begun_without_t5_resumes_as_it_began(folders, tmp_path, monkeypatch):
    """A run begun on an SD3.5 folder naming its parts but not T5 (as every folder run had to before the folder gave
    its parts): its resume goes on with the parts it recorded, not the folder's T5 (another cache key, refused)."""
    from test_data import write_images

    import distill.train
    from distill.train import main as train

    folder, _ = folders["t5"]
    write_images(tmp_path / "data", [((64, 64), "a red fox")])
    out = tmp_path / "out"
    argv = ["--model", str(folder), "--targets", "sd3", "--data", str(tmp_path / "data"), "--resolution", "64",
            "--device", "cpu", "--dtype", "fp32", "--rank", "2", "--batch_size", "1", "--steps", "1",
            "--sample_every", "0", "--export_formats", "ours", "--t5_length", "16", "--checkpoint_every", "1",
            "--vae", str(folder / "vae"), "--clip", str(folder / "text_encoder"), "--clip_g",
            str(folder / "text_encoder_2"), "--output", str(out)]
    with monkeypatch.context() as m:
        m.setattr(distill.train, "resolve_folder", lambda cfg, family: cfg)  # the run as it began then
        assert train(argv) == 0
    assert train(["--output", str(out), "--steps", "2", "--resume"]) == 0
