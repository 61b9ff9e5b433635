"""FLUX.2 [klein] text-to-image: prompts -> Qwen3 (hidden states 9 / 18 / 27) -> Euler over the FLUX.2 transformer
on its empirical-shift grid -> the 32-channel VAE -> images.

The same seed gives the same image as diffusers' `Flux2KleinPipeline`: noise drawn as (B, 128, H/16, W/16) with the
same generator and dtype, packed in raster order; the grid is FLUX.1-dev's scheduler fed klein's empirical mu; base
models run real CFG u + g (c - u) against the empty prompt when g > 1, distilled ones never (the pipeline ignores g
for them); the latents are un-normalised with the VAE's BatchNorm statistics and unpatchified before decoding
(model/vae.py). Image editing (reference images) is not supported.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from model.tokenizers import Qwen3Tokenizer
from weights.families.flux2 import FLUX2
from weights.io import WeightsError, exists
from weights.text import load_qwen3

from .base import Pipeline
from .components import check_paths, check_vae_fit, check_width, load_tokenizer, read_model_index, require_sources
from .options import cfg_scale, pick, refuse_without_cfg
from .pipeline import schedule_from_diffusers
from .samplers import euler, true_cfg
from .schedules import SCHEDULES, ScheduleConfig, get_sigmas
from .velocity import Flux2Velocity


@dataclass(frozen=True)
class Flux2Sources:
    """Where each component comes from; `distilled`: the step-distilled klein (no CFG), None when unknown."""

    transformer: Path
    vae: Path | None = None
    text_encoder: Path | None = None
    tokenizer: Path | None = None
    schedule: ScheduleConfig | None = None
    distilled: bool | None = None
    folder: Path | None = None  # the pipeline folder the parts come from: a missing one is its, not a flag's

    @classmethod
    def from_folder(cls, folder: str | Path, **overrides) -> Flux2Sources:
        """A diffusers Flux2KleinPipeline folder (model_index.json with `is_distilled`, transformer/, vae/,
        text_encoder/, tokenizer/, scheduler/)."""
        folder = Path(folder).expanduser()
        index = read_model_index(folder)
        if index is None:
            raise WeightsError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
        schedule = schedule_from_diffusers(folder / "scheduler" / "scheduler_config.json")
        parts = dict(transformer=folder, folder=folder, vae=folder / "vae", text_encoder=folder / "text_encoder",
                     tokenizer=folder / "tokenizer", distilled=index.get("is_distilled"),
                     schedule=None if schedule is None else replace(schedule, mu="empirical"))
        return cls(**{**parts, **{k: v for k, v in overrides.items() if v is not None}})

    def check(self) -> None:
        flags = dict(transformer="--model", vae="--vae", text_encoder="--qwen", tokenizer="--qwen-tokenizer")
        require_sources(self, flags, flags)
        check_paths(self, flags)


@dataclass(frozen=True)
class Flux2GenerationConfig:
    height: int = 1024
    width: int = 1024
    steps: int = 50  # the pipeline's default; the distilled klein is meant for 4
    guidance: float = 4.0  # real CFG u + g (c - u) for base models (g > 1); distilled models ignore it
    negative_prompt: str = ""
    max_sequence_length: int = 512  # Qwen3 tokens (the template included)
    seed: int | None = 0
    grid: str = "diffusers"  # or "scfm"
    shift: float | str | None = None  # None: the empirical dynamic shift
    extra: dict = field(default_factory=dict)


def klein_variant(model: Path, given: str | None) -> tuple[bool, str]:
    """(distilled, what said so): `--variant`, else a pipeline folder's `is_distilled`, else a klein file's name
    (BFL names them flux-2-klein-4b / flux-2-klein-base-4b); base and distilled weights have the same keys."""
    if given is not None:
        return given == "distilled", "--variant"
    index = read_model_index(model)  # None for a file, or a folder without model_index.json
    if index is not None:
        distilled = index.get("is_distilled")
        if distilled is not None:
            return bool(distilled), "model_index.json"
    name = model.name.lower()
    if "klein" in name:
        return "base" not in name, "the file name"
    raise WeightsError(f"{model}: a FLUX.2 [klein] base or distilled model? their weights look alike; pass "
                       "--variant base or --variant distilled")


class Flux2KleinPipeline(Pipeline):
    default_config = Flux2GenerationConfig
    family = FLUX2.name
    cond_names = ("txt",)
    defaults = {"steps": 50, "guidance": 4.0, "max_sequence_length": 512}  # Flux2KleinPipeline's
    pads_text_to = 512  # diffusers, BFL and ComfyUI always pad Qwen3's output to 512 (docs/flux2.md §2.1)
    own_flags = (("--qwen", "qwen"), ("--qwen-tokenizer", "qwen_tokenizer"), ("--variant", "variant"))
    unread_flags = (("--clip", "clip"), ("--t5", "t5"), ("--clip-tokenizer", "clip_tokenizer"),
                    ("--t5-tokenizer", "t5_tokenizer"))
    unread_hint = "its text encoder is Qwen3: --qwen and --qwen-tokenizer (or a pipeline folder)"
    needed_files = ("qwen", "qwen_tokenizer")

    @classmethod
    def from_files(cls, model: Path, files: dict, **options) -> Flux2KleinPipeline:
        names = {"vae": "vae", "text_encoder": "qwen", "tokenizer": "qwen_tokenizer"}
        given = {ours: Path(files[flag]) for ours, flag in names.items() if files.get(flag)}
        distilled, _ = klein_variant(model, files.get("variant"))
        if exists(model / "model_index.json"):
            pipe = cls(Flux2Sources.from_folder(model, **given, distilled=distilled), **options)
        else:
            pipe = cls(Flux2Sources(transformer=model, distilled=distilled, **given), **options)
        if pipe.transformer_config().guidance_embed:  # read on meta: no weight is loaded for this
            raise WeightsError(f"{model}: FLUX.2 [dev], whose text encoder (Mistral Small 3.2) scfm does not have; "
                               "generate samples FLUX.2 [klein]")
        return pipe

    @classmethod
    def step_distilled(cls, model: Path) -> tuple[bool, str]:
        try:
            return klein_variant(model, None)
        except WeightsError:  # neither the folder nor the name says (training has no --variant): the base
            return False, ""

    def check_components(self) -> None:
        """FLUX.2's VAE (32 channels, 2x2-patchified, BatchNorm statistics), and Qwen3 of the width the transformer
        stacks three hidden states of (klein 4B: 3 x 2560, 9B: 3 x 4096)."""
        t, s = self.transformer_config(), self.sources
        check_vae_fit(self, t.in_channels, True, ("batch_norm",), "FLUX.2 [klein]",
                      "FLUX.2's VAE (flux2-vae.safetensors or the klein pipeline folder's vae/)")
        qwen = load_qwen3(s.text_encoder, device="meta").config
        check_width("--qwen", s.text_encoder, f"Qwen3 ({len(qwen.taps)} stacked states)",
                    len(qwen.taps) * qwen.hidden_size, s.transformer, "context_in_dim", t.context_in_dim,
                    "the Qwen3 of this klein (4B: qwen_3_4b, 9B: qwen_3_8b)")

    @property
    def teacher_defaults(self) -> dict:
        """make_dataset's defaults: klein base at its pipeline's, real CFG 4 (u + g (c - u)) over 50 steps; the
        distilled klein as `generate` samples it, 4 steps without CFG."""
        return {"steps": 4, "guidance": 1.0} if self.sources.distilled else {"steps": 50, "guidance": 4.0}

    @classmethod
    def generation_config(cls, args, rec, common: dict) -> Flux2GenerationConfig:
        """The distilled klein defaults to its 4 steps and no CFG (as its model card and BFL's CLI); the variant
        and what told it are printed."""
        distilled, source = klein_variant(Path(args.model), args.variant)
        print(f"FLUX.2 [klein] {'distilled' if distilled else 'base'} (from {source})", file=sys.stderr)
        given = [flag for flag, value in (("--cfg", args.cfg), ("--guidance", args.guidance),
                                          ("--negative-prompt", args.negative_prompt)) if value is not None]
        # klein's one CFG scale, as SD3's
        scale, flag = cfg_scale({"--cfg": args.cfg, "--guidance": args.guidance}, "CFG",
                                "pass {flag} 1 to sample without CFG, or above 1 to use it (klein base: 4)")
        if distilled and given and (args.negative_prompt is not None or scale > 1):
            raise ValueError(f"{', '.join(given)}: the distilled klein samples without CFG (its guidance is distilled "
                             "in), so they would do nothing; drop them, or pass --variant base for the base model")
        if distilled and ((rec.training_cfg_scale or 0) > 0 or (rec.guidance or 1) > 1):
            # an SCFM LoRA trained with klein base's CFG baked in (distill.train --cfg_scale): it runs here without
            print("warning: the LoRA was distilled with CFG on the klein base model and is sampled here without it "
                  "(the distilled klein never runs CFG); sample it on the base model (--variant base if this is it)",
                  file=sys.stderr)
        if distilled and args.steps is None and rec.steps is None:
            common = {**common, "steps": 4}
        # the distilled klein never runs CFG: a LoRA's recommended guidance is not what it samples at (warned above),
        # and the PNG records the 1 it ran at
        guidance = pick(scale, 1.0) if distilled else pick(scale, rec.guidance, cls.defaults["guidance"])
        if guidance <= 1:  # no negative pass runs without CFG
            refuse_without_cfg(["--negative-prompt"] if args.negative_prompt is not None else [], flag, scale,
                               guidance, f"pass {flag} above 1 (klein base: 4)")
        return Flux2GenerationConfig(**common, guidance=guidance, negative_prompt=args.negative_prompt or "")

    def used_settings(self, settings: dict) -> dict:
        # the variant decides the defaults and whether CFG runs; a PNG says which one it was (--from-png takes it)
        return {**settings, "variant": "distilled" if self.sources.distilled else "base"}

    def text_encoder_names(self) -> tuple[str, ...]:
        return ()  # LoRA parts for Qwen3 are not read yet

    def size_multiple(self) -> int:
        return 2 * self.vae_scale  # one token per 2x2 latent pixels

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        h, w = super().latent_size(height, width)
        return h // 2, w // 2  # after the VAE's 2x2 patchify (model/vae.py normalize_latents)

    def latent_channels(self) -> int:
        return self.transformer_config().in_channels

    def base_schedule(self) -> ScheduleConfig:
        return self.sources.schedule or SCHEDULES["flux2-klein"]

    def wants_negative(self, cfg: Flux2GenerationConfig) -> bool:
        return cfg.guidance > 1 and not self.sources.distilled

    def tokenizers(self, max_sequence_length: int) -> tuple[Qwen3Tokenizer]:
        return (load_tokenizer(Qwen3Tokenizer.load, self.sources.tokenizer, "--qwen-tokenizer",
                               max_length=max_sequence_length),)

    def text_encoder(self, max_sequence_length: int = 512):
        """Qwen3 on klein's chat template: cond = {txt (B, 512, 3 * width)}, pads included."""
        if self.sources.text_encoder is None or self.sources.tokenizer is None:
            raise WeightsError("FLUX.2 needs its text encoder: pass --qwen and --qwen-tokenizer (or a pipeline folder)")
        (tokenizer,) = self.tokenizers(max_sequence_length)
        encoder = load_qwen3(self.sources.text_encoder, dtype=self.dtype, device=self.device)

        @torch.no_grad()
        def encode(prompts: Sequence[str]) -> dict[str, Tensor]:
            ids, mask = tokenizer(list(prompts))
            return {"txt": encoder(ids.to(self.device), mask.to(self.device))}

        return encode

    @torch.no_grad()
    def sample(self, cond: dict[str, Tensor], cfg: Flux2GenerationConfig, *, negative: dict[str, Tensor] | None = None,
               generator: torch.Generator | None = None, callback=None, noise: Tensor | None = None) -> Tensor:
        """Normalised, patchified latents (B, 128, H/16, W/16)."""
        batch = cond["txt"].shape[0]
        x = self.noise(batch, cfg.height, cfg.width, self.generator(cfg, generator)) if noise is None else noise
        velocity = Flux2Velocity(self.transformer)
        if negative is not None and self.wants_negative(cfg):
            velocity = true_cfg(velocity, negative, cfg.guidance)
        sigmas = get_sigmas(self.schedule(cfg), cfg.steps, x.shape[2] * x.shape[3], device=self.device)
        return euler(velocity, x, sigmas, cond, None, callback=callback)
