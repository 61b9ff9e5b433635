"""`python -m distill.export`: any checkpoint's LoRA set as the files the run's final export writes, from the
checkpoint alone (distill/lora_export.py), on the tiny Flux."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_lora
from flux_fixtures import tiny_config
from safetensors.torch import load_file
from test_trainer import config, trainer

import distill.lora_export
from distill.export import main
from distill.lora import lora_layers
from distill.lora_export import export_checkpoint, export_lora
from model.flux import Flux
from weights.io import read_header
from weights.lora import read_lora

LAYOUTS = ("ours", "diffusers", "kohya")


def trained(tmp_path, on_step=None, **kw):
    """A 4-step run with checkpoints at steps 2 and 4 (the last is written at the end)."""
    cfg = config(tmp_path, steps=4, checkpoint_every=2, keep_checkpoints=3, **kw)
    t = trainer(tmp_path, cfg, on_step=on_step)
    t.run()
    return cfg, t


def assert_same_files(a, b) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys(), (a.name, b.name)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), (a.name, k)
    # metadata: hints, provenance, steps; not the title (the file's own name) and the date (of the writing)
    meta_a, meta_b = ({k: v for k, v in read_header(f)[1].items() if k not in ("modelspec.title", "modelspec.date")}
                      for f in (a, b))
    assert meta_a == meta_b, (a.name, b.name)


def test_the_newest_checkpoint_exports_what_the_run_exports_in_every_layout(tmp_path):
    cfg, t = trained(tmp_path, export_formats=LAYOUTS)
    final = export_lora(t.model, cfg)
    got = export_checkpoint(cfg.output)
    assert [p.name for p in got] == [f"scfm-lora-live-step000004{s}.safetensors"
                                     for s in ("-scfm-only", "", "-kohya")]
    assert all(p.parent == final[0].parent for p in got)  # beside the run's own export
    for a, b in zip(final, got, strict=True):
        assert_same_files(a, b)


def test_an_earlier_checkpoint_exports_its_own_set_without_reading_the_base(tmp_path, monkeypatch):
    deltas = {}

    def at_step(step):  # the checkpoint of step 2 is written before this hook runs
        if step == 2:
            deltas.update({n: layer.delta_weight("slow_ema").clone() for n, layer in lora_layers(t.model).items()})

    cfg = config(tmp_path, steps=4, checkpoint_every=2, keep_checkpoints=3)
    t = trainer(tmp_path, cfg, on_step=at_step)
    t.run()

    def no_base(*_, **__):
        raise AssertionError("the export read the base model")

    monkeypatch.setattr(distill.lora_export, "load_model", no_base)
    folder = tmp_path / "out"
    paths = export_checkpoint(tmp_path / "run" / "checkpoints" / "step-000002", "slow_ema", LAYOUTS, folder)
    assert [p.parent for p in paths] == [folder] * 3
    final = {n: layer.delta_weight("slow_ema") for n, layer in lora_layers(t.model).items()}
    for path in paths:
        assert json.loads(read_header(path)[1]["scfm_training"])["steps"] == 2
        lora = read_lora(path)
        assert set(lora.modules) == set(deltas), path.name
        for name, want in deltas.items():
            assert not torch.equal(want, final[name])  # step 2's set, not the one trained on to step 4
            torch.testing.assert_close(lora.modules[name].delta(), want, rtol=1e-6,
                                       atol=1e-7 * want.abs().max().item(), msg=f"{path.name}: {name}")


def test_an_older_checkpoint_without_the_model_config_reads_the_model_files_header(tmp_path):
    trained(tmp_path)
    step = tmp_path / "run" / "checkpoints" / "step-000004"
    new = export_checkpoint(step, formats=("kohya",), folder=tmp_path / "new")
    state = json.loads((step / "state.json").read_text())
    del state["model"], state["base_loras"]  # written before the export existed
    (step / "state.json").write_text(json.dumps(state))
    old = export_checkpoint(step, formats=("kohya",), folder=tmp_path / "old")
    assert_same_files(new[0], old[0])


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_the_guidance_hint_is_written_only_for_a_model_with_a_guidance_input(tmp_path, guidance):
    """The sample guidance is recommended (scfm_guidance, the ModelSpec usage hint) for a Flux with a guidance
    embedding (dev); a schnell-like model has no guidance input, so its files recommend none, in every layout."""
    model = Flux(tiny_config(guidance))
    random_lora(model, rank=4, alpha=4.0)
    cfg = config(tmp_path, export_formats=LAYOUTS, sample_guidance=2.5)
    for path in export_lora(model, cfg):
        meta = read_header(path)[1]
        if guidance:
            assert meta["scfm_guidance"] == "2.5" and meta["modelspec.usage_hint"].endswith(", guidance 2.5")
        else:
            assert "scfm_guidance" not in meta and "guidance" not in meta["modelspec.usage_hint"], path.name
        assert meta["scfm_steps"] == str(cfg.sample_steps)  # the other hints are written either way


def test_cli_refuses_to_overwrite_and_says_what_is_wrong_in_one_line(tmp_path, capsys):
    cfg, _ = trained(tmp_path)
    run = cfg.output
    assert main([run, "--set", "fast_ema", "--formats", "kohya"]) == 0
    assert capsys.readouterr().out.strip().endswith("scfm-lora-fast_ema-step000004-kohya.safetensors")
    cases = [
        ([run, "--set", "fast_ema", "--formats", "kohya"], "exists"),  # never overwritten unless asked
        ([run, "--set", "teacher"], "--set teacher: no such LoRA set"),  # the flag typed, not the config field
        ([str(tmp_path / "nowhere")], "no such folder"),
        ([str(tmp_path / "cache")], "no intact checkpoint"),
    ]
    for argv, says in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
    assert main([run, "--set", "fast_ema", "--formats", "kohya", "--overwrite"]) == 0
    damaged = tmp_path / "run" / "checkpoints" / "step-000002"
    with open(damaged / "tensors.safetensors", "r+b") as f:
        f.truncate(100)
    assert main([str(damaged)]) == 2
    err = capsys.readouterr().err
    assert "sha256" in err and err.count("\n") == 1, err
    assert main([run, "--formats", "ours"]) == 0  # the run folder's newest intact checkpoint is still fine
