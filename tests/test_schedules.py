"""Sigma grids, Euler steps and guidance against diffusers' FlowMatchEulerDiscreteScheduler (docs/models.md §6, §9
rows 14 and 15)."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from sampling.samplers import (
    add_noise,
    cat_cond,
    cfg_scale_from_w,
    euler,
    euler_step,
    flux_guidance,
    sd3_cfg,
    true_cfg,
)
from sampling.schedules import (
    SCFM_FIRST_SIGMA,
    SCHEDULES,
    ScheduleConfig,
    dynamic_mu,
    get_sigmas,
    schedule_for,
)

TOL = 0.0  # the diffusers grid repeats the scheduler's arithmetic, so it is bit-identical (row 14 asks 1e-6)
FORMULA_TOL = 1e-6  # against formulas evaluated independently (BFL's, float64)


def flux_scheduler(dynamic=True):
    if dynamic:
        return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=256, max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)


def flux_pipeline_grid(scheduler, steps, seq_len):
    """What FluxPipeline.__call__ does before its loop."""
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    return scheduler


def assert_grid(ours, scheduler):
    torch.testing.assert_close(ours, scheduler.sigmas, rtol=0, atol=TOL)
    torch.testing.assert_close(ours[:-1] * 1000, scheduler.timesteps, rtol=0, atol=1000 * TOL)
    assert ours.dtype == torch.float32 and ours[-1] == 0


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize("seq_len", [256, 1024, 4096, 6400])
def test_flux_dev_grid(steps, seq_len):
    scheduler = flux_pipeline_grid(flux_scheduler(), steps, seq_len)
    assert_grid(get_sigmas("flux-dev", steps, image_seq_len=seq_len), scheduler)
    assert dynamic_mu(seq_len) == pytest.approx(calculate_shift(seq_len), abs=1e-12)


def test_flux_dev_grid_known_values():
    # docs/models.md §6.1, also equal to BFL get_schedule
    torch.testing.assert_close(get_sigmas("flux-dev", 4, 4096)[:2], torch.tensor([1.0, 0.904531]), rtol=0, atol=1e-6)
    torch.testing.assert_close(get_sigmas("flux-dev", 28, 4096)[:3], torch.tensor([1.0, 0.988409, 0.976222]),
                               rtol=0, atol=1e-6)


def test_bfl_formula():
    # BFL get_schedule: time_shift(mu, 1, linspace(1, 0, N + 1)) with mu from the same line.
    for steps, seq_len in [(4, 1024), (28, 4096), (50, 6400)]:
        mu = dynamic_mu(seq_len)
        t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1]
        bfl = torch.cat([math.exp(mu) / (math.exp(mu) + (1 / t - 1)), torch.zeros(1, dtype=torch.float64)])
        torch.testing.assert_close(get_sigmas("flux-dev", steps, seq_len), bfl.float(), rtol=0, atol=FORMULA_TOL)


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_flux_schnell_grid(steps):
    scheduler = flux_pipeline_grid(flux_scheduler(dynamic=False), steps, 4096)
    ours = get_sigmas("flux-schnell", steps)
    assert_grid(ours, scheduler)
    torch.testing.assert_close(ours, torch.linspace(1, 0, steps + 1))


@pytest.mark.parametrize("steps", [4, 28, 40])
def test_sd3_grid(steps):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)  # StableDiffusion3Pipeline passes neither sigmas nor mu
    ours = get_sigmas("sd3.5", steps)
    assert_grid(ours, scheduler)
    # the double shift at the sigma_min end (docs/models.md §6.2)
    assert ours[-2].item() == pytest.approx(0.008929, abs=1e-6)


def test_sd3_known_values():
    torch.testing.assert_close(get_sigmas("sd3.5", 28)[:3], torch.tensor([1.0, 0.987381, 0.974108]), rtol=0, atol=1e-6)
    torch.testing.assert_close(get_sigmas("sd3.5", 4)[:3], torch.tensor([1.0, 0.857692, 0.602151]), rtol=0, atol=1e-6)


def test_sd3_pipeline_with_dynamic_shift_and_other_fixed_shift():
    # Any scheduler setting on the sd3-style grid, not just the default shift 3.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=2.0)
    scheduler.set_timesteps(10)
    assert_grid(get_sigmas(ScheduleConfig(pipeline="StableDiffusion3Pipeline", shift=2.0), 10), scheduler)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    scheduler.set_timesteps(10, mu=dynamic_mu(2304))
    assert_grid(get_sigmas(ScheduleConfig(pipeline="StableDiffusion3Pipeline", dynamic=True), 10, 2304), scheduler)


@pytest.mark.parametrize("shift", [1.0, 3.0, "dynamic"])
def test_scfm_grid(shift):
    for steps in (1, 3, 8):
        s = get_sigmas(schedule_for("flux-dev", grid="scfm", shift=shift), steps, image_seq_len=4096)
        assert s.shape == (steps + 1,) and s.dtype == torch.float32
        assert s[0].item() == pytest.approx(SCFM_FIRST_SIGMA, abs=1e-7) and s[-1] == 0
        assert (s[1:] < s[:-1]).all()
        s_value = math.exp(dynamic_mu(4096)) if shift == "dynamic" else shift
        base = torch.linspace(1, 0, steps + 1, dtype=torch.float64)[1:]
        torch.testing.assert_close(s[1:], (s_value * base / (1 + (s_value - 1) * base)).float(), rtol=0,
                                   atol=FORMULA_TOL)


def test_schedule_for_and_errors():
    assert schedule_for("sd3.5") == SCHEDULES["sd3.5"]
    assert schedule_for("flux-dev", shift="2.5") == ScheduleConfig(pipeline="FluxPipeline", shift=2.5)
    assert schedule_for("sd3.5", shift="dynamic").dynamic
    with pytest.raises(ValueError, match="image_seq_len"):
        get_sigmas("flux-dev", 4)
    with pytest.raises(ValueError, match="grid"):
        ScheduleConfig(grid="karras")
    with pytest.raises(ValueError, match="number or 'dynamic'"):
        schedule_for("flux-dev", shift="big")
    with pytest.raises(ValueError, match="unknown model"):
        schedule_for("sdxl")


# ----------------------------------------------------------------------------------------------------------------
# steps (row 15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_euler_loop_equals_scheduler_step(dtype):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 16, 8, 8, generator=g).to(dtype)
    target = torch.randn(2, 16, 8, 8, generator=g)

    def velocity(x, sigma, cond, guidance):  # a toy field that depends on x, sigma and cond
        assert sigma.shape == (2,) and sigma.dtype == torch.float32
        return (torch.tanh(x.float()) * sigma[:, None, None, None] - cond).to(dtype)

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(6)
    ref = x0
    for t in scheduler.timesteps:
        v = velocity(ref, (t / 1000).expand(2), target, None)
        ref = scheduler.step(v, t, ref).prev_sample
    seen = []
    ours = euler(velocity, x0, get_sigmas("sd3.5", 6), target, callback=lambda i, n, x: seen.append((i, n)))
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)  # same rounding as diffusers, bit for bit
    assert seen == [(i, 6) for i in range(1, 7)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_step_and_scale_noise(dtype):
    g = torch.Generator().manual_seed(1)
    x, v, noise = (torch.randn(3, 4, 6, 6, generator=g).to(dtype) for _ in range(3))
    scheduler = flux_pipeline_grid(flux_scheduler(), 4, 1024)
    sigmas = get_sigmas("flux-dev", 4, 1024)
    for i, t in enumerate(scheduler.timesteps):
        scheduler._step_index = i
        torch.testing.assert_close(euler_step(x, v, sigmas[i], sigmas[i + 1]), scheduler.step(v, t, x).prev_sample,
                                   rtol=0, atol=0)
    scheduler._step_index = None
    t = scheduler.timesteps[[1, 2, 3]]
    ref = scheduler.scale_noise(x, t, noise)
    torch.testing.assert_close(add_noise(x, noise, sigmas[[1, 2, 3]]), ref, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# guidance


def toy_velocity(calls):
    def velocity(x, sigma, cond, guidance):
        calls.append((x.shape[0], cond, guidance))
        return x * cond["s"][:, None] + sigma[:, None] + (0 if guidance is None else guidance[:, None])
    return velocity


def test_true_cfg_formula():
    calls = []
    x, sigma = torch.randn(2, 5), torch.tensor([0.7, 0.7])
    pos, neg = {"s": torch.tensor([2.0, 3.0])}, {"s": torch.tensor([-1.0, 0.5])}
    g = flux_guidance(3.5, 2)
    assert g.shape == (2,) and g.dtype == torch.float32 and (g == 3.5).all()
    guided = true_cfg(toy_velocity(calls), neg, 4.0)(x, sigma, pos, g)
    v_pos = x * pos["s"][:, None] + 0.7 + 3.5
    v_neg = x * neg["s"][:, None] + 0.7 + 3.5
    torch.testing.assert_close(guided, v_neg + 4.0 * (v_pos - v_neg))
    assert [c[0] for c in calls] == [2, 2]  # two separate calls, guidance passed to both
    assert true_cfg(toy_velocity(calls), neg, 1.0)(x, sigma, pos, None).shape == (2, 5)  # scale 1: plain call


def test_sd3_cfg_formula_and_batch_order():
    calls = []
    x, sigma = torch.randn(2, 5), torch.tensor([0.3, 0.3])
    cond, uncond = {"s": torch.tensor([2.0, 3.0])}, {"s": torch.tensor([-1.0, 0.5])}
    w = 2.5
    guided = sd3_cfg(toy_velocity(calls), uncond, cfg_scale_from_w(w))(x, sigma, cond, None)
    v_c = x * cond["s"][:, None] + 0.3
    v_u = x * uncond["s"][:, None] + 0.3
    torch.testing.assert_close(guided, v_u + 3.5 * (v_c - v_u))
    torch.testing.assert_close(guided, v_c + w * (v_c - v_u))  # SCFM's form with s = 1 + w
    assert len(calls) == 1 and calls[0][0] == 4
    torch.testing.assert_close(calls[0][1]["s"], torch.tensor([-1.0, 0.5, 2.0, 3.0]))  # [uncond, cond]
    assert sd3_cfg(toy_velocity(calls), uncond, 1.0)(x, sigma, cond, None).shape == (2, 5)
    assert len(calls) == 2 and calls[1][0] == 2


def test_cat_cond_structures():
    a = (torch.zeros(1, 2), {"p": torch.ones(1)}, None)
    b = (torch.ones(1, 2), {"p": torch.zeros(1)}, None)
    out = cat_cond(a, b)
    assert out[0].shape == (2, 2) and out[1]["p"].tolist() == [1.0, 0.0] and out[2] is None
    with pytest.raises(TypeError):
        cat_cond("text", "text")


@pytest.mark.parametrize("steps", [1, 4, 50])
@pytest.mark.parametrize("seq_len", [1024, 4096, 4301, 9216])
def test_flux2_klein_grid(steps, seq_len):
    """Flux2KleinPipeline: FLUX.1-dev's scheduler fed linspace(1, 1/N, N) and its empirical mu of the image
    tokens and the step count (docs/flux2.md §4), bit for bit."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    from sampling.schedules import empirical_mu

    assert empirical_mu(seq_len, steps) == compute_empirical_mu(seq_len, steps)
    scheduler = flux_scheduler()
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(seq_len, steps))
    assert_grid(get_sigmas("flux2-klein", steps, image_seq_len=seq_len), scheduler)


def test_flux2_klein_grid_values():
    """The reference table's rows (docs/flux2.md §4)."""
    from sampling.schedules import empirical_mu

    for seq_len, steps, mu, first in ((1024, 4, 2.0307, (1, .9581, .8840, .7175, 0)),
                                      (4096, 4, 2.2912, (1, .9674, .9081, .7672, 0)),
                                      (4096, 50, 2.0234, (1, .9973, .9945, .9916))):
        assert empirical_mu(seq_len, steps) == pytest.approx(mu, abs=1e-4)
        got = get_sigmas("flux2-klein", steps, image_seq_len=seq_len)[:len(first)]
        torch.testing.assert_close(got, torch.tensor(first, dtype=torch.float32), rtol=0, atol=1e-4)
    assert empirical_mu(9216, 4) == empirical_mu(9216, 50) == pytest.approx(2.0167, abs=1e-4)
