"""`python -m distill.evaluate`: what an SCFM LoRA buys over its teacher at few steps, measured on the demo world.

    python -m distill.evaluate                                   # the shipped demo teacher and its SCFM LoRA
    python -m distill.evaluate --lora run/scfm.safetensors --per-prompt 4 --json eval.json --overwrite

From the same prompts and noises it samples the teacher at --teacher-steps (the reference), the teacher at each of
--steps, and the teacher with the LoRA merged at each of --steps, all with plain Euler on the demo's grid (schnell's
unshifted linear one), and reads every image back with the world's checker (distill/demo/quality.py):

- adherence: percent of images whose read attributes match everything the prompt fixes;
- paired: mean |pixel| difference (0..1) to the reference image from the same noise;
- hist: distance of the read-attribute histograms to the reference's (0: the same distribution of attributes);
- crispness: mean distance of the pixels to the world's palette (lower is crisper); iou: shape-template fit.

The `world` row scores ground-truth renders of the same prompts: the ceiling for adherence and crispness. With
--floor, a `teacher N new noises` row runs the reference sampler from other noises: a sampler that draws exactly the
teacher's distribution still scores its `hist` (finitely many samples), so hist distances mean little below it. The table
is printed; --json writes it with the settings used, --grid a PNG with one column per prompt (its first noise) and
one row per table row. Existing files are never replaced without --overwrite.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model import fp8_gemm
from model.fp8 import enable_fp8_compute_
from weights.io import WeightsError

from .demo import quality, world
from .demo.models import DEMO_FOLDER, DEMO_LORA, T5_LENGTH

METRICS = ("adherence", "paired", "hist", "crispness", "iou")


@dataclass(frozen=True)
class EvalConfig:
    model: Path = DEMO_FOLDER  # the teacher's diffusers Flux pipeline folder
    lora: Path | None = DEMO_LORA  # an SCFM LoRA for it, in any layout weights/lora.py reads; None: teacher only
    prompts: tuple[str, ...] = quality.PROMPTS  # captions in the world's grammar: the checker must parse them
    per_prompt: int = 16  # noises per prompt
    steps: tuple[int, ...] = (1, 2, 4, 8)
    teacher_steps: int = 32  # the reference run
    seed: int = 0  # noises, and the world's ground-truth renders
    lora_scale: float | None = None  # None: the LoRA's recommended scale, else 1
    device: str = "cpu"
    floor: bool = False  # add the reference sampler from other noises: the metrics' floor for a perfect sampler
    shift: float | None = None  # the --steps rows on the SCFM grid with this shift; None: the demo's own grid
    fp8: bool = False  # the LoRA rows on e4m3 block weights, the LoRA merged first (generate --fp8 --lora)
    fp8_compute: bool = False  # those rows' GEMMs in fp8 too (model/fp8_gemm.py; emulated on the CPU); implies fp8
    compile: bool = False  # the transformer blocks compiled (model/layers.py compile_blocks)

    def __post_init__(self):
        object.__setattr__(self, "model", Path(self.model).expanduser())
        object.__setattr__(self, "lora", None if self.lora is None else Path(self.lora).expanduser())
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "steps", tuple(dict.fromkeys(int(n) for n in self.steps)))  # ordered, unique
        object.__setattr__(self, "fp8", self.fp8 or self.fp8_compute)


def check(cfg: EvalConfig) -> None:
    """Everything that can be wrong with the inputs, before anything is loaded or sampled (one line each)."""
    if cfg.per_prompt < 1 or cfg.teacher_steps < 1 or not cfg.steps or min(cfg.steps) < 1:
        raise ValueError("--per-prompt, --steps and --teacher-steps must be positive integers")
    if cfg.shift is not None and not cfg.shift > 0:
        raise ValueError(f"--shift {cfg.shift}: must be a positive number (1 = unshifted, ~3 = the recipe's)")
    if not cfg.prompts:
        raise ValueError("no prompts: pass --prompts TEXT ... or --prompts-file FILE")
    for p in cfg.prompts:
        try:
            world.parse_caption(p)
        except ValueError as e:  # the checker could not score it: every row would read 0%
            raise ValueError(f"{e}; prompts must follow the captions' grammar (distill/demo/world.py), "
                             "e.g. 'a red circle at the top left'") from None
    if not (cfg.model / "model_index.json").exists():
        raise ValueError(f"--model {cfg.model}: no pipeline folder (no model_index.json); build the demo with "
                         "`python -m tools.make_demo` or pass --model FOLDER")
    if cfg.fp8 and cfg.lora is None:
        raise ValueError("--fp8 / --fp8-compute sample the LoRA rows on fp8 weights; pass --lora")
    if cfg.fp8_compute:
        fp8_gemm.check_device(cfg.device, "--fp8-compute")
    if cfg.lora is not None and not cfg.lora.is_file():
        raise ValueError(f"--lora {cfg.lora}: no such file; distil one with `python -m distill.train` "
                         "or pass --lora PATH")


def evaluate(cfg: EvalConfig = EvalConfig(), **changes) -> dict:
    """The table as {"config": ..., "rows": [...]} plus "grid": (rows x 64, prompts x 64, 3) uint8, the first noise
    of each prompt for every row. `changes` replace fields of `cfg` (evaluate(per_prompt=2, steps=(1, 2)))."""
    from sampling.pipeline import FluxPipeline, FluxSources
    from weights import load_flux
    from weights.lora import read_lora
    from weights.lora_merge import apply_loras, unload_loras

    cfg = dataclasses.replace(cfg, **changes)
    check(cfg)
    lora, scale = None, None
    if cfg.lora is not None:
        try:
            lora = read_lora(cfg.lora, family="flux")  # a wrong file fails here, before the models load
        except WeightsError as e:
            raise WeightsError(f"--lora {e}") from None
        scale = next(s for s in (cfg.lora_scale, lora.recommended.lora_scale, 1.0) if s is not None)
    sources = FluxSources.from_folder(cfg.model)
    sources.check()
    pipe = FluxPipeline(sources, device=cfg.device)  # fp32: the demo is small and the reference must be exact

    prompts = [p for p in cfg.prompts for _ in range(cfg.per_prompt)]
    unique = list(dict.fromkeys(cfg.prompts))
    # the demo's T5 length, not Flux's 512: T5 runs unmasked, so the length is part of the conditioning
    encoded = pipe.encode(unique, T5_LENGTH)
    index = torch.tensor([unique.index(p) for p in prompts])
    cond = {k: v[index.to(v.device)] for k, v in encoded.items()}
    h, w = pipe.latent_size(world.SIZE, world.SIZE)
    noise = torch.randn(len(prompts), pipe.latent_channels(), h, w,
                        generator=torch.Generator().manual_seed(cfg.seed)).to(cfg.device)
    model, vae = pipe.transformer, pipe.vae
    if cfg.compile:
        model.compile_blocks()

    def draw(steps: int, start: torch.Tensor = noise, shift: float | None = cfg.shift, net=model) -> np.ndarray:
        return quality.decode(vae, quality.sample_latents(net, cond, start, steps, shift=shift))

    images: dict[tuple[str, int], np.ndarray] = {}
    teacher_rows = [("teacher", n) for n in dict.fromkeys((cfg.teacher_steps, *cfg.steps))]
    name = "scfm-fp8c" if cfg.fp8_compute else "scfm-fp8" if cfg.fp8 else "scfm"
    student_rows = [(name, n) for n in cfg.steps] if lora is not None else []
    # The student first: a LoRA that does not fit the model fails before any sampling. Unloading restores the
    # weights bit-exactly, so the teacher rows are those of the model as loaded. fp8: a second copy of the
    # (small) demo model, the LoRA merged as it is read, then rounded; the teacher rows stay in fp32.
    if lora is not None:
        try:
            if cfg.fp8:
                student = load_flux(sources.transformer, device=cfg.device, fp8=True, loras=[(lora, scale)])
                if cfg.fp8_compute:
                    enable_fp8_compute_(student, cfg.device)
                if cfg.compile:
                    student.compile_blocks()
            else:
                apply_loras(model, [(lora, scale)], restorable=True)
        except WeightsError as e:
            raise WeightsError(f"--lora {e}; pass the LoRA distilled from --model {cfg.model}") from None
        try:
            for key in student_rows:
                images[key] = draw(key[1], net=student if cfg.fp8 else model)
        finally:
            if not cfg.fp8:
                unload_loras(model)
    images[teacher_rows[0]] = draw(cfg.teacher_steps, shift=None)  # the reference keeps the demo's grid
    for key in teacher_rows[1:]:
        images[key] = draw(key[1])
    floor_rows = []
    if cfg.floor:
        # The reference sampler itself from fresh noises: a sampler with exactly the teacher's distribution still
        # scores this hist (finite samples), and this paired distance is what "right images, unrelated to the
        # noise" would score. Distances are only meaningful above these.
        other = torch.randn(noise.shape, generator=torch.Generator().manual_seed(cfg.seed + 1)).to(cfg.device)
        floor_rows = [("floor", cfg.teacher_steps)]
        images[floor_rows[0]] = draw(cfg.teacher_steps, other, shift=None)
    order = teacher_rows[:1] + floor_rows + teacher_rows[1:] + student_rows

    # ground truth for the same prompts; seed + i so that repeated prompts still get fresh scenes
    truth = np.concatenate([world.sample_for_prompt(p, cfg.seed + i, cfg.per_prompt)[0]
                            for i, p in enumerate(cfg.prompts)])
    ref = images["teacher", cfg.teacher_steps]
    scores = {key: quality.score(im, prompts) for key, im in images.items()}
    rows = [_row("world", "world", None, quality.score(truth, prompts))]
    for kind, n in order:
        s, ref_reads = scores[kind, n], scores["teacher", cfg.teacher_steps]["reads"]
        by_attribute = quality.histogram_distances(s["reads"], ref_reads, prompts)
        name, model_name = (f"teacher {n} new noises", "teacher") if kind == "floor" else (f"{kind} {n}", kind)
        rows.append(_row(name, model_name, n, s, paired=quality.paired_distance(images[kind, n], ref),
                         hist=float(np.mean(list(by_attribute.values())))))
        rows[-1]["hist_by_attribute"] = {k: round(v, 4) for k, v in by_attribute.items()}
    grid = np.concatenate([np.concatenate(list(im[::cfg.per_prompt]), axis=1)
                           for im in [truth] + [images[key] for key in order]], axis=0)
    config = dict(model=str(cfg.model), lora=cfg.lora and str(cfg.lora), lora_scale=scale, prompts=list(cfg.prompts),
                  per_prompt=cfg.per_prompt, steps=list(cfg.steps), teacher_steps=cfg.teacher_steps, seed=cfg.seed,
                  t5_length=T5_LENGTH, sampler="euler",
                  schedule="flux-schnell (linear, shift 1)" if cfg.shift is None else
                  f"reference: flux-schnell (linear, shift 1); --steps rows: scfm grid, shift {cfg.shift}",
                  reference=f"teacher {cfg.teacher_steps}", device=cfg.device, floor=cfg.floor,
                  shift=cfg.shift, fp8=cfg.fp8, fp8_compute=cfg.fp8_compute, compile=cfg.compile)
    return {"config": config, "rows": rows, "grid": grid}


def _row(name: str, model: str, steps: int | None, score: dict, **distances) -> dict:
    values = {"paired": None, "hist": None, **score, **distances}  # the world row has no reference
    return dict(name=name, model=model, steps=steps, **{k: values[k] and round(values[k], 4) for k in METRICS})


def format_table(rows: list[dict]) -> str:
    """Fixed-width text; '-' where a metric does not apply (the world row has no reference to compare with). A
    second block splits `hist` by attribute: which attribute's distribution a sampler gets wrong."""
    width = max(len(r["name"]) for r in rows)
    cols = ("steps",) + METRICS
    lines = [" ".join([" " * width] + [f"{c:>9}" for c in cols])]
    for r in rows:
        cells = ["-" if r[c] is None else f"{r[c]}" if c == "steps" else f"{r[c]:.1f}" if c == "adherence"
                 else f"{r[c]:.4f}" for c in cols]
        lines.append(" ".join([f"{r['name']:>{width}}"] + [f"{c:>9}" for c in cells]))
    split = [r for r in rows if "hist_by_attribute" in r]
    if split:
        attrs = list(split[0]["hist_by_attribute"])
        lines += ["", " ".join([f"{'hist by':>{width}}"] + [f"{a:>10}" for a in attrs])]
        lines += [" ".join([f"{r['name']:>{width}}"] + [f"{r['hist_by_attribute'][a]:>10.4f}" for a in attrs])
                  for r in split]
    return "\n".join(lines)


def refuse_existing(paths: list[Path], overwrite: bool) -> None:
    for path in paths:
        if path.exists() and not overwrite:
            raise ValueError(f"{path} exists; pass --overwrite to replace it, or another path")


def write_json(path: Path, data: dict) -> None:
    """Atomically: a crash never leaves half a file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_grid(path: Path, grid: np.ndarray, scale: int, report: dict) -> None:
    from PIL import Image

    from sampling.base import save_png  # atomic, with the settings in a text chunk

    big = grid.repeat(scale, axis=0).repeat(scale, axis=1)  # nearest: the 64 px images stay sharp
    save_png(Image.fromarray(big), path, dict(report["config"], rows=[r["name"] for r in report["rows"]]))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distill.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEMO_FOLDER, help="the teacher's pipeline folder (default: the demo)")
    p.add_argument("--lora", type=Path, default=DEMO_LORA, help="the SCFM LoRA, any layout (default: the demo's)")
    p.add_argument("--lora-scale", type=float, help="default: the LoRA's recommended scale, else 1")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--prompts", nargs="+", metavar="TEXT", help="default: distill/demo/quality.PROMPTS")
    which.add_argument("--prompts-file", type=Path, help="one prompt per line")
    p.add_argument("--per-prompt", type=int, default=16, help="noises per prompt")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--teacher-steps", type=int, default=32, help="steps of the reference run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shift", type=float,
                   help="sample the --steps rows (teacher and LoRA) on the SCFM grid with this shift, as a LoRA "
                        "trained with shift_min/shift_max > 1 is meant to be sampled (default: the demo's grid)")
    p.add_argument("--fp8", action="store_true",
                   help="sample the LoRA rows (named scfm-fp8) with the transformer blocks' weights in e4m3, the "
                        "LoRA merged before rounding, as `generate --fp8 --lora` does; teacher rows stay fp32")
    p.add_argument("--fp8-compute", "--fp8_compute", action="store_true",
                   help="as --fp8, with the LoRA rows' GEMMs on fp8 tensor cores (named scfm-fp8c; an exact "
                        "emulation on the CPU)")
    p.add_argument("--compile", action="store_true", help="compile each transformer block once (torch.compile)")
    p.add_argument("--floor", action="store_true",
                   help="add a row: the reference sampler from other noises (the distances' floor)")
    p.add_argument("--json", type=Path, help="write the table and settings here")
    p.add_argument("--grid", type=Path, default=Path("evaluate_grid.png"), help="PNG of the first noise per prompt")
    p.add_argument("--no-grid", action="store_true", help="write no grid")
    p.add_argument("--grid-scale", type=int, default=2, help="nearest-neighbour upscaling of the grid")
    p.add_argument("--overwrite", action="store_true", help="replace existing --json / --grid files")
    p.add_argument("--device", default="cpu", help="cuda works too; results differ from the CPU's by rounding")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (the demo models gain little from more)")
    return p


def _prompts(args) -> tuple[str, ...]:
    if args.prompts_file is None:
        return tuple(args.prompts or quality.PROMPTS)
    try:
        return tuple(ln.strip() for ln in args.prompts_file.read_text().splitlines() if ln.strip())
    except OSError as e:
        raise ValueError(f"--prompts-file {args.prompts_file}: {e.strerror}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.threads < 1 or args.grid_scale < 1:
            raise ValueError("--threads and --grid-scale must be positive integers")
        torch.set_num_threads(args.threads)
        outputs = [p for p in (args.json, None if args.no_grid else args.grid) if p is not None]
        cfg = EvalConfig(model=args.model, lora=args.lora, prompts=_prompts(args), per_prompt=args.per_prompt,
                         steps=tuple(args.steps), teacher_steps=args.teacher_steps, seed=args.seed,
                         lora_scale=args.lora_scale, device=args.device, floor=args.floor, shift=args.shift,
                         fp8=args.fp8, fp8_compute=args.fp8_compute, compile=args.compile)
        check(cfg)  # inputs, then outputs: both before the run, not after minutes of sampling
        refuse_existing(outputs, args.overwrite)
        report = evaluate(cfg)
        print(format_table(report["rows"]))
        refuse_existing(outputs, args.overwrite)  # a file that appeared meanwhile is still someone's
        if args.json is not None:
            write_json(args.json, {"config": report["config"], "rows": report["rows"]})
            print(f"wrote {args.json}")
        if not args.no_grid:
            write_grid(args.grid, report["grid"], args.grid_scale, report)
            print(f"wrote {args.grid} (rows: {', '.join(r['name'] for r in report['rows'])})")
    except (WeightsError, ValueError, OSError) as e:
        raise SystemExit("evaluate: " + " ".join(str(e).split())) from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
