"""`python -m distill.evaluate` on any model (the demo's world checker aside): the run of the --out mode. Rows of
the same prompts and noises (the teacher at --teacher-steps, the reference; the teacher, the student LoRA and each
--compare LoRA at every --steps), each rendered into its folder under --out (distill/judge_render.py: a `generate`
PNG per image with its final latent, and a manifest) and scored against the reference (distill/judge_scores.py);
the checks before anything loads; the report and grid written at the end. A rerun reuses every row whose manifest
matches and renders only what is missing; a row whose settings changed is refused unless --overwrite."""

from __future__ import annotations

import json
import os
import shutil
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np

from sampling.compare import Column, Session
from weights.atomic import atomic_path
from weights.families import title_of

from .judge_render import Row, SamplingClock, folder_name, render_row
from .judge_scores import clip_columns, score, world_columns, world_prompts


def rows_for(args, lora, compare, base) -> list[Row]:
    """The reference first; teacher (at --teacher-steps: the reference itself), student and each compare LoRA at
    every --steps. Student and compare rows sample on their LoRA's own grid unless --shift; teacher rows on their
    schedule (and on the SCFM grid too with --shift). The names are unique and so are their folders (check_rows),
    decided before anything renders."""
    shift = {"shift": args.shift, "schedule": "scfm"} if args.shift is not None else {}
    compare_names = file_labels([p for p, _ in compare], lambda p: p.stem)
    model_names = file_labels(args.compare_model, lambda p: p.name)
    guidance = teacher_guidance(args, lora, base)
    rows = [Row(f"teacher {args.teacher_steps}", Column(list(base), args.teacher_steps, guidance=guidance))]
    for n in dict.fromkeys(args.steps):  # a repeated step count is one set of rows, as in the demo table
        if n != args.teacher_steps:  # at --teacher-steps the reference is that teacher row (the demo table's way)
            rows.append(Row(f"teacher {n}", Column(list(base), n, guidance=guidance)))
        if shift:
            rows.append(Row(f"teacher {n} scfm", Column(list(base), n, guidance=guidance, **shift)))
        if lora is not None:
            rows.append(Row(f"student {n}", Column([lora, *base], n, **shift)))
        for name, (path, scale) in zip(compare_names, compare):
            rows.append(Row(f"{name}@{scale:g} {n}", Column([(path, scale), *base], n, **shift)))
        for name, model in zip(model_names, args.compare_model):  # a whole few-step model on its own grid
            rows.append(Row(f"{name} {n}", Column(list(base), n), model=model))
    check_rows(rows, args)
    return rows


def teacher_guidance(args, lora, base) -> float | None:
    """The guidance of the teacher rows (the reference included), as generate reads it for the family (FLUX.1: its
    guidance input; SD3.5 and klein: the CFG scale): --guidance, else what the student's LoRA recommends with the
    --base-lora under it (the teacher it was distilled with, and the guidance its own rows sample at: SD3.5's
    4.5, not generate's default CFG 7), else None: generate's default. --compare-model rows keep their own."""
    if getattr(args, "guidance", None) is not None:
        return args.guidance
    if lora is None:
        return None
    from sampling.job import lora_recommendations

    return lora_recommendations([lora[0], *(p for p, _ in base)]).guidance


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
    return loras, row.column.steps, row.column.shift, row.column.schedule, row.column.guidance, model


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
                raise ValueError(f"{flag} {path}: a LoRA for {title_of(lora.family)}; the model is {family.title}: "
                                 "pass a LoRA "
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
            if wanted is None:  # args.width and args.height: set and checked by evaluate's check_image_size
                demo, model = session.demo, session.model
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
                         "shift": args.shift, "teacher_guidance": ref["guidance"], "reference": rows[0].name,
                         "features": f"latents pooled 4x4 ({width})", "images_per_row": count},
              "rows": table}
    grid = np.concatenate([np.concatenate(list(rendered[r.name]["pixels"][: len(prompts)]), axis=1) for r in rows])
    return report, grid
