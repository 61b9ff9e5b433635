"""What every text-to-image pipeline shares: lazy components, the size check, diffusers-exact noise, the schedule
with its overrides, decoding, and the prompt -> latents -> image flow. Families fill in the rest."""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from model import fp8_gemm
from model.block_swap import BlockSwap, check_count
from model.fp8 import enable_fp8_compute_
from model.vae import AutoEncoder, vae_to_images
from weights.io import WeightsError, atomic_path
from weights.lora_text import EncoderLoRA, SplitLoRAs, split_loras
from weights.vae import load_vae

from .infotext import infotext
from .schedules import ScheduleConfig


class Pipeline:
    default_config: type  # the family's generation config dataclass
    family: str  # "flux" | "sd3": the LoRA names its files are read for

    def __init__(self, sources, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 fp8: bool = False, loras: Sequence = (), blocks_to_swap: int = 0, fp8_compute: bool = False,
                 compile: bool = False, ignore_te_lora: bool = False):  # noqa: A002  (the CLI's word)
        self.sources, self.device, self.dtype = sources, torch.device(device), dtype
        # fp8_compute: the blocks' GEMMs on fp8 tensor cores (model/fp8_gemm.py; e4m3 storage implied), refused
        # at once on a GPU without them; compile: each transformer block compiled once (model/layers.py)
        if fp8_compute:
            fp8_gemm.check_device(self.device, "--fp8-compute")
        self.fp8_compute, self.compile = fp8_compute, compile
        fp8 = fp8 or fp8_compute
        # blocks_to_swap: the last N transformer blocks' weights wait in host memory (model/block_swap.py)
        self.blocks_to_swap = blocks_to_swap
        # fp8: the transformer blocks' weights are stored in e4m3 (model/fp8.py), half of bf16's memory.
        # loras (as weights.lora.apply_loras takes them) are merged for good as the weights are read, before fp8
        # rounds them: no full-precision copy of the model exists on either device
        self.fp8, self.loras = fp8, list(loras)
        # A LoRA's text-encoder part (kohya lora_te*_, diffusers text_encoder*.) is merged into the encoders as they
        # are read, as diffusers and ComfyUI apply it; ignore_te_lora skips it (one line says so)
        self.ignore_te_lora = ignore_te_lora
        self._lora_parts: SplitLoRAs | None = None
        self._transformer: nn.Module | None = None
        self._vae: AutoEncoder | None = None

    # --- what a family defines -----------------------------------------------------------------------------------

    def load_transformer(self, device: torch.device | None = None) -> nn.Module:
        """The transformer in `self.dtype` on `device` (default `self.device`), `self.loras` merged, block weights
        in e4m3 if `self.fp8`. On "meta" the loader's checks run and nothing is read."""
        raise NotImplementedError

    def size_multiple(self) -> int:
        """Image sizes must be multiples of this (VAE downscale x the transformer's patch)."""
        raise NotImplementedError

    def latent_channels(self) -> int:
        raise NotImplementedError

    def base_schedule(self) -> ScheduleConfig:
        raise NotImplementedError

    def wants_negative(self, cfg) -> bool:
        raise NotImplementedError

    def text_encoder_names(self) -> tuple[str, ...]:
        """The encoders `encode` loads, as weights/lora_text.py names them ("clip_l", "clip_g", "t5")."""
        raise NotImplementedError

    def encode(self, prompts: Sequence[str], max_sequence_length: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def sample(self, cond: dict[str, Tensor], cfg, *, negative=None, generator=None, callback=None) -> Tensor:
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------------------------------

    def lora_parts(self) -> SplitLoRAs:
        """`self.loras` split into transformer and text-encoder parts: each file read once, its notes (a part
        skipped, or for an encoder this run does not load) printed once."""
        if self._lora_parts is None:
            self._lora_parts = split_loras(self.loras, self.family, encoders=self.text_encoder_names(),
                                           ignore_text=self.ignore_te_lora)
            for line in self._lora_parts.notes:
                print(line, file=sys.stderr)
        return self._lora_parts

    def text_loras(self, encoder: str) -> list[EncoderLoRA]:
        """The LoRAs' parts for one text encoder, as the text loaders' `loras=` take them."""
        return self.lora_parts().text_for(encoder)

    def check_transformer(self) -> None:
        """Everything loading the transformer checks (its files, keys, shapes, the LoRAs' fit) without reading a
        weight: bad input fails in seconds, before the text encoders load and run."""
        if self._transformer is None:
            model = self.load_transformer(torch.device("meta"))
            if self.blocks_to_swap:
                check_count(model, self.blocks_to_swap)

    @property
    def transformer(self) -> nn.Module:
        if self._transformer is None and self.blocks_to_swap:  # loaded in host memory; the kept part moves
            model = self.load_transformer(torch.device("cpu"))
            BlockSwap(model, self.blocks_to_swap, self.device)
            self._transformer = self._speed(model)
        elif self._transformer is None:
            self._transformer = self._speed(self.load_transformer())
        return self._transformer

    def _speed(self, model: nn.Module) -> nn.Module:
        if self.fp8_compute:
            enable_fp8_compute_(model, self.device)
        if self.compile:
            model.compile_blocks()
        return model

    @property
    def vae(self) -> AutoEncoder:
        if self._vae is None:
            if self.sources.vae is None:
                raise WeightsError("no VAE given: pass --vae (ae.safetensors, a vae/ folder or a pipeline folder)")
            self._vae = load_vae(self.sources.vae, dtype=self.dtype, device=self.device)
        return self._vae

    @property
    def vae_scale(self) -> int:
        return self.vae.config.downscale

    def release_text_encoders(self) -> None:
        """Called after encoding: the encoders are gone before the transformer loads (T5-XXL is 9 GB in bf16)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        multiple = self.size_multiple()
        for name, size in (("height", height), ("width", width)):
            if size % multiple or size <= 0:
                lo, hi = max(multiple, size // multiple * multiple), (size // multiple + 1) * multiple
                raise ValueError(f"{name} {size} is not a multiple of {multiple}; use {lo} or {hi}")
        return height // self.vae_scale, width // self.vae_scale

    def noise(self, batch: int, height: int, width: int, generator: torch.Generator) -> Tensor:
        """diffusers' `randn_tensor`: drawn on the generator's device in the model dtype, then moved."""
        h, w = self.latent_size(height, width)
        shape = (batch, self.latent_channels(), h, w)
        return torch.randn(shape, generator=generator, device=generator.device, dtype=self.dtype).to(self.device)

    def schedule(self, cfg) -> ScheduleConfig:
        """The family's grid with the run's overrides: `scfm` or `diffusers`, a fixed shift or "dynamic"."""
        base = replace(self.base_schedule(), grid=cfg.grid)
        if cfg.shift == "dynamic":
            return replace(base, dynamic=True)
        if cfg.shift is not None:
            return replace(base, dynamic=False, shift=float(cfg.shift))
        return base

    @staticmethod
    def generator(cfg, generator: torch.Generator | None) -> torch.Generator:
        return generator or torch.Generator("cpu").manual_seed(cfg.seed if cfg.seed is not None else 0)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents -> images (B, 3, H, W) in [0, 1]."""
        vae = self.vae
        return vae_to_images(vae.decode(vae.denormalize_latents(latents.to(self.dtype))))

    def __call__(self, prompts: str | Sequence[str], cfg=None, *, generator: torch.Generator | None = None,
                 callback=None, output: str = "pil"):
        cfg = cfg or self.default_config()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self.latent_size(cfg.height, cfg.width)  # fail on a bad size before loading the big parts
        with_negative = self.wants_negative(cfg)
        conds = self.encode(prompts + ([cfg.negative_prompt] * len(prompts) if with_negative else []),
                            cfg.max_sequence_length)
        cond = {k: v[: len(prompts)] for k, v in conds.items()}
        negative = {k: v[len(prompts):] for k, v in conds.items()} if with_negative else None
        latents = self.sample(cond, cfg, negative=negative, generator=generator, callback=callback)
        if output == "latent":
            return latents
        images = self.decode(latents)
        return images if output == "tensor" else to_pil(images)


def to_pil(images: Tensor) -> list:
    """[0, 1] float images -> PIL, rounded as diffusers rounds (x * 255, round half to even, uint8)."""
    from PIL import Image

    arrays = (images.float().permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arrays]


# The PNG text chunk holding our settings as JSON; `parameters` holds the A1111 infotext other tools read.
PNG_PARAMS_KEY = "scfm"


def save_png(image, path: Path, params: dict) -> None:
    """Atomically (a crash never leaves half a PNG under the final name), with `params` twice: as JSON under
    `scfm`, which `read_png_params` reads, and as A1111 infotext under `parameters` (sampling/infotext.py)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext(params))
    info.add_text(PNG_PARAMS_KEY, json.dumps(params))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def read_png_params(image) -> dict:
    """The params `save_png` stored, from a path or an open PIL image. PNGs written before the infotext hold the
    JSON under `parameters`; a PNG without either is a ValueError."""
    from PIL import Image

    if hasattr(image, "text"):
        text = image.text
    else:
        with Image.open(image) as im:
            text = im.text
    raw = text.get(PNG_PARAMS_KEY) or text.get("parameters", "")
    try:
        params = json.loads(raw)
        if isinstance(params, dict):
            return params
    except json.JSONDecodeError:
        pass
    raise ValueError(f"{getattr(image, 'filename', image)}: no scfm settings in this PNG (not written by scfm?)")
