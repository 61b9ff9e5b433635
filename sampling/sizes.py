"""The image sizes a pipeline samples, checked before any weight is read (SizeChecks, a base of sampling/base.py's
Pipeline): the latent size of an image size, with the nearest valid sizes for a wrong one; a rough estimate of the
activation memory sampling and decoding need; and the refusal of a size whose activations alone exceed the device.
The largest side (MAX_SIDE, `max_side()`) stays with the Pipeline, whose families narrow it."""

from __future__ import annotations

import math
import os

import torch

from model.vae import AUTO_TILE_LATENT, TILE_SIZE

# Text tokens next to the image's, at most: T5's 512 plus CLIP's 77 (SD3's context), for the memory estimate.
TEXT_TOKENS = 512 + 77


class SizeChecks:
    """The size checks of a Pipeline, which supplies what they read: `size_multiple()`, `max_side()`,
    `default_config`, `vae_scale` and `vae_config()`, `transformer_config()`, `dtype` and `device`."""

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the latents; a size that is not positive, over max_side() or not a multiple of what the model
        needs is one line with the nearest valid values (always positive)."""
        multiple = self.size_multiple()
        cap, why = self.max_side()
        for name, size in (("height", height), ("width", width)):
            if size <= 0:
                default = self.default_config().width
                raise ValueError(f"--{name} {size}: must be a positive multiple of {multiple}; pass --{name} "
                                 f"{default} (the default) or another positive multiple of {multiple}")
            if size > cap:
                raise ValueError(f"--{name} {size}: over {cap} px, the largest side this model samples ({why}); "
                                 f"pass --{name} {cap // multiple * multiple} or less")
            if size % multiple:
                lo, hi = max(multiple, size // multiple * multiple), (size // multiple + 1) * multiple
                fix = f"use {lo} or {hi}" if lo != hi else f"use {lo}"
                raise ValueError(f"--{name} {size} is not a multiple of {multiple}; {fix}")
        return height // self.vae_scale, width // self.vae_scale

    def activation_bytes(self, images: int, height: int, width: int) -> int:
        """Peak activation memory of sampling then decoding `images` images at once, roughly; weights are not
        counted (--blocks-to-swap and --fp8 shrink those). A transformer block holds ~16 hidden-wide rows per token
        at its peak (counted for Flux's single block: its 21504-wide linear1 output, the 12288-wide GELU and the
        15360-wide concat, at hidden 3072). The VAE decoder holds ~8 x ch values per decoded pixel (measured on the
        CPU: 7.3 x 128 at 512 px, 6.9 x 128 at 1024), of one tile above AUTO_TILE_LATENT, plus three fp32 copies
        of the image (decoder output, tile blend, PIL); on the CPU, whose SDPA holds the scores whole, also the
        mid-block attention's two (tokens x tokens) fp32 matrices. Sampling ends before decoding starts: the peak
        is the larger of the two."""
        multiple, size = self.size_multiple(), self.dtype.itemsize
        tokens = (height // multiple) * (width // multiple) + TEXT_TOKENS
        sampling = tokens * self.transformer_config().hidden_size * 16 * size
        pixels = height * width
        untiled = pixels // self.vae_scale ** 2 <= AUTO_TILE_LATENT
        decoded = pixels if untiled else TILE_SIZE * TILE_SIZE
        decoding = decoded * self.vae_config().ch * 8 * size + pixels * 3 * 4 * 3
        if self.device.type == "cpu":
            decoding += 2 * 4 * (decoded // self.vae_scale ** 2) ** 2
        return images * max(sampling, decoding)

    def check_size(self, height: int, width: int, images: int = 1) -> None:
        """latent_size's checks, then refuse a size whose activations alone (`images` at once) exceed the
        device's whole memory: it could never run, and would fail only after the text encoders ran."""
        self.latent_size(height, width)
        need, have = self.activation_bytes(images, height, width), device_memory(self.device)
        if have is None or need <= have:
            return
        multiple = self.size_multiple()
        shrink = math.sqrt(have / need) * 0.9  # both terms grow with the pixels: scale each side by the root

        def fit(side: int) -> int:
            return max(multiple, int(side * shrink) // multiple * multiple)

        fewer = " or fewer prompts per run" if images > 1 else ""
        raise ValueError(f"--width {width} --height {height}: sampling {images} image(s) at once needs about "
                         f"{need / 1e9:.1f} GB of activations, more than all {have / 1e9:.1f} GB of "
                         f"{self.device}; pass --width {fit(width)} --height {fit(height)} or smaller{fewer}")


def device_memory(device: torch.device) -> int | None:
    """All of `device`'s memory in bytes (the host's RAM for the CPU); None when it cannot be asked cheaply."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not a POSIX host
            return None
    return None
