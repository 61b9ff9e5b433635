"""What every text-to-image pipeline shares (the Pipeline base class): lazy components, LoRAs swapped on a loaded
transformer, the largest image side, diffusers-exact noise, the schedule with its overrides, decoding, and the
prompt -> latents -> image flow. Families fill in the rest. The size and memory checks it inherits: sizes.py; which
files a pipeline is built from, and their checks: components.py; the PNG it writes: png_record.py."""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from model import fp8_gemm
from model.block_swap import BlockSwap, check_count
from model.fp8 import enable_fp8_compute_
from model.vae import AutoEncoder, VAEConfig, vae_to_images
from weights.io import WeightsError
from weights.lora_merge import _resolve, apply_loras, requantize_loras, unload_loras
from weights.lora_text import EncoderLoRA, SplitLoRAs, split_loras
from weights.transformer import load_transformer
from weights.vae import load_vae

from .schedules import ScheduleConfig
from .sizes import SizeChecks

# The largest image side we sample (SD3 may allow less: its position table). A sanity cap, not a memory limit
# (activation_bytes is that): 4x the released models' 1024-px training side. Far beyond what they were trained on,
# images break down into repeated parts, and a step at 4096x4096 has 16x the tokens and 256x the attention work
# of one at 1024x1024.
MAX_SIDE = 4096


class Pipeline(SizeChecks):
    """One family's text-to-image pipeline (its sampling half: weights/families names it as part "pipeline").
    `generate` and the trainer's cache drive every family through this interface alone."""

    default_config: type  # the family's generation config dataclass
    family: str  # the family's name (weights/families): the LoRA names its files are read for
    cond_names: tuple[str, ...]  # the keys of `encode`'s conditioning, in the cache's order
    defaults: dict  # `generate`'s defaults: steps, guidance, max_sequence_length (the diffusers pipeline's)
    # `make_dataset`'s: the released recipe renders its teacher data with 32 steps at guidance 3.5
    # (docs/method.md §7); a family whose pipeline guides otherwise says so
    teacher_defaults: dict = {"steps": 32, "guidance": 3.5}
    # the text length every pipeline of the family gives its transformer, where that is fixed (None: a choice,
    # `max_sequence_length`); the trainer's default t5_length (distill/run_setup.py with_text_length)
    pads_text_to: int | None = None
    # `generate` flags only this family reads, (flag, args attribute): another family's model refuses them
    own_flags: tuple[tuple[str, str], ...] = ()
    flag_hint: str = ""  # said when another family's flag is refused for this family's model
    # flags several other families read and this one does not (its parts are others): refused too
    unread_flags: tuple[tuple[str, str], ...] = ()
    unread_hint: str = ""
    needed_files: tuple[str, ...] = ()  # the text-encoder files (DistillConfig fields) a training cache needs

    def __init__(self, sources, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 fp8: bool = False, loras: Sequence = (), blocks_to_swap: int = 0, fp8_compute: bool = False,
                 compile: bool = False, ignore_te_lora: bool = False):
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
        self._meta: nn.Module | None = None  # the transformer built on "meta": its config and checks, no weights
        self._vae: AutoEncoder | None = None
        self._vae_config: VAEConfig | None = None
        self.components_checked = False  # check_components' answer cannot change: the sources are frozen

    # --- what a family defines -----------------------------------------------------------------------------------

    def load_transformer(self, device: torch.device | None = None) -> nn.Module:
        """The transformer in `self.dtype` on `device` (default `self.device`), `self.loras` merged, block weights
        in e4m3 if `self.fp8`. On "meta" the loader's checks run and nothing is read."""
        return load_transformer(self.family, self.sources.transformer, dtype=self.dtype,
                                device=device or self.device, fp8=self.fp8, loras=self.lora_parts().transformer)

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

    def tokenizers(self, max_sequence_length: int) -> tuple:
        """The text encoders' tokenizers, in `encode`'s order; loaded first there, so a wrong file costs no load."""
        raise NotImplementedError

    @classmethod
    def from_files(cls, model: Path, files: dict, **options) -> Pipeline:
        """The pipeline of a model file or pipeline folder with the components `files` names
        (sampling/components.py `component_files`; None for not given)."""
        raise NotImplementedError

    @classmethod
    def generation_config(cls, args, rec, common: dict):
        """`generate`'s config: `common` (sizes, steps, grid, shift, seed), then this family's settings from the
        command line `args`, the LoRAs' recommendation `rec` and `defaults`."""
        raise NotImplementedError

    def text_encoder(self, max_sequence_length: int) -> Callable[[Sequence[str]], dict[str, Tensor]]:
        """Load the tokenizers (first: a wrong file costs no load) and the text encoders, LoRA parts merged; the
        function returned encodes prompts with them into {cond_names...}. `encode` uses it once; the trainer's
        cache build keeps it for every batch."""
        raise NotImplementedError

    def sample(self, cond: dict[str, Tensor], cfg, *, negative=None, generator=None, callback=None,
               noise: Tensor | None = None) -> Tensor:
        """Latents from the conditioning (and `negative`'s when `wants_negative`), from `noise` (as `noise`
        draws it) or a fresh draw of the config's seed."""
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], max_sequence_length: int) -> dict[str, Tensor]:
        """Run the text encoders once for all prompts, then free them before the transformer loads."""
        encode = self.text_encoder(max_sequence_length)
        cond = encode(list(prompts))
        del encode
        self.release_text_encoders()
        return cond

    def encode_prompts(self, prompts: Sequence[str], cfg) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """The prompts' conditioning and, when `cfg` runs a negative pass (`wants_negative`), the negative
        prompt's, one row per prompt: both from one run of the text encoders."""
        prompts = list(prompts)
        with_negative = self.wants_negative(cfg)
        conds = self.encode(prompts + ([cfg.negative_prompt] * len(prompts) if with_negative else []),
                            cfg.max_sequence_length)
        cond = {k: v[: len(prompts)] for k, v in conds.items()}
        return cond, ({k: v[len(prompts):] for k, v in conds.items()} if with_negative else None)

    def check_config(self, cfg) -> None:
        """Settings only this model can judge (a block index, say), checked before the text encoders run."""

    @classmethod
    def step_distilled(cls, model: Path) -> tuple[bool, str]:
        """(whether `model` is its family's step-distilled variant, which samples without CFG, and what said so);
        (False, "") where the family has none, or nothing tells."""
        return False, ""

    def check_guidance_flag(self, given: float | None) -> None:
        """A --guidance the user gave (None: not given), refused where this model would ignore it."""

    def check_components(self) -> None:
        """That the VAE and the text encoders fit this transformer, from their headers and configs alone (each built
        on "meta"): a part of another model fails in one line before any weight is read, not as a shape error
        after the encoders ran, nor as a wrong image (two 16-channel VAEs with other latent statistics)."""

    def used_settings(self, settings: dict) -> dict:
        """The settings as sampled, for the PNG: a family drops what its model ignored."""
        return settings

    def set_loras(self, loras: Sequence) -> None:
        """Replace the LoRAs (as `loras=` takes them) of a pipeline that may have its transformer loaded: their
        transformer parts are unmerged and the new ones merged on the loaded weights, bit-exactly (a transformer
        loaded with LoRAs cannot unmerge them: unload_loras says so); with fp8, the touched weights are re-read
        from the file, merged and quantized again, as loading does. Text-encoder parts apply as the encoders next
        load (`encode` loads them each time). A refused LoRA (one that does not fit, an unreadable file) leaves the
        pipeline as it was: its LoRAs and the weights they merged."""
        previous = self.loras, self._lora_parts
        self.loras, self._lora_parts = list(loras), None
        if self._transformer is None:
            return
        try:
            parts = self.lora_parts().transformer
            if self.fp8:  # requantize_loras checks every LoRA's fit before it rewrites a weight
                requantize_loras(self._transformer, parts, source=self.sources.transformer, dtype=self.dtype)
                return
            # checked before the merged stack is undone: a refused LoRA must not leave the model without the
            # previous ones while the caller (the app's Session) still believes they are merged
            _resolve(self._transformer, parts, ignore_text_encoders=True)
            unload_loras(self._transformer)  # its refusals come before it restores a weight
        except Exception:
            self.loras, self._lora_parts = previous
            raise
        try:
            if parts:
                apply_loras(self._transformer, parts, base=self.sources.transformer)
        except Exception:
            # the previous stack is unmerged already: merge it again, so the weights match `self.loras`
            self.loras, self._lora_parts = previous
            if old := self.lora_parts().transformer:
                apply_loras(self._transformer, old, base=self.sources.transformer)
            raise

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
            self.transformer_config()
            if self.blocks_to_swap:
                check_count(self._meta, self.blocks_to_swap)

    def transformer_config(self):
        """The transformer's config, read without a weight (a build on "meta", whose checks run once)."""
        if self._transformer is not None:
            return self._transformer.config
        if self._meta is None:
            self._meta = self.load_transformer(torch.device("meta"))
        return self._meta.config

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
            say_first_call(model)
        return model

    @property
    def vae(self) -> AutoEncoder:
        if self._vae is None:
            if self.sources.vae is None:
                raise WeightsError("no VAE given: pass --vae (ae.safetensors, a vae/ folder or a pipeline folder)")
            self._vae = load_vae(self.sources.vae, dtype=self.dtype, device=self.device)
        return self._vae

    def vae_config(self) -> VAEConfig:
        """The VAE's config without reading its weights (a build on "meta"): size checks need only this."""
        if self._vae is not None:
            return self._vae.config
        if self._vae_config is None:
            if self.sources.vae is None:
                raise WeightsError("no VAE given: pass --vae (ae.safetensors, a vae/ folder or a pipeline folder)")
            self._vae_config = load_vae(self.sources.vae, dtype=self.dtype, device="meta").config
        return self._vae_config

    @property
    def vae_scale(self) -> int:
        return self.vae_config().downscale

    def release_text_encoders(self) -> None:
        """Called after encoding: the encoders are gone before the transformer loads (T5-XXL is 9 GB in bf16)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def max_side(self) -> tuple[int, str]:
        """The largest image side this model samples, and why (a family with a hard limit says so)."""
        return MAX_SIDE, "sampling/base.py MAX_SIDE: 4x the released models' training size"

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
        with_negative = self.wants_negative(cfg)
        # fail on a bad size before loading the big parts
        self.check_size(cfg.height, cfg.width, len(prompts) * (2 if with_negative else 1))
        cond, negative = self.encode_prompts(prompts, cfg)
        latents = self.sample(cond, cfg, negative=negative, generator=generator, callback=callback)
        if output == "latent":
            return latents
        images = self.decode(latents)
        return images if output == "tensor" else to_pil(images)


def say_first_call(model: nn.Module) -> None:
    """Print how long the compiled model's first call took, compiling its blocks included (--compile's warm-up,
    which the first image pays; later calls reuse the compiled code), once, to stderr."""
    started: list[float] = []

    def before(module, args):
        started.append(time.perf_counter())

    def after(module, args, out):
        for h in handles:
            h.remove()
        if isinstance(out, Tensor) and out.is_cuda:
            torch.cuda.synchronize(out.device)
        print(f"--compile: the first transformer call took {time.perf_counter() - started[0]:.1f} s, compiling its "
              "blocks included (later calls reuse them)", file=sys.stderr, flush=True)

    handles = [model.register_forward_pre_hook(before), model.register_forward_hook(after)]


def to_pil(images: Tensor) -> list:
    """[0, 1] float images -> PIL, rounded as diffusers rounds (x * 255, round half to even, uint8)."""
    from PIL import Image

    arrays = (images.float().permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arrays]
