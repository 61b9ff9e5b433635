"""`python -m distill.train`: distil a Flux or SD3.5 model into a few-step sampler with an SCFM LoRA.

    python -m distill.train                    # the built-in demo: distils the shipped tiny teacher on a CPU
    python -m distill.train --config flux-dev-scfm --model FLUX.1-dev/ --data teacher_data/ --output runs/a
    python -m distill.train --config sd35-large-scfm --model sd3.5_large.safetensors --data d/ --output runs/b
    python -m distill.train --output runs/a --resume               # continue from the newest checkpoint
    python -m distill.export runs/a                                # that checkpoint as LoRA files (export.py)
    torchrun --nproc_per_node 8 -m distill.train --config runs/a.toml   # data-parallel, same results

Every config field is also a flag (`--field value`; `--help` lists them with their meaning). The first run
encodes the dataset once into a cache of latents and text embeddings (a diffusers pipeline folder as --model
gives its own VAE and text encoders; with single files Flux needs --vae, --clip, --t5, --t5-tokenizer; SD3.5 --vae,
--clip, --clip-g and optionally --t5 with --t5-tokenizer, and also embeds the empty negative prompt once for its
CFG); training itself loads only the transformer.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import textwrap
from pathlib import Path

import torch
import torch.distributed as dist

from sampling.fields import add_dataclass_args, check_fields
from sampling.options import OneLineParser, check_device, plain_warnings
from weights.atomic import folder_lock
from weights.family import Family
from weights.io import WeightsError, read_header
from weights.lora_foreign import peft_file
from weights.lora_merge import lora_spec, merge_while_reading
from weights.lora_text import transformer_parts

from .checkpoint import checkpoints, newest_settings
from .config import ConfigError, DistillConfig, flat_fields
from .config_files import build_config, load_toml, presets
from .dataset import DataError
from .lora import inject_lora, set_state_dict
from .lora_export import EARLIER, export_lora, export_paths, keep_earlier_export
from .run_outputs import os_error_line
from .run_setup import (
    check_writable,
    family_of,
    load_model,
    prepare_cache,
    render_demo_data,
    resolve_demo,
    resolve_folder,
    setup_distributed,
    step_distilled,
    teacher_set,
    with_recipe_cfg,
    with_text_length,
)
from .sharding import loads_on_cpu
from .student import family_refusal, lora_config
from .trainer import Stopped, Trainer, TrainingError

# What a new run takes from its model where no flag or file sets it: the LoRA target table (the model's family's,
# the only one it accepts) and the cfg_scale of the family's recipe (run_setup.with_recipe_cfg)
UNSET_FOLLOWS_MODEL = frozenset({"targets", "cfg_scale"})


def demo_values() -> dict:
    """The fields the demo preset (what a run with neither --config nor --model takes) sets to other values than
    the fields' defaults, read from distill/configs/demo.toml."""
    table = check_fields(DistillConfig, load_toml("demo"), "the demo preset", ConfigError)
    return {k: v for k, v in table.items() if v != flat_fields()[k][0].default}


def build_parser() -> argparse.ArgumentParser:
    demo = demo_values()
    said = ", ".join(f"{k} {v!r}" if isinstance(v, str) else f"{k} {v}" for k, v in demo.items())
    note = textwrap.fill("With neither --config nor --model (nor a --resume of a checkpointed run, which keeps its "
                         "own settings) the demo preset distill/configs/demo.toml applies, not the defaults in "
                         "brackets below: each flag's help gives the demo's value after its default where they "
                         f"differ. The demo's values: {said}.", width=116)
    p = OneLineParser(prog="python -m distill.train", description=f"{__doc__}\n{note}",
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"a TOML file, or a packaged preset name ({', '.join(presets())})")
    add_dataclass_args(p.add_argument_group("config fields (override the file)"), DistillConfig, also=("demo", demo))
    return p


# ----- main -------------------------------------------------------------------------------------------------


def check_paths(cfg: DistillConfig) -> None:
    """What would otherwise fail as a traceback after the cache is built or the model loaded."""
    out = Path(cfg.output).expanduser()
    taken = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if taken is not None:
        raise ConfigError(f"--output {cfg.output}: {taken} is a file, not a folder; choose another --output")
    # the run's own paths: a file (or a read-only folder) there would fail only at the first checkpoint, sample
    # or export, steps into the run; one that does not exist yet is made in --output, checked in run()
    fix = "move it aside or choose another --output"
    own = [out / "checkpoints", *([out / "samples"] if cfg.sample_every else []),
           *([out / EARLIER] if cfg.resume else [])]
    for path in own:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{path}: a file where the run makes its {path.name} folder; {fix}")
        if path.exists():
            check_writable(path, fix)
    for path in export_paths(cfg).values():
        if path.is_dir():
            raise ConfigError(f"{path}: a folder where the run exports its LoRA; {fix}")
    cache = Path(cfg.cache).expanduser() if cfg.cache else None
    if cache is not None and cache.exists() and not cache.is_dir():
        raise ConfigError(f"--cache {cfg.cache}: a file, not a folder; pass a cache folder (or leave --cache out "
                          "for <output>/cache)")
    if cfg.lora.teacher_lora:  # missing, pickled or not safetensors: refused here, before the model loads
        read_header(peft_file(Path(cfg.lora.teacher_lora).expanduser()))


def check_resume(cfg: DistillConfig) -> None:
    """--resume where nothing was ever run (a mistyped --output, say) is refused before a folder is made: starting
    a new run there is not what was asked. A run stopped before its first checkpoint (its log.jsonl, or exports,
    are there) goes on as before: `_run_locked` restarts it from step 0, or refuses to replace its exports."""
    out = Path(cfg.output).expanduser()
    if not cfg.resume or checkpoints(out / "checkpoints"):
        return
    if not ((out / "log.jsonl").exists() or any(out.glob("scfm-lora-*.safetensors"))):  # its exports among them
        raise ConfigError(f"--resume: no checkpoint in {out / 'checkpoints'}; check --output, or drop --resume to "
                          "start a new run")


def check_loras(cfg: DistillConfig, family: Family) -> None:
    """--base_loras and --teacher_lora against the model's shapes, before the demo renders its data and the cache
    is built (the model and the trainer would refuse them only then): on the meta model its headers give (no
    weight is read), the base LoRAs as the loader merges them and the teacher as the trainer places it."""
    if not (cfg.lora.base_loras or cfg.lora.teacher_lora):
        return
    meta = torch.device("meta")
    model = load_model(cfg.replace(base_loras=(), fp8_base=False, fp8_compute=False), meta, family)
    if cfg.lora.base_loras:
        try:
            merge_while_reading(model, transformer_parts([lora_spec(s) for s in cfg.lora.base_loras], family.name))
        except WeightsError as e:
            raise ConfigError(f"--base_loras: {e}") from None
    if cfg.lora.teacher_lora:
        inject_lora(model, lora_config(cfg))
        teacher_set(model, cfg.lora.teacher_lora, family, device=meta)


def check_family(cfg: DistillConfig, family: Family) -> None:
    """What the model's family refuses, before anything is rendered or cached (Trainer checks again, for Python
    callers): a family SCFM cannot train yet, another family's LoRA targets, a baked-in CFG for a model without."""
    family.part("lora_targets")
    refused = family_refusal(cfg, family, lambda: getattr(
        load_model(cfg, torch.device("meta"), family).config, "guidance_embed", False))
    if refused:
        raise ConfigError(refused)
    distilled, source = step_distilled(cfg, family)
    if cfg.scfm.cfg_scale > 0 and distilled:  # its LoRA would be sampled without the CFG it was trained with
        raise ConfigError(f"cfg_scale {cfg.scfm.cfg_scale:g}: {cfg.model} is the step-distilled {family.display} "
                          f"(from {source}), which samples without CFG; train on the base model, or pass "
                          "--cfg_scale 0")


def run(cfg: DistillConfig, on_step=None, unset: frozenset[str] = frozenset()) -> list[Path]:
    """`unset`: the fields of UNSET_FOLLOWS_MODEL no flag, file or resumed run set (make_config), which a new run
    takes from its model: the family's LoRA targets and its recipe's cfg_scale (run_setup.with_recipe_cfg). A
    Python caller's config is taken as it is."""
    check_paths(cfg)
    check_resume(cfg)
    check_writable(Path(cfg.output).expanduser(), "choose another --output")  # before the cache and model
    if cfg.device != "auto":
        try:  # a GPU this machine lacks: one line now, not an AttributeError from torch.cuda.set_device
            check_device(cfg.device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    device = setup_distributed(cfg)
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        with folder_lock(Path(cfg.output).expanduser(), "training run") if rank == 0 else contextlib.nullcontext():
            return _run_locked(cfg, device, rank, on_step, unset)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_locked(cfg: DistillConfig, device: torch.device, rank: int, on_step, unset: frozenset[str]) -> list[Path]:
    """run() once rank 0 holds the output folder (a second run on it is refused, weights/atomic.py folder_lock)."""
    out = Path(cfg.output).expanduser()
    clash = [p for p in export_paths(cfg).values() if p.exists()]
    checkpointed = bool(checkpoints(out / "checkpoints"))
    if not cfg.resume:  # another run's log or LoRAs there: this run would wipe its log and mix its files in
        earlier = clash or [p for p in (out / "log.jsonl", *sorted(out.glob("scfm-lora-*.safetensors"))) if p.exists()]
        if earlier:
            raise ConfigError(f"{earlier[0]} is an earlier run's; choose another --output (or --resume that run)")
    if clash and not checkpointed:
        raise ConfigError(f"--resume: no checkpoint to continue from, and {clash[0]} is an earlier run's: "
                          "starting over would replace it; choose another --output")
    if cfg.resume and not checkpointed:  # a run stopped before its first (check_resume)
        if rank == 0:  # said here in one line, not as the trainer's warning
            print(f"--resume: no checkpoint in {out / 'checkpoints'} yet; starting that run again from step 0",
                  file=sys.stderr)
        cfg = cfg.replace(resume=False)
    demo_data = cfg.model == "demo" and not cfg.data
    cfg = resolve_demo(cfg)
    family = family_of(cfg)
    if not cfg.resume:  # a resumed run (checkpointed: one without restarts above) goes on with the parts and CFG it
        cfg = resolve_folder(cfg, family)  # recorded; a pipeline folder's own parts, for those no flag names
        if "targets" in unset:  # the one table this model takes (student.family_refusal refuses any other)
            cfg = cfg.replace(targets=family.name)
        cfg = with_recipe_cfg(cfg, family) if "cfg_scale" in unset else cfg  # set by nothing: the recipe's
    check_family(cfg, family)  # before the demo renders its data and the cache is built
    check_loras(cfg, family)
    cfg = with_text_length(cfg, family)  # before the demo renders its data at that length
    if demo_data and rank == 0:
        render_demo_data(cfg)
    cache = prepare_cache(cfg, device, rank, family)
    if cfg.cache_only:
        return []
    try:
        model = load_model(cfg, torch.device("cpu") if loads_on_cpu(cfg) else device, family)
    except torch.OutOfMemoryError:
        tip = "" if cfg.fp8_storage else "; --fp8_base stores its blocks in fp8 (Flux-dev 23.7 -> 11.9 GB)"
        raise TrainingError(f"out of GPU memory loading the model{tip}") from None
    try:
        trainer = Trainer(cfg, model, cache, device=device, on_step=on_step)
        trainer.run()  # a step's own out-of-memory is its one line already (Trainer.out_of_memory)
    except torch.OutOfMemoryError:  # the sets and optimizer, a sample image, a checkpoint's gathering
        raise TrainingError("out of GPU memory outside a training step (setting up the LoRA sets, sampling "
                            "images or writing a checkpoint); checkpoints written so far are intact: add "
                            "--fp8_base or --blocks_to_swap N, or lower --sample_size / --sample_every 0, then "
                            "--resume") from None
    state = set_state_dict(trainer.model, cfg.export_set)  # on every process: a sharded set is gathered
    if rank != 0:
        return []
    for old, aside in keep_earlier_export(cfg, cfg.steps) if cfg.resume else ():
        print(f"--resume: {old.name}, exported at an earlier step, moved to {aside} (this run's export takes "
              "its name)", file=sys.stderr)
    return export_lora(trainer.model, cfg, overwrite=cfg.resume, state=state, base_loras=trainer.base_loras)


def make_config(file: str | None, args: dict) -> tuple[DistillConfig, frozenset[str]]:
    """The run's config from the config file and the flags, and the fields of UNSET_FOLLOWS_MODEL neither sets
    (a new run takes them from its model: run()). With --resume: the run's own settings (its newest
    checkpoint's) under the config file and the flags given now, so `--output RUN --resume` is enough, and flags
    are checked against that run's settings, not the demo's (`--resume --blocks_to_swap 19` on a checkpointed
    run); what may not change (checkpoint.RESUME_FIXED, the model, the cache) is then refused by the trainer."""
    preset = file or (None if args.get("model") else "demo")  # no config and no model: the built-in demo
    table = load_toml(preset) if preset else {}
    unset = UNSET_FOLLOWS_MODEL - (table | args).keys()
    if args.get("resume", table.get("resume")):
        output = args.get("output") or table.get("output") or DistillConfig.output
        stored = newest_settings(Path(output).expanduser() / "checkpoints")
        if stored is not None:
            if "unchecked_blocks" in args and "max_memory" not in args:  # that run's budget was for its "auto"
                stored = {**stored, "max_memory": ""}
            if stored.get("data") == str(Path(stored.get("output", "")).expanduser() / "data"):
                # the data the demo rendered into its run folder (run_setup.resolve_demo): moved with the folder
                stored = {**stored, "data": str(Path(output).expanduser() / "data")}
            return build_config(file, args, base=stored), frozenset()  # the run's own, as it began
    return build_config(preset, args), unset


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    cfg = None
    try:
        file = args.pop("config")
        cfg, unset = make_config(file, args)
        for path in run(cfg, unset=unset):
            print(path)
    except Stopped as e:  # Ctrl-C or SIGTERM, with a checkpoint written
        print(f"stopped: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # Ctrl-C before the loop (rendering, caching, loading), or a second one inside it
        print("stopped: interrupted; what was written stays: run the same command again (rendering and caching go "
              "on where they stopped), or add --resume once a checkpoint exists", file=sys.stderr)
        return 130
    except (ConfigError, DataError, WeightsError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk's own refusal (full, a file in the way, read-only): what is written stays
        output = Path(cfg.output if cfg is not None else args.get("output") or DistillConfig.output).expanduser()
        print(f"error: {os_error_line(e, output)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    plain_warnings()
    sys.exit(main())
