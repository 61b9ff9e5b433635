"""Few-shot and own-LoRA training (distill/trainer.py): a 1-pair dataset trains, resumes and exports (its batches
repeat the pair: BucketBatches tops a batch up from the same shuffle), and the flow-matching objective is ordinary
LoRA training: its loss is mean((v - (eps - x0))^2) written out, one model call per step, the live set alone, and
its exported LoRA is sampled on its base's schedule."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_data import make_cache
from test_trainer import Kill, assert_same, config, kill_at, state, tiny_model

from distill.config import ConfigError
from distill.lora import lora_layers, weight_set
from distill.scfm import element_generators, sample_draw
from distill.trainer import Trainer

ONE = [((512, 512), "a red circle")]


def test_one_pair_trains_resumes_and_exports(tmp_path):
    from distill.lora_export import export_lora

    cache = make_cache(tmp_path, images=ONE)
    assert len(cache.buckets) == 1
    whole = Trainer(config(tmp_path, "whole", steps=4, batch_size=4), tiny_model(), cache)
    assert whole.batches.batch(0) == [0, 0, 0, 0]  # the one pair, four times (four noises, four draws)
    whole.run()
    cfg = config(tmp_path, "killed", steps=4, batch_size=4)
    with pytest.raises(Kill):
        Trainer(cfg, tiny_model(), cache, on_step=kill_at(3)).run()
    resumed = Trainer(dataclasses.replace(cfg, resume=True), tiny_model(), cache)
    resumed.run()
    assert_same(state(resumed), state(whole))
    files = export_lora(resumed.model, cfg)
    assert files and all(f.exists() for f in files)


def test_flow_matching_is_the_plain_loss_with_one_call_and_the_live_set_alone(tmp_path):
    cache = make_cache(tmp_path)
    cfg = config(tmp_path, objective="flow_matching", steps=2, checkpoint_every=0)
    t = Trainer(cfg, tiny_model(), cache)
    layer = next(iter(lora_layers(t.model).values()))
    assert layer.set_names() == ("live",) and not layer.zero_sets  # no EMA, no teacher
    indices = t.batches.batch(0)
    x0, cond = cache.load(indices)
    out = t._loss(0, indices, range(len(indices)))
    draw = sample_draw(t.scfm, element_generators(cfg.seed, 0, range(len(indices))), x0.shape[1:],
                       (x0.shape[-2] // 2) * (x0.shape[-1] // 2), global_batch=cfg.batch_size)
    sigma = draw.sigma.float().view(-1, 1, 1, 1)
    x_sigma = (1 - sigma) * x0 + sigma * draw.noise
    with torch.no_grad(), weight_set(t.model, "live"):
        v = t.velocity(x_sigma, sigma.flatten(), cond, draw.guidance)  # the tiny Flux has a guidance input
    by_hand = (v - (draw.noise - x0)).pow(2).mean()
    torch.testing.assert_close(out.loss.detach(), by_hand, rtol=1e-6, atol=0)

    calls = []
    hook = t.model.register_forward_pre_hook(lambda *_: calls.append(1))
    t.run()
    hook.remove()
    assert len(calls) == cfg.steps  # the student's call: no teacher, no EMA jumps


def test_flow_matching_refuses_what_it_does_not_have_and_exports_an_ordinary_lora(tmp_path):
    from distill.lora_export import export_lora
    from sampling.job import lora_recommendations

    for field, value in (("export_set", "slow_ema"), ("cfg_scale", 3.0)):
        with pytest.raises(ConfigError, match=f"{field}: objective flow_matching trains the live set alone"):
            config(tmp_path, objective="flow_matching", **{field: value})
    cfg = config(tmp_path, objective="flow_matching", steps=1, checkpoint_every=0)
    t = Trainer(cfg, tiny_model(), make_cache(tmp_path))
    t.run()
    (path,) = [f for f in export_lora(t.model, cfg) if f.name == "scfm-lora-live.safetensors"]
    rec = lora_recommendations([str(path)])
    assert (rec.schedule, rec.steps, rec.shift) == (None, None, None)  # sampled as its base model is


def test_ten_shot_recipes_start_from_their_base_and_change_only_what_they_say(tmp_path):
    from distill.config import build_config, load_toml

    demo, ten = load_toml("demo"), load_toml("demo-10shot")
    assert {k for k in ten if ten[k] != demo.get(k)} == {"demo_images", "output", "steps"} and ten["demo_images"] == 10
    flux, flux10 = load_toml("flux-dev-scfm"), load_toml("flux-dev-scfm-10shot")
    assert {k for k in flux10 if flux10[k] != flux.get(k)} == {"steps", "checkpoint_every", "keep_checkpoints"}
    assert build_config("flux-dev-scfm-10shot").lr == build_config("flux-dev-scfm").lr
    (tmp_path / "a.toml").write_text('base = "b.toml"\n')
    (tmp_path / "b.toml").write_text('base = "a.toml"\n')
    with pytest.raises(ConfigError, match="its `base` chain comes back to itself"):
        load_toml(tmp_path / "a.toml")
