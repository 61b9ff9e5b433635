"""How well a demo model draws the world: sample fixed prompts and noises, read the images back, score them.

Scores (all from `world.read_image`, no learned metric):
- adherence: percent of images whose read attributes match every attribute the prompt fixes;
- crispness: mean distance of the pixels to the world's palette (0 is flat colour; blur and mixed modes score high);
- iou: how well the best shape template fits the drawn shape (low for blobs, mixtures and ghosts);
- paired distance: mean absolute pixel difference to a reference run (the 32-step teacher) from the same noise;
- histogram distance: total variation between the read-attribute histograms of a run and of the reference run
  (a distributional score: a sampler that always draws the mode's average can be close in pixels and still wrong).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from torch import Tensor

from model.flux import Flux
from sampling.samplers import euler
from sampling.schedules import SCHEDULES, get_sigmas, schedule_for
from sampling.velocity import FluxVelocity

from . import world

# A fixed prompt set covering full, partial and empty captions; each is drawn for several noises.
PROMPTS = (
    "a red circle at the top left",
    "a blue square in the center on a white background",
    "a yellow triangle at the bottom right on a black background",
    "a green ring at the left",
    "a purple diamond at the top on a gray background",
    "a large blue circle at the right",
    "a small red square at the top right",
    "a triangle at the bottom left on a white background",
    "a green shape at the bottom",
    "a ring in the center",
    "a yellow shape at the top left on a black background",
    "a shape at the bottom right",
)


@torch.no_grad()
def sample_latents(model: Flux, cond: dict[str, Tensor], noise: Tensor, steps: int, batch: int = 64,
                   shift: float | None = None) -> Tensor:
    """Euler from the given noise on the demo's own grid (schnell's: linspace(1, 1/N, N) then 0, shift 1), or with
    `shift` on the SCFM training grid (linspace(1, 0, N + 1) shifted, docs/method.md §2 and §8)."""
    config = SCHEDULES["flux-schnell"] if shift is None else schedule_for("flux-schnell", grid="scfm", shift=shift)
    sigmas = get_sigmas(config, steps, (noise.shape[2] // 2) * (noise.shape[3] // 2))
    velocity = FluxVelocity(model)
    out = []
    for i in range(0, noise.shape[0], batch):
        c = {k: v[i:i + batch] for k, v in cond.items()}
        out.append(euler(velocity, noise[i:i + batch], sigmas, c))
    return torch.cat(out)


@torch.no_grad()
def decode(vae, latents: Tensor, batch: int = 64) -> np.ndarray:
    """Normalised latents -> (B, H, W, 3) uint8 images."""
    out = []
    for i in range(0, latents.shape[0], batch):
        x = vae.decode(vae.denormalize_latents(latents[i:i + batch]))
        out.append(((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def score(images: np.ndarray, prompts: list[str], world_name: str = "base") -> dict:
    """Adherence (percent), crispness, template IoU and the read attributes of each image, read as `world_name`
    draws (its colours); style: percent of the images whose prompt names a colour that show it in `world_name`'s
    drawing of it (None without such prompts): whether a style LoRA took."""
    reads = [world.read_image(im, world_name) for im in images]
    fixed = [world.parse_caption(p) for p in prompts]
    ok = [world.adheres(r, f) for r, f in zip(reads, fixed)]
    styled = [r["colour"] == f["colour"] for r, f in zip(reads, fixed) if "colour" in f and r["found"]]
    return dict(adherence=100.0 * float(np.mean(ok)), crispness=float(np.mean([r["crispness"] for r in reads])),
                iou=float(np.mean([r["iou"] for r in reads])),
                style=100.0 * float(np.mean(styled)) if styled else None, reads=reads)


def histogram_distances(reads: list[dict], ref: list[dict], prompts: list[str]) -> dict[str, float]:
    """Per attribute: the mean over prompts of the total-variation distance between read-attribute histograms."""
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_prompt.setdefault(p, []).append(i)
    out = {}
    for key in ("shape", "colour", "background", "position", "size"):
        dists = []
        for idx in by_prompt.values():
            a = Counter(str(reads[i][key]) for i in idx)
            b = Counter(str(ref[i][key]) for i in idx)
            dists.append(0.5 * sum(abs(a[k] - b[k]) for k in set(a) | set(b)) / len(idx))
        out[key] = float(np.mean(dists))
    return out


def paired_distance(images: np.ndarray, ref: np.ndarray) -> float:
    """Mean absolute pixel difference in [0, 1]."""
    return float(np.abs(images.astype(np.float32) - ref.astype(np.float32)).mean() / 255.0)
