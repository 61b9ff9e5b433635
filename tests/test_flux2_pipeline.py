"""FLUX.2 [klein] sampling (sampling/flux2.py) against diffusers' Flux2KleinPipeline on a tiny pipeline folder that
diffusers itself writes (Qwen3 with 28 layers, a tiny byte-level BPE with Qwen's specials, the 32-channel VAE's
tiny twin, a tiny FLUX.2 transformer): same seed, same latents and image, base (real CFG) and distilled."""

import json

import numpy as np
import pytest
import torch
from conftest import randomize_
from test_qwen3 import reference as qwen_reference
from test_qwen3 import tiny_qwen_tokenizer

from model.flux2 import Flux2Config
from sampling.flux2 import Flux2KleinPipeline, Flux2Sources
from weights.families.flux2 import config_to_diffusers

# klein's template as a jinja chat template, so that diffusers' apply_chat_template renders the same string
CHAT_TEMPLATE = ("{{ '<|im_start|>user\\n' + messages[0]['content'] + '<|im_end|>\\n<|im_start|>assistant\\n"
                 "<think>\\n\\n</think>\\n\\n' }}")
TRANSFORMER = Flux2Config(in_channels=16, out_channels=16, context_in_dim=144, hidden_size=64, num_heads=4, depth=2,
                          depth_single_blocks=2, axes_dim=(4, 4, 4, 4), guidance_embed=False)
PROMPT, SIZE = "a red fox in the snow", 64


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from test_lora_everywhere import FLUX_DEV_SCHEDULER
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("klein")
    tiny_qwen_tokenizer(root / "tok")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(root / "tok" / "tokenizer.json"), pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    transformer = Flux2Transformer2DModel(**{k: v for k, v in config_to_diffusers(TRANSFORMER).items() if k[0] != "_"})
    vae = AutoencoderKLFlux2(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    randomize_(transformer, 0.1, seed=2)
    randomize_(vae, 0.05, seed=3)
    with torch.no_grad():
        vae.bn.running_var.copy_(torch.rand(16, generator=torch.Generator().manual_seed(4)) + 0.5)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(FLUX_DEV_SCHEDULER)
    out = {}
    for distilled in (False, True):
        pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=qwen_reference(tied=True),
                                  tokenizer=tokenizer, transformer=transformer.eval(), is_distilled=distilled)
        folder = root / ("distilled" if distilled else "base")
        pipe.save_pretrained(folder)
        out[distilled] = pipe, folder
    return out


@pytest.mark.parametrize("distilled,guidance,steps,width", [(False, 4.0, 3, SIZE), (True, 1.0, 2, SIZE),
                                                             (True, 4.0, 2, SIZE), (True, 1.0, 2, SIZE + 32)],
                         ids=["base-cfg", "distilled", "distilled-ignores-guidance", "wider-than-tall"])
def test_same_latents_and_image_as_diffusers(folders, distilled, guidance, steps, width):
    """Same seed, same latents and image; a 64 x 96 image checks the image ids, packing and schedule length of a
    non-square size (a transposed axis would pass every square one)."""
    ref, folder = folders[distilled]
    assert json.loads((folder / "model_index.json").read_text())["is_distilled"] is distilled
    kwargs = dict(prompt=PROMPT, height=SIZE, width=width, num_inference_steps=steps, guidance_scale=guidance,
                  max_sequence_length=48)
    want = ref(**kwargs, output_type="latent", generator=torch.Generator().manual_seed(5)).images
    image = ref(**kwargs, output_type="np", generator=torch.Generator().manual_seed(5)).images[0]

    ours = Flux2KleinPipeline(Flux2Sources.from_folder(folder))
    cfg = ours.default_config(height=SIZE, width=width, steps=steps, guidance=guidance, max_sequence_length=48,
                              seed=5)
    assert ours.wants_negative(cfg) == (guidance > 1 and not distilled)
    cond, negative = ours.encode_prompts([PROMPT], cfg)
    latents = ours.sample(cond, cfg, negative=negative)
    # diffusers returns the unpatchified, un-normalised latents for output_type="latent"
    got = ours.vae.denormalize_latents(latents)
    assert got.shape == want.shape
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= 1e-5
    pixels = ours.decode(latents)[0].permute(1, 2, 0).numpy()
    assert np.abs(np.round(pixels * 255) - np.round(image * 255)).max() <= 1  # one 8-bit level


def test_generate_writes_the_klein_image(folders, tmp_path, capsys):
    from PIL import Image

    from sampling.generate import main

    ref, folder = folders[True]
    assert main(["--model", str(folder), "--prompt", PROMPT, "--steps", "2", "--width", str(SIZE), "--height",
                 str(SIZE), "--max-sequence-length", "48", "--seed", "5", "--out", str(tmp_path / "k.png")]) == 0
    image = ref(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=2, max_sequence_length=48,
                output_type="np", generator=torch.Generator().manual_seed(5)).images[0]
    ours = np.asarray(Image.open(tmp_path / "k.png")).astype(int)
    assert np.abs(ours - np.round(image * 255)).max() <= 1
    params = json.loads(Image.open(tmp_path / "k.png").text["scfm"])
    assert (params["family"], params["variant"]) == ("flux2", "distilled")  # what --from-png renders it with
    # CFG on the distilled klein would do nothing: refused in one line (diffusers warns and drops it)
    for extra, why in ((["--cfg", "4"], "the distilled klein samples without CFG"),
                       (["--negative-prompt", "blurry"], "the distilled klein samples without CFG"),
                       (["--cfg", "4", "--guidance", "3"], "--cfg and --guidance name the same scale"),
                       (["--t5", str(folder)], "--t5: a FLUX.2 model has no such part; its text encoder is Qwen3")):
        assert main(["--model", str(folder), "--prompt", PROMPT, "--steps", "2", "--width", str(SIZE), "--height",
                     str(SIZE), "--out", str(tmp_path / "cfg.png"), *extra]) == 2
        assert why in capsys.readouterr().err
    assert not (tmp_path / "cfg.png").exists()


@pytest.mark.parametrize("distilled,defaults", [(False, (50, 4.0)), (True, (4, 1.0))], ids=["base", "distilled"])
def test_make_dataset_renders_klein_as_generate_does_at_the_variants_defaults(folders, tmp_path, distilled, defaults):
    """Teacher data for klein base: its pipeline's 50 steps at real CFG 4 (no flags); for the distilled klein its
    4 steps without CFG; image for image what `generate` makes from the same seed."""
    from PIL import Image

    from distill.make_dataset import main as make_dataset
    from sampling.generate import main as generate

    _, folder = folders[distilled]
    (tmp_path / "prompts.txt").write_text(PROMPT + "\n")
    assert make_dataset(["--model", str(folder), "--prompts", str(tmp_path / "prompts.txt"), "--out",
                         str(tmp_path / "data"), "--images-per-bucket", "1", "--resolution", str(SIZE),
                         "--max-sequence-length", "48"]) == 0
    (png,) = (tmp_path / "data").glob("*.png")
    params = json.loads(Image.open(png).text["scfm"])
    assert (params["steps"], params["guidance"]) == defaults
    assert generate(["--model", str(folder), "--prompt", PROMPT, "--width", str(SIZE), "--height", str(SIZE),
                     "--max-sequence-length", "48", "--seed", "0", "--out", str(tmp_path / "g.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(tmp_path / "g.png")))


def test_evaluate_judges_a_klein_pipeline_folder(folders, tmp_path):
    """distill.evaluate --out on FLUX.2 [klein] base (through the family registry): the teacher rows, CFG counted."""
    from distill.evaluate import main as evaluate

    _, folder = folders[False]
    assert evaluate(["--model", str(folder), "--prompts", PROMPT, "a blue square", "--per-prompt", "2", "--steps",
                     "2", "--teacher-steps", "3", "--width", str(SIZE), "--height", str(SIZE), "--device", "cpu",
                     "--dtype", "fp32", "--out", str(tmp_path / "eval")]) == 0
    rows = json.loads((tmp_path / "eval" / "report.json").read_text())["rows"]
    assert [(r["name"], r["nfe"]) for r in rows] == [("teacher 3", 6), ("teacher 2", 4)]  # u and c per step
    assert rows[0]["mean|d|"] == 0 and rows[1]["mean|d|"] > 0


def test_train_builds_the_cache_from_a_klein_pipeline_folder_as_the_flags_would(folders, tmp_path):
    """`distill.train --model FOLDER` with no component flag: the folder's VAE, Qwen3 and tokenizer build the cache,
    recorded as the run's settings; the same run with the flags naming them has the same cache key and loss, and
    the flagless run resumes on its own settings."""
    from test_data import write_images

    from distill.checkpoint import newest_settings
    from distill.train import main as train

    _, folder = folders[False]
    write_images(tmp_path / "data", [((64, 64), "a red fox"), ((64, 64), "a blue square")])
    common = ["--model", str(folder), "--targets", "flux2", "--data", str(tmp_path / "data"), "--resolution", "64",
              "--device", "cpu", "--dtype", "fp32", "--rank", "2", "--batch_size", "1", "--steps", "1",
              "--sample_every", "0", "--export_formats", "ours"]
    flags = ["--vae", str(folder / "vae"), "--qwen", str(folder / "text_encoder"), "--qwen_tokenizer",
             str(folder / "tokenizer")]
    runs = {}
    for name, extra in (("folder", []), ("flags", flags)):
        out = tmp_path / name
        assert train([*common, *extra, "--output", str(out), "--checkpoint_every", "1"]) == 0
        key = json.loads((out / "cache" / "cache.json").read_text())["key"]
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        runs[name] = key, [row["loss"] for row in log if "loss" in row]
    assert runs["folder"] == runs["flags"] and runs["folder"][1]
    assert all(runs["folder"][0][k] for k in ("vae", "qwen", "qwen_tokenizer"))
    stored = newest_settings(tmp_path / "folder" / "checkpoints")
    assert (stored["vae"], stored["qwen"]) == (str(folder / "vae"), str(folder / "text_encoder"))
    assert train(["--output", str(tmp_path / "folder"), "--steps", "2", "--resume"]) == 0


def test_the_klein_recipe_on_the_distilled_klein_is_refused_before_anything_is_cached(folders, tmp_path, capsys):
    """Its CFG baked in, the LoRA would be sampled without it (the distilled klein never runs CFG): one line."""
    from distill.train import main as train

    _, folder = folders[True]
    out = tmp_path / "out"
    assert train(["--config", "flux2-klein-4b-scfm", "--model", str(folder), "--data", str(tmp_path / "data"),
                  "--output", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cfg_scale 3: ") and err.count("\n") == 1, err
    assert "is the step-distilled FLUX.2 (from model_index.json), which samples without CFG; train on the base " \
        "model, or pass --cfg_scale 0" in err
    assert "(from model_index.json)" in err and not (out / "cache").exists()


@pytest.mark.parametrize("distilled,rec,warned", [(True, dict(guidance=4.0, training_cfg_scale=3.0), True),
                                                  (True, dict(training_cfg_scale=3.0), True),
                                                  (True, dict(guidance=4.0), True), (True, {}, False),
                                                  (False, dict(guidance=4.0, training_cfg_scale=3.0), False)],
                         ids=["distilled-cfg-lora", "cfg-scale-only", "guidance-only", "distilled-plain", "base"])
def test_a_cfg_baked_lora_on_the_distilled_klein_is_warned_about(folders, capsys, distilled, rec, warned):
    """generate / the app on the distilled klein with an SCFM LoRA distilled with CFG: one warning line, since the
    distilled klein samples it without the CFG it was trained with."""
    from argparse import Namespace

    from weights.lora import Recommended

    _, folder = folders[distilled]
    args = Namespace(model=str(folder), variant=None, cfg=None, guidance=None, negative_prompt=None, steps=None)
    common = dict(height=SIZE, width=SIZE, steps=4, max_sequence_length=512, grid="scfm", seed=0, shift=None)
    cfg = Flux2KleinPipeline.generation_config(args, Recommended(**rec), common)
    # what it samples at, as the PNG records it: the distilled klein runs no CFG whatever the LoRA recommends
    assert cfg.guidance == (1.0 if distilled else rec.get("guidance", 4.0))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(lines) == warned, err
    if warned:
        assert "distilled with CFG on the klein base model and is sampled here without it" in lines[0]
