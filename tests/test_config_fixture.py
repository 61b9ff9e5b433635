"""What a run written before configs nest (tests/fixtures/config_v1, made by its make.py with the flat config)
must still do: resume from its checkpoint with the old flat flags, or from the old TOML file, and export what
that code exported on resuming (expected-step4.safetensors); its exported LoRA still loads onto the model and
names its recipe; its checkpoint's stored config still reads."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from distill.checkpoint import read_checkpoint, stored_config
from distill.train import main

FIXTURE = Path(__file__).parent / "fixtures" / "config_v1"
_spec = importlib.util.spec_from_file_location("config_v1_make", FIXTURE / "make.py")
_make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_make)
flags = _make.flags  # the fixture's own command line: the old flat flag names


@pytest.fixture
def copied(tmp_path):
    shutil.copytree(FIXTURE / "run", tmp_path / "run")
    shutil.copytree(FIXTURE / "cache", tmp_path / "cache")
    return tmp_path


def _same_lora(path: Path) -> None:
    got, want = load_file(path), load_file(FIXTURE / "expected-step4.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert (got[k] - want[k]).abs().max() <= 1e-6, k


@pytest.mark.parametrize("source", ["flags", "toml"])
def test_the_old_run_resumes_and_exports_what_it_did(copied, source):
    if source == "flags":
        argv = flags(copied / "cache", copied / "run", 4, "--resume")
    else:
        argv = ["--config", str(FIXTURE / "run.toml"), "--cache", str(copied / "cache"), "--output",
                str(copied / "run"), "--steps", "4", "--resume"]
    assert main(argv) == 0
    log = (copied / "run" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4]
    _same_lora(copied / "run" / "scfm-lora-live.safetensors")


def test_the_old_lora_loads_and_names_its_recipe():
    import torch

    from model.flux import FLUX_CONFIGS, Flux
    from weights.lora import read_lora
    from weights.lora_merge import apply_loras

    lora = read_lora(FIXTURE / "run" / "scfm-lora-live.safetensors", family="flux")
    rec = lora.recommended  # the recipe's sampling settings, from the run's config
    assert (rec.steps, rec.schedule, rec.shift, rec.max_sequence_length) == (4, "scfm", 3.0, 5)
    model = Flux(FLUX_CONFIGS["tiny"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_loras(model, [(lora, 1.0)], restorable=False)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.endswith(".weight") for k in changed)


def test_the_old_checkpoint_config_reads():
    _, state = read_checkpoint(FIXTURE / "run" / "checkpoints" / "step-000002")
    cfg = stored_config(state)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.scfm.t_skip, cfg.scfm.teacher_ratio) == (2, 2.0, 2, 0.5)
    assert (cfg.ema.fast_decay, cfg.ema.slow_decay) == (0.9, 0.99)
    assert (cfg.scfm.shift_min, cfg.scfm.shift_max, cfg.batch_size, cfg.lr, cfg.export_formats) == (2.0, 4.0, 2, 1e-3,
                                                                                          ("diffusers",))
