"""One row of `python -m distill.evaluate --out` (distill/judge.py runs them all): its folder under --out, the
manifest that says what the folder was rendered with (so a rerun reuses it, or refuses it when the settings
changed), the rendering of the noises the folder lacks, and the clock that times the sampling in it."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sampling.compare import Column, Session
from sampling.components import COMPONENT_FILES
from sampling.options import run_dtype
from weights.atomic import atomic_path, atomic_save
from weights.io import file_sha256, read_json_object

from . import metrics


@dataclass
class Row:
    name: str
    column: Column
    model: str | None = None  # --compare-model: another whole model (None: --model)


def folder_name(name: str) -> str:
    """A row's folder under --out: one level (a/scfm-lora@1 2 -> a--scfm-lora-at-1_2), no spaces."""
    return name.replace(" ", "_").replace("@", "-at-").replace("/", "--")


# What generate reads besides the row's LoRAs and grid: each changes the pixels, so a folder rendered with another
# is not the same row. The files are recorded by content (distill/data.file_identity: sizes, headers, sampled
# chunks), so one file reached by another path or from another cwd still matches. A key missing from an older
# manifest reads as its default here, so folders rendered before a key was recorded stay usable. The guidance (FLUX.1's
# guidance input, SD3.5's and klein's CFG scale) is the one generate samples the row at; one missing from an older
# manifest reads as the row's guidance without a flag (its LoRAs' recommendation, else the family default: what
# rows were rendered at before the teacher rows took the student's), in render_row.
COMPONENTS = tuple(c for c in COMPONENT_FILES if c not in ("no_t5", "variant"))  # the files (those two: flags)
DEFAULTS = {"fp8_compute": False, "no_t5": False, "ignore_te_lora": False, "variant": None,
            "model_identity": None, **{f"{c}_identity": None for c in COMPONENTS}}


@functools.lru_cache(maxsize=None)
def _identity_of(path: str) -> str | None:
    from .data import weights_identity

    return weights_identity(path)


def sampled_guidance(session: Session, col: Column, args, prompts: list[str]) -> float:
    """The guidance generate samples `col` at on the session's model: the column's, else its LoRAs'
    recommendation, else the family's default (klein: its variant's). Headers only; generate's refusals apply."""
    from sampling.job import generation_config, lora_recommendations

    argv = session.column_argv(prompts, "", args.seed, args.width, args.height, col)
    with contextlib.redirect_stderr(io.StringIO()):  # klein's variant line: the render prints it
        cfg = generation_config(session.parse(argv), session.family,
                                lora_recommendations([str(session.allowed(p)) for p, _ in col.loras]))
    return cfg.guidance


def manifest(row: Row, args, session: Session, prompts: list[str], guidance: float | None = None) -> dict:
    loras = [{"file": Path(p).name, "sha256": file_sha256(p), "scale": s} for p, s in row.column.loras]
    col = row.column
    model = str(Path(row.model or session.model).expanduser().resolve())
    files = {f"{c}_identity": _identity_of(str(Path(getattr(args, c)).expanduser().resolve()))
             for c in COMPONENTS if getattr(args, c, None)}
    return {**DEFAULTS, **dict(model=model, loras=loras, steps=col.steps, shift=col.shift, schedule=col.schedule,
                               guidance=guidance, seed=args.seed, prompts=prompts, width=args.width,
                               height=args.height, dtype=run_dtype(args), device=args.device, fp8=args.fp8,
                               fp8_compute=bool(getattr(args, "fp8_compute", False)),
                               no_t5=bool(getattr(args, "no_t5", False)),
                               ignore_te_lora=bool(getattr(args, "ignore_te_lora", False)),
                               variant=getattr(args, "variant", None), model_identity=_identity_of(model)),
            **files}


def differing(have: dict, want: dict) -> list[str]:
    """The settings a folder's manifest records otherwise than this run asks; its model by content where both
    record it (a path from another cwd names the same folder), else by path."""
    have = {**DEFAULTS, **have}
    model = ("model", "model_identity")
    keys = [k for k in want if k not in model and have.get(k) != want[k]]
    keys += [k for k in have if k not in want]
    if have["model_identity"] is not None:
        keys += ["model"] if have["model_identity"] != want["model_identity"] else []
    elif str(Path(str(have.get("model"))).expanduser().resolve()) != want["model"]:
        keys.append("model")
    return [k.removesuffix("_identity") for k in keys]


class SamplingClock:
    """What sampling costs a user per image: each batch's sampler calls and VAE decode, timed around the loaded
    pipeline's `sample` and `decode` while Session.render runs. Left out: the text encoders (run once per prompt
    list and text-encoder LoRA state: the Session keeps the last encoding), the LoRA merge before a row, PNG writing,
    and the first call on a freshly loaded model (lazy VAE load, allocations, kernel selection), which a one-step
    warm-up takes instead, so the row rendered first is not the slow one."""

    def __init__(self, pipe):
        self.pipe, self.warm = pipe, False

    @contextmanager
    def timing(self):
        """Yields a list that gets each batch's seconds."""
        pipe, seconds = self.pipe, []
        sample, decode = pipe.sample, pipe.decode

        def timed_sample(cond, cfg, **kwargs):
            if not self.warm:
                decode(sample(cond, dataclasses.replace(cfg, steps=1), **{**kwargs, "callback": None}))
                self.warm = True
            start = time.perf_counter()
            latents = _synced(sample(cond, cfg, **kwargs))
            seconds.append(time.perf_counter() - start)
            return latents

        def timed_decode(latents):
            start = time.perf_counter()
            images = _synced(decode(latents))
            seconds[-1] += time.perf_counter() - start
            return images

        # instance attributes shadow the methods sampling/job.py's render calls, for this render only: its step
        # callback would see neither the first step's start nor the decode, nor let the warm-up run first
        pipe.sample, pipe.decode = timed_sample, timed_decode
        try:
            yield seconds
        finally:
            del pipe.sample, pipe.decode


def _synced(t: torch.Tensor) -> torch.Tensor:
    if t.is_cuda:  # CUDA returns before the kernels finish: the clock would stop early
        torch.cuda.synchronize(t.device)
    return t


def render_row(session: Session, clock: SamplingClock, row: Row, args, prompts: list[str], out: Path) -> dict:
    """The row's images and latents (noise-major), rendering only the noises its folder lacks."""
    from safetensors.torch import load_file

    folder = out / folder_name(row.name)
    col = row.column
    plain = sampled_guidance(session, dataclasses.replace(col, guidance=None), args, prompts)
    if getattr(args, "guidance", None) is None and col.guidance == plain:
        col = dataclasses.replace(col, guidance=None)  # a recommendation that is the default: generate's own pick
    guidance = plain if col.guidance is None else sampled_guidance(session, col, args, prompts)
    want = manifest(row, args, session, prompts, guidance)
    record = folder / "manifest.json"
    have = read_json_object(record, f"delete {folder} to render that row again", "a row's manifest",
                            ValueError) if record.exists() else {}
    if have:
        have.setdefault("guidance", plain)  # rendered before the guidance was recorded: generate's pick, no flag
    timing = have.pop("timing", {})
    changed = differing(have, want) if have else []
    if changed:
        if not args.overwrite:
            raise ValueError(f"{folder}: rendered with other settings ({row.name}: its {', '.join(changed)} "
                             "differ); pass --overwrite to replace it, or another --out")
        shutil.rmtree(folder)
        timing = {}
    folder.mkdir(parents=True, exist_ok=True)
    done = 0
    while noise_done(folder, done, len(prompts)):
        done += 1
    if done < args.per_prompt:
        print(f"rendering {row.name}: noises {done} to {args.per_prompt - 1}", file=sys.stderr, flush=True)
        paths = [folder / f"{b:03d}_{i:03d}.png" for b in range(done, args.per_prompt) for i in range(len(prompts))]
        latents: list = []
        with clock.timing() as seconds:
            result = session.render(prompts, "", args.seed + done, args.width, args.height, col,
                                    noises=args.per_prompt - done, paths=paths, latents_out=latents)
        for b, lat in enumerate(latents, start=done):  # atomic: a half-written file would count as done
            atomic_save({"latents": lat}, folder / f"latents-{b:03d}.safetensors", overwrite=True)
        # a new key: rows timed before (the whole render, text encoders and LoRA merge included) read as unknown
        timing = {"nfe": result.nfe, "sampling_sec_per_image": sum(seconds) / len(paths)}
    with atomic_path(record) as tmp:
        tmp.write_text(json.dumps({**want, "timing": timing}, indent=1) + "\n")
    from PIL import Image

    pixels = np.stack([np.asarray(Image.open(folder / f"{b:03d}_{i:03d}.png").convert("RGB"))
                       for b in range(args.per_prompt) for i in range(len(prompts))])  # (N, H, W, 3) uint8
    lat = torch.cat([load_file(folder / f"latents-{b:03d}.safetensors")["latents"] for b in range(args.per_prompt)])
    return {"pixels": pixels, "latents": lat, "features": metrics.latent_features(lat), "timing": timing,
            "guidance": guidance}


def noise_done(folder: Path, b: int, n_prompts: int) -> bool:
    """Noise b's latents readable and every prompt's PNG beside them: else it is rendered again (a file cut short
    by a crash before writes were atomic, a PNG deleted by hand)."""
    from weights.io import WeightsError, read_header

    path = folder / f"latents-{b:03d}.safetensors"
    if not path.is_file() or not all((folder / f"{b:03d}_{i:03d}.png").is_file() for i in range(n_prompts)):
        return False
    try:
        read_header(path)  # checks the header against the file's size: a cut-short file fails here
    except (WeightsError, ValueError, OSError):
        return False
    return True
