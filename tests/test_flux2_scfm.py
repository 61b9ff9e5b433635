"""SCFM for FLUX.2 [klein] base (distill/ with model/flux2.py): the CFG-baked target and loss against u + g (c - u)
computed by hand, klein's empirical dynamic shift in the draws, and a tiny CFG-baked run whose exported files load
where users load them: the PEFT file in diffusers' Flux2KleinPipeline and in `generate`, the kohya file by
ComfyUI's rule, conversion and merging; a killed run resumes to the uninterrupted one (docs/flux2.md §4-§5)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math

import pytest
import torch
from conftest import randomize_
from safetensors.torch import load_file, save_file
from test_data import FakeVAE, write_images
from test_trainer import Kill, assert_same, config, kill_at, state

from distill.data import build_cache, plan_cache
from distill.lora import LoRAConfig, inject_lora, load_set, set_state_dict, weight_set
from distill.lora_targets import FLUX2_TARGETS
from distill.scfm import SCFMConfig, element_generators, sample_draw, scfm_loss
from distill.trainer import Trainer
from model.flux2 import Flux2, Flux2Config, flux2_image_ids, flux2_text_ids
from sampling.schedules import empirical_mu, scfm_grid
from sampling.velocity import Flux2Velocity

# a klein-shaped tiny model at the fake encoders' widths (tests/test_data.py: 4 latent channels, 32-wide text)
TINY = Flux2Config(in_channels=4, out_channels=4, context_in_dim=32, hidden_size=64, num_heads=4, depth=1,
                   depth_single_blocks=1, axes_dim=(4, 4, 4, 4), guidance_embed=False)
W = 3.0  # the recipe's w of c + w (c - u): klein's guidance 4 = 1 + w
KEY = {"vae": "fake-vae", "qwen": "fake-qwen", "t5_length": 5, "resolution": 512}


def klein_text(prompts) -> dict[str, torch.Tensor]:
    """prompts -> {"txt": (B, 5, 32)}: a fixed function of each prompt ("" included: klein's negative)."""
    out = []
    for p in prompts:
        g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(p.encode()).digest()[:7], "little"))
        out.append(torch.randn(5, TINY.context_in_dim, generator=g))
    return {"txt": torch.stack(out)}


def klein_cache(tmp_path):
    data = tmp_path / "data"
    write_images(data, [((512, 512), "a red circle"), ((512, 512), "a blue square"), ((512, 512), "a tree")])
    plan = plan_cache(data, KEY, 512, ("a sample",), shard_size=2, cond_names=("txt",), negative_prompt="")
    return build_cache(tmp_path / "cache", plan, lambda: klein_text, lambda: FakeVAE(64), progress=False)


def base_model(seed: int = 8) -> Flux2:
    return randomize_(Flux2(TINY), 0.1, seed)


# ----- the objective with klein's CFG against calls written out ---------------------------------------------


def by_hand(model, x, sigma, cond, uncond) -> torch.Tensor:
    """u + g (c - u), g = 1 + W, for one element: two plain FLUX.2 calls on the packed latent (one token per
    latent pixel, raster order), no wrapper."""
    b, ch, h, w = x.shape

    def call(c):
        out = model(x.flatten(2).transpose(1, 2), flux2_image_ids(h, w), c["txt"], flux2_text_ids(c["txt"].shape[1]),
                    sigma.float().view(1), None)
        return out.transpose(1, 2).reshape(b, ch, h, w)

    c, u = call(cond), call(uncond)
    return u + (1 + W) * (c - u)


def test_cfg_target_and_student_equal_u_plus_g_c_minus_u_with_gradient_through_both():
    config_ = SCFMConfig(dynamic_shift_prob=0.0, guidance_max=None, cfg_scale=W)
    model = base_model(0).eval()
    inject_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=FLUX2_TARGETS), torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    for name in ("live", "fast_ema", "slow_ema"):  # teacher = the base; three distinct, non-zero sets
        load_set(model, name, {k: torch.randn(v.shape, generator=g) * 0.1
                               for k, v in set_state_dict(model, "live").items()})
    b = 4
    draw = sample_draw(config_, element_generators(3, 0, range(b)), (4, 4, 4), 16)
    assert 0 < int(draw.teacher.sum()) < b  # both kinds of first jump
    x0 = torch.randn(b, 4, 4, 4, generator=g)
    cond = klein_text([f"prompt {i}" for i in range(b)])
    uncond = {k: v.expand(b, *v.shape[1:]) for k, v in klein_text([""]).items()}
    out = scfm_loss(Flux2Velocity(model), model, x0, cond, draw, config_, uncond=uncond)
    out.loss.backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    sigmas, dt, big_dt = draw.sigmas.float(), draw.dt.float(), draw.big_dt.float()
    losses = []
    for i in range(b):
        c, u = {"txt": cond["txt"][i:i + 1]}, {"txt": uncond["txt"][i:i + 1]}
        x = (1 - sigmas[i, 0]) * x0[i:i + 1] + sigmas[i, 0] * draw.noise[i:i + 1]
        travelled = torch.zeros_like(x)
        with torch.no_grad():
            for j in range(config_.t_skip):  # first jump: teacher (the base) or the fast EMA; second: the slow
                name = ("teacher" if draw.teacher[i] else "fast_ema") if j < config_.t_skip // 2 else "slow_ema"
                with weight_set(model, name):
                    travelled += dt[i, j] * by_hand(model, x - travelled, sigmas[i, j], c, u)
        target = travelled / big_dt[i]
        torch.testing.assert_close(out.target[i:i + 1], target, rtol=1e-5, atol=1e-5 * target.abs().max().item())
        losses.append((by_hand(model, x, sigmas[i, 0], c, u) - target).pow(2).mean())  # live set, both branches
    reference = torch.stack(losses).mean()
    torch.testing.assert_close(out.loss, reference.detach(), rtol=1e-5, atol=0)
    reference.backward()
    for n, grad in ours_grads.items():  # fp32, batched vs one element at a time: within ~5e-6 of each largest
        torch.testing.assert_close(grad, model.get_parameter(n).grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(),
                                   msg=n)
    assert ours_grads["final_layer.adaLN_modulation.1.lora_up.live"].abs().max() > 0


def test_dynamic_shift_elements_train_on_kleins_empirical_grid():
    """klein samples n steps at exp(empirical_mu(tokens, n)); a dynamic element of grid size n trains there."""
    config_ = SCFMConfig(dynamic_shift_prob=1.0, guidance_max=None, dynamic_shift="empirical")
    draw = sample_draw(config_, element_generators(0, 0, range(16)), (4, 32, 32), 1024)
    assert bool(draw.dynamic.all()) and len(set(draw.steps.tolist())) > 1
    for i in range(16):
        n, start = int(draw.steps[i]), int(draw.start[i])
        grid = scfm_grid(n, math.exp(empirical_mu(1024, n)), config_.sigma_max)
        assert torch.equal(draw.sigmas[i], grid[start:start + config_.t_skip + 1])
    flux1 = sample_draw(dataclasses.replace(config_, dynamic_shift="linear"), element_generators(0, 0, range(16)),
                        (4, 32, 32), 1024)
    assert not torch.equal(flux1.sigmas, draw.sigmas)  # FLUX.1's rule is another grid


# ----- a CFG-baked run and its files ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Three CFG-baked steps on the tiny klein; the live set exported in every layout. Returns (trainer, the
    base's weights, the exported files by layout)."""
    from distill.lora_export import export_lora

    tmp = tmp_path_factory.mktemp("klein")
    model = base_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = config(tmp, targets="flux2", steps=3, checkpoint_every=0, cfg_scale=W, dynamic_shift_prob=0.5,
                 export_set="live", export_formats=("ours", "kohya", "diffusers"), batch_size=2)
    trainer = Trainer(cfg, model, klein_cache(tmp), device="cpu")
    assert trainer.scfm.dynamic_shift == "empirical" and trainer.scfm.cfg_scale == W
    trainer.run()
    files = export_lora(trainer.model, cfg)
    layouts = {"ours": "-scfm-only", "kohya": "-kohya"}
    by_layout = {k: next(f for f in files if f.stem.endswith(v)) for k, v in layouts.items()}
    by_layout["diffusers"] = next(f for f in files if f.stem == "scfm-lora-live")
    return trainer, base, by_layout


def live_velocity(trainer, x, sigma, cond) -> torch.Tensor:
    with torch.no_grad(), weight_set(trainer.model, "live"):
        return Flux2Velocity(trainer.model)(x, sigma, cond)


def probe():
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 4, 6, 4, generator=g), torch.tensor([0.8, 0.35]), klein_text(["a red circle", "a tree"])


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def diffusers_klein(base: dict):
    """diffusers' Flux2KleinPipeline around a Flux2Transformer2DModel holding `base` (the other parts unused)."""
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    from weights.families.flux2 import config_to_diffusers
    from weights.transformer import transformer_state_dict

    plain = Flux2(TINY)
    plain.load_state_dict(base)
    ref = Flux2Transformer2DModel(**{k: v for k, v in config_to_diffusers(TINY).items() if k[0] != "_"})
    ref.load_state_dict(transformer_state_dict(plain, "diffusers"), strict=True)
    return Flux2KleinPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=ref.eval())


def diffusers_velocity(transformer, x, sigma, cond) -> torch.Tensor:
    b, c, h, w = x.shape
    with torch.no_grad():
        out = transformer(hidden_states=x.flatten(2).transpose(1, 2), encoder_hidden_states=cond["txt"], timestep=sigma,
                          img_ids=flux2_image_ids(h, w), txt_ids=flux2_text_ids(cond["txt"].shape[1]),
                          return_dict=False)[0]
    return out.transpose(1, 2).reshape(b, c, h, w)


def test_the_main_file_loads_in_diffusers_and_generate_to_the_trainers_velocity(run, tmp_path):
    from test_sd3_lora_files import peft_keys

    from weights.transformer import load_flux2, save_transformer

    trainer, base, files = run
    x, sigma, cond = probe()
    want = live_velocity(trainer, x, sigma, cond)
    pipe = diffusers_klein(base)
    plain = diffusers_velocity(pipe.transformer, x, sigma, cond)
    pipe.load_lora_weights(str(files["diffusers"]))
    keys = set(load_file(files["diffusers"]))
    assert "transformer.norm_out.linear.lora_B.weight" in keys and not any(k.endswith(".alpha") for k in keys)
    assert peft_keys(pipe.transformer) == {k.removeprefix("transformer.") for k in keys}  # none missing or unexpected
    theirs = diffusers_velocity(pipe.transformer, x, sigma, cond)
    assert rel(theirs, want) <= 1e-5 and rel(plain, want) > 1e-3  # the LoRA matters, and diffusers applies it all

    model = Flux2(TINY)
    model.load_state_dict(base)
    merged = load_flux2(save_transformer(model, tmp_path / "flux-2-klein-base-tiny.safetensors"),
                        loras=[(files["diffusers"], 1.0)])  # as `generate --lora` reads it
    with torch.no_grad():
        assert rel(Flux2Velocity(merged)(x, sigma, cond), want) <= 1e-5


def test_the_kohya_file_is_what_comfyui_loads_key_for_key(run):
    from comfyui_lora import assert_comfyui_merge_is_ours

    trainer, base, files = run
    sd = load_file(files["kohya"])
    assert {"lora_unet_final_layer_adaLN_modulation_1.alpha", "lora_unet_double_stream_modulation_img_lin.alpha",
            "lora_unet_single_blocks_0_linear1.lora_down.weight"} <= set(sd)
    plain = Flux2(TINY)
    plain.load_state_dict(base)
    assert_comfyui_merge_is_ours(plain, "flux2", files["kohya"], strength=0.8)


def test_comfyui_loads_the_main_file_but_for_five_layers(run):
    """Why ComfyUI users take `-kohya` (README, "Distil klein base"): ComfyUI's map of diffusers' FLUX.2 names has
    no time embedding and no shared modulations, so the main file loses exactly those layers there (its console's
    "lora key not loaded"); every layer it does load is patched as we merge it."""
    import copy

    from comfyui_lora import key_map, load_lora, patch

    from weights.lora_merge import apply_loras

    _, base, files = run
    plain = Flux2(TINY)
    plain.load_state_dict(base)
    weights = dict(plain.state_dict())
    patches, not_loaded = load_lora(load_file(files["diffusers"]), key_map("flux2", TINY, weights))
    lost = {k.split(".lora_")[0].removeprefix("transformer.") for k in not_loaded}
    assert lost == {"time_guidance_embed.timestep_embedder.linear_1", "time_guidance_embed.timestep_embedder.linear_2",
                    "double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
                    "single_stream_modulation.linear"}
    patched, skipped = patch(weights, patches, 1.0)
    assert not skipped and "final_layer.adaLN_modulation.1.weight" in patched and "img_in.weight" in patched
    ours = copy.deepcopy(plain)
    apply_loras(ours, [(files["diffusers"], 1.0)])
    merged = ours.state_dict()
    for name, want in patched.items():
        delta = (want - weights[name]).abs().max()
        assert (merged[name] - want).abs().max() <= 1e-5 * delta, name


def test_what_diffusers_makes_of_the_bfl_named_files(run, tmp_path):
    """Why the main file is the PEFT one (README, "Distil klein base"): diffusers 0.42.1 reads a `diffusion_model.`
    (ai-toolkit) file's final_layer.adaLN_modulation.1 into norm_out.linear without swapping its shift and scale
    halves, and its kohya FLUX.2 converter drops the modulation and guidance layers (with a warning)."""
    from diffusers import Flux2KleinPipeline

    from weights.keymaps import swap_halves
    from weights.lora import read_lora

    _, _, files = run
    lora = read_lora(files["ours"])
    bfl = {}
    for name, mod in lora.modules.items():  # ai-toolkit's layout: BFL names, lora_A / B, alpha folded into B
        down, up, alpha = (torch.cat([p.down for p in mod.parts]),
                           torch.block_diag(*[p.up for p in mod.parts]), mod.parts[0].alpha)
        bfl[f"diffusion_model.{name}.lora_A.weight"] = down
        bfl[f"diffusion_model.{name}.lora_B.weight"] = up * (alpha / mod.parts[0].up.shape[1])
    save_file(bfl, tmp_path / "ai-toolkit.safetensors")
    converted = Flux2KleinPipeline.lora_state_dict(str(tmp_path / "ai-toolkit.safetensors"))
    peft = load_file(files["diffusers"])
    b = "transformer.norm_out.linear.lora_B.weight"
    right = bfl["diffusion_model.final_layer.adaLN_modulation.1.lora_B.weight"]
    assert torch.equal(peft[b], swap_halves(right))  # ours: diffusers' order, [scale, shift]
    assert torch.equal(converted[b], right) and not torch.equal(right, swap_halves(right))  # theirs: BFL's order
    kohya = Flux2KleinPipeline.lora_state_dict(str(files["kohya"]))
    dropped = {k.split(".lora_")[0] for k in peft} - {k.split(".lora_")[0] for k in kohya}
    assert {"transformer.double_stream_modulation_img.linear", "transformer.norm_out.linear"} <= dropped


def test_convert_between_the_layouts_and_merge_into_bfl_and_diffusers_checkpoints(run, tmp_path):
    from tools.convert import main as convert
    from weights.lora import read_lora
    from weights.lora_merge import apply_loras
    from weights.transformer import load_flux2, save_transformer

    _, base, files = run
    model = Flux2(TINY)
    model.load_state_dict(base)
    bfl = save_transformer(model, tmp_path / "base.safetensors")
    src = files["ours"]
    for i, layout in enumerate(("kohya", "diffusers", "ours")):
        assert convert(["lora", str(src), str(tmp_path / f"{i}.safetensors"), "--to", layout]) == 0
        src = tmp_path / f"{i}.safetensors"
    a, b = read_lora(files["ours"]), read_lora(src)
    assert a.family == b.family == "flux2" and a.modules.keys() == b.modules.keys()
    for m, mod in a.modules.items():
        torch.testing.assert_close(b.modules[m].delta(), mod.delta(), rtol=1e-5, atol=1e-7, msg=m)
    expected = copy.deepcopy(model)
    apply_loras(expected, [(files["diffusers"], 0.7)])
    assert convert(["merge", "--base", str(bfl), "--lora", f"{files['diffusers']}:0.7", "--out",
                    str(tmp_path / "merged.safetensors")]) == 0
    assert convert(["checkpoint", str(bfl), str(tmp_path / "base-d"), "--to", "diffusers"]) == 0
    assert convert(["merge", "--base", str(tmp_path / "base-d"), "--lora", f"{files['kohya']}:0.7", "--out",
                    str(tmp_path / "merged-d")]) == 0
    for merged in (tmp_path / "merged.safetensors", tmp_path / "merged-d"):
        got = load_flux2(merged).state_dict()
        for k, v in expected.state_dict().items():
            torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7, msg=k)


def test_a_killed_cfg_baked_run_resumes_to_the_uninterrupted_one(tmp_path):
    cache = klein_cache(tmp_path)
    kw = dict(targets="flux2", steps=4, checkpoint_every=2, cfg_scale=W, dynamic_shift_prob=0.5,
              lr_schedule="cosine", sample_every=0)
    whole = Trainer(config(tmp_path, "whole", **kw), base_model(), cache, device="cpu")
    whole.run()
    cfg = config(tmp_path, "killed", **kw)
    with pytest.raises(Kill):
        Trainer(cfg, base_model(), cache, device="cpu", on_step=kill_at(3)).run()
    resumed = Trainer(cfg.replace(resume=True), base_model(), cache, device="cpu")
    resumed.run()
    assert resumed.progress.step == 4
    assert_same(state(resumed), state(whole))


def test_the_klein_recipe_trains_with_its_cfg_and_shift_range(tmp_path):
    from distill.config import DistillConfig
    from distill.config_files import build_config, load_toml

    preset = load_toml("flux2-klein-4b-scfm")
    assert (preset["targets"], preset["cfg_scale"], preset["t5_length"]) == ("flux2", 3.0, 512)
    assert (preset["rank"], preset["lr"], preset["t_skip"], preset["teacher_ratio"]) == (64, 2e-5, 2, 0.4)
    assert build_config("flux2-klein-4b-scfm") == DistillConfig().replace(**preset)
    # the fixed shifts cover what klein samples 512 px with, from 32 steps down to 4 (docs/flux2.md §4)
    for steps in (32, 4):
        assert preset["shift_min"] < math.exp(empirical_mu(1024, steps)) < preset["shift_max"]
    assert preset["shift_min"] < preset["sample_shift"] < preset["shift_max"]
    scfm = {k: preset[k] for k in ("t_skip", "teacher_steps_min", "teacher_steps_max", "teacher_ratio", "shift_min",
                                   "shift_max", "cfg_scale", "dynamic_shift_prob")}
    trainer = Trainer(config(tmp_path, targets="flux2", steps=1, checkpoint_every=0, sample_every=0, **scfm),
                      base_model(), klein_cache(tmp_path), device="cpu")
    assert trainer.negative is not None and trainer.scfm.dynamic_shift == "empirical"
    trainer.run()
    assert trainer.progress.updates == 1


def test_readme_klein_lines_sample_the_scfm_grid_in_diffusers():
    """README's diffusers lines for a klein SCFM LoRA, run as Flux2KleinPipeline.__call__ sets its timesteps (its
    own sigmas and the empirical mu, which a fixed shift ignores): the SCFM grid at the recipe's shift."""
    import re
    from pathlib import Path

    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps
    from test_lora_everywhere import FLUX_DEV_SCHEDULER

    from distill.config_files import load_toml
    from sampling.schedules import SCFM_FIRST_SIGMA, ScheduleConfig, get_sigmas

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme[readme.index("Flux2KleinPipeline.from_pretrained"):]
    kwargs = re.search(r"FlowMatchEulerDiscreteScheduler\.from_config\(pipe\.scheduler\.config, ([^)]*)\)", block)[1]
    steps = int(re.search(r"num_inference_steps=(\d+)", block)[1])
    assert float(re.search(r"guidance_scale=([\d.]+)", block)[1]) == 1 + load_toml("flux2-klein-4b-scfm")["cfg_scale"]
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(FLUX_DEV_SCHEDULER, **eval(f"dict({kwargs})"))
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps),
                       mu=compute_empirical_mu(4096, steps))
    ours = get_sigmas(ScheduleConfig(grid="scfm", shift=load_toml("flux2-klein-4b-scfm")["sample_shift"]), steps)
    theirs = scheduler.sigmas.float()
    torch.testing.assert_close(theirs[1:], ours[1:], rtol=0, atol=1e-6)
    assert (theirs[0].item(), ours[0].item()) == (1.0, torch.tensor(SCFM_FIRST_SIGMA).item())


def test_the_trainer_draws_on_the_image_tokens_klein_has(tmp_path, monkeypatch):
    """One token per latent pixel (token_side 1): the dynamic shift's token count is h * w, not FLUX.1's h/2 * w/2."""
    import distill.trainer

    seen = []

    def recording(config_, generators, shape, image_tokens, **kw):
        seen.append((tuple(shape), image_tokens))
        return sample_draw(config_, generators, shape, image_tokens, **kw)

    monkeypatch.setattr(distill.trainer, "sample_draw", recording)
    trainer = Trainer(config(tmp_path, targets="flux2", steps=1, checkpoint_every=0, sample_every=0),
                      base_model(), klein_cache(tmp_path), device="cpu")
    trainer.run()
    (shape, tokens), = seen
    assert shape == (4, 8, 8) and tokens == 64  # 512 px through the fake VAE's 64x pooling: 8 x 8 tokens


def test_block_swap_and_fp8_base_train_klein_as_they_train_flux1(tmp_path):
    """--blocks_to_swap moves where klein's frozen weights wait, not one bit of the run; --fp8_base stores its
    blocks' Linears in e4m3 and trains."""
    from conftest import assert_same_bits

    cache = klein_cache(tmp_path)
    runs = {}
    for n in (0, 1):  # one of its two blocks
        t = Trainer(config(tmp_path, f"swap{n}", targets="flux2", steps=2, checkpoint_every=0, sample_every=0,
                           cfg_scale=W, gradient_checkpointing=True, blocks_to_swap=n), base_model(), cache)
        t.run()
        runs[n] = state(t)
        if n:  # the swapped blocks' base weights stay the host tensors
            assert t.model.block_swap.copies > 0
    assert_same_bits(runs[1], runs[0])
    t = Trainer(config(tmp_path, "fp8", targets="flux2", steps=2, checkpoint_every=0, sample_every=0, cfg_scale=W,
                       fp8_base=True), base_model(), cache)
    t.run()
    assert t.model.get_parameter("single_blocks.0.linear1.weight").dtype == torch.float8_e4m3fn
    assert all(torch.isfinite(v).all() for v in set_state_dict(t.model, "live").values())


def test_the_text_length_defaults_to_what_each_familys_pipelines_give(tmp_path):
    """No --t5_length: klein trains on the 512 Qwen3 tokens its pipelines always give the transformer (not FLUX.1's
    recipe length, 256); another length for klein is warned about, and FLUX.1 / SD3.5 keep the recipe's 256."""
    import warnings

    from distill.config_files import build_config
    from distill.run_setup import with_text_length
    from weights.families import get_family

    cfg = build_config(None, {"model": "tiny-flux2", "targets": "flux2"})
    assert cfg.t5_length == 0
    assert with_text_length(cfg, get_family("flux2")).t5_length == 512
    for name in ("flux", "sd3"):
        assert with_text_length(cfg, get_family(name)).t5_length == 256
    with pytest.warns(UserWarning, match="t5_length 300: every FLUX.2 .* 512"):
        assert with_text_length(cfg.replace(t5_length=300), get_family("flux2")).t5_length == 300
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert with_text_length(cfg.replace(t5_length=300), get_family("flux")).t5_length == 300
    trainer = Trainer(config(tmp_path, targets="flux2", steps=1, t5_length=0), base_model(), klein_cache(tmp_path),
                      device="cpu")
    assert trainer.config.t5_length == 512  # what the export records as the LoRA's sequence length
