"""The SCFM objective (distill/scfm.py): sampler statistics, the shortcut target against an explicit reference
that swaps weights into a copy of the model, and a tiny overfit run."""

import copy
import math

import pytest
import torch
from conftest import randomize_
from flux_fixtures import tiny_inputs

from distill.ema import EMAConfig, ema_step
from distill.lora import LoRAConfig, inject_lora, load_set, lora_layers, set_state_dict, weight_set
from distill.scfm import (
    SCFM_CONFIGS,
    SCFMConfig,
    element_generators,
    sample_draw,
    scfm_loss,
    shortcut_target,
)
from model.flux import FLUX_CONFIGS, Flux, FluxConfig

SETS4 = ("live", "fast_ema", "slow_ema", "teacher")


def draw_for(config: SCFMConfig, n: int, seed: int = 0, step: int = 0, shape=(1,), tokens: int = 1024):
    return sample_draw(config, element_generators(seed, step, range(n)), shape, tokens)


# ----- the schedule sampler ---------------------------------------------------------------------------------


def test_sampler_statistics():
    config = SCFMConfig()
    n = 4000
    d = draw_for(config, n)
    teacher = d.teacher
    assert abs(teacher.float().mean().item() - 0.4) < 0.035  # 4.5 sigma of a binomial mean at n = 4000
    assert set(d.steps[teacher].tolist()) == {32}
    self_steps = d.steps[~teacher]
    assert set(self_steps.tolist()) == {2, 4, 8, 16}
    for size in (2, 4, 8, 16):
        assert abs((self_steps == size).float().mean().item() - 0.25) < 0.04
    assert abs(d.dynamic.float().mean().item() - 0.1) < 0.025
    fixed = d.shift[~d.dynamic]
    assert fixed.min() >= 2.5 and fixed.max() < 4.5 and abs(fixed.mean().item() - 3.5) < 0.05
    assert (d.start % 2 == 0).all() and (d.start + 2 <= d.steps).all() and (d.start >= 0).all()
    # start index uniform over {0, 2, ..., N - 2}: on the 32-step grid, about a 16th at each
    t_start = d.start[teacher]
    assert abs((t_start == 0).float().mean().item() - 1 / 16) < 0.03 and t_start.max() == 30
    torch.testing.assert_close(d.big_dt, d.dt.sum(dim=1), rtol=0, atol=1e-15)
    assert (d.dt > 0).all() and (d.sigma > 0).all() and (d.sigma < 1).all()
    assert (d.sigma[d.start == 0] == 1 - 1e-5).all()
    assert d.guidance.min() >= 0 and d.guidance.max() < 7.5 and abs(d.guidance.mean().item() - 3.75) < 0.15
    assert d.shortcut.all() and d.noise.shape == (n, 1)


def test_grid_values_fixed_and_dynamic_shift():
    config = SCFMConfig()
    d = draw_for(config, 300, tokens=1024)
    for b in range(300):
        n, i, k = d.steps[b].item(), d.start[b].item(), d.shift[b].item()
        s = torch.linspace(1, 0, n + 1, dtype=torch.float64)
        if d.dynamic[b]:
            mu = 0.5 + 0.65 * (1024 - 256) / 3840
            s[1:-1] = math.exp(mu) / (math.exp(mu) + (1 / s[1:-1] - 1))
        else:
            s = k * s / (1 + (k - 1) * s)
        s[0] = 1 - 1e-5
        torch.testing.assert_close(d.sigmas[b], s[i:i + 3], rtol=0, atol=1e-15)


@pytest.mark.parametrize("shift", [2.5, 3.0, 4.2])
def test_the_grid_a_lora_is_trained_on_is_the_grid_generate_samples_it_on(shift, tmp_path):
    """Draws at a fixed shift k come from the grid `generate` picks for a LoRA whose hints say shift k, bit for
    bit once rounded to float32 (the sampler's dtype): one function makes both (sampling/schedules.py)."""
    from safetensors.torch import save_file

    from distill.demo.models import demo_pipeline
    from sampling.flags import build_parser
    from sampling.job import generation_config, lora_recommendations
    from sampling.schedules import get_sigmas
    from weights.families.flux import FLUX
    from weights.lora import FORMAT

    config = SCFMConfig(shift_min=shift, shift_max=shift, dynamic_shift_prob=0.0, teacher_steps_min=8,
                        teacher_steps_max=8)
    draw = draw_for(config, 64)
    pipe = demo_pipeline()
    for n in config.self_grid_sizes() + config.teacher_grid_sizes():
        path = tmp_path / f"lora-{n}.safetensors"
        save_file({"unused": torch.zeros(1)}, path,
                  metadata={"scfm_format": FORMAT, "scfm_shift": str(shift), "scfm_steps": str(n)})
        args = build_parser().parse_args(["--model", "demo", "--prompt", "a", "--lora", str(path)])
        cfg = generation_config(args, FLUX, lora_recommendations([str(path)]))
        sampled = get_sigmas(pipe.schedule(cfg), cfg.steps, 16)
        assert cfg.grid == "scfm" and cfg.steps == n and sampled.dtype == torch.float32
        rows = [b for b in range(64) if draw.steps[b] == n]
        assert rows, f"no draw with a {n}-step grid"
        for b in rows:
            i = draw.start[b].item()
            assert torch.equal(draw.sigmas[b].float(), sampled[i:i + config.t_skip + 1])


def test_draws_do_not_depend_on_how_the_batch_is_split():
    config = SCFMConfig(non_shortcut_ratio=0.25)
    whole = sample_draw(config, element_generators(7, 3, range(8)), (2, 3), 64)
    gens = element_generators(7, 3, [5, 6, 7])
    part = sample_draw(config, gens, (2, 3), 64, positions=[5, 6, 7], global_batch=8)
    for field in ("teacher", "steps", "dynamic", "shift", "start", "sigmas", "shortcut", "guidance", "noise"):
        assert torch.equal(getattr(whole, field)[5:], getattr(part, field)), field
    assert whole.shortcut.tolist() == [False] * 2 + [True] * 6  # ceil(8 * 0.25) plain elements first
    other_step = sample_draw(config, element_generators(7, 4, range(8)), (2, 3), 64)
    assert not torch.equal(whole.noise, other_step.noise)


def test_config_presets_and_validation():
    assert SCFM_CONFIGS["sd3.5"].dynamic_shift_prob == 0 and SCFM_CONFIGS["sd3.5"].cfg_scale == 3.5
    assert SCFM_CONFIGS["flux-schnell"].guidance_max is None
    assert SCFMConfig().self_grid_sizes() == (2, 4, 8, 16)
    assert SCFMConfig(teacher_steps_min=8, teacher_steps_max=16).teacher_grid_sizes() == (8, 10, 12, 14, 16)
    assert draw_for(SCFM_CONFIGS["flux-schnell"], 3).guidance is None
    with pytest.raises(ValueError):
        SCFMConfig(t_skip=3)


# ----- the shortcut target ----------------------------------------------------------------------------------


def tiny_flux(guidance: bool = True, seed: int = 0) -> Flux:
    cfg = FluxConfig(**{**FLUX_CONFIGS["tiny"].to_dict(), "guidance_embed": guidance})
    return randomize_(Flux(cfg), 0.2, seed).eval().requires_grad_(False)


def flux_velocity(model):
    ids = tiny_inputs(batch=1)  # positions are shared by the batch: not part of the per-element conditioning

    def velocity(x, sigma, cond, guidance):
        return model(x, ids["img_ids"], cond["txt"], ids["txt_ids"], sigma, cond["y"], guidance)

    return velocity


def batch(n: int, seed: int = 1):
    """x0 (B, 24, 16) packed latents and the Flux conditioning, from the shared tiny inputs."""
    parts = [tiny_inputs(batch=2, seed=seed + k) for k in range((n + 1) // 2)]
    x0 = torch.cat([p["img"] for p in parts])[:n]
    cond = {"txt": torch.cat([p["txt"] for p in parts])[:n], "y": torch.cat([p["y"] for p in parts])[:n]}
    return x0, cond


def randomize_sets_(model, seed: int = 0, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    for name in SETS4:
        load_set(model, name, {k: torch.randn(v.shape, generator=g) * std
                               for k, v in set_state_dict(model, "live").items()})


def with_sets(seed: int = 0) -> Flux:
    model = tiny_flux()
    inject_lora(model, LoRAConfig(rank=4, alpha=8.0), torch.Generator().manual_seed(seed))
    randomize_sets_(model, seed)
    return model


def swapped_copy(model, name: str):
    """The released trainer's way: a copy whose live parameters hold set `name` (copied in place)."""
    twin = copy.deepcopy(model)
    for layer in lora_layers(twin).values():
        layer.lora_down["live"].data.copy_(layer.lora_down[name].data)
        layer.lora_up["live"].data.copy_(layer.lora_up[name].data)
    return twin


def one(cond, b):
    return {k: (v[b:b + 1] if k in ("txt", "y") else v) for k, v in cond.items()}


@torch.no_grad()
def reference_target(model, x_sigma, draw, cond):
    """Per element: Euler sub-step 0 with teacher / fast EMA, sub-step 1 with slow EMA; (x - x_2) / Dt."""
    out = []
    for b in range(x_sigma.shape[0]):
        first = swapped_copy(model, "teacher" if draw.teacher[b] else "fast_ema")
        second = swapped_copy(model, "slow_ema")
        s, g = draw.sigmas[b].float(), draw.guidance[b:b + 1]
        x = x_sigma[b:b + 1]
        v0 = flux_velocity(first)(x, s[0:1], one(cond, b), g)
        x1 = x - (s[0] - s[1]) * v0
        v1 = flux_velocity(second)(x1, s[1:2], one(cond, b), g)
        x2 = x1 - (s[1] - s[2]) * v1
        # in fp64 so that the reference's own cancellation in x - x_end does not set the tolerance
        out.append((x.double() - x2.double()) / (draw.sigmas[b, 0] - draw.sigmas[b, 2]))
    return torch.cat(out).float()


def test_target_equals_explicit_weight_swapping_reference():
    model = with_sets()
    x0, cond = batch(6)
    draw = draw_for(SCFMConfig(), 6, seed=3, shape=x0.shape[1:], tokens=24)
    assert draw.teacher.any() and not draw.teacher.all()  # both roles are exercised
    sigma = draw.sigma.float().view(-1, 1, 1)
    x_sigma = (1 - sigma) * x0 + sigma * draw.noise
    ours = shortcut_target(flux_velocity(model), model, x_sigma, draw, cond)
    ref = reference_target(model, x_sigma, draw, cond)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    # each set matters: swapping any one of them moves the target far beyond the tolerance
    for a, b in (("teacher", "fast_ema"), ("fast_ema", "slow_ema"), ("slow_ema", "live")):
        wrong = swapped_copy(model, "live")
        for layer in lora_layers(wrong).values():
            for store in (layer.lora_down, layer.lora_up):
                store[a].data, store[b].data = store[b].data.clone(), store[a].data.clone()
        moved = shortcut_target(flux_velocity(wrong), wrong, x_sigma, draw, cond)
        assert (moved - ref).abs().max() > 100 * 1e-5 * ref.abs().max(), (a, b)


def test_loss_outputs_come_back_in_the_callers_order():
    """scfm_loss runs teacher elements first internally; its per-element losses and targets are the caller's
    elements in the caller's order: per element, the live set's velocity (one element at a time) against the
    explicit weight-swapping reference target, and the loss their mean."""
    model = with_sets()
    x0, cond = batch(6)
    config = SCFMConfig()
    draw = draw_for(config, 6, seed=3, shape=x0.shape[1:], tokens=24)
    teacher = draw.teacher.tolist()
    assert teacher != sorted(teacher, reverse=True)  # not teacher-first already: the loss reorders this batch
    out = scfm_loss(flux_velocity(model), model, x0, cond, draw, config)
    sigma = draw.sigma.float()
    x_sigma = (1 - sigma.view(-1, 1, 1)) * x0 + sigma.view(-1, 1, 1) * draw.noise
    target = reference_target(model, x_sigma, draw, cond)
    torch.testing.assert_close(out.target, target, rtol=1e-4, atol=1e-5 * target.abs().max().item())
    with torch.no_grad(), weight_set(model, "live"):
        pred = torch.cat([flux_velocity(model)(x_sigma[b:b + 1], sigma[b:b + 1], one(cond, b), draw.guidance[b:b + 1])
                          for b in range(6)])
    per_element = (pred - target).pow(2).flatten(1).mean(dim=1)
    torch.testing.assert_close(out.per_element, per_element, rtol=1e-4, atol=0)
    torch.testing.assert_close(out.loss.detach(), per_element.mean(), rtol=1e-4, atol=0)
    internal = torch.argsort((~draw.teacher).to(torch.uint8), stable=True)  # the order the loss computes in
    assert not torch.allclose(per_element[internal], per_element, rtol=1e-2)  # that order would show


@pytest.mark.parametrize("cfg_scale", [None, 3.5], ids=["flux", "cfg"])
def test_zero_lora_teacher_only_target_is_two_base_euler_steps(cfg_scale):
    base = tiny_flux(guidance=cfg_scale is None)
    model = copy.deepcopy(base)
    inject_lora(model, LoRAConfig(rank=4))
    for layer in lora_layers(model).values():  # a non-zero live set, which the target must not use
        torch.nn.init.normal_(layer.lora_up["live"], std=0.5)
    config = SCFMConfig(teacher_ratio=1.0, guidance_max=None if cfg_scale else 7.5, cfg_scale=cfg_scale)
    x0, cond = batch(4)
    uncond = {**cond, "txt": torch.zeros_like(cond["txt"]), "y": torch.zeros_like(cond["y"])}
    draw = draw_for(config, 4, seed=5, shape=x0.shape[1:], tokens=24)
    assert draw.teacher.all()
    plain = flux_velocity(base)

    def v(x, s, c, g):  # the recipe's cond + w (cond - uncond) when CFG is on
        vc = plain(x, s, c, g)
        return vc + cfg_scale * (vc - plain(x, s, uncond, g)) if cfg_scale else vc

    sig = draw.sigmas.float()
    x = (1 - sig[:, :1, None]) * x0 + sig[:, :1, None] * draw.noise
    x1 = x - (sig[:, 0] - sig[:, 1])[:, None, None] * v(x, sig[:, 0], cond, draw.guidance)
    x2 = x1 - (sig[:, 1] - sig[:, 2])[:, None, None] * v(x1, sig[:, 1], cond, draw.guidance)
    expected = (x.double() - x2.double()) / (draw.sigmas[:, 0] - draw.sigmas[:, 2])[:, None, None]
    out = scfm_loss(flux_velocity(model), model, x0, cond, draw, config, uncond=uncond)
    scale = expected.abs().max().item()
    torch.testing.assert_close(out.target, expected.float(), rtol=1e-4, atol=1e-5 * scale)
    out.loss.backward()  # the student's gradient reaches the live set (through both CFG branches when on)
    assert all(layer.lora_up["live"].grad is not None for layer in lora_layers(model).values())


def test_non_shortcut_elements_keep_the_flow_matching_target():
    model = with_sets()
    config = SCFMConfig(non_shortcut_ratio=0.5)
    x0, cond = batch(4)
    draw = draw_for(config, 4, seed=2, shape=x0.shape[1:], tokens=24)
    out = scfm_loss(flux_velocity(model), model, x0, cond, draw, config)
    assert torch.equal(out.target[:2], draw.noise[:2] - x0[:2])
    assert not torch.allclose(out.target[2:], draw.noise[2:] - x0[2:], atol=1e-2)


def test_a_few_steps_lower_the_loss_on_a_tiny_overfit_case():
    model = tiny_flux()
    inject_lora(model, LoRAConfig(rank=8, alpha=8.0), torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    config, ema = SCFMConfig(), EMAConfig()
    x0, cond = batch(4)
    draw = draw_for(config, 4, seed=1, shape=x0.shape[1:], tokens=24)  # one fixed batch: overfit it
    assert draw.teacher.any() and not draw.teacher.all()
    losses = []
    for step in range(1, 9):
        out = scfm_loss(flux_velocity(model), model, x0, cond, draw, config)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        ema_step(model, ema, step)
        losses.append(out.loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses  # about 1.6 -> 0.16 here


def test_gradient_checkpointing_recomputes_with_the_live_set():
    """Backward runs after the set contexts have exited; the recompute must still see the live weights."""
    grads = []
    for checkpointing in (False, True):
        model = with_sets().enable_gradient_checkpointing(checkpointing)
        x0, cond = batch(2)
        draw = draw_for(SCFMConfig(), 2, seed=0, shape=x0.shape[1:], tokens=24)
        scfm_loss(flux_velocity(model), model, x0, cond, draw, SCFMConfig()).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6 * grads[0].abs().max().item())
