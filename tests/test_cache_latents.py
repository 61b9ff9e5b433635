"""The image half of the training cache (distill/run_setup.py `prepare_cache` with the run's own VAE) against
diffusers' own encode path on the same files: the cached latents are what a diffusers pipeline would hand its
transformer, so a cache that skipped the [0, 1] -> [-1, 1] mapping or the latent normalisation cannot pass."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

from distill.config_files import build_config
from distill.run_setup import prepare_cache, resolve_demo
from sampling.demo import DEMO_FOLDER, IMAGE_SIZE

CAPTIONS = ("a red circle at the top left", "a blue square at the right")


def write_pairs(folder) -> list[Image.Image]:
    """Square images of the demo's size (so no resize or crop stands between the file and the VAE): a colour
    ramp that differs left to right and top to bottom, plus noise; each saved with its caption."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, IMAGE_SIZE)
    out = []
    for k, caption in enumerate(CAPTIONS):
        base = np.stack([ramp[None, :] * np.ones((IMAGE_SIZE, 1)), ramp[:, None] * np.ones((1, IMAGE_SIZE)),
                         np.full((IMAGE_SIZE, IMAGE_SIZE), 0.3 + 0.4 * k)], axis=-1)
        pixels = np.clip(base * 200 + rng.integers(0, 56, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{k}.png")
        (folder / f"{k}.txt").write_text(caption)
        with Image.open(folder / f"{k}.png") as saved:
            out.append(saved.convert("RGB"))
    return out


def test_cached_latents_are_diffusers_normalised_vae_means(tmp_path):
    """Each cached latent (the flipped copies too) equals diffusers' path on the PNG: VaeImageProcessor.preprocess
    ([0, 1] -> [-1, 1]), AutoencoderKL.encode(...).latent_dist.mode() (our encode without sampling returns the
    mean, which is the diagonal Gaussian's mode), then (z - shift_factor) * scaling_factor."""
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor

    images = write_pairs(tmp_path / "data")
    flags = {"data": str(tmp_path / "data"), "output": str(tmp_path / "run"), "cache": str(tmp_path / "cache"),
             "dtype": "fp32", "device": "cpu", "flip": True}
    cfg = resolve_demo(build_config("demo", flags))
    assert cfg.vae == str(DEMO_FOLDER / "vae")  # the demo's diffusers-layout AutoencoderKL
    cache = prepare_cache(cfg, torch.device("cpu"), 0)
    assert len(cache) == 2 * len(images) and [it.get("flip", False) for it in cache.plan["items"]] == [
        False, False, True, True]

    vae = AutoencoderKL.from_pretrained(DEMO_FOLDER / "vae").eval()
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    assert shift != 0 and scale != 1  # so that leaving either out shows
    processor = VaeImageProcessor(vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1))
    for i, item in enumerate(cache.plan["items"]):
        image = images[int(item["file"].removesuffix(".png"))]
        pixels = processor.preprocess(ImageOps.mirror(image) if item.get("flip") else image)
        assert pixels.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and pixels.min() < -0.5  # [-1, 1], not resized
        with torch.no_grad():
            want = (vae.encode(pixels).latent_dist.mode() - shift) * scale
        x0, _ = cache.load([i])
        assert x0.dtype == torch.float32
        torch.testing.assert_close(x0, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    # the mirrored items are not the originals' latents
    assert not torch.allclose(cache.load([0])[0], cache.load([2])[0], atol=1e-2)
