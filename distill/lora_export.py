"""The trained LoRA as files other tools load: at the end of a run, and from any checkpoint while it goes on.

    python -m distill.export runs/a                      # the newest checkpoint, in the run's set and layouts
    python -m distill.export runs/a/checkpoints/step-001200 --set slow_ema --formats kohya

A checkpoint holds every LoRA set (live, fast_ema, slow_ema, and a teacher LoRA if one was given) and the
model's config, so an export reads the checkpoint alone: neither the base weights nor a GPU, and the run may be
training meanwhile. Which step and which set a few-step sampler is best at is found by trying them
(`python -m distill.evaluate --lora FILE`), so every checkpoint can become a file ComfyUI, diffusers and
`sampling.generate` load. Files are named `scfm-lora-{set}-step{N}[-{layout}].safetensors`, beside the run's
final export, and an existing file is never overwritten unless asked.

The file without a layout suffix is the diffusers / PEFT layout with alpha folded into the weights: for FLUX.1
and SD3.5 the one file ComfyUI, Forge, diffusers and scfm all load at the right strength (weights/lora.py).
`-kohya` is the sd-scripts layout (kohya's tools, A1111-style loaders), and for FLUX.2 [klein] the file ComfyUI
loads whole: its map of diffusers' FLUX.2 names lacks the shared modulations and the time embedding, and no one
file loads right in both (README, "Distil klein base"). `-scfm-only` is our own layout, which only scfm reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from sampling.samplers import cfg_scale_from_w
from weights.io import WeightsError, read_header

from .checkpoint import STEP_DIR, CheckpointError, first_non_finite, latest_checkpoint, read_checkpoint, stored_config
from .config import ConfigError, DistillConfig
from .lora import inject_lora, lora_layers, set_state_dict
from .run_outputs import base_lora_records
from .run_setup import check_writable, load_model, with_text_length
from .student import lora_config, model_family

# The main file (no suffix) loads everywhere; the others are named for who reads them.
SUFFIXES = {"diffusers": "", "kohya": "-kohya", "ours": "-scfm-only"}


def export_paths(cfg: DistillConfig, step: int | None = None, folder: Path | None = None) -> dict[str, Path]:
    """Layout -> file: the run's final export, or with `step` a checkpoint's (both in the run folder by default)."""
    out = Path(folder or cfg.output).expanduser()
    tag = "" if step is None else f"-step{step:06d}"
    return {fmt: out / f"scfm-lora-{cfg.export_set}{tag}{SUFFIXES[fmt]}.safetensors"
            for fmt in cfg.export_formats}


def export_step(path: Path) -> int | None:
    """The step an exported LoRA file records (its `ss_steps`), None when it records none or does not read."""
    try:
        return int(read_header(path)[1]["ss_steps"])
    except (WeightsError, OSError, KeyError, ValueError):
        return None


EARLIER = "earlier-exports"  # beside the run's export: a glob of the run folder for its export still finds one


def keep_earlier_export(cfg: DistillConfig, step: int) -> list[tuple[Path, Path]]:
    """A resumed run's final export takes the names of the export its run made at an earlier end (`--resume
    --steps 8` on a finished 4-step run), whose checkpoint pruning may since have deleted: that export is the
    step's only copy, so each of its files first moves into <output>/earlier-exports, renamed with its step
    (scfm-lora-slow_ema.step-000004.safetensors), never over an existing file. An export of this same `step`
    is replaced as before. Returns (old, new) per file moved."""
    moved = []
    for path in export_paths(cfg).values():
        if not path.is_file():
            continue
        old = export_step(path)
        if old == step:
            continue
        stem = f"scfm-lora-{cfg.export_set}"
        tag = f".step-{old:06d}" if old is not None else ".earlier"
        aside = path.parent / EARLIER / (stem + tag + path.name[len(stem):])
        try:
            aside.parent.mkdir(exist_ok=True)
            if aside.exists():
                raise FileExistsError
            try:  # a hard link fails when `aside` appeared meanwhile: nothing is overwritten; then the name is freed
                os.link(path, aside)
                os.unlink(path)
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: a rename, `aside` checked just above
                os.rename(path, aside)
        except FileExistsError:
            raise WeightsError(f"{path}: the export of an earlier step, and {aside} exists too; move one of them "
                               "aside, then run the same command again") from None
        except OSError as e:
            raise WeightsError(f"{path}: the export of an earlier step could not move aside to {aside} "
                               f"({e.strerror or e}); move it yourself, then run the same command again") from None
        moved.append((path, aside))
    return moved


def lora_metadata(cfg: DistillConfig, model, step: int, base_loras: list[dict], hints) -> dict[str, str]:
    """How the LoRA was made and how to sample it, for us (`scfm_training`) and for the tools that show a
    LoRA's card (ModelSpec and sd-scripts keys; the layout's own metadata adds rank, alpha and our hints)."""
    from weights.lora_write import base_architecture

    info = {"objective": cfg.scfm.objective, "set": cfg.export_set, "steps": step, "t_skip": cfg.scfm.t_skip,
            "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed, "base": model.config.to_dict()}
    if base_loras:  # generate warns when this LoRA is sampled without them
        info["base_loras"] = base_loras
    if cfg.scfm.cfg_scale:  # docs/method.md §5: what every training call computed, and how to sample it
        info["cfg"] = {"w": cfg.scfm.cfg_scale, "formula": "cond + w * (cond - uncond)", "negative_prompt": "",
                       "diffusers_guidance_scale": cfg_scale_from_w(cfg.scfm.cfg_scale)}
    family = model_family(model)
    what = "SCFM velocity-field self-distillation"
    if cfg.scfm.objective == "flow_matching":
        what = usage = "LoRA trained with the flow-matching objective: sample it as its base model"
    else:
        usage = f"SCFM few-step LoRA: {hints.steps} Euler steps, shift {hints.shift:g} (README: Use the LoRA)"
    if hints.guidance is not None:
        usage += f", {'guidance' if family.guidance == 'embedding' else 'CFG scale'} {hints.guidance:g}"
    return {"scfm_training": json.dumps(info),
            "modelspec.architecture": f"{base_architecture(family.name, model.config)}/lora",
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}", "modelspec.usage_hint": usage,
            "modelspec.description": f"{what}, {cfg.export_set} weights, step {step}",
            "ss_max_train_steps": str(cfg.steps), "ss_steps": str(step), "ss_learning_rate": str(cfg.lr),
            "ss_seed": str(cfg.seed), "ss_training_comment": usage}


def export_lora(model, cfg: DistillConfig, *, overwrite: bool = False, state: dict | None = None,
                step: int | None = None, folder: Path | None = None, base_loras: list[dict] | None = None
                ) -> list[Path]:
    """The chosen set (`cfg.export_set`) in each requested layout, through the LoRA file code (weights/lora.py).
    `state`: the set already gathered (a sharded model's, gathered by every process together) or read from a
    checkpoint; `step`: a checkpoint's step (named in the file), else the run's final export of `cfg.steps`;
    `base_loras`: the records of the LoRAs merged into the base (computed from `cfg` when not given)."""
    from weights.lora import Recommended
    from weights.lora_write import save_lora

    family = model_family(model)
    cfg = with_text_length(cfg, family, warn=False)  # t5_length 0: the family's, as the run trained with
    state = {k: v.float() for k, v in (state or set_state_dict(model, cfg.export_set)).items()}
    bad = first_non_finite(state)
    if bad is not None:  # a diverged run's LoRA would load everywhere and draw black images
        where = f"step {step}" if step is not None else "the run's end"
        raise WeightsError(f"LoRA set {cfg.export_set!r} at {where} holds NaN/inf (first bad tensor {bad}); "
                           "nothing exported: export an earlier checkpoint (python -m distill.export "
                           "RUN/checkpoints/step-N) or another --set")
    slices = {name: layer.slices for name, layer in lora_layers(model).items()}
    # docs/method.md §8: a few Euler steps on the SCFM grid at shift ~3; the T5 length it was distilled with.
    # Flux-dev: its guidance input. SD3.5 with CFG baked in: sampled as trained, c + w (c - u) against the
    # empty prompt, which is diffusers' guidance scale 1 + w (generate reads it as that).
    if family.guidance == "embedding":
        guidance = cfg.sample_guidance if model.config.guidance_embed else None
    else:
        guidance = cfg_scale_from_w(cfg.scfm.cfg_scale) if cfg.scfm.cfg_scale else None
    hints = Recommended(steps=cfg.sample_steps, schedule="scfm", shift=cfg.sample_shift, guidance=guidance,
                        max_sequence_length=cfg.t5_length, training_cfg_scale=cfg.scfm.cfg_scale or None)
    if cfg.scfm.objective == "flow_matching":  # an ordinary LoRA: sampled as its base is, nothing to recommend
        hints = Recommended(max_sequence_length=cfg.t5_length)
    records = base_lora_records(cfg.lora.base_loras) if base_loras is None else base_loras
    metadata = lora_metadata(cfg, model, cfg.steps if step is None else step, records, hints)
    paths = export_paths(cfg, step, folder)
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:  # every target checked first: none is written when one would be refused
        raise WeightsError(f"{', '.join(existing)} exist{'s' if len(existing) == 1 else ''}; pass --overwrite to "
                           "replace, or another --output")
    written = []
    for fmt, path in paths.items():
        try:
            written.append(save_lora(state, path, layout=fmt, alpha=cfg.lora.alpha, rank=cfg.lora.rank, slices=slices,
                                     family=family.name, metadata=metadata, recommended=hints, overwrite=overwrite))
        except OSError as e:  # a full disk: the write went to a temp file, removed; `path` is as it was
            raise WeightsError(f"{path}: not written ({e.strerror or e}); free some space (or pass a writable "
                               "--output), then export again") from None
    return written


# ----- from a checkpoint ------------------------------------------------------------------------------------


def find_checkpoint(source: Path) -> tuple[Path, dict, dict]:
    """A checkpoint folder as given, or a run folder's newest intact checkpoint: (path, tensors, state)."""
    if source.is_file():
        raise ConfigError(f"{source}: a file; pass the run folder (--output of distill.train) or one of its "
                          "checkpoints/step-NNNNNN folders")
    if not source.is_dir():
        raise ConfigError(f"{source}: no such folder; pass a run folder (--output of distill.train) or one of its "
                          "checkpoints/step-NNNNNN folders")
    if (source / "state.json").exists() or STEP_DIR.fullmatch(source.name):
        try:
            return source, *read_checkpoint(source)
        except (ValueError, OSError) as e:
            if not source.is_dir():  # pruned by the run writing there (it keeps its newest --keep_checkpoints)
                raise ConfigError(f"{source}: deleted while being read (the run writing there keeps only its newest "
                                  "checkpoints); pass the run folder for its newest one") from None
            raise ConfigError(f"{e}; pass another checkpoint, or the run folder for its newest intact one") from None
    try:
        with warnings.catch_warnings(record=True) as caught:  # a damaged checkpoint skipped: one line, no source
            warnings.simplefilter("always")
            found = latest_checkpoint(source / "checkpoints")
    except CheckpointError as e:
        raise ConfigError(f"{e}; nothing to export") from None
    for w in caught:
        print(f"warning: {' '.join(str(w.message).split())}", file=sys.stderr)
    if found is None:
        raise ConfigError(f"{source}: no intact checkpoint in {source / 'checkpoints'}; is it a run folder?")
    return found


def model_on_meta(cfg: DistillConfig, state: dict):
    """The trained model's architecture with its LoRA layers, holding no data: what a file's layout needs (layer
    names, fused slices, the config). Checkpoints record the config; older ones name the model file, whose header
    is read (no tensor)."""
    from weights.families import get_family

    if "model" in state:
        family = get_family(state["model"]["family"])
        with torch.device("meta"):
            model = family.model_class(family.config_class.from_dict(state["model"]["config"]))
    else:
        model = load_model(cfg, torch.device("meta"))
    inject_lora(model, lora_config(cfg))
    return model


def export_checkpoint(source: str | Path, lora_set: str | None = None, formats: tuple[str, ...] | None = None,
                      folder: str | Path | None = None, overwrite: bool = False) -> list[Path]:
    """Write a checkpoint's LoRA set (default: the run's `export_set`) in `formats` (default: the run's)."""
    if lora_set is not None and not lora_set.strip():  # '' would fall back to the run's set unnoticed
        raise ConfigError("--set '': empty; pass live, fast_ema or slow_ema (or leave --set out for the run's "
                          "export_set)")
    path, tensors, state = find_checkpoint(Path(source).expanduser())
    cfg = stored_config(state)
    cfg = dataclasses.replace(cfg, export_set=lora_set or cfg.export_set,
                              export_formats=tuple(formats or cfg.export_formats))
    prefix = f"lora.{cfg.export_set}."
    lora = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not lora:
        sets = sorted({k.split(".")[1] for k in tensors if k.startswith("lora.")})
        raise ConfigError(f"{path}: no LoRA set {cfg.export_set!r}; it holds {', '.join(sets)} (--set)")
    # beside the run's final export; a checkpoint copied out of its run: beside the checkpoint
    run_folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    check_writable(Path(folder).expanduser() if folder else run_folder,
                   "pass --output FOLDER" if not folder else "choose another --output")
    return export_lora(model_on_meta(cfg, state), cfg, overwrite=overwrite, state=lora,
                       step=state["progress"]["step"], folder=Path(folder) if folder else run_folder,
                       base_loras=state.get("base_loras"))
