"""SCFM for SD3.5 (distill/ with the MMDiT): the CFG target and loss against explicit cond / uncond calls, the
SAI-named LoRA targets against the released diffusers list, a tiny training run with CFG, the EMA restart, the
preset, and the exported LoRA read back in every layout."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from test_data import write_images

from distill.config import DistillConfig
from distill.config_files import build_config, load_toml
from distill.data import build_cache, plan_cache
from distill.lora import (
    SD3_TARGETS,
    LoRAConfig,
    LoRAConv2d,
    inject_lora,
    load_set,
    lora_layers,
    set_state_dict,
    weight_set,
)
from distill.scfm import SCFM_CONFIGS, element_generators, sample_draw, scfm_loss
from distill.trainer import Trainer, TrainingError
from model.mmdit import MMDIT_CONFIGS, MMDiT
from sampling.velocity import MMDiTVelocity
from weights.keymaps.mmdit import mmdit_rules

TINY = MMDIT_CONFIGS["tiny"]  # 16 latent channels, width 32, context 32, pooled 24, dual blocks 0 and 1
W = 3.5  # the recipe's w of c + w (c - u)


def sd3_cond(prompts: list[str]) -> dict[str, torch.Tensor]:
    """prompts -> {"context": (B, 5, 32), "pooled": (B, 24)}: a fixed function of each prompt."""
    context, pooled = [], []
    for p in prompts:
        g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(p.encode()).digest()[:7], "little"))
        context.append(torch.randn(5, TINY.context_in_dim, generator=g))
        pooled.append(torch.randn(TINY.adm_in_channels, generator=g))
    return {"context": torch.stack(context), "pooled": torch.stack(pooled)}


def fake_vae(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 512, 512) -> (B, 16, 8, 8): pooled by 64, mixed to 16 channels by a fixed matrix."""
    mix = torch.linspace(-1, 1, 48).view(16, 3)
    return torch.einsum("ck,bkhw->bchw", mix, F.avg_pool2d(images * 2 - 1, 64)) * 1.5


def sd3_cache(tmp_path):
    data = tmp_path / "data"
    write_images(data, [((512, 512), "a red circle"), ((512, 512), "a blue square"), ((512, 512), "a tree")])
    plan = plan_cache(data, {"t5_length": 5, "resolution": 512}, 512, ("a sample",), shard_size=2,
                      cond_names=("context", "pooled"), negative_prompt="")
    return build_cache(tmp_path / "cache", plan, lambda: sd3_cond, lambda: fake_vae, progress=False)


def student(seed: int = 0, rank: int = 4) -> MMDiT:
    """A tiny SD3.5 (default init: a smooth field) with the SD3 LoRA and distinct random live / fast / slow
    sets (teacher = the base)."""
    torch.manual_seed(seed)
    model = MMDiT(TINY).eval()
    lora = LoRAConfig(rank=rank, alpha=2.0 * rank, targets=SD3_TARGETS)
    inject_lora(model, lora, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    for name in ("live", "fast_ema", "slow_ema"):
        load_set(model, name, {k: torch.randn(v.shape, generator=g) * 0.1
                               for k, v in set_state_dict(model, "live").items()})
    return model


# ----- the objective with CFG against explicit calls --------------------------------------------------------


def explicit_guided(model, x, sigma, cond, uncond) -> torch.Tensor:
    """c + w (c - u) for one element with two plain MMDiT calls (timestep sigma * 1000), no wrapper."""
    t = (sigma * 1000).view(1)
    c = model(x, t, cond["pooled"], cond["context"])
    u = model(x, t, uncond["pooled"], uncond["context"])
    return c + W * (c - u)


def test_cfg_target_and_student_equal_explicit_cond_uncond_calls_with_gradient_through_both():
    config = SCFM_CONFIGS["sd3.5"]
    assert config.cfg_scale == W and config.guidance_max is None
    model = student()
    b = 4
    draw = sample_draw(config, element_generators(3, 0, range(b)), (16, 8, 8), 16)
    assert 0 < int(draw.teacher.sum()) < b  # both kinds of first jump
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(b, 16, 8, 8, generator=g)
    cond = sd3_cond([f"prompt {i}" for i in range(b)])
    uncond = {k: v.expand(b, *v.shape[1:]) for k, v in sd3_cond([""]).items()}
    out = scfm_loss(MMDiTVelocity(model), model, x0, cond, draw, config, uncond=uncond)
    out.loss.backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    sigmas, dt = draw.sigmas.float(), draw.dt.float()  # the same fp32 casts scfm.py makes
    big_dt = draw.big_dt.float()
    losses = []
    for i in range(b):
        c = {k: v[i:i + 1] for k, v in cond.items()}
        u = {k: v[i:i + 1] for k, v in uncond.items()}
        x = ((1 - sigmas[i, 0]) * x0[i:i + 1] + sigmas[i, 0] * draw.noise[i:i + 1])
        travelled = torch.zeros_like(x)
        with torch.no_grad():
            for j in range(config.t_skip):
                first = "teacher" if draw.teacher[i] else "fast_ema"
                name = first if j < config.t_skip // 2 else "slow_ema"
                with weight_set(model, name):
                    travelled += dt[i, j] * explicit_guided(model, x - travelled, sigmas[i, j], c, u)
        target = travelled / big_dt[i]
        # fp32 both ways (batched vs one element): each was measured within 1.6e-6 of max of an fp64 reference
        tol = dict(rtol=1e-5, atol=1e-5 * target.abs().max().item())
        torch.testing.assert_close(out.target[i:i + 1], target, **tol)
        pred = explicit_guided(model, x, sigmas[i, 0], c, u)  # live set, with gradient through c and u
        losses.append((pred - target).pow(2).mean())
    reference = torch.stack(losses).mean()
    torch.testing.assert_close(out.loss, reference.detach(), rtol=1e-5, atol=0)
    reference.backward()
    for n, grad in ours_grads.items():
        torch.testing.assert_close(grad, model.get_parameter(n).grad, rtol=1e-4,
                                   atol=1e-6 * grad.abs().max().item(), msg=n)
    # the uncond branch carries gradient too: w (c - u) is no constant offset
    assert ours_grads["x_embedder.proj.lora_up.live"].abs().max() > 0


def test_sd3_targets_on_the_real_mmdit_are_what_peft_wraps_for_the_released_list():
    from diffusers import SD3Transformer2DModel
    from mmdit_fixtures import DIFFUSERS_KWARGS
    from peft import LoraConfig as PeftConfig
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from test_lora import RELEASED_SD3

    model = MMDiT(TINY)
    names = inject_lora(model, LoRAConfig(targets=SD3_TARGETS))
    assert isinstance(model.x_embedder.proj, LoRAConv2d)
    table = mmdit_rules(TINY.depth, TINY.dual_attention_layers, True, modules=True)
    rules = {r.official: r.others for r in table}
    ref = SD3Transformer2DModel(**DIFFUSERS_KWARGS["sd3.5"])
    inject_adapter_in_model(PeftConfig(r=2, lora_alpha=2, target_modules=RELEASED_SD3), ref)
    wrapped = {n for n, m in ref.named_modules() if isinstance(m, BaseTunerLayer)}
    assert {d for n in names for d in rules[n]} == wrapped


# ----- training with CFG ------------------------------------------------------------------------------------


def config(tmp_path, **kw) -> DistillConfig:
    base = dict(model="tiny-sd3", targets="sd3", cfg_scale=W, dynamic_shift_prob=0.0, max_grad_norm=2.0,
                output=str(tmp_path / "run"), cache=str(tmp_path / "cache"), dtype="fp32", autocast=False,
                gradient_checkpointing=False, device="cpu", rank=8, alpha=8.0, batch_size=4, steps=12,
                lr=3e-3, checkpoint_every=0, log_every=1, t5_length=5, sample_every=12, sample_size=512,
                sample_steps=2)  # fake_vae's 64 px per latent pixel: 8 x 8 sample latents
    return DistillConfig.from_flat(**{**base, **kw})


def test_a_few_sd3_scfm_steps_with_cfg_lower_the_loss_restart_the_emas_and_export(tmp_path):
    from distill.lora_export import export_lora
    from weights.io import read_header
    from weights.lora import read_lora

    cache = sd3_cache(tmp_path)
    assert cache.negative_cond()["context"].shape == (1, 5, 32)  # the empty prompt, embedded once
    # 25 steps end right after a restart (updates 9, 17, 25), so the held-out targets' EMAs equal live
    cfg = config(tmp_path, ema_restart_every=8, steps=25, sample_every=25)
    torch.manual_seed(0)
    restarts = []

    def on_step(step):
        if step % 8 == 1:  # after updates R + 1, 2R + 1, ... (the released timing) both EMAs equal live
            live = set_state_dict(t.model, "live")
            restarts.append(all(torch.equal(set_state_dict(t.model, s)[k], v)
                                for s in ("fast_ema", "slow_ema") for k, v in live.items()))

    t = Trainer(cfg, MMDiT(TINY), cache, device="cpu", on_step=on_step)
    assert t.scfm.cfg_scale == W and t.scfm.guidance_max is None
    x0, cond = cache.load([0, 1, 2, 0, 1, 2])
    draw = sample_draw(t.scfm, element_generators(99, 0, range(6)), x0.shape[1:], 16)

    def held_out() -> float:
        with torch.no_grad():
            return scfm_loss(t.velocity, t.model, x0, cond, draw, t.scfm, uncond=t.uncond(6)).loss.item()

    before = held_out()
    t.run()
    after = held_out()
    # seed 0's held-out loss falls to 0.74 of its start (seeds 1, 2: 0.94, 0.75; the CFG target moves with the
    # EMAs), so 0.9 leaves room without accepting a run that does not learn
    assert after < 0.9 * before, (before, after)
    assert restarts == [False, True, True, True]  # step 1 is a plain update
    assert (tmp_path / "run" / "samples" / "step-000025.safetensors").exists()  # sampled with CFG 1 + w

    paths = export_lora(t.model, cfg)
    layers = lora_layers(t.model)
    for path in paths:
        lora = read_lora(path)
        assert lora.family == "sd3" and set(lora.modules) == set(layers), path.name
        rec = lora.recommended
        assert (rec.guidance, rec.training_cfg_scale, rec.schedule) == (1 + W, W, "scfm")
        for name, layer in layers.items():
            expected = layer.delta_weight("live")
            torch.testing.assert_close(lora.modules[name].delta(), expected, rtol=1e-6,
                                       atol=1e-7 * expected.abs().max().item(), msg=f"{path.name}: {name}")
    training = json.loads(read_header(paths[0])[1]["scfm_training"])
    assert training["cfg"] == {"w": W, "formula": "cond + w * (cond - uncond)", "negative_prompt": "",
                               "diffusers_guidance_scale": 1 + W}
    from test_export import assert_same_files

    from distill.lora_export import export_checkpoint

    for a, b in zip(paths, export_checkpoint(cfg.output), strict=True):  # the MMDiT rebuilt from the checkpoint
        assert_same_files(a, b)


def test_preset_and_refusals(tmp_path):
    preset = load_toml("sd35-large-scfm")
    assert (preset["cfg_scale"], preset["ema_restart_every"], preset["max_grad_norm"]) == (3.5, 2000, 2.0)
    assert (preset["targets"], preset["dynamic_shift_prob"]) == ("sd3", 0.0)
    assert (preset["rank"], preset["lr"], preset["t_skip"], preset["teacher_ratio"]) == (64, 2e-5, 2, 0.4)
    assert build_config("sd35-large-scfm").batch_size == 8
    cache = sd3_cache(tmp_path)
    with pytest.raises(TrainingError, match="--targets sd3"):
        Trainer(config(tmp_path, targets="flux"), MMDiT(TINY), cache)
    from model.flux import FLUX_CONFIGS, Flux

    with pytest.raises(TrainingError, match="cfg_scale bakes in classifier-free guidance, which FLUX.1 does not"):
        Trainer(config(tmp_path, targets="flux"), Flux(FLUX_CONFIGS["tiny"]), cache)


def test_teacher_only_target_equals_two_cfg_euler_substeps_of_diffusers_transformer():
    """Zero LoRA, teacher elements only: the SCFM target is two CFG Euler sub-steps of the base model, here
    computed independently with diffusers' SD3Transformer2DModel holding the same weights (issue 8)."""
    import dataclasses

    from mmdit_fixtures import ours_from, tiny_diffusers_mmdit

    from distill.scfm import cfg_velocity, shortcut_target

    ref = tiny_diffusers_mmdit("sd3.5", 0.02, seed=5)
    model = ours_from(ref, TINY)
    inject_lora(model, LoRAConfig(rank=4, targets=SD3_TARGETS), torch.Generator().manual_seed(0))  # up = 0
    config = dataclasses.replace(SCFM_CONFIGS["sd3.5"], teacher_ratio=1.0)
    batch = 3
    draw = sample_draw(config, element_generators(7, 1, range(batch)), (TINY.in_channels, 8, 8), image_tokens=16)
    assert bool(draw.teacher.all())
    cond, uncond = sd3_cond(["a red circle", "a blue square", "a tree"]), sd3_cond([""] * batch)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(batch, TINY.in_channels, 8, 8, generator=g)
    sigma = draw.sigma.float().view(-1, 1, 1, 1)
    x_sigma = sigma * draw.noise + (1 - sigma) * x0

    with torch.no_grad():
        target = shortcut_target(cfg_velocity(MMDiTVelocity(model), W, uncond), model, x_sigma, draw, cond)
        x = x_sigma.clone()
        for j in range(config.t_skip):
            t = draw.sigmas[:, j].float() * 1000
            c = ref(hidden_states=x, timestep=t, encoder_hidden_states=cond["context"],
                    pooled_projections=cond["pooled"]).sample
            u = ref(hidden_states=x, timestep=t, encoder_hidden_states=uncond["context"],
                    pooled_projections=uncond["pooled"]).sample
            x = x - draw.dt[:, j].float().view(-1, 1, 1, 1) * (c + W * (c - u))
        expected = (x_sigma - x) / draw.big_dt.float().view(-1, 1, 1, 1)
    scale = expected.abs().max().item()
    assert scale > 0.1
    torch.testing.assert_close(target, expected, rtol=1e-4, atol=1e-5 * max(1.0, scale))


def test_make_dataset_renders_with_the_teacher_the_recipe_trains_against():
    """The SD3.5 recipe bakes in c + w (c - u) with w = cfg_scale; make_dataset's default teacher must be that one,
    diffusers' CFG w + 1 (it rendered at CFG 3.5, i.e. w = 2.5, a weaker teacher than the one trained against)."""
    from sampling.sd3 import SD3Pipeline

    assert SD3Pipeline.teacher_defaults["guidance"] == build_config("sd35-large-scfm").scfm.cfg_scale + 1
