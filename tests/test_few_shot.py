"""Few-shot and own-LoRA training (distill/trainer.py): a 1-pair dataset trains, resumes and exports (its batches
repeat the pair: BucketBatches tops a batch up from the same shuffle), and the flow-matching objective is ordinary
LoRA training: its loss is mean((v - (eps - x0))^2) written out, one model call per step, the live set alone, and
its exported LoRA is sampled on its base's schedule."""

from __future__ import annotations

import re

import pytest
import torch
from test_data import KEY, FakeText, FakeVAE, make_cache, write_images
from test_trainer import Kill, assert_same, config, kill_at, state, tiny_model

from distill.config import ConfigError
from distill.data import build_cache, plan_cache
from distill.dataset import load_image, mirror_caption
from distill.demo import world
from distill.lora import load_set, lora_layers, set_state_dict, weight_set
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
    resumed = Trainer(cfg.replace(resume=True), tiny_model(), cache)
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
    # a live set that is not the zero-init one (else the base alone would give the same loss), and random sets
    # under the other names, so that a loss read with any of them, or with no LoRA, shows
    g = torch.Generator().manual_seed(1)
    for lora in lora_layers(t.model).values():
        with torch.no_grad():
            lora.lora_up["live"].copy_(torch.randn(lora.lora_up["live"].shape, generator=g) * 0.5)
    for name in ("fast_ema", "slow_ema", "teacher"):
        load_set(t.model, name, {k: torch.randn(v.shape, generator=g) * 0.5
                                 for k, v in set_state_dict(t.model, "live").items()})
    indices = t.batches.batch(0)
    x0, cond = cache.load(indices)
    out = t._loss(0, indices, range(len(indices)))
    draw = sample_draw(t.scfm, element_generators(cfg.seed, 0, range(len(indices))), x0.shape[1:],
                       (x0.shape[-2] // 2) * (x0.shape[-1] // 2), global_batch=cfg.batch_size)
    sigma = draw.sigma.float().view(-1, 1, 1, 1)
    x_sigma = (1 - sigma) * x0 + sigma * draw.noise

    def by_hand(name: str, multiplier: float = 1.0):
        with torch.no_grad(), weight_set(t.model, name, multiplier):
            v = t.velocity(x_sigma, sigma.flatten(), cond, draw.guidance)  # the tiny Flux has a guidance input
        return (v - (draw.noise - x0)).pow(2).mean()

    torch.testing.assert_close(out.loss.detach(), by_hand("live"), rtol=1e-6, atol=0)
    for name, multiplier in (("fast_ema", 1.0), ("slow_ema", 1.0), ("teacher", 1.0), ("live", 0.0)):
        assert not torch.allclose(out.loss.detach(), by_hand(name, multiplier), rtol=1e-3), name  # they would show

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


def test_flow_matching_takes_its_own_export_set_and_cfg_scale_over_a_presets_and_names_the_flag_to_pass():
    """Every preset exports the slow EMA (sd35 bakes in CFG): `--objective flow_matching` with one trains, saying so
    in one line; a contradicting flag is refused naming the value to pass, not a flag to drop; a flag it would
    ignore (the EMAs', the shortcut share) is refused."""
    from distill.config_files import build_config

    for preset, said in (("demo", "export_set 'live' (not the config's 'slow_ema')"),
                         ("sd35-large-scfm", "cfg_scale 0.0 (not the config's 3.5)")):
        with pytest.warns(UserWarning, match=re.escape(said)) as caught:
            cfg = build_config(preset, {"objective": "flow_matching"})
        assert len(caught) == 1 and (cfg.export_set, cfg.scfm.cfg_scale) == ("live", 0.0)
    for flag, value, fix in (("export_set", "slow_ema", "live"), ("cfg_scale", 3.0, "0")):
        with pytest.raises(ConfigError, match=f"; pass --{flag} {fix}$"):
            build_config(None, {"objective": "flow_matching", flag: value})
    for flag, value in (("fast_decay", 0.9), ("slow_decay", 0.99), ("ema_restart_every", 10),
                        ("non_shortcut_ratio", 0.5)):  # no EMAs, every element plain: these would do nothing
        with pytest.raises(ConfigError, match=f"^{flag}: objective flow_matching .* would do nothing; drop --{flag}$"):
            build_config(None, {"objective": "flow_matching", flag: value})
    assert build_config(None, {"objective": "flow_matching", "t_skip": 4}).scfm.t_skip == 4  # picks the sigmas


def test_ten_shot_recipes_start_from_their_base_and_change_only_what_they_say(tmp_path):
    from distill.config_files import build_config, load_toml

    demo, ten = load_toml("demo"), load_toml("demo-10shot")
    assert {k for k in ten if ten[k] != demo.get(k)} == {"demo_images", "output", "steps"} and ten["demo_images"] == 10
    flux, flux10 = load_toml("flux-dev-scfm"), load_toml("flux-dev-scfm-10shot")
    assert {k for k in flux10 if flux10[k] != flux.get(k)} == {"steps", "checkpoint_every", "keep_checkpoints"}
    assert build_config("flux-dev-scfm-10shot").lr == build_config("flux-dev-scfm").lr
    (tmp_path / "a.toml").write_text('base = "b.toml"\n')
    (tmp_path / "b.toml").write_text('base = "a.toml"\n')
    with pytest.raises(ConfigError, match="its `base` chain comes back to itself"):
        load_toml(tmp_path / "a.toml")


def test_a_preset_base_is_the_packaged_preset_and_a_users_base_is_next_to_the_file(tmp_path, monkeypatch):
    """A preset's base never reads the current folder (a `demo/` folder there, a file named like a preset); a user's
    relative base is read from its file's folder, else as a preset name, `.toml` or not."""
    from distill.config_files import load_toml

    demo, want, want_flux = load_toml("demo"), load_toml("demo-10shot"), load_toml("flux-dev-scfm-10shot")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    (tmp_path / "flux-dev-scfm").write_text("rank = 4\n")
    (tmp_path / "flux-dev-scfm.toml").write_text("rank = 4\n")
    assert load_toml("demo-10shot") == want and load_toml("flux-dev-scfm-10shot") == want_flux
    assert load_toml("demo") == demo  # --config demo too: a folder is never a config
    (tmp_path / "b.toml").write_text("rank = 4\n")  # the cwd's: not the one the user's file means
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "b.toml").write_text("rank = 8\n")
    (tmp_path / "own" / "a.toml").write_text('base = "b.toml"\nsteps = 3\n')
    assert load_toml("own/a.toml") == {"rank": 8, "steps": 3}
    (tmp_path / "own" / "demo").mkdir()  # a run folder beside the user's file: a folder is never its base
    for base in ("demo", "demo.toml"):
        (tmp_path / "own" / "c.toml").write_text(f'base = "{base}"\nsteps = 3\n')
        assert load_toml("own/c.toml") == demo | {"steps": 3}
    (tmp_path / "own" / "demo.toml").write_text('base = "demo.toml"\nsteps = 3\n')  # the preset, not itself
    assert load_toml("own/demo.toml") == demo | {"steps": 3}
    (tmp_path / "own" / "c.toml").write_text('base = "nope.toml"\n')
    with pytest.raises(ConfigError, match=r"^base 'nope.toml' \(in own/c.toml\): no such file next to it") as e:
        load_toml("own/c.toml")
    assert "--config" not in str(e.value)


def test_mirror_caption_swaps_whole_words_and_keeps_case():
    assert mirror_caption("a red circle at the top left") == "a red circle at the top right"
    assert mirror_caption("Left of the RIGHT door, leftover bright") == "Right of the LEFT door, leftover bright"
    assert mirror_caption("a shape on a black background") == "a shape on a black background"


def test_flip_adds_mirrored_pairs_whose_caption_still_fits_and_is_off_by_default(tmp_path):
    """Every image again, mirrored, under the mirrored caption; the demo world's checker reads a mirrored render
    as its mirrored caption (so the pair is consistent); without flip the plan is what it always was."""
    data = tmp_path / "data"
    write_images(data, [((512, 512), "a red circle at the top left"), ((512, 512), "a shape in the center")])
    plain = plan_cache(data, KEY, 512, shard_size=4)
    assert plain == plan_cache(data, KEY, 512, shard_size=4, flip=False)
    assert len(plain["items"]) == 2 and not any("flip" in it for it in plain["items"])
    plan = plan_cache(data, KEY, 512, shard_size=4, flip=True)
    assert plan["items"][:2] == plain["items"]  # the originals keep their numbers
    assert [plan["prompts"][it["prompt"]] for it in plan["items"][2:]] == [
        "a red circle at the top right", "a shape in the center"]
    vae = FakeVAE()
    cache = build_cache(tmp_path / "cache", plan, FakeText, lambda: vae, batch_size=2, progress=False)
    assert vae.calls == 4 and len(cache) == 4
    for i in range(2):
        image = load_image(data / plan["items"][i]["file"], (512, 512))
        torch.testing.assert_close(cache.load([i + 2])[0][0], vae(image.flip(-1)[None])[0])
        mirrored = plan["prompts"][plan["items"][i + 2]["prompt"]]
        torch.testing.assert_close(cache.load([i + 2])[1]["txt"], FakeText()([mirrored])["txt"])
    for seed in range(20):  # every position and shape: a mirrored render is its mirrored caption's image
        images, captions, _ = world.sample(seed, 4)
        for image, caption in zip(images, captions):
            read = world.read_image(image[:, ::-1].copy())
            assert world.adheres(read, world.parse_caption(mirror_caption(caption))), caption
