"""What a training run writes besides checkpoints: the JSONL log (and TensorBoard's, when installed) and the
sample images."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor


def save_samples(latents: Tensor, prompts: list[str], folder: Path, step: int, vae_path: str,
                 device: torch.device) -> list[Path]:
    """PNGs when a VAE is configured, else the latents as safetensors (no decoder, still inspectable)."""
    from weights.io import atomic_save

    if not vae_path:
        return [atomic_save({"latents": latents.cpu()}, folder / f"step-{step:06d}.safetensors",
                            {"prompts": json.dumps(prompts)}, overwrite=True)]
    from model.vae import vae_to_images
    from sampling.generate import save_png
    from sampling.pipeline import to_pil
    from weights.vae import load_vae

    vae = load_vae(vae_path, device=device)
    images = to_pil(vae_to_images(vae.decode(vae.denormalize_latents(latents.to(device)))))
    paths = []
    for i, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
        paths.append(folder / f"step-{step:06d}_{i:02d}.png")
        save_png(image, paths[-1], {"prompt": prompt, "step": step})
    return paths


class JsonlLog:
    """Append-only JSONL; on resume, lines past the checkpoint (from the killed run) are dropped first."""

    def __init__(self, path: Path, resumed_step: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            lines = path.read_text().splitlines()
            keep = [ln for ln in lines if ln and json.loads(ln)["step"] <= resumed_step]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            tmp.replace(path)
        self.path = path
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:  # TensorBoard is optional
            self.tb = None

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb:
            for k in ("loss", "loss_mean", "grad_norm", "seconds_per_step"):
                self.tb.add_scalar(k, row[k], row["step"])
