"""Flux text-to-image: prompts -> text encoders -> Euler over the velocity field -> VAE -> images.

The same seed gives the same image as diffusers' `FluxPipeline`: noise is drawn with the same shape, generator and
dtype, the grid is the scheduler's, and the timestep is rounded the way diffusers rounds it. Components load
lazily and the text encoders are released before the transformer is loaded, so T5-XXL and the 12 B transformer are
never resident together.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from model.text import encode_flux
from model.tokenizers import CLIPTokenizer, T5Tokenizer
from weights.families.flux import FLUX
from weights.io import WeightsError, exists, read_json_object
from weights.text import load_clip, load_t5

from .base import Pipeline
from .components import (
    bundled_parts,
    check_paths,
    check_vae_fit,
    check_width,
    encoder_prefix,
    existing,
    load_tokenizer,
    require_sources,
)
from .options import cfg_scale, pick
from .samplers import euler, flux_guidance, true_cfg
from .schedules import SCHEDULES, ScheduleConfig, get_sigmas
from .velocity import FluxVelocity


@dataclass(frozen=True)
class FluxSources:
    """Where each component comes from. Tokenizers: None means the vendored CLIP vocabulary / no T5 default."""

    transformer: Path
    vae: Path | None = None
    clip: Path | None = None
    t5: Path | None = None
    clip_tokenizer: Path | None = None
    t5_tokenizer: Path | None = None
    schedule: ScheduleConfig | None = None  # None: the family default (dev: dynamic shift; schnell: shift 1)
    folder: Path | None = None  # the pipeline folder the parts come from: a missing one is its, not a flag's

    @classmethod
    def from_folder(cls, folder: str | Path, **overrides) -> FluxSources:
        """A diffusers FluxPipeline folder (model_index.json, transformer/, vae/, text_encoder{,_2}/,
        tokenizer{,_2}/)."""
        folder = Path(folder).expanduser()
        if not exists(folder / "model_index.json"):
            raise WeightsError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
        parts = dict(
            transformer=folder, folder=folder, vae=folder / "vae", clip=folder / "text_encoder",
            t5=folder / "text_encoder_2", t5_tokenizer=folder / "tokenizer_2",
            # CLIP-L's vocabulary is vendored (model/tokenizers.py), as SD3's folder rule uses it
            clip_tokenizer=existing(folder / "tokenizer"),
            schedule=schedule_from_diffusers(folder / "scheduler" / "scheduler_config.json"),
        )
        return cls(**{**parts, **{k: v for k, v in overrides.items() if v is not None}})

    def check(self) -> None:
        """Fail before loading anything: every component present, every path existing (one line each)."""
        flags = dict(transformer="--model", vae="--vae", clip="--clip", t5="--t5", t5_tokenizer="--t5-tokenizer",
                     clip_tokenizer="--clip-tokenizer")
        require_sources(self, flags, [name for name in flags if name != "clip_tokenizer"])
        check_paths(self, flags)


# FlowMatchEulerDiscreteScheduler options whose grids or steps we do not reproduce: refused, not ignored.
UNSUPPORTED_SCHEDULER = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                         "stochastic_sampling", "shift_terminal")


def schedule_from_diffusers(path: Path, pipeline: str = "FluxPipeline") -> ScheduleConfig | None:
    """A `FlowMatchEulerDiscreteScheduler` config.json -> our ScheduleConfig (None when the file is absent); an
    option we do not reproduce, or a value that is no number, is one line naming the file."""
    if not exists(path):
        return None
    fix = "restore the pipeline folder's scheduler config"
    d = read_json_object(path, fix, "a scheduler config")
    bad = [k for k in UNSUPPORTED_SCHEDULER if d.get(k)]
    # the dynamic shift's formula: we shift exponentially, diffusers' default
    if d.get("time_shift_type", "exponential") != "exponential":
        bad.append(f"time_shift_type={d['time_shift_type']!r}")
    if bad:
        raise WeightsError(f"{path}: scheduler options {bad} are not supported (plain flow-matching Euler with an "
                           f"exponential time shift only); {fix}")

    def value(key: str, default, kind):
        v = d.get(key, default)
        # bool(v) would take "false" as True, float(None) raise a bare TypeError: both are a damaged config
        ok = isinstance(v, bool) if kind is bool else isinstance(v, (int, float)) and not isinstance(v, bool)
        if not ok:
            want = "true or false" if kind is bool else "a number"
            raise WeightsError(f"{path}: {key} is {json.dumps(v)}, not {want}; {fix}")
        return kind(v)

    return ScheduleConfig(
        pipeline=pipeline, shift=value("shift", 1.0, float), dynamic=value("use_dynamic_shifting", False, bool),
        base_shift=value("base_shift", 0.5, float), max_shift=value("max_shift", 1.15, float),
        base_seq_len=value("base_image_seq_len", 256, int), max_seq_len=value("max_image_seq_len", 4096, int),
    )


@dataclass(frozen=True)
class GenerationConfig:
    height: int = 1024
    width: int = 1024
    steps: int = 28
    guidance: float = 3.5  # Flux-dev's guidance embedding; ignored by models without one (schnell)
    true_cfg: float = 1.0  # > 1 with a negative prompt: real CFG, neg + s (pos - neg), twice the compute
    negative_prompt: str | None = None
    max_sequence_length: int = 512  # T5 length; the SCFM recipe trains with 256
    seed: int | None = 0
    grid: str = "diffusers"  # or "scfm": shifted linspace with s[0] = 1 - 1e-5, what SCFM LoRAs are trained on
    shift: float | str | None = None  # a number, "dynamic", or None for the schedule's own
    extra: dict = field(default_factory=dict)


class FluxPipeline(Pipeline):
    default_config = GenerationConfig
    family = FLUX.name
    cond_names = ("txt", "y")
    defaults = {"steps": 28, "guidance": 3.5, "max_sequence_length": 512}  # FluxPipeline's (guidance embedding)
    own_flags = (("--true-cfg", "true_cfg"),)
    needed_files = ("clip", "t5", "t5_tokenizer")  # the text encoders a cache build needs

    @classmethod
    def from_files(cls, model: Path, files: dict, **options) -> FluxPipeline:
        names = ("vae", "clip", "t5", "clip_tokenizer", "t5_tokenizer")
        given = {k: Path(files[k]) for k in names if files.get(k)}
        if exists(model / "model_index.json"):
            return cls(FluxSources.from_folder(model, **given), **options)
        # a ComfyUI all-in-one file holds the VAE and the text encoders: the defaults of those no flag names
        inside = {"clip" if k == "clip_l" else k: v for k, v in bundled_parts(model).items() if k != "clip_g"}
        return cls(FluxSources(transformer=model, **{**inside, **given}), **options)

    def check_components(self) -> None:
        t, s = self.transformer_config(), self.sources
        check_vae_fit(self, t.in_channels, True, ("flux1",), "FLUX.1", "FLUX.1's VAE (ae.safetensors or the FLUX.1 "
                      "pipeline folder's vae/)")
        clip = load_clip(s.clip, device="meta", prefix=encoder_prefix(s.clip, "clip_l")).config
        check_width("--clip", s.clip, "its pooled output", clip.hidden_size, s.transformer, "vec_in_dim",
                    t.vec_in_dim, "FLUX.1's CLIP-L (clip_l.safetensors), not bigG")
        t5 = load_t5(s.t5, device="meta", prefix=encoder_prefix(s.t5, "t5")).config
        check_width("--t5", s.t5, "T5 (d_model)", t5.d_model, s.transformer, "context_in_dim", t.context_in_dim,
                    "the T5 this model was trained with (T5-XXL: 4096)")

    @classmethod
    def generation_config(cls, args, rec, common: dict) -> GenerationConfig:
        """The flags, then the LoRAs' recommendation, then diffusers' defaults; real CFG that would not run
        (diffusers' FluxPipeline skips it silently) is refused in one line."""
        scale, flag = cfg_scale({"--cfg": args.cfg, "--true-cfg": args.true_cfg}, "real CFG",
                                "drop {flag}, or pass it above 1 with --negative-prompt")
        true_cfg = pick(scale, 1.0)
        if true_cfg > 1 and args.negative_prompt is None:
            raise ValueError(f"{flag} {true_cfg:g}: real CFG runs against a negative prompt and none is given, so it "
                             "would do nothing; add --negative-prompt '' for the empty one")
        if true_cfg <= 1 and args.negative_prompt is not None:
            raise ValueError("--negative-prompt: FLUX.1 reads a negative prompt only for real CFG, which is off "
                             "(--true-cfg 1, the default), so it would do nothing; add --true-cfg above 1 (twice the "
                             "compute per step) or drop --negative-prompt")
        # the flag itself rides along in `extra` (not in the PNG): check_config refuses it for a model without the
        # guidance embedding, which would ignore it; a LoRA's recommended guidance is just not used there
        return GenerationConfig(**common, guidance=pick(args.guidance, rec.guidance, cls.defaults["guidance"]),
                                true_cfg=true_cfg, negative_prompt=args.negative_prompt,
                                extra={"guidance_flag": args.guidance})

    def check_config(self, cfg: GenerationConfig) -> None:
        self.check_guidance_flag(cfg.extra.get("guidance_flag"))

    def check_guidance_flag(self, given: float | None) -> None:
        if given is not None and not self.transformer_config().guidance_embed:
            raise ValueError(f"--guidance {given:g}: {self.sources.transformer} has no guidance embedding (like "
                             "FLUX.1-schnell and the demo), so it would do nothing (diffusers ignores it silently); "
                             "drop --guidance, or for real CFG pass --true-cfg above 1 with --negative-prompt")

    def used_settings(self, settings: dict) -> dict:
        if not self.transformer.config.guidance_embed:
            settings["guidance"] = None  # schnell: the value was never used
        return settings

    def text_encoder_names(self) -> tuple[str, ...]:
        return ("clip_l", "t5")

    def size_multiple(self) -> int:
        return 2 * self.vae_scale  # one packed token covers 2x2 latent pixels

    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4  # packed tokens hold 2x2 latent pixels

    def base_schedule(self) -> ScheduleConfig:
        # None: the family default (dev: dynamic shift; schnell: shift 1)
        guided = self.transformer.config.guidance_embed
        return self.sources.schedule or SCHEDULES["flux-dev" if guided else "flux-schnell"]

    def wants_negative(self, cfg: GenerationConfig) -> bool:
        return cfg.negative_prompt is not None and cfg.true_cfg > 1

    def tokenizers(self, max_sequence_length: int) -> tuple[CLIPTokenizer, T5Tokenizer]:
        s = self.sources
        return (load_tokenizer(CLIPTokenizer.load, s.clip_tokenizer, "--clip-tokenizer"),
                load_tokenizer(T5Tokenizer.load, s.t5_tokenizer, "--t5-tokenizer", max_length=max_sequence_length))

    def text_encoder(self, max_sequence_length: int = 512):
        """CLIP-L and T5: cond = {txt (B, T, 4096), y (B, 768)}."""
        s = self.sources
        if s.clip is None or s.t5 is None or s.t5_tokenizer is None:
            raise WeightsError("Flux needs text encoders: pass --clip, --t5 and --t5-tokenizer (or a pipeline folder)")
        clip_tokenizer, t5_tokenizer = self.tokenizers(max_sequence_length)
        clip = load_clip(s.clip, dtype=self.dtype, device=self.device, loras=self.text_loras("clip_l"),
                         prefix=encoder_prefix(s.clip, "clip_l"))
        t5 = load_t5(s.t5, dtype=self.dtype, device=self.device, loras=self.text_loras("t5"),
                     prefix=encoder_prefix(s.t5, "t5"))

        @torch.no_grad()
        def encode(prompts: Sequence[str]) -> dict[str, Tensor]:
            txt, _, y = encode_flux(list(prompts), clip=clip, clip_tokenizer=clip_tokenizer, t5=t5,
                                    t5_tokenizer=t5_tokenizer, max_length=max_sequence_length)
            return {"txt": txt, "y": y}

        return encode

    @torch.no_grad()
    def sample(self, cond: dict[str, Tensor], cfg: GenerationConfig, *, negative: dict[str, Tensor] | None = None,
               generator: torch.Generator | None = None, callback=None, noise: Tensor | None = None) -> Tensor:
        """Latents (B, 16, h, w) in the model's normalised latent space; from `noise` when given."""
        batch = cond["txt"].shape[0]
        x = self.noise(batch, cfg.height, cfg.width, self.generator(cfg, generator)) if noise is None else noise
        velocity = FluxVelocity(self.transformer)
        if negative is not None and cfg.true_cfg > 1:
            velocity = true_cfg(velocity, negative, cfg.true_cfg)
        image_tokens = (x.shape[2] // 2) * (x.shape[3] // 2)
        sigmas = get_sigmas(self.schedule(cfg), cfg.steps, image_tokens, device=self.device)
        guidance = flux_guidance(cfg.guidance, batch, self.device) if self.transformer.config.guidance_embed else None
        return euler(velocity, x, sigmas, cond, guidance, callback=callback)
