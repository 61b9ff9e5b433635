"""`python -m distill.evaluate` on any model (the demo's world checker aside): rows of the same prompts and noises
(the teacher at --teacher-steps, the reference; the teacher, the student LoRA and each --compare LoRA at every
--steps), each image a `generate` PNG with its final latent, kept under --out with a manifest, and the metrics of
distill/metrics.py per row. A rerun reuses every row whose manifest matches and renders only what is missing; a
row whose settings changed is refused unless --overwrite."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys
import time
from argparse import Namespace
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sampling.compare import Column, Session
from sampling.options import run_dtype
from weights.atomic import atomic_path, atomic_save
from weights.io import file_sha256

from . import metrics

TABLE = ("nfe", "sec/img", "mean|d|", "psnr", "ssim", "lat mse", "fd", "kid", "pairwise", "vendi")


@dataclass
class Row:
    name: str
    column: Column
    model: str | None = None  # --compare-model: another whole model (None: --model)


def rows_for(args, lora, compare, base) -> list[Row]:
    """The reference first; teacher, student and each compare LoRA at every --steps. Student and compare rows
    sample on their LoRA's own grid unless --shift; teacher rows on their schedule (and on the SCFM grid too with
    --shift). The names are unique and so are their folders (check_rows), decided before anything renders."""
    shift = {"shift": args.shift, "schedule": "scfm"} if args.shift is not None else {}
    compare_names = file_labels([p for p, _ in compare], lambda p: p.stem)
    model_names = file_labels(args.compare_model, lambda p: p.name)
    rows = [Row(f"teacher {args.teacher_steps}", Column(list(base), args.teacher_steps))]
    for n in args.steps:
        rows.append(Row(f"teacher {n}", Column(list(base), n)))
        if shift:
            rows.append(Row(f"teacher {n} scfm", Column(list(base), n, **shift)))
        if lora is not None:
            rows.append(Row(f"student {n}", Column([lora, *base], n, **shift)))
        for name, (path, scale) in zip(compare_names, compare):
            rows.append(Row(f"{name}@{scale:g} {n}", Column([(path, scale), *base], n, **shift)))
        for name, model in zip(model_names, args.compare_model):  # a whole few-step model on its own grid
            rows.append(Row(f"{name} {n}", Column(list(base), n), model=model))
    check_rows(rows, args)
    return rows


def file_labels(paths: list[str], name) -> list[str]:
    """Each file's label in the row names: `name(path)` (a LoRA's stem, a model folder's name), with as many of
    its parent folders as it takes to tell it from another file of that name: the seed-comparison workflow's
    runs/a/scfm-lora-slow_ema.safetensors and runs/b/scfm-lora-slow_ema.safetensors are a/scfm-lora-slow_ema and
    b/scfm-lora-slow_ema. The same file keeps one label (its scales tell its rows apart)."""
    files = [Path(os.path.abspath(Path(p).expanduser())) for p in paths]  # as given (a link keeps its own name)
    same = [Path(p).expanduser().resolve() for p in paths]

    def label(path: Path, depth: int) -> str:
        parents = path.parent.parts[1:]  # the root left out
        if depth > len(parents):  # x.safetensors beside x.ckpt: only the whole file name tells them apart
            return str(path)
        return "/".join([*parents[len(parents) - depth:], name(path)])

    depth = [0] * len(files)
    while True:
        labels = [label(f, d) for f, d in zip(files, depth)]
        clash = [i for i in range(len(files)) if any(labels[j] == labels[i] and same[j] != same[i]
                                                     for j in range(len(files)))]
        if not clash:
            return labels
        for i in clash:
            depth[i] += 1


def check_rows(rows: list[Row], args) -> None:
    """Two rows in one folder would mix their images, or one would delete the other's with --overwrite: refused,
    in one line, before anything loads. Folders are compared case-blind (macOS and Windows file systems are)."""
    seen: dict[str, Row] = {}
    for row in rows:
        key = folder_name(row.name).casefold()
        if key not in seen:
            seen[key] = row
            continue
        other = seen[key]
        if _identity(other) == _identity(row):
            raise ValueError(f"row {row.name!r} is asked for twice (the same file and scale); drop the repeated "
                             "--compare or --compare-model")
        raise ValueError(f"rows {other.name!r} and {row.name!r} would share the folder "
                         f"{args.out / folder_name(row.name)}; rename one of their files")


def _identity(row: Row) -> tuple:
    """What a row renders, with its files as resolved paths (runs/x and ./runs/x are one file)."""
    loras = [(Path(p).expanduser().resolve(), s) for p, s in row.column.loras]
    model = row.model and Path(row.model).expanduser().resolve()
    return loras, row.column.steps, row.column.shift, row.column.schedule, model


# What generate reads besides the row's LoRAs and grid: each changes the pixels, so a folder rendered with another
# is not the same row. The files are recorded by content (distill/data.file_identity: sizes, headers, sampled
# chunks), so one file reached by another path or from another cwd still matches. A key missing from an older
# manifest reads as its default here, so folders rendered before a key was recorded stay usable.
COMPONENTS = ("vae", "clip", "clip_g", "t5", "clip_tokenizer", "clip_g_tokenizer", "t5_tokenizer", "qwen",
              "qwen_tokenizer")
DEFAULTS = {"fp8_compute": False, "no_t5": False, "ignore_te_lora": False, "variant": None,
            "model_identity": None, **{f"{c}_identity": None for c in COMPONENTS}}


@functools.lru_cache(maxsize=None)
def _identity_of(path: str) -> str | None:
    from .data import weights_identity

    return weights_identity(path)


def manifest(row: Row, args, session: Session, prompts: list[str]) -> dict:
    loras = [{"file": Path(p).name, "sha256": file_sha256(p), "scale": s} for p, s in row.column.loras]
    col = row.column
    model = str(Path(row.model or session.model).expanduser().resolve())
    files = {f"{c}_identity": _identity_of(str(Path(getattr(args, c)).expanduser().resolve()))
             for c in COMPONENTS if getattr(args, c, None)}
    return {**DEFAULTS, **dict(model=model, loras=loras, steps=col.steps, shift=col.shift, schedule=col.schedule,
                               seed=args.seed, prompts=prompts, width=args.width, height=args.height,
                               dtype=run_dtype(args), device=args.device, fp8=args.fp8,
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


def folder_name(name: str) -> str:
    """A row's folder under --out: one level (a/scfm-lora@1 2 -> a--scfm-lora-at-1_2), no spaces."""
    return name.replace(" ", "_").replace("@", "-at-").replace("/", "--")


class SamplingClock:
    """What sampling costs a user per image: each batch's sampler calls and VAE decode, timed around the loaded
    pipeline's `sample` and `decode` while Session.render runs. Left out: the text encoders (loaded and run again
    for every row here, once per prompt list for a user), the LoRA merge before a row, PNG writing, and the first
    call on a freshly loaded model (lazy VAE load, allocations, kernel selection), which a one-step warm-up takes
    instead, so the row rendered first is not the slow one."""

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

        # instance attributes shadow the methods sampling/job.py's render calls, for this render only
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
    want = manifest(row, args, session, prompts)
    record = folder / "manifest.json"
    have = json.loads(record.read_text()) if record.exists() else {}
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
            result = session.render(prompts, "", args.seed + done, args.width, args.height, row.column,
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
    return {"pixels": pixels, "latents": lat, "features": metrics.latent_features(lat), "timing": timing}


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


def score(row: dict, ref: dict, n_prompts: int) -> dict:
    """The row's metrics against the reference row (distill/metrics.py); the reference against itself is at
    distance 0 by definition (KID's unbiased estimator would read a same-set pair as negative). Null where a metric
    is undefined, as PSNR of identical images is: a set's Fréchet distance and KID need two images (a covariance,
    a pair), a prompt's diversity two noises."""
    feats, ref_feats = row["features"], ref["features"]
    by_prompt = [feats[i::n_prompts] for i in range(n_prompts)]  # noise-major: prompt i every n_prompts
    images, ref_images = row["pixels"] / 255, ref["pixels"] / 255  # metrics.py's [0, 1]
    psnrs = [metrics.psnr(a, b) for a, b in zip(images, ref_images)]
    sets, noises = len(feats) > 1, len(by_prompt[0]) > 1
    out = {"nfe": row["timing"].get("nfe"), "sec/img": row["timing"].get("sampling_sec_per_image"),
           "mean|d|": metrics.mean_abs(images, ref_images),
           "psnr": float(np.mean(psnrs)) if all(np.isfinite(psnrs)) else None,  # identical images: inf, null
           "ssim": metrics.ssim(images, ref_images),
           "lat mse": metrics.mse(row["latents"], ref["latents"]),
           "fd": metrics.frechet(feats, ref_feats) if sets else 0.0 if row is ref else None,
           "kid": 0.0 if row is ref else metrics.kid(feats, ref_feats) if sets else None,
           "pairwise": float(np.mean([metrics.pairwise(f) for f in by_prompt])) if noises else None,
           "vendi": float(np.mean([metrics.vendi(f) for f in by_prompt])) if noises else None}
    return out


def world_columns(rendered: dict, ref_name: str, prompts: list[str], world: str = "base") -> dict:
    """On the demo model, whose prompts the world's checker reads (distill/demo): adherence (percent of images
    matching everything the prompt fixes, read in `world`'s colours), hist (the read attributes' histogram distance
    to the reference's) and, in the variant world as without --out, style (percent of colour-naming prompts drawn
    in its colours: whether a style LoRA took)."""
    from .demo import quality
    from .evaluation import world_score

    per_image = [prompts[i % len(prompts)] for i in range(len(rendered[ref_name]["pixels"]))]  # noise-major
    scores = {name: world_score(row["pixels"], per_image, world) for name, row in rendered.items()}
    out = {}
    for name, s in scores.items():
        hist = quality.histogram_distances(s["reads"], scores[ref_name]["reads"], per_image)
        out[name] = {"adherence": s["adherence"], "hist": float(np.mean(list(hist.values()))),
                     **({"style": s["style"]} if "style" in s else {})}
    return out


def world_prompts(prompts: list[str]) -> bool:
    from .demo import world

    try:
        for p in prompts:
            world.parse_caption(p)
    except ValueError:
        return False
    return True


def clip_columns(rendered: dict, ref_name: str, prompts: list[str], source: str) -> dict:
    """With --clip-vision (the user's CLIP weights: weights/vision.py): CLIP score against each image's prompt,
    and the Fréchet distance and CMMD of the CLIP image embeddings to the reference's."""
    from model.clip_vision import clip_score, embed_images
    from model.tokenizers import CLIPTokenizer
    from weights.text import load_clip
    from weights.vision import load_clip_vision

    vision, text = load_clip_vision(source), load_clip(source)
    with torch.no_grad():
        text_embeds = text(CLIPTokenizer.load()(prompts)).text_embeds
        embeds = {name: embed_images(vision, list(row["pixels"])) for name, row in rendered.items()}
        repeat = text_embeds[torch.arange(len(rendered[ref_name]["pixels"])) % len(prompts)]  # noise-major
        out = {}
        for name in rendered:
            e, ref = embeds[name].numpy(), embeds[ref_name].numpy()
            sets = len(e) > 1  # one image per row: no covariance, no pair (as score's fd and kid)
            out[name] = {"clip": float(np.mean(clip_score(embeds[name], repeat))),
                         "fd clip": metrics.frechet(e, ref) if sets else 0.0 if name == ref_name else None,
                         "cmmd": 0.0 if name == ref_name else metrics.cmmd(e, ref) if sets else None}
    return out


def check_out(args) -> None:
    """What the --out mode would otherwise find wrong only after rendering every row: --out a file, someone's own
    report.json / grid.png there, a missing --clip-vision, a LoRA of another model family."""
    from sampling.demo import DEMO_FOLDER
    from weights.families import detect_family
    from weights.io import WeightsError
    from weights.lora import read_lora
    from weights.lora_merge import lora_spec

    out = args.out.expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file, not a folder; pass a folder (made if missing)")
    if not args.overwrite and not written_by_us(out):
        raise ValueError(f"{out}: holds a report.json / grid.png that evaluate did not write; pass --overwrite to "
                         "replace them, or another --out")
    if args.clip_vision and not Path(args.clip_vision).expanduser().exists():
        raise ValueError(f"--clip-vision {args.clip_vision}: no such file or folder; pass your CLIP weights "
                         "(a CLIPModel folder or safetensors file)")
    family = detect_family(Path(args.model or DEMO_FOLDER).expanduser())
    for flag, specs in (("--lora", args.lora), ("--compare", args.compare), ("--base-lora", args.base_lora)):
        for spec in specs:  # the headers and tensors, not the model: a wrong file is refused in seconds
            path = lora_spec(spec)[0]
            try:
                lora = read_lora(path, family=family.name)
            except WeightsError as e:
                raise WeightsError(f"{flag} {e}") from None
            if lora.family != family.name:
                raise ValueError(f"{flag} {path}: a {lora.family} LoRA; the model is {family.title}: pass a LoRA "
                                 "trained on it")


def written_by_us(out: Path) -> bool:
    """Whether OUT's report.json and grid.png (where present) are evaluate's: a report.json with evaluate's config
    (the grid is written with it), or neither file."""
    report, grid = out / "report.json", out / "grid.png"
    if not report.exists():
        return not grid.exists()
    try:
        config = json.loads(report.read_text()).get("config", {})
    except (ValueError, OSError, AttributeError):
        return False
    return isinstance(config, dict) and {"reference", "images_per_row", "teacher_steps"} <= config.keys()


def judge(args) -> dict:
    """Render (or reuse) every row under args.out and score it; the report that --out/report.json holds. The
    report and grid are written together at the end, after every metric: a failure leaves the previous ones."""
    from weights.lora_merge import lora_spec

    prompts = list(args.prompt_list)
    lora = lora_spec(args.lora[0]) if args.lora else None
    compare = [lora_spec(s) for s in args.compare]
    base = [lora_spec(s) for s in args.base_lora]
    rows = rows_for(args, lora, compare, base)
    app = args.out / "_app"  # the sessions' own output folder (empty: every image goes to its row's folder)
    ours = not app.exists()
    try:
        rendered, demo, model = render_rows(args, rows, prompts)
        report, grid = scored(args, rows, rendered, prompts, demo, model)
    finally:
        if ours:
            shutil.rmtree(app, ignore_errors=True)
    from PIL import Image

    with atomic_path(args.out / "grid.png") as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    with atomic_path(args.out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
    return report


def render_rows(args, rows: list[Row], prompts: list[str]) -> tuple[dict, bool, str]:
    """Every row's images, latents and timing (render_row), one model in memory at a time; with whether the
    model is the demo and its path."""
    from tqdm import tqdm

    rendered, session, demo, model = {}, None, None, None
    with tqdm(total=len(rows) * len(prompts) * args.per_prompt, desc="evaluate", unit="image") as bar:
        for wanted in [None, *args.compare_model]:
            mine = [r for r in rows if r.model == wanted]
            if not mine:
                continue
            session = None  # the previous model goes before the next loads
            launch = Namespace(**{**vars(args), "model": wanted or args.model, "lora_dir": [],
                                  "lora": [s for s in (*args.lora, *args.compare, *args.base_lora)],
                                  "out": str(args.out / "_app")})
            session = Session(launch)
            clock = SamplingClock(session.pipe)
            if wanted is None:
                demo, model = session.demo, session.model
                args.width = args.width or (64 if demo else 1024)
                args.height = args.height or args.width  # --height alone keeps its height
            for row in mine:
                rendered[row.name] = render_row(session, clock, row, args, prompts, args.out)
                bar.update(len(prompts) * args.per_prompt)
    return {r.name: rendered[r.name] for r in rows}, demo, model


def scored(args, rows: list[Row], rendered: dict, prompts: list[str], demo: bool,
           model: str) -> tuple[dict, np.ndarray]:
    """The report (settings and a table row per row) and the grid (rows x prompts, each prompt's first noise)."""
    ref = rendered[rows[0].name]
    width, count = ref["features"].shape[1], len(ref["latents"])
    if count < 2:
        print("warning: 1 image per row: fd and kid (with --clip-vision, fd clip and cmmd too) need two and are "
              "null (raise --per-prompt or add prompts)", file=sys.stderr)
    elif count < width:
        print(f"warning: {count} images per row, fewer than the {width} latent features: the Fréchet distances "
              "are biased upward (compare rows with each other, or raise --per-prompt)", file=sys.stderr)
    if args.per_prompt < 2:
        print("warning: 1 noise per prompt: pairwise and vendi (diversity across a prompt's noises) are null "
              "(raise --per-prompt)", file=sys.stderr)
    table = [{"name": row.name, **score(rendered[row.name], ref, len(prompts))} for row in rows]
    extras = []
    if demo and world_prompts(prompts):  # the demo world's own columns beside them
        extras.append(world_columns(rendered, rows[0].name, prompts, args.world))
    if args.clip_vision:
        extras.append(clip_columns(rendered, rows[0].name, prompts, args.clip_vision))
    for extra in extras:
        for r in table:
            r.update(extra[r["name"]])
    report = {"config": {"model": model, "prompts": prompts, "per_prompt": args.per_prompt,
                         "steps": list(args.steps), "teacher_steps": args.teacher_steps, "seed": args.seed,
                         "shift": args.shift, "reference": rows[0].name, "features": f"latents pooled 4x4 ({width})",
                         "images_per_row": count},
              "rows": table}
    grid = np.concatenate([np.concatenate(list(rendered[r.name]["pixels"][: len(prompts)]), axis=1) for r in rows])
    return report, grid


def format_report(report: dict) -> str:
    rows = report["rows"]
    width = max(len(r["name"]) for r in rows)
    cols = TABLE + tuple(c for c in ("adherence", "hist", "style", "clip", "fd clip", "cmmd") if c in rows[0])
    lines = [" ".join([" " * width] + [f"{c:>9}" for c in cols])]
    for r in rows:
        cells = ["-" if r[c] is None else f"{r[c]}" if c == "nfe" else f"{r[c]:.4g}" for c in cols]
        lines.append(" ".join([f"{r['name']:>{width}}"] + [f"{c:>9}" for c in cells]))
    return "\n".join(lines)
