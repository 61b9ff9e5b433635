"""The measurements behind `python -m distill.evaluate` (whose help describes the rows and the metrics): the
teacher and an SCFM LoRA sampled from the same prompts and noises on the demo world, each image read back by the
world's checker (distill/demo/quality.py), and the table, JSON and grid that report them."""


from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model import fp8_gemm
from model.fp8 import enable_fp8_compute_
from sampling.demo import DEMO_FOLDER, DEMO_LORA, T5_LENGTH
from weights.atomic import atomic_path
from weights.io import WeightsError

from .demo import quality, world

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
    world: str = "base"  # whose colours the checker reads and the ground truth is drawn in (variant: a style LoRA's)

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
    if cfg.shift is not None and not (math.isfinite(cfg.shift) and cfg.shift > 0):
        raise ValueError(f"--shift {cfg.shift}: must be a positive number (1 = unshifted, ~3 = the recipe's)")
    if cfg.lora_scale is not None and not math.isfinite(cfg.lora_scale):
        raise ValueError(f"--lora-scale {cfg.lora_scale}: must be a finite number; pass --lora-scale 1")
    # numpy's generators take seeds >= 0, torch's below 2**64; the floor row draws from seed + 1
    if not 0 <= cfg.seed < 2**64 - 1:
        raise ValueError(f"--seed {cfg.seed}: must be from 0 to 2**64 - 2; pass --seed 0")
    if not cfg.prompts:
        raise ValueError("no prompts: pass --prompts TEXT ... or --prompts-file FILE")
    if cfg.world not in world.WORLDS:
        raise ValueError(f"--world {cfg.world}: one of {', '.join(world.WORLDS)}")
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
    if cfg.lora is not None and cfg.lora.is_dir():  # "no such file" would send the user looking for a typo
        raise ValueError(f"--lora {cfg.lora}: a folder; pass a LoRA .safetensors file (a run's "
                         "scfm-lora-*.safetensors)")
    if cfg.lora is not None and not cfg.lora.is_file():
        raise ValueError(f"--lora {cfg.lora}: no such file; distil one with `python -m distill.train` "
                         "or pass --lora PATH")


def evaluate(cfg: EvalConfig = EvalConfig(), **changes) -> dict:
    """The table as {"config": ..., "rows": [...]} plus "grid": (rows x 64, prompts x 64, 3) uint8, the first noise
    of each prompt for every row. `changes` replace fields of `cfg` (evaluate(per_prompt=2, steps=(1, 2)))."""
    from sampling.pipeline import FluxPipeline, FluxSources
    from weights import load_flux
    from weights.families.flux import FLUX  # the demo model's family
    from weights.lora import read_lora
    from weights.lora_merge import apply_loras, unload_loras

    cfg = dataclasses.replace(cfg, **changes)
    check(cfg)
    lora, scale = None, None
    if cfg.lora is not None:
        try:
            lora = read_lora(cfg.lora, family=FLUX.name)  # a wrong file fails here, before the models load
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
    truth = np.concatenate([world.sample_for_prompt(p, cfg.seed + i, cfg.per_prompt, world=cfg.world)[0]
                            for i, p in enumerate(cfg.prompts)])
    ref = images["teacher", cfg.teacher_steps]
    scores = {key: world_score(im, prompts, cfg.world) for key, im in images.items()}
    rows = [_row("world", "world", None, world_score(truth, prompts, cfg.world))]
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
                  shift=cfg.shift, fp8=cfg.fp8, fp8_compute=cfg.fp8_compute, compile=cfg.compile, world=cfg.world)
    return {"config": config, "rows": rows, "grid": grid}


def grid_rows(cfg: EvalConfig) -> int:
    """Rows of the grid `evaluate` returns: world, the teacher rows (the reference first), floor, the LoRA's."""
    teacher = len(dict.fromkeys((cfg.teacher_steps, *cfg.steps)))
    return 1 + teacher + cfg.floor + (len(cfg.steps) if cfg.lora is not None else 0)


def check_grid_scale(cfg: EvalConfig, scale: int) -> None:
    """The grid PNG must stay under PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS, 89 MP), or PIL and
    the tools built on it warn, then refuse, when it is opened again."""
    from PIL import Image

    if scale < 1:
        raise ValueError(f"--grid-scale {scale}: must be 1 or more; pass --grid-scale 2")
    tile = world.SIZE * world.SIZE * grid_rows(cfg) * len(cfg.prompts)  # pixels at scale 1
    largest = max(1, math.isqrt(Image.MAX_IMAGE_PIXELS // tile))
    if scale > largest:
        raise ValueError(f"--grid-scale {scale}: the grid would be {tile * scale * scale / 1e6:.0f} MP, over the "
                         f"{Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP PIL opens; pass --grid-scale {largest} or --no-grid")


def world_score(images: np.ndarray, prompts: list[str], world_name: str) -> dict:
    """quality.score, without style where it says nothing: in the base world it is the colour part of adherence,
    and without colour-naming prompts it is None (this table and --out's, distill/judge_scores.py, both drop it)."""
    score = quality.score(images, prompts, world_name)
    if world_name == "base" or score["style"] is None:
        del score["style"]
    return score


def _row(name: str, model: str, steps: int | None, score: dict, **distances) -> dict:
    values = {"paired": None, "hist": None, **score, **distances}  # the world row has no reference
    # style: a variant world's column (in the base world it is the colour part of adherence)
    keys = METRICS + (("style",) if "style" in values else ())
    return dict(name=name, model=model, steps=steps, **{k: values[k] and round(values[k], 4) for k in keys})


def format_table(rows: list[dict]) -> str:
    """Fixed-width text; '-' where a metric does not apply (the world row has no reference to compare with). A
    second block splits `hist` by attribute: which attribute's distribution a sampler gets wrong."""
    width = max(len(r["name"]) for r in rows)
    cols = ("steps",) + METRICS + (("style",) if "style" in rows[0] else ())
    lines = [" ".join([" " * width] + [f"{c:>9}" for c in cols])]
    for r in rows:
        cells = ["-" if r[c] is None else f"{r[c]}" if c == "steps" else f"{r[c]:.1f}" if c in ("adherence", "style")
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
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def write_grid(path: Path, grid: np.ndarray, scale: int, report: dict) -> None:
    from PIL import Image

    from sampling.png_record import save_png  # atomic, with the settings in a text chunk

    big = grid.repeat(scale, axis=0).repeat(scale, axis=1)  # nearest: the 64 px images stay sharp
    save_png(Image.fromarray(big), path, dict(report["config"], rows=[r["name"] for r in report["rows"]]))
