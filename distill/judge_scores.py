"""The columns of `python -m distill.evaluate --out`'s report (distill/judge.py renders the rows): each row's
metrics against the reference row (distill/metrics.py), the demo world's columns on the demo model, the CLIP
columns with --clip-vision, and the table printed from the report."""

from __future__ import annotations

import numpy as np
import torch

from . import metrics

TABLE = ("nfe", "sec/img", "mean|d|", "psnr", "ssim", "lat mse", "fd", "kid", "pairwise", "vendi")


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


def format_report(report: dict) -> str:
    rows = report["rows"]
    width = max(len(r["name"]) for r in rows)
    cols = TABLE + tuple(c for c in ("adherence", "hist", "style", "clip", "fd clip", "cmmd") if c in rows[0])
    lines = [" ".join([" " * width] + [f"{c:>9}" for c in cols])]
    for r in rows:
        cells = ["-" if r[c] is None else f"{r[c]}" if c == "nfe" else f"{r[c]:.4g}" for c in cols]
        lines.append(" ".join([f"{r['name']:>{width}}"] + [f"{c:>9}" for c in cells]))
    return "\n".join(lines)
