"""The training loop (distill/trainer.py, checkpoint.py, config.py, train.py) on the tiny Flux, on CPU."""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings

import pytest
import torch
from conftest import assert_same_bits, randomize_
from test_data import make_cache

from distill import checkpoint as ckpt
from distill.config import ConfigError, DistillConfig, flat_fields, lr_at
from distill.config_files import build_config, load_toml
from distill.lora import set_state_dict
from distill.scfm import element_generators, sample_draw, scfm_loss
from distill.sharding import full
from distill.train import build_parser, main
from distill.trainer import Trainer, TrainingError
from model.flux import FLUX_CONFIGS, Flux
from model.layers import named_blocks

SETS = ("live", "fast_ema", "slow_ema")


def tiny_model(seed: int = 0) -> Flux:
    return randomize_(Flux(FLUX_CONFIGS["tiny"]), 0.2, seed)


def config(tmp_path, name: str = "run", **kw) -> DistillConfig:
    base = dict(model="tiny", output=str(tmp_path / name), cache=str(tmp_path / "cache"), dtype="fp32",
                autocast=False, gradient_checkpointing=False, device="cpu", rank=4, alpha=4.0, batch_size=2,
                steps=6, lr=1e-3, checkpoint_every=2, keep_checkpoints=2, log_every=1)
    return DistillConfig.from_flat(**{**base, **kw})


def trainer(tmp_path, cfg: DistillConfig, **kw) -> Trainer:
    return Trainer(cfg, tiny_model(), make_cache(tmp_path), device="cpu", **kw)


def state(t: Trainer) -> dict[str, torch.Tensor]:
    """Every LoRA set and the optimizer state, whole (a sharded run's are gathered: all processes call this)."""
    out = {f"{s}.{k}": v.clone() for s in SETS for k, v in set_state_dict(t.model, s).items()}
    opt = t.optimizer.state_dict()["state"]
    out.update({f"opt.{i}.{k}": full(v).clone() for i, st in opt.items() for k, v in st.items()})
    return out


def assert_same(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        torch.testing.assert_close(value, b[k], rtol=0, atol=atol, msg=k)


class Kill(Exception):
    pass


def kill_at(step: int):
    def hook(s):
        if s == step:
            raise Kill

    return hook


# ----- training ---------------------------------------------------------------------------------------------


def test_a_few_steps_lower_the_loss_on_a_tiny_overfit_case(tmp_path):
    """One image; the SCFM loss on a fixed held-out draw of 8 elements must drop clearly within 15 steps.

    The base is the default-initialised tiny Flux (a smooth velocity field, loss ~1e-3 as in a healthy run);
    over seeds 0-3 the held-out loss falls to 0.60-0.70 of its start, so 0.8 leaves room without being loose.
    """
    cfg = config(tmp_path, steps=15, lr=3e-3, rank=8, alpha=8.0, batch_size=4, checkpoint_every=0)
    torch.manual_seed(0)
    cache = make_cache(tmp_path, images=[((512, 512), "a red circle")])
    t = Trainer(cfg, Flux(FLUX_CONFIGS["tiny"]), cache, device="cpu")
    x0, cond = cache.load([0] * 8)
    draw = sample_draw(t.scfm, element_generators(99, 0, range(8)), x0.shape[1:], 64)

    def held_out() -> float:
        with torch.no_grad():
            return scfm_loss(t.velocity, t.model, x0, cond, draw, t.scfm).loss.item()

    before = held_out()
    t.run()
    after = held_out()
    assert after < 0.8 * before, (before, after)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 16)) and all(r["loss"] > 0 for r in log)


@pytest.mark.parametrize("fp8_base", [False, True], ids=["fp32 base", "fp8 base"])
def test_kill_then_resume_equals_the_uninterrupted_run(tmp_path, fp8_base):
    """With a decaying lr, which the resumed run must pick up at its step (config.lr_at)."""
    whole = trainer(tmp_path, config(tmp_path, "whole", fp8_base=fp8_base, lr_schedule="cosine"))
    whole.run()
    if fp8_base:  # the blocks' Linears hold e4m3 storage; embedders and LoRA sets keep their dtypes
        dtypes = {n: p.dtype for n, p in whole.model.named_parameters()}
        assert dtypes["single_blocks.0.linear1.weight"] == torch.float8_e4m3fn
        assert dtypes["img_in.weight"] == dtypes["single_blocks.0.linear1.lora_down.live"] == torch.float32
    cfg = config(tmp_path, "killed", fp8_base=fp8_base, lr_schedule="cosine")
    with pytest.raises(Kill):
        trainer(tmp_path, cfg, on_step=kill_at(5)).run()  # dies after step 5; newest checkpoint: step 4
    names = [p.name for p in ckpt.checkpoints(tmp_path / "killed" / "checkpoints")]
    assert names == ["step-000002", "step-000004"]
    resumed = trainer(tmp_path, cfg.replace(resume=True))
    resumed.run()
    assert resumed.progress.step == 6 and resumed.progress.updates == 6
    assert_same(state(resumed), state(whole))
    rows = [json.loads(line) for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # the killed run's step-5 line was replaced
    assert [r["lr"] for r in rows] == [lr_at(cfg, r["step"] - 1) for r in rows] and rows[0]["lr"] > rows[-1]["lr"]


def test_a_run_begun_before_kohya_repeats_resumes_without_them(tmp_path):
    """A cache planned before kohya's folder repeat counts were applied learns them without encoding anything
    again; a run begun on it resumes as it began (warned), equal to its uninterrupted run; a new run uses them."""
    from PIL import Image
    from test_data import KEY, FakeText, FakeVAE

    from distill.data import build_cache, plan_cache

    data = tmp_path / "data"
    for i, folder in enumerate(("4_dog", "4_dog", "1_cat")):
        (data / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (512, 512), (60 * i, 100, 200)).save(data / folder / f"{i}.png")
        (data / folder / f"{i}.txt").write_text(f"photo {i}")
    with pytest.warns(UserWarning, match="4_dog x4"):
        plan = plan_cache(data, KEY, 512, shard_size=4)
    assert plan["repeats"] == [1, 4, 4]  # sorted by path: 1_cat first
    old = build_cache(tmp_path / "cache", {k: v for k, v in plan.items() if k != "repeats"}, FakeText, FakeVAE,
                      progress=False)
    cfg = config(tmp_path, "killed", steps=4)
    whole = Trainer(config(tmp_path, "whole", steps=4), tiny_model(), old, device="cpu")
    whole.run()
    with pytest.raises(Kill):
        Trainer(cfg, tiny_model(), old, device="cpu", on_step=kill_at(3)).run()
    vae = FakeVAE()
    cache = build_cache(tmp_path / "cache", plan, FakeText, lambda: vae, progress=False)
    assert vae.calls == 0 and cache.repeats == [1, 4, 4]
    assert Trainer(config(tmp_path, "new"), tiny_model(), cache, device="cpu").batches.per_epoch == 5  # 9 draws
    resumed = Trainer(cfg.replace(resume=True), tiny_model(), cache, device="cpu")
    with pytest.warns(UserWarning, match="began without kohya's folder repeat counts and goes on without them"):
        resumed.run()
    assert resumed.batches.per_epoch == 2 and resumed.progress.step == 4
    assert_same(state(resumed), state(whole))


def test_block_swap_trains_bit_for_bit_like_the_whole_model_on_the_device(tmp_path):
    """--blocks_to_swap changes where the frozen weights wait, not one bit of the run; it refuses what it cannot."""
    runs = {}
    for n in (0, 3):
        t = trainer(tmp_path, config(tmp_path, f"swap{n}", gradient_checkpointing=True, blocks_to_swap=n, steps=3))
        t.run()
        runs[n] = state(t)
        if n:  # the swapped blocks' base weights stay the host tensors; the LoRA sets are those being trained
            assert t.model.block_swap.copies > 0 and t.model.double_blocks[1].img_attn.qkv.weight.is_cpu
    assert_same_bits(runs[3], runs[0])
    with pytest.raises(ConfigError, match="needs gradient_checkpointing"):
        config(tmp_path, blocks_to_swap=2)
    with pytest.raises(ConfigError, match="choose one"):
        config(tmp_path, blocks_to_swap=2, gradient_checkpointing=True, fsdp=True)
    with pytest.raises(TrainingError, match="between 1 and 3"):
        trainer(tmp_path, config(tmp_path, gradient_checkpointing=True, blocks_to_swap=4))


def test_unchecked_blocks_skip_only_their_recomputation(tmp_path):
    """--unchecked_blocks N: the first N blocks run once per student step instead of twice, the run is the same bits,
    and a count that would leave a swapped block unchecked is refused."""
    runs, calls = {}, {}
    for n in (0, 2):
        t = trainer(tmp_path, config(tmp_path, f"u{n}", gradient_checkpointing=True, unchecked_blocks=n, steps=2))
        blocks = [b for _, b in named_blocks(t.model)]
        calls[n] = [0] * len(blocks)
        for i, b in enumerate(blocks):
            # a pre-hook: a recomputation stops as soon as it has what backward needs, before any forward hook
            b.register_forward_pre_hook(lambda *_, i=i, n=n: calls[n].__setitem__(i, calls[n][i] + 1))
        t.run()
        runs[n] = state(t)
    assert_same_bits(runs[2], runs[0])
    # per step: the two target jumps, the student's forward, and its recomputation where checkpointed
    assert calls[0] == [8, 8, 8, 8] and calls[2] == [6, 6, 8, 8]
    with pytest.raises(ConfigError, match="gradient_checkpointing, which is off"):
        config(tmp_path, unchecked_blocks=1)
    with pytest.raises(TrainingError, match="exceed this model's 4 blocks"):
        trainer(tmp_path, config(tmp_path, gradient_checkpointing=True, unchecked_blocks=2, blocks_to_swap=3))


def test_out_of_memory_is_one_line_that_keeps_the_checkpoint_and_names_what_is_left_to_try(tmp_path, monkeypatch):
    """An OOM step ends the run with one line: the intact checkpoint, and only the switches not yet on."""
    cfg = config(tmp_path, "oom", batch_size=4)
    t = trainer(tmp_path, cfg)
    real_step = Trainer.step

    def step_or_oom(self):
        if self.progress.step == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self)

    monkeypatch.setattr(Trainer, "step", step_or_oom)
    with pytest.raises(TrainingError) as e:
        t.run()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("out of GPU memory at step 5")
    assert "step-000004" in msg and "--resume" in msg
    assert "--fp8_base" in msg and "--gradient_checkpointing" in msg and "--micro_batch 2" in msg
    assert "--blocks_to_swap" not in msg  # it needs checkpointing, which is off here
    on = cfg.replace(fp8_base=True, gradient_checkpointing=True, micro_batch=1, resume=True)
    msg = trainer(tmp_path, on).out_of_memory()  # the tiny model has 4 blocks: swap 2 of the 3 that may go
    assert "--fp8_base" not in msg and "--micro_batch" not in msg and "--blocks_to_swap 2 " in msg
    msg = trainer(tmp_path, dataclasses.replace(on, blocks_to_swap=3)).out_of_memory()
    assert "--blocks_to_swap" not in msg and "a new run with --rank 2" in msg
    msg = trainer(tmp_path, dataclasses.replace(on, blocks_to_swap=0, unchecked_blocks=3)).out_of_memory()
    assert msg.split(": ", 1)[1].startswith("--unchecked_blocks 1 (")  # the cheapest first
    monkeypatch.setattr(Trainer, "step", real_step)
    resumed = trainer(tmp_path, cfg.replace(micro_batch=2, resume=True))  # the advice works
    resumed.run()
    assert resumed.progress.step == 6


def test_fp8_base_model_file_is_quantized_as_it_is_read(tmp_path):
    from distill.run_setup import load_model
    from weights import save_transformer

    path = save_transformer(tiny_model(), tmp_path / "flux.safetensors")
    model = load_model(config(tmp_path, model=str(path), fp8_base=True), torch.device("cpu"))
    assert model.single_blocks[0].linear1.weight.dtype == torch.float8_e4m3fn
    assert model.img_in.weight.dtype == torch.float32


def test_a_checkpoint_torn_mid_write_leaves_the_previous_usable(tmp_path, monkeypatch):
    whole = trainer(tmp_path, config(tmp_path, "whole"))
    whole.run()
    cfg = config(tmp_path, "torn")
    real_save = ckpt.save_file
    calls = []

    def dies_mid_write(tensors, path):  # half a file on disk, then the process "dies"
        calls.append(path)
        if len(calls) == 2:
            real_save(tensors, path)
            with open(path, "r+b") as f:
                f.truncate(f.seek(0, 2) // 2)
            raise Kill
        real_save(tensors, path)

    monkeypatch.setattr(ckpt, "save_file", dies_mid_write)
    with pytest.raises(Kill):
        trainer(tmp_path, cfg).run()  # killed while writing the step-4 checkpoint
    monkeypatch.setattr(ckpt, "save_file", real_save)
    root = tmp_path / "torn" / "checkpoints"
    assert [p.name for p in ckpt.checkpoints(root)] == ["step-000002"]
    # a completed checkpoint damaged afterwards is skipped too, with a warning
    (root / "step-000003").mkdir()
    (root / "step-000003" / "state.json").write_text("{")
    (root / "step-000003" / "tensors.safetensors").write_bytes(b"\0" * 16)
    resumed = trainer(tmp_path, cfg.replace(resume=True))
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        resumed.run()
    assert not list(root.glob(".step-*"))  # the killed write's temp folder was cleaned up
    assert_same(state(resumed), state(whole))


def test_a_damaged_newest_checkpoint_costs_no_good_one_and_is_written_again(tmp_path):
    """The newest checkpoint damaged (a copy cut short): the resume goes on from the one before it; pruning counts
    only the steps up to the one just written (the damaged later one took a `keep` slot and the good ones were
    deleted), and the run's end writes the damaged step again (its folder's name was taken as done)."""
    whole = trainer(tmp_path, config(tmp_path, "whole"))
    whole.run()
    cfg = config(tmp_path, "run", keep_checkpoints=3)
    trainer(tmp_path, cfg).run()
    root = tmp_path / "run" / "checkpoints"
    tensors = root / "step-000006" / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:1000])
    cfg = cfg.replace(resume=True, keep_checkpoints=1, checkpoint_every=1)
    with pytest.warns(UserWarning, match="skipping checkpoint"), pytest.raises(Kill):
        trainer(tmp_path, cfg, on_step=kill_at(5)).run()  # resumed at 4, killed after step 5's checkpoint
    assert [p.name for p in ckpt.checkpoints(root)] == ["step-000005", "step-000006"]
    resumed = trainer(tmp_path, cfg)
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        resumed.run()
    assert [p.name for p in ckpt.checkpoints(root)] == ["step-000006"]
    _, saved = ckpt.read_checkpoint(root / "step-000006")  # intact again
    assert saved["step"] == 6
    assert_same(state(resumed), state(whole))


def test_nan_steps_are_skipped_then_the_run_stops(tmp_path):
    t = trainer(tmp_path, config(tmp_path, steps=10, checkpoint_every=0, max_bad_steps=3))
    real = t.velocity
    poisoned = {2, 5, 6, 7}  # steps (1-based) whose student prediction is NaN

    def velocity(x, sigma, cond, guidance):
        v = real(x, sigma, cond, guidance)
        return v * float("nan") if torch.is_grad_enabled() and t.progress.step + 1 in poisoned else v

    t.velocity = velocity
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TrainingError, match="3 steps in a row"):
            t.run()
    assert sum("step skipped" in str(w.message) for w in caught) == 4
    assert t.progress.step == 7 and t.progress.updates == 3  # steps 1, 3, 4 updated
    assert all(torch.isfinite(v).all() for v in state(t).values())


def fake_wandb(monkeypatch) -> list:
    """A `wandb` module that records what the trainer asks of it."""
    import importlib.machinery
    import types

    calls = []

    class Run:
        def log(self, row, step):
            calls.append(("log", step, row))

        def finish(self, exit_code):
            calls.append(("finish", exit_code))

    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.init = lambda **kw: calls.append(("init", kw)) or Run()
    module.Image = lambda path, caption: ("image", path, caption)
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_a_resume_hides_the_killed_runs_tensorboard_events_past_its_checkpoint(tmp_path, monkeypatch):
    """TensorBoard (optional, so a stand-in records what is asked of it): the resumed run's writer purges the
    events from the first step it logs again, so the killed run's step 3 does not plot beside the resumed one."""
    import importlib.machinery
    import types

    writers = []

    class SummaryWriter:
        def __init__(self, log_dir, purge_step=None):
            self.log_dir, self.purge_step, self.scalars = log_dir, purge_step, []
            writers.append(self)

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, step))

        def close(self):
            pass

    module = types.ModuleType("torch.utils.tensorboard")
    module.__spec__ = importlib.machinery.ModuleSpec("torch.utils.tensorboard", None)
    module.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    cfg = config(tmp_path, "tb", steps=4, checkpoint_every=2)
    with pytest.raises(Kill):
        trainer(tmp_path, cfg, on_step=kill_at(3)).run()
    trainer(tmp_path, cfg.replace(resume=True)).run()
    killed, resumed = writers
    assert killed.purge_step == 1 and resumed.purge_step == 3  # the checkpoint is step 2's
    assert {s for tag, s in killed.scalars if tag == "loss"} == {1, 2, 3}
    assert {s for tag, s in resumed.scalars if tag == "loss"} == {3, 4}
    assert killed.log_dir == resumed.log_dir == str(tmp_path / "tb" / "tensorboard")


def test_wandb_gets_the_logged_rows_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    calls = fake_wandb(monkeypatch)
    cfg = config(tmp_path, "wb", steps=4, wandb_project="scfm-test")
    with pytest.raises(Kill):
        trainer(tmp_path, cfg, on_step=kill_at(3)).run()
    trainer(tmp_path, cfg.replace(resume=True)).run()
    inits = [c[1] for c in calls if c[0] == "init"]
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] and inits[0]["resume"] == "allow"
    assert inits[0]["project"] == "scfm-test" and inits[0]["config"]["rank"] == 4
    assert [c for c in calls if c[0] == "finish"] == [("finish", 1), ("finish", 0)]  # killed, then done
    logged = [(c[1], c[2]["loss"]) for c in calls if c[0] == "log"]
    rows = [json.loads(ln) for ln in (tmp_path / "wb" / "log.jsonl").read_text().splitlines()]
    assert logged == [(1, rows[0]["loss"]), (2, rows[1]["loss"]), (3, logged[2][1]), (3, rows[2]["loss"]),
                      (4, rows[3]["loss"])]  # the killed run's step 3, then the resumed run's steps 3 and 4

    from PIL import Image

    from distill.run_outputs import JsonlLog
    from sampling.png_record import save_png

    png = tmp_path / "s.png"  # a sample as the trainer writes it: its prompt in the PNG becomes the caption
    save_png(Image.new("RGB", (8, 8)), png, {"prompt": "a red circle", "step": 2})
    log = JsonlLog(tmp_path / "wb2" / "log.jsonl", 0, "scfm-test")
    log.samples([png], 2)
    assert calls[-1] == ("log", 2, {"samples": [("image", str(png), "a red circle")]})

    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match="pip install wandb"):
        config(tmp_path, wandb_project="p")


def test_fresh_run_refuses_an_output_with_checkpoints(tmp_path):
    cfg = config(tmp_path, steps=2)
    trainer(tmp_path, cfg).run()
    with pytest.raises(TrainingError, match="--resume"):
        trainer(tmp_path, cfg).run()


# ----- config and CLI ---------------------------------------------------------------------------------------


def test_config_file_flags_and_errors(tmp_path):
    preset = load_toml("flux-dev-scfm")
    assert preset["rank"] == 64 and preset["lr"] == 2e-5 and preset["batch_size"] == 8
    assert preset["t_skip"] == 2 and preset["teacher_ratio"] == 0.4 and preset["max_grad_norm"] == 10.0
    assert build_config("flux-dev-scfm") == DistillConfig().replace(**preset)
    file = tmp_path / "a.toml"
    file.write_text('[lora]\nrank = 16\n[optim]\nlr = 1\nsample_prompts = ["a", "b"]\n')
    argv = ["--config", str(file), "--rank", "8", "--no-autocast", "--t-skip", "4"]
    args = vars(build_parser().parse_args(argv))
    cfg = build_config(args.pop("config"), args)
    assert (cfg.lora.rank, cfg.lr, cfg.autocast, cfg.scfm.t_skip, cfg.sample_prompts) == (8, 1.0, False, 4, ("a", "b"))
    file.write_text("rnak = 3\n")
    with pytest.raises(ConfigError, match="unknown field 'rnak' \\(did you mean 'rank'\\?\\)"):
        build_config(str(file))
    file.write_text('rank = "big"\n')
    with pytest.raises(ConfigError, match="'rank' needs a int"):
        build_config(str(file))
    with pytest.raises(ConfigError, match="no such file"):
        build_config(str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="dtype must be one of"):
        build_config(None, {"dtype": "int4"})


def test_help_lists_every_field_with_its_meaning(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for name in flat_fields():  # the tables' fields by their flat names
        assert f"--{name}" in text
    assert "share of teacher elements" in text


def test_sample_every_is_refused_without_sample_prompts_or_with_a_size_the_vae_cannot_make(tmp_path):
    # the fake VAE downscales by 32 and Flux packs 2x2 latent pixels: sample sides are multiples of 64 px
    no_prompts = make_cache(tmp_path / "a", sample_prompts=())
    with pytest.raises(TrainingError, match=r"^sample_every 5: the cache .* holds no sample prompts; pass "
                                            r"--sample_prompts .* or --sample_every 0$"):
        Trainer(config(tmp_path, sample_every=5), tiny_model(), no_prompts, device="cpu")
    Trainer(config(tmp_path, sample_every=0), tiny_model(), no_prompts, device="cpu")  # sampling off: fine
    prompts = make_cache(tmp_path / "b")
    with pytest.raises(TrainingError, match=r"^sample_size 80 is not a multiple of 64 \(this VAE's 32 pixels .* "
                                            r"2 per token\); pass --sample_size 64$"):
        Trainer(config(tmp_path, sample_every=5, sample_size=80), tiny_model(), prompts, device="cpu")
    t = Trainer(config(tmp_path, sample_every=5, sample_size=128), tiny_model(), prompts, device="cpu")
    assert (prompts.downscale, t.sample_side) == (32, 4)


def test_cli_trains_resumes_and_exports(tmp_path, capsys):
    make_cache(tmp_path)
    args = ["--model", "tiny", "--cache", str(tmp_path / "cache"), "--output", str(tmp_path / "cli"),
            "--dtype", "fp32", "--device", "cpu", "--rank", "4", "--batch_size", "2", "--steps", "3",
            "--checkpoint_every", "2", "--sample_every", "3", "--sample_size", "64", "--sample_steps", "2",
            "--export_formats", "diffusers", "--t5_length", "5"]
    assert main(args) == 0
    out = tmp_path / "cli"
    assert (out / "scfm-lora-live.safetensors").exists()
    assert (out / "samples" / "step-000003.safetensors").exists()
    assert main(args) == 2 and "is an earlier run's" in capsys.readouterr().err  # never overwrites without being asked
    assert main([*args, "--steps", "4", "--resume"]) == 0
    assert main(["--model", "tiny", "--output", str(tmp_path / "x"), "--cache", str(tmp_path / "none")]) == 2
    assert "no cache" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["live", "slow_ema"])
def test_export_in_every_layout_reads_back_as_the_chosen_set(tmp_path, which):
    from distill.lora import lora_layers
    from distill.lora_export import export_lora
    from weights.lora import read_lora

    cfg = config(tmp_path, steps=2, checkpoint_every=0, export_set=which)
    t = trainer(tmp_path, cfg)
    t.run()
    paths = export_lora(t.model, cfg)
    assert [p.name for p in paths] == [f"scfm-lora-{which}{s}.safetensors" for s in ("", "-kohya")]  # default
    layers = lora_layers(t.model)
    for path in paths:
        lora = read_lora(path)
        assert set(lora.modules) == set(layers), path.name
        # the config's default t5_length 0 is the family's: FLUX.1's recipe length, as the run trained with
        assert cfg.t5_length == 0 and t.config.t5_length == 256
        assert lora.recommended.max_sequence_length == 256 and lora.recommended.schedule == "scfm"
        for name, layer in layers.items():
            expected = layer.delta_weight(which)
            torch.testing.assert_close(lora.modules[name].delta(), expected, rtol=1e-6,
                                       atol=1e-7 * expected.abs().max().item(), msg=f"{path.name}: {name}")
    with pytest.raises(Exception, match="exist"):
        export_lora(t.model, cfg)
