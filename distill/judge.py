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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sampling.compare import Column, Session
from weights.atomic import atomic_path
from weights.io import file_sha256

from . import metrics

TABLE = ("nfe", "sec/img", "mean|d|", "psnr", "ssim", "lat mse", "fd", "kid", "pairwise", "vendi")


@dataclass
class Row:
    name: str
    column: Column
    loras: list = field(default_factory=list)  # (path, scale), base LoRAs included


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
    return rows


def manifest(row: Row, args, session: Session, prompts: list[str]) -> dict:
    loras = [{"file": Path(p).name, "sha256": file_sha256(p), "scale": s} for p, s in row.column.loras]
    col = row.column
    return dict(model=session.model, loras=loras, steps=col.steps, shift=col.shift, schedule=col.schedule,
                seed=args.seed, prompts=prompts, width=args.width, height=args.height, dtype=args.dtype,
                device=args.device, fp8=args.fp8)


def folder_name(name: str) -> str:
    return name.replace(" ", "_").replace("@", "-at-")


def render_row(session: Session, row: Row, args, prompts: list[str], out: Path) -> dict:
    """The row's images and latents (noise-major), rendering only the noises its folder lacks."""
    from safetensors.torch import load_file, save_file

    folder = out / folder_name(row.name)
    want = manifest(row, args, session, prompts)
    record = folder / "manifest.json"
    if record.exists():
        have = json.loads(record.read_text())
        if {k: v for k, v in have.items() if k != "timing"} != want:
            if not args.overwrite:
                raise ValueError(f"{folder}: rendered with other settings ({row.name}); pass --overwrite to replace "
                                 "it, or another --out")
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    done = 0
    while (folder / f"latents-{done:03d}.safetensors").exists():
        done += 1
    timing = json.loads(record.read_text()).get("timing", {}) if record.exists() else {}
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

    images = np.stack([np.asarray(Image.open(folder / f"{b:03d}_{i:03d}.png").convert("RGB"), dtype=np.float64) / 255
                       for b in range(args.per_prompt) for i in range(len(prompts))])
    lat = torch.cat([load_file(folder / f"latents-{b:03d}.safetensors")["latents"] for b in range(args.per_prompt)])
    return {"images": images, "latents": lat, "timing": timing}


def score(row: dict, ref: dict, n_prompts: int) -> dict:
    """The row's metrics against the reference row (distill/metrics.py); the reference against itself is at
    distance 0 by definition (KID's unbiased estimator would read a same-set pair as negative)."""
    feats, ref_feats = metrics.latent_features(row["latents"]), metrics.latent_features(ref["latents"])
    by_prompt = [feats[i::n_prompts] for i in range(n_prompts)]  # noise-major: prompt i every n_prompts
    psnrs = [metrics.psnr(a, b) for a, b in zip(row["images"], ref["images"])]
    out = {"nfe": row["timing"].get("nfe"), "sec/img": row["timing"].get("sec_per_image"),
           "mean|d|": metrics.mean_abs(row["images"], ref["images"]),
           "psnr": float(np.mean(psnrs)) if all(np.isfinite(psnrs)) else None,  # identical images: inf, null
           "ssim": metrics.ssim(row["images"], ref["images"]),
           "lat mse": metrics.mse(row["latents"], ref["latents"]),
           "fd": metrics.frechet(feats, ref_feats),
           "kid": 0.0 if row is ref else metrics.kid(feats, ref_feats) if len(feats) > 1 else None,
           "pairwise": float(np.mean([metrics.pairwise(f) for f in by_prompt])),
           "vendi": float(np.mean([metrics.vendi(f) for f in by_prompt]))}
    return out


def judge(args) -> dict:
    """Render (or reuse) every row under args.out and score it; the report that --out/report.json holds."""
    from weights.lora_merge import lora_spec

    prompts = list(args.prompt_list)
    lora = lora_spec(args.lora[0]) if args.lora else None
    compare = [lora_spec(s) for s in args.compare]
    base = [lora_spec(s) for s in args.base_lora]
    launch = Namespace(**{**vars(args), "lora": [s for s in (*args.lora, *args.compare, *args.base_lora)],
                          "lora_dir": [], "out": str(args.out / "_app")})
    session = Session(launch)
    if args.width is None:
        args.width = args.height = 64 if session.demo else 1024
    rows = rows_for(args, lora, compare, base)
    rendered = {}
    for row in rows:
        rendered[row.name] = render_row(session, row, args, prompts, args.out)
    ref = rendered[rows[0].name]
    width = ref["latents"][0].numel() and metrics.latent_features(ref["latents"][:1]).shape[1]
    if len(ref["latents"]) < width:
        print(f"warning: {len(ref['latents'])} images per row, fewer than the {width} latent features: the Fréchet "
              "distances are biased upward (compare rows with each other, or raise --per-prompt)", file=sys.stderr)
    table = [{"name": row.name, **score(rendered[row.name], ref, len(prompts))} for row in rows]
    report = {"config": {"model": session.model, "prompts": prompts, "per_prompt": args.per_prompt,
                         "steps": list(args.steps), "teacher_steps": args.teacher_steps, "seed": args.seed,
                         "shift": args.shift, "reference": rows[0].name, "features": f"latents pooled 4x4 ({width})",
                         "images_per_row": len(ref["latents"])},
              "rows": table}
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
    grid = np.concatenate([np.concatenate(list(rendered[r.name]["images"][: len(prompts)]), axis=1) for r in rows])
    from PIL import Image

    with atomic_path(args.out / "grid.png") as tmp:
        Image.fromarray((grid * 255).round().astype(np.uint8)).save(tmp, format="PNG")
    shutil.rmtree(args.out / "_app", ignore_errors=True)
    return report


def format_report(report: dict) -> str:
    rows = report["rows"]
    width = max(len(r["name"]) for r in rows)
    lines = [" ".join([" " * width] + [f"{c:>9}" for c in TABLE])]
    for r in rows:
        cells = ["-" if r[c] is None else f"{r[c]}" if c == "nfe" else f"{r[c]:.4g}" for c in TABLE]
        lines.append(" ".join([f"{r['name']:>{width}}"] + [f"{c:>9}" for c in cells]))
    return "\n".join(lines)
