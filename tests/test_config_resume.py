"""Config validation, resume semantics and the EMA restart timing (issue 21: #1 config, #3, #11, #12, #15).

Bad values must stop `python -m distill.train` before anything loads or is written, as one `error:` line that
names the field and its allowed range; a resume applies the optimizer settings passed now and refuses a
--steps the checkpoint has already passed; SD3.5's EMA restart follows the released trainer's timing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil

import pytest
import torch
from test_data import make_cache
from test_ema import set_live_, small_model
from test_trainer import config, tiny_model, trainer

from distill.config import AUTO, FLOAT_RANGES, ConfigError, DistillConfig, flat_fields, lr_at
from distill.config_files import build_config
from distill.data import Cache
from distill.ema import EMAConfig, ema_step
from distill.lora import set_state_dict
from distill.train import main
from distill.trainer import Trainer, TrainingError
from model.flux import FLUX_CONFIGS, Flux


def snapshot(folder) -> dict:
    """Every file under `folder` with its bytes and mtime: a refused command must leave them as they were."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def train_argv(tmp_path_factory) -> list[str]:
    """A CLI run that would train (a built cache, the tiny Flux)."""
    folder = tmp_path_factory.mktemp("cli")
    make_cache(folder)
    return ["--model", "tiny", "--cache", str(folder / "cache"), "--dtype", "fp32", "--device", "cpu", "--rank",
            "4", "--batch_size", "2", "--steps", "2", "--export_formats", "diffusers", "--t5_length", "5"]


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> list[str]:
    """train_argv: before the fixes, bad values trained or raised mid-run."""
    return train_argv(tmp_path_factory)


def one_line_error(capsys, argv: list[str], substring: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert substring in err, err
    return err


# ----- #1 / #11: every float field finite and in range ----------------------------------------------------


def test_unchecked_blocks_is_a_count_or_auto_never_a_negative_number():
    assert build_config(None, {"unchecked_blocks": "auto"}).unchecked_blocks == AUTO
    assert build_config(None, {"unchecked_blocks": "3"}).unchecked_blocks == 3
    for bad in ("-1", "-2", "two", -1):  # -1 is how "auto" is stored, not a spelling of it
        with pytest.raises(ConfigError, match="must be a block count \\(0 or more\\) or 'auto'"):
            build_config(None, {"unchecked_blocks": bad})


def test_every_float_field_has_a_range_and_refuses_nan_and_inf():
    floats = {name for name, (_, tp) in flat_fields().items() if tp is float}
    assert floats == set(FLOAT_RANGES)  # a new float field must say what it accepts
    for name in floats:
        for bad in (math.nan, math.inf, -math.inf):
            with pytest.raises(ConfigError, match=rf"^{name} must lie in .*, got {bad}"):
                DistillConfig.from_flat(**{name: bad})


@pytest.mark.parametrize(("field", "value", "message"), [
    ("lr", 1e6, "lr must lie in (0, 1], got 1000000.0"),
    ("lr", 0.0, "lr must lie in (0, 1], got 0.0"),
    ("fast_decay", 2.0, "fast_decay must lie in [0, 1), got 2.0"),
    ("slow_decay", 1.0, "slow_decay must lie in [0, 1), got 1.0"),
    ("beta2", 1.0, "beta2 must lie in [0, 1)"),
    ("eps", 0.0, "eps must lie in (0, 1)"),
    ("teacher_ratio", 1.5, "teacher_ratio must lie in [0, 1]"),
    ("max_grad_norm", -1.0, "max_grad_norm must lie in [0, inf)"),
    ("alpha", 0.0, "alpha must lie in (0, inf)"),
    ("cfg_scale", -0.5, "cfg_scale must lie in [0, inf)"),
])
def test_float_fields_out_of_range_are_refused_with_the_range(field, value, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        DistillConfig.from_flat(**{field: value})


def test_swapped_ema_decays_are_refused():
    with pytest.raises(ConfigError, match=r"^fast_decay 0.999 > slow_decay 0.99: .*; pass --fast_decay <= "
                                          r"--slow_decay$"):
        DistillConfig.from_flat(fast_decay=0.999, slow_decay=0.99)
    assert DistillConfig.from_flat(fast_decay=0.99, slow_decay=0.99).ema.fast_decay == 0.99


def test_shift_min_above_shift_max_is_refused():
    with pytest.raises(ConfigError, match=r"^shift_min 5.0 > shift_max 1.0: .*--shift_min <= --shift_max"):
        DistillConfig.from_flat(shift_min=5.0, shift_max=1.0)
    DistillConfig.from_flat(shift_min=3.0, shift_max=3.0)  # one fixed shift


@pytest.mark.parametrize(("argv", "substring"), [
    (["--lr", "inf"], "lr must lie in (0, 1], got inf"),
    (["--lr", "nan"], "lr must lie in (0, 1], got nan"),
    (["--lr", "1e6"], "lr must lie in (0, 1], got 1000000.0"),
    (["--fast_decay", "2"], "fast_decay must lie in [0, 1), got 2.0"),
    (["--shift_min", "5", "--shift_max", "1"], "shift_min 5.0 > shift_max 1.0"),
])
def test_cli_refuses_bad_floats_in_one_line(tmp_path, capsys, cli, argv, substring):
    one_line_error(capsys, [*cli, "--output", str(tmp_path / "out"), *argv], substring)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_folder_or_a_binary_file_as_config(tmp_path, capsys):
    one_line_error(capsys, ["--config", str(tmp_path)], "is a folder, not a TOML file")
    binary = tmp_path / "x.toml"
    binary.write_bytes(b"\xff\xfe\x00rank")
    one_line_error(capsys, ["--config", str(binary)], "is not UTF-8 text")


def test_targets_and_cfg_scale_the_model_cannot_take_are_refused_before_the_cache(tmp_path, capsys):
    """Known from the model's family (and its config: guidance_embed): nothing is cached or rendered first."""
    from test_data import write_images

    write_images(tmp_path / "data", [((64, 64), "a red circle")])
    demo = ["--model", "demo", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "out"), "--device", "cpu",
            "--resolution", "64", "--steps", "1"]
    one_line_error(capsys, [*demo, "--targets", "sd3"], "targets 'sd3' are for another model; this one is Flux: "
                   "pass --targets flux")
    flux = "cfg_scale bakes in classifier-free guidance, which FLUX.1 does not train with (FLUX.1-dev has a guidance "
    one_line_error(capsys, [*demo, "--cfg_scale", "3"], flux + "input; this model has none); pass --cfg_scale 0")
    one_line_error(capsys, ["--model", "tiny", "--output", str(tmp_path / "out"), "--cfg_scale", "3"],
                   flux + "input; this model has one)")
    assert not (tmp_path / "out" / "cache").exists()


def test_cli_refuses_an_output_that_is_a_file_and_a_pickled_teacher_lora(tmp_path, capsys, cli):
    file = tmp_path / "taken"
    file.write_text("keep me")
    one_line_error(capsys, [*cli, "--output", str(file)], "is a file, not a folder")
    one_line_error(capsys, [*cli, "--output", str(file / "sub")], "is a file, not a folder")
    assert file.read_text() == "keep me"
    pickled = tmp_path / "teacher.safetensors"
    torch.save({"w": torch.zeros(2)}, pickled)
    before = snapshot(tmp_path)
    one_line_error(capsys, [*cli, "--output", str(tmp_path / "out"), "--teacher_lora", str(pickled)],
                   "a pickled PyTorch checkpoint")
    assert snapshot(tmp_path) == before


# ----- #3: a resume applies the optimizer settings passed now ---------------------------------------------


NEW = {"lr": 3e-4, "weight_decay": 0.05, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6}


def test_resume_applies_the_new_optimizer_settings_and_resets_the_bad_step_count(tmp_path):
    cfg = config(tmp_path, steps=2, checkpoint_every=0)
    first = trainer(tmp_path, cfg)
    first.run()
    first.progress.bad_in_row = 3  # a run stopped by NaN steps, resumed with a lower lr
    first.save()
    t = trainer(tmp_path, cfg.replace(resume=True, steps=3, **NEW))
    with pytest.warns(UserWarning, match=r"--resume: lr 0.001 -> 0.0003, .*betas \(0.9, 0.999\) -> \(0.8, 0.99\)"):
        assert t.resume()
    assert t.progress.bad_in_row == 0 and t.progress.step == 2
    for group in t.optimizer.param_groups:
        assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (3e-4, 0.05, (0.8, 0.99), 1e-6)
    # the next update is the one an AdamW built with the new settings makes from the checkpoint's moments
    live = [p for _, p in t.params]
    ref_params = [p.detach().clone().requires_grad_() for p in live]
    ref = torch.optim.AdamW(ref_params, lr=NEW["lr"], betas=(NEW["beta1"], NEW["beta2"]), eps=NEW["eps"],
                            weight_decay=NEW["weight_decay"])
    moments = {i: {k: v.clone() for k, v in s.items()} for i, s in t.optimizer.state_dict()["state"].items()}
    ref.load_state_dict({"state": moments, "param_groups": ref.state_dict()["param_groups"]})
    grads = []
    t.optimizer.register_step_pre_hook(lambda *_: grads.extend(p.grad.clone() for p in live))
    t.step()
    for p, g in zip(ref_params, grads, strict=True):
        p.grad = g
    ref.step()
    for p, r in zip(live, ref_params, strict=True):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=0, atol=1e-7)
    # the log records the lr the optimizer used
    t2 = trainer(tmp_path, cfg.replace(resume=True, steps=3, **NEW))
    with pytest.warns(UserWarning, match="--resume: lr"):
        t2.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step" in r and "loss" in r]
    assert [(r["step"], r["lr"]) for r in steps] == [(1, 1e-3), (2, 1e-3), (3, 3e-4)]
    # settings that change the numbers from here on, outside the optimizer, are said too (they were silent)
    t3 = trainer(tmp_path, cfg.replace(resume=True, steps=4, max_grad_norm=2.0, lr_schedule="cosine"))
    with pytest.warns(UserWarning, match=r"--resume: lr_schedule constant -> cosine, max_grad_norm 10.0 -> 2.0 "
                                         r"\(the values passed now apply from step 4\)") as said:
        t3.resume()
    # the cosine lr at step 3 of 4, a float sum, said in 6 digits (it read 0.0002500000000000001)
    assert any(str(w.message).startswith("--resume: lr 0.0003 -> 0.00025, weight_decay 0.05 -> 0.0001, betas "
                                         "(0.8, 0.99) -> (0.9, 0.999), eps 1e-06 -> 1e-08") for w in said), \
        [str(w.message) for w in said]


# ----- #12: a resume never goes back ----------------------------------------------------------------------


def test_resume_with_steps_below_the_checkpoint_is_refused_and_changes_nothing(tmp_path, capsys):
    make_cache(tmp_path)
    args = ["--model", "tiny", "--cache", str(tmp_path / "cache"), "--output", str(tmp_path / "cli"),
            "--dtype", "fp32", "--device", "cpu", "--rank", "4", "--batch_size", "2", "--steps", "3",
            "--checkpoint_every", "2", "--export_formats", "diffusers", "--t5_length", "5"]
    assert main(args) == 0
    capsys.readouterr()
    before = snapshot(tmp_path / "cli")
    one_line_error(capsys, [*args, "--steps", "2", "--resume"], "is at step 3; pass --steps 3 or more")
    assert snapshot(tmp_path / "cli") == before
    cfg = config(tmp_path, "lib", steps=2, checkpoint_every=0)
    trainer(tmp_path, cfg).run()
    with pytest.raises(TrainingError, match=r"step-000002 is at step 2; pass --steps 2 or more .*distill\.export"):
        trainer(tmp_path, cfg.replace(steps=1, resume=True)).run()


# ----- a resume reads the run's settings, and refuses another model, objective or cache ----------------------


def test_resume_needs_only_the_output_and_refuses_another_run_in_one_line(tmp_path, capsys, cli):
    out = tmp_path / "cli"
    assert main([*cli, "--output", str(out), "--checkpoint_every", "2", "--gradient_checkpointing",
                 "--unchecked_blocks", "auto", "--max_memory", "1GB"]) == 0
    capsys.readouterr()
    # the README's resume: the model, cache and every setting come from the newest checkpoint; memory flags are
    # checked against that run's settings (checkpointed), not the demo preset's (which has no checkpointing), and a
    # block count given now drops the budget that run's "auto" had
    assert main(["--output", str(out), "--steps", "3", "--resume", "--blocks_to_swap", "1",
                 "--unchecked_blocks", "1"]) == 0
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 3]  # logged every 10 steps and at the last
    capsys.readouterr()
    before = snapshot(out)
    one_line_error(capsys, ["--output", str(out), "--steps", "4", "--resume", "--rank", "8"], "different rank")
    one_line_error(capsys, ["--output", str(out), "--steps", "4", "--resume", "--t_skip", "3"],
                   "t_skip must be even and >= 2 (two jumps of t_skip/2 steps), got 3: change --t_skip")
    assert snapshot(out) == before
    # no checkpoint left, the exports there: starting over would replace them
    shutil.rmtree(out / "checkpoints")
    before = snapshot(out)
    one_line_error(capsys, [*cli, "--output", str(out), "--resume"], "no checkpoint to continue from, and")
    assert snapshot(out) == before


def test_out_of_memory_outside_a_step_is_one_line(tmp_path, capsys, cli, monkeypatch):
    def sample(self, step):  # a sample image that does not fit beside the training state
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "sample", sample)
    assert main([*cli, "--output", str(tmp_path / "o"), "--sample_every", "1"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the progress bar's line
    assert last.startswith("error: out of GPU memory outside a training step") and "Traceback" not in last


def test_a_full_disk_before_and_during_the_run_and_demo_data_of_other_settings_are_one_line(tmp_path, capsys, cli,
                                                                                          monkeypatch):
    from collections import namedtuple

    from distill import run_setup, teacher_data

    usage = namedtuple("usage", "total used free")
    real = run_setup.shutil.disk_usage
    monkeypatch.setattr(run_setup.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    one_line_error(capsys, [*cli, "--output", str(tmp_path / "full")], "0.0 MB free on its disk, the run needs more")
    assert not (tmp_path / "full").exists()
    monkeypatch.setattr(run_setup.shutil, "disk_usage", real)

    def full(self):  # the disk fills up mid-run
        raise OSError(28, "No space left on device", str(tmp_path / "o" / "log.jsonl"))

    monkeypatch.setattr(Trainer, "run", full)
    one_line_error(capsys, [*cli, "--output", str(tmp_path / "o")], "log.jsonl: No space left on device; checkpoints")

    def other(args):  # make_dataset's refusal of a demo dataset rendered with other settings
        raise ValueError(f"{args.out} holds a dataset made with other images_per_bucket; use another --out")

    monkeypatch.setattr(teacher_data, "run", other)
    one_line_error(capsys, ["--output", str(tmp_path / "demo"), "--demo_images", "8"],
                   "made with other images_per_bucket; choose another --output")


def test_resume_refuses_another_objective_model_or_training_data(tmp_path):
    cfg = config(tmp_path, steps=2, checkpoint_every=0)
    trainer(tmp_path, cfg).run()
    with pytest.raises(TrainingError, match=r"resuming with different objective would be another run"):
        trainer(tmp_path, cfg.replace(resume=True, objective="flow_matching", export_set="live")).resume()
    state_file = next((tmp_path / "run" / "checkpoints").glob("step-*/state.json"))
    state = json.loads(state_file.read_text())
    state["model"]["config"]["depth"] += 1  # as if trained on a deeper model
    state_file.write_text(json.dumps(state))
    with pytest.raises(TrainingError, match=r"trained another model \(depth 3 -> 2\); pass its --model"):
        trainer(tmp_path, cfg.replace(resume=True)).resume()
    del state["model"]  # a checkpoint from before models were recorded: the LoRA's keys still tell
    state_file.write_text(json.dumps(state))
    deeper = Flux(dataclasses.replace(FLUX_CONFIGS["tiny"], depth=3))
    with pytest.raises(TrainingError, match=r"its LoRA does not fit this run \(set 'live': missing"):
        Trainer(cfg.replace(resume=True), deeper, make_cache(tmp_path), device="cpu").resume()


def test_new_sample_prompts_keep_a_run_resumable_and_other_training_data_is_refused(tmp_path):
    cfg = config(tmp_path, steps=2, checkpoint_every=0)
    trainer(tmp_path, cfg).run()
    state_file = next((tmp_path / "run" / "checkpoints").glob("step-*/state.json"))
    state = json.loads(state_file.read_text())
    plan = json.loads((tmp_path / "cache" / "cache.json").read_text())
    # other sample prompts (build_cache embeds them again): the same run
    cache = make_cache(tmp_path, sample_prompts=("another sample",))
    assert cache.plan["sample_prompts"] == ["another sample"] and cache.fingerprint() == state["cache"]
    assert Trainer(cfg.replace(resume=True, steps=3), tiny_model(), cache, device="cpu").resume()
    # a checkpoint from before: it stored the fingerprint of the whole plan, sample prompts included
    (tmp_path / "cache" / "cache.json").write_text(json.dumps(plan))
    state_file.write_text(json.dumps({**state, "cache": hashlib.sha256(json.dumps(plan, sort_keys=True).encode())
                                      .hexdigest()[:16]}))
    assert Trainer(cfg.replace(resume=True, steps=3), tiny_model(), Cache(tmp_path / "cache"), device="cpu").resume()
    # other training data: refused, naming what to pass
    (tmp_path / "cache" / "cache.json").write_text(json.dumps({**plan, "key": {**plan["key"], "t5_length": 7}}))
    with pytest.raises(TrainingError, match="holds other training data than that run's .* pass that run's --data"):
        Trainer(cfg.replace(resume=True, steps=3), tiny_model(), Cache(tmp_path / "cache"), device="cpu").resume()


# ----- #15: the EMA restart follows the released trainer ----------------------------------------------------


def emas_equal_live(model) -> bool:
    live = set_state_dict(model, "live")
    return all(torch.equal(set_state_dict(model, s)[k], v) for s in ("fast_ema", "slow_ema") for k, v in live.items())


def test_ema_restarts_after_updates_r_plus_1_2r_plus_1_like_the_released_trainer():
    model = small_model()
    restarted = []
    for update in range(1, 11):
        set_live_(model, update)  # live moves every update: an EMA equals live only right after a restart
        ema_step(model, EMAConfig(restart_every=3), update)
        if emas_equal_live(model):
            restarted.append(update)
    assert restarted == [4, 7, 10]
    model = small_model()
    for update in range(1, 4):  # R = 1: every update but the first is a restart
        set_live_(model, update)
        ema_step(model, EMAConfig(restart_every=1), update)
        assert emas_equal_live(model) == (update > 1)


def test_trainer_restarts_the_emas_after_updates_r_plus_1(tmp_path):
    restarted = []

    def on_step(step):
        if emas_equal_live(t.model):
            restarted.append(step)

    t = Trainer(config(tmp_path, steps=5, checkpoint_every=0, ema_restart_every=2), tiny_model(),
                make_cache(tmp_path), device="cpu", on_step=on_step)
    t.run()
    assert restarted == [3, 5]


def test_lr_schedules_run_from_lr_to_lr_final_as_a_function_of_the_step():
    cfg = build_config(None, {"lr": 1e-3, "steps": 101, "lr_final": 0.1})
    assert [lr_at(cfg, s) for s in (0, 50, 100)] == [1e-3] * 3  # constant: the recipe's
    cos = cfg.replace(lr_schedule="cosine")
    lin = cfg.replace(lr_schedule="linear")
    for c in (cos, lin):
        assert lr_at(c, 0) == pytest.approx(1e-3) and lr_at(c, 100) == pytest.approx(1e-4)
        assert lr_at(c, 50) == pytest.approx(5.5e-4)  # half way: the mean of the two ends for both shapes
    assert lr_at(cos, 25) == pytest.approx(1e-4 + 9e-4 * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_at(lin, 25) == pytest.approx(1e-4 + 9e-4 * 0.75)
    with pytest.raises(ConfigError, match="lr_schedule must be one of"):
        build_config(None, {"lr_schedule": "step"})


def test_the_config_holds_its_lora_scfm_and_ema_tables_and_reads_flat_names(tmp_path):
    """Sub-configs as the TOML tables are; flat names everywhere outside (flags, files, checkpoints); the tables
    make the trainer's SCFMConfig and EMAConfig whole, with the model-dependent parts filled in."""
    from distill.config import EMASettings, LoRASettings, SCFMSettings
    from distill.ema import EMAConfig
    from distill.scfm import SCFMConfig

    cfg = DistillConfig.from_flat(rank=8, t_skip=4, teacher_steps_min=16, teacher_steps_max=32, cfg_scale=2.0,
                                  fast_decay=0.9, lr=1e-3)
    assert [type(t) for t in (cfg.lora, cfg.scfm, cfg.ema)] == [LoRASettings, SCFMSettings, EMASettings]
    assert (cfg.lora.rank, cfg.scfm.t_skip, cfg.ema.fast_decay, cfg.lr) == (8, 4, 0.9, 1e-3)
    assert cfg.get("rank") == 8 and cfg.to_dict()["fast_decay"] == 0.9 and "lora" not in cfg.to_dict()
    assert DistillConfig.from_flat(**cfg.to_dict()) == cfg and cfg.replace(rank=4).lora.rank == 4
    assert cfg.replace(rank=4).scfm == cfg.scfm
    assert cfg.scfm.scfm_config(guidance=False, dynamic_shift="empirical") == SCFMConfig(
        t_skip=4, teacher_steps_min=16, teacher_steps_max=32, guidance_max=None, cfg_scale=2.0,
        dynamic_shift="empirical")
    plain = cfg.replace(objective="flow_matching", cfg_scale=0.0).scfm.scfm_config(guidance=True)
    assert plain.non_shortcut_ratio == 1.0 and plain.guidance_max == 7.5 and plain.cfg_scale is None
    assert cfg.ema.ema_config() == EMAConfig(fast_decay=0.9, slow_decay=0.999, restart_every=0)
    with pytest.raises(TypeError, match=r"pass the fields of \[lora\] by their names, not the table"):
        DistillConfig.from_flat(lora={"rank": 2})
    old = tmp_path / "old.toml"  # the EMA decays under [scfm], as files had them before [ema]
    old.write_text("[lora]\nrank = 8\n[scfm]\nt_skip = 4\nteacher_steps_min = 16\nfast_decay = 0.9\n")
    new = tmp_path / "new.toml"
    new.write_text("[lora]\nrank = 8\n[scfm]\nt_skip = 4\nteacher_steps_min = 16\n[ema]\nfast_decay = 0.9\n")
    assert build_config(str(old)) == build_config(str(new)) == DistillConfig.from_flat(
        rank=8, t_skip=4, teacher_steps_min=16, fast_decay=0.9)


# ----- a run folder moved, another model's weights, another run's files -------------------------------------


def test_a_moved_run_resumes_and_another_runs_folder_is_refused(tmp_path, capsys, cli):
    """A run folder moved whole (the demo renders its data into it) resumes from its new place; a new run in a
    folder holding another run's log or LoRAs is refused before it wipes that log."""
    old, new = tmp_path / "old", tmp_path / "new"
    (old / "data").mkdir(parents=True)
    assert main([*cli, "--output", str(old), "--data", str(old / "data"), "--checkpoint_every", "2"]) == 0
    old.rename(new)
    assert main(["--output", str(new), "--steps", "3", "--resume"]) == 0
    from distill.checkpoint import newest_settings

    assert newest_settings(new / "checkpoints")["data"] == str(new / "data")
    capsys.readouterr()
    for leave in ("log.jsonl", "scfm-lora-live.safetensors"):  # what another run left there, alone
        other = tmp_path / f"other-{leave}"
        other.mkdir()
        shutil.copy(new / leave, other / leave)
        before = snapshot(other)
        one_line_error(capsys, [*cli, "--output", str(other), "--export_set", "slow_ema"],
                       f"{other / leave} is an earlier run's; choose another --output (or --resume that run)")
        assert snapshot(other) == before


def test_a_moved_dataset_keeps_its_cache_and_its_run(tmp_path):
    """The cache's plan records the data folder's path, which the resume check no longer counts: the same images
    in a moved folder use the cache as it is (nothing encoded again) and the run resumes as if never moved."""
    from test_data import KEY, FakeText, FakeVAE

    from distill.data import build_cache, plan_cache

    cache = make_cache(tmp_path)
    whole = Trainer(config(tmp_path, "whole"), tiny_model(), cache, device="cpu")
    whole.run()
    cfg = config(tmp_path, "run")
    from test_trainer import Kill, kill_at

    with pytest.raises(Kill):
        Trainer(cfg, tiny_model(), cache, device="cpu", on_step=kill_at(5)).run()
    (tmp_path / "data").rename(tmp_path / "moved")
    vae = FakeVAE()
    moved = build_cache(tmp_path / "cache", plan_cache(tmp_path / "moved", KEY, 512, ("a sample",), shard_size=4),
                        FakeText, lambda: vae, batch_size=2, progress=False)
    assert vae.calls == 0 and moved.plan["data"] == str((tmp_path / "moved").resolve())
    resumed = Trainer(cfg.replace(resume=True), tiny_model(), moved, device="cpu")
    resumed.run()
    from test_trainer import assert_same, state

    assert_same(state(resumed), state(whole))


def test_a_resume_onto_other_weights_of_the_same_architecture_is_refused(tmp_path):
    """Checkpoints record the model's weights' fingerprint: a fine-tune of the same shape is another model (a
    renamed copy of the same file is not)."""
    from safetensors.torch import save_file
    from test_trainer import Kill, kill_at

    files = {}
    for name, seed in (("a", 0), ("renamed-a", 0), ("b", 1)):
        files[name] = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in tiny_model(seed).state_dict().items()}, files[name])
    cache = make_cache(tmp_path)
    cfg = config(tmp_path, "run", model=str(files["a"]))
    with pytest.raises(Kill):
        Trainer(cfg, tiny_model(), cache, device="cpu", on_step=kill_at(3)).run()
    with pytest.raises(TrainingError, match="that run trained another model .the same architecture with other"):
        Trainer(cfg.replace(resume=True, model=str(files["b"])), tiny_model(), cache, device="cpu").run()
    t = Trainer(cfg.replace(resume=True, model=str(files["renamed-a"])), tiny_model(), cache, device="cpu")
    t.run()
    assert t.progress.step == 6
