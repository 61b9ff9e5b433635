"""`python -m distill.evaluate` on any model (the demo's world checker aside): rows of the same prompts and noises
(the teacher at --teacher-steps, the reference; the teacher, the student LoRA and each --compare LoRA at every
--steps), each image a `generate` PNG with its final latent, kept under --out with a manifest, and the metrics of
distill/metrics.py per row. A rerun reuses every row whose manifest matches and renders only what is missing; a
row whose settings changed is refused unless --overwrite."""

from __future__ import annotations

import json
import shutil
import sys
import time
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sampling.compare import Column, Session
from sampling.options import run_dtype
from weights.atomic import atomic_path
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
    --shift)."""
    shift = {"shift": args.shift, "schedule": "scfm"} if args.shift is not None else {}
    rows = [Row(f"teacher {args.teacher_steps}", Column(list(base), args.teacher_steps))]
    for n in args.steps:
        rows.append(Row(f"teacher {n}", Column(list(base), n)))
        if shift:
            rows.append(Row(f"teacher {n} scfm", Column(list(base), n, **shift)))
        if lora is not None:
            rows.append(Row(f"student {n}", Column([lora, *base], n, **shift)))
        for path, scale in compare:
            rows.append(Row(f"{Path(path).stem}@{scale:g} {n}", Column([(path, scale), *base], n, **shift)))
        for model in args.compare_model:  # a whole few-step model (FLUX.1-schnell, a merged checkpoint) on its grid
            rows.append(Row(f"{Path(model).name} {n}", Column(list(base), n), model=model))
    return rows


def manifest(row: Row, args, session: Session, prompts: list[str]) -> dict:
    loras = [{"file": Path(p).name, "sha256": file_sha256(p), "scale": s} for p, s in row.column.loras]
    col = row.column
    return dict(model=row.model or session.model, loras=loras, steps=col.steps, shift=col.shift, schedule=col.schedule,
                seed=args.seed, prompts=prompts, width=args.width, height=args.height, dtype=run_dtype(args),
                device=args.device, fp8=args.fp8)


def folder_name(name: str) -> str:
    return name.replace(" ", "_").replace("@", "-at-")


def render_row(session: Session, row: Row, args, prompts: list[str], out: Path) -> dict:
    """The row's images and latents (noise-major), rendering only the noises its folder lacks."""
    from safetensors.torch import load_file, save_file

    folder = out / folder_name(row.name)
    want = manifest(row, args, session, prompts)
    record = folder / "manifest.json"
    have = json.loads(record.read_text()) if record.exists() else {}
    timing = have.pop("timing", {})
    if have and have != want:
        if not args.overwrite:
            raise ValueError(f"{folder}: rendered with other settings ({row.name}); pass --overwrite to replace "
                             "it, or another --out")
        shutil.rmtree(folder)
        timing = {}
    folder.mkdir(parents=True, exist_ok=True)
    done = 0
    while (folder / f"latents-{done:03d}.safetensors").exists():
        done += 1
    if done < args.per_prompt:
        print(f"rendering {row.name}: noises {done} to {args.per_prompt - 1}", file=sys.stderr, flush=True)
        paths = [folder / f"{b:03d}_{i:03d}.png" for b in range(done, args.per_prompt) for i in range(len(prompts))]
        latents: list = []
        start = time.perf_counter()
        result = session.render(prompts, "", args.seed + done, args.width, args.height, row.column,
                                noises=args.per_prompt - done, paths=paths, latents_out=latents)
        per_image = (time.perf_counter() - start) / len(paths)
        for b, lat in enumerate(latents, start=done):
            save_file({"latents": lat.contiguous()}, folder / f"latents-{b:03d}.safetensors")
        timing = {"nfe": result.nfe, "sec_per_image": per_image}
    with atomic_path(record) as tmp:
        tmp.write_text(json.dumps({**want, "timing": timing}, indent=1) + "\n")
    from PIL import Image

    pixels = np.stack([np.asarray(Image.open(folder / f"{b:03d}_{i:03d}.png").convert("RGB"))
                       for b in range(args.per_prompt) for i in range(len(prompts))])  # (N, H, W, 3) uint8
    lat = torch.cat([load_file(folder / f"latents-{b:03d}.safetensors")["latents"] for b in range(args.per_prompt)])
    return {"pixels": pixels, "latents": lat, "features": metrics.latent_features(lat), "timing": timing}


def score(row: dict, ref: dict, n_prompts: int) -> dict:
    """The row's metrics against the reference row (distill/metrics.py); the reference against itself is at
    distance 0 by definition (KID's unbiased estimator would read a same-set pair as negative)."""
    feats, ref_feats = row["features"], ref["features"]
    by_prompt = [feats[i::n_prompts] for i in range(n_prompts)]  # noise-major: prompt i every n_prompts
    images, ref_images = row["pixels"] / 255, ref["pixels"] / 255  # metrics.py's [0, 1]
    psnrs = [metrics.psnr(a, b) for a, b in zip(images, ref_images)]
    out = {"nfe": row["timing"].get("nfe"), "sec/img": row["timing"].get("sec_per_image"),
           "mean|d|": metrics.mean_abs(images, ref_images),
           "psnr": float(np.mean(psnrs)) if all(np.isfinite(psnrs)) else None,  # identical images: inf, null
           "ssim": metrics.ssim(images, ref_images),
           "lat mse": metrics.mse(row["latents"], ref["latents"]),
           "fd": metrics.frechet(feats, ref_feats),
           "kid": 0.0 if row is ref else metrics.kid(feats, ref_feats) if len(feats) > 1 else None,
           "pairwise": float(np.mean([metrics.pairwise(f) for f in by_prompt])),
           "vendi": float(np.mean([metrics.vendi(f) for f in by_prompt]))}
    return out


def world_columns(rendered: dict, ref_name: str, prompts: list[str], world: str = "base") -> dict:
    """On the demo model, whose prompts the world's checker reads (distill/demo): adherence (percent of images
    matching everything the prompt fixes, read in `world`'s colours), hist (the read attributes' histogram distance
    to the reference's) and style (percent of colour-naming prompts drawn in `world`'s colours: whether a style
    LoRA took; None without such prompts)."""
    from .demo import quality

    per_image = [prompts[i % len(prompts)] for i in range(len(rendered[ref_name]["pixels"]))]  # noise-major
    scores = {name: quality.score(row["pixels"], per_image, world) for name, row in rendered.items()}
    out = {}
    for name, s in scores.items():
        hist = quality.histogram_distances(s["reads"], scores[ref_name]["reads"], per_image)
        out[name] = {"adherence": s["adherence"], "hist": float(np.mean(list(hist.values()))), "style": s["style"]}
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
            out[name] = {"clip": float(np.mean(clip_score(embeds[name], repeat))),
                         "fd clip": metrics.frechet(e, ref),
                         "cmmd": 0.0 if name == ref_name else metrics.cmmd(e, ref)}
    return out


def judge(args) -> dict:
    """Render (or reuse) every row under args.out and score it; the report that --out/report.json holds."""
    from tqdm import tqdm

    from weights.lora_merge import lora_spec

    prompts = list(args.prompt_list)
    lora = lora_spec(args.lora[0]) if args.lora else None
    compare = [lora_spec(s) for s in args.compare]
    base = [lora_spec(s) for s in args.base_lora]
    rows = rows_for(args, lora, compare, base)
    rendered, session, demo, model = {}, None, None, None
    with tqdm(total=len(rows) * len(prompts) * args.per_prompt, desc="evaluate", unit="image") as bar:
        for wanted in [None, *args.compare_model]:  # one model in memory at a time
            mine = [r for r in rows if r.model == wanted]
            if not mine:
                continue
            session = None  # the previous model goes before the next loads
            launch = Namespace(**{**vars(args), "model": wanted or args.model, "lora_dir": [],
                                  "lora": [s for s in (*args.lora, *args.compare, *args.base_lora)],
                                  "out": str(args.out / "_app")})
            session = Session(launch)
            if wanted is None:
                demo, model = session.demo, session.model
                if args.width is None:
                    args.width = args.height = 64 if demo else 1024
            for row in mine:
                rendered[row.name] = render_row(session, row, args, prompts, args.out)
                bar.update(len(prompts) * args.per_prompt)
    rendered = {r.name: rendered[r.name] for r in rows}
    ref = rendered[rows[0].name]
    width = ref["features"].shape[1]
    if len(ref["latents"]) < width:
        print(f"warning: {len(ref['latents'])} images per row, fewer than the {width} latent features: the Fréchet "
              "distances are biased upward (compare rows with each other, or raise --per-prompt)", file=sys.stderr)
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
                         "images_per_row": len(ref["latents"])},
              "rows": table}
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
    grid = np.concatenate([np.concatenate(list(rendered[r.name]["pixels"][: len(prompts)]), axis=1) for r in rows])
    from PIL import Image

    with atomic_path(args.out / "grid.png") as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    shutil.rmtree(args.out / "_app", ignore_errors=True)
    return report


def format_report(report: dict) -> str:
    rows = report["rows"]
    width = max(len(r["name"]) for r in rows)
    cols = TABLE + tuple(c for c in ("adherence", "hist", "style", "clip", "fd clip", "cmmd") if c in rows[0])
    lines = [" ".join([" " * width] + [f"{c:>9}" for c in cols])]
    for r in rows:
        cells = ["-" if r[c] is None else f"{r[c]}" if c == "nfe" else f"{r[c]:.4g}" for c in cols]
        lines.append(" ".join([f"{r['name']:>{width}}"] + [f"{c:>9}" for c in cells]))
    return "\n".join(lines)
