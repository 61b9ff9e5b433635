"""SD3 / SD3.5 text-to-image: prompts -> CLIP-L, CLIP-bigG (and T5) -> CFG Euler over the MMDiT -> VAE -> images.

The same seed gives the same image as diffusers' `StableDiffusion3Pipeline`: noise is drawn with the same shape,
generator and dtype, the sigma grid is the scheduler's (shift 3, the twice-shifted last sigma), the timestep is
sigma * 1000 in fp32, the CFG batch is [negative, positive] with u + g (c - u), and skip-layer guidance follows
diffusers' step rule. T5 is optional as in diffusers: without it its part of the context is zeros. Components load
lazily and the text encoders are freed before sampling, as in `sampling.pipeline.FluxPipeline`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.text import encode_sd3
from model.tokenizers import CLIPTokenizer, T5Tokenizer, _pad_token_of
from weights.families.sd3 import SD3
from weights.io import WeightsError, exists
from weights.text import load_clip, load_t5

from .base import MAX_SIDE, Pipeline
from .components import (
    bundled_parts,
    check_paths,
    check_vae_fit,
    check_width,
    encoder_prefix,
    existing,
    load_tokenizer,
    read_model_index,
    require_sources,
)
from .options import cfg_scale, pick, refuse_without_cfg
from .pipeline import schedule_from_diffusers
from .samplers import Velocity, cat_cond, euler
from .schedules import SCHEDULES, ScheduleConfig, get_sigmas
from .velocity import MMDiTVelocity

# bigG pads with "!" (id 0), not <|endoftext|>: SAI's SDXLClipGTokenizer(pad_with_end=False) and diffusers'
# tokenizer_2 config. Used when no tokenizer folder says otherwise.
CLIP_G_PAD = "!"


@dataclass(frozen=True)
class SD3Sources:
    """Where each component comes from. t5=None: no T5 (zeros in its place). Tokenizers None: the vendored CLIP
    vocabulary (bigG padded with "!"); T5 has no default tokenizer."""

    transformer: Path
    vae: Path | None = None
    clip_l: Path | None = None
    clip_g: Path | None = None
    t5: Path | None = None
    clip_l_tokenizer: Path | None = None
    clip_g_tokenizer: Path | None = None
    t5_tokenizer: Path | None = None
    schedule: ScheduleConfig | None = None  # None: SD3.5's shift 3
    folder: Path | None = None  # the pipeline folder the parts come from: a missing one is its, not a flag's

    @classmethod
    def from_folder(cls, folder: str | Path, *, without_t5: bool = False, **overrides) -> SD3Sources:
        """A diffusers StableDiffusion3Pipeline folder. T5 is taken when model_index.json lists text_encoder_3
        (pipelines saved with text_encoder_3=None list [null, null]) unless `without_t5`; a listed T5 whose folder
        is missing is refused, not skipped (the images would silently lack it)."""
        folder = Path(folder).expanduser()
        index = read_model_index(folder)
        if index is None:
            raise WeightsError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
        entry = index.get("text_encoder_3")
        listed = any(entry) if isinstance(entry, list) else (folder / "text_encoder_3").is_dir()
        has_t5 = listed and not without_t5
        if has_t5 and overrides.get("t5") is None and not exists(folder / "text_encoder_3"):
            raise WeightsError(f"{folder}: its model_index.json lists text_encoder_3 (T5) but the folder has no "
                               "text_encoder_3/; download it again, pass --t5, or --no-t5 to run without T5")
        parts = dict(
            transformer=folder, folder=folder, vae=folder / "vae", clip_l=folder / "text_encoder",
            clip_g=folder / "text_encoder_2", t5=folder / "text_encoder_3" if has_t5 else None,
            clip_l_tokenizer=existing(folder / "tokenizer"), clip_g_tokenizer=existing(folder / "tokenizer_2"),
            t5_tokenizer=existing(folder / "tokenizer_3") if has_t5 else None,
            schedule=schedule_from_diffusers(folder / "scheduler" / "scheduler_config.json",
                                             pipeline="StableDiffusion3Pipeline"),
        )
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if without_t5:
            overrides.pop("t5", None)
        return cls(**{**parts, **overrides})

    def check(self) -> None:
        """Fail before loading anything: every needed component given and existing (one line each)."""
        flags = dict(transformer="--model", vae="--vae", clip_l="--clip", clip_g="--clip-g", t5="--t5",
                     clip_l_tokenizer="--clip-tokenizer", clip_g_tokenizer="--clip-g-tokenizer",
                     t5_tokenizer="--t5-tokenizer")
        require_sources(self, flags, ("transformer", "vae", "clip_l", "clip_g"),
                        lambda name: name.replace("_", "-").replace("clip-l", "CLIP-L").replace("clip-g", "CLIP-bigG"))
        if self.t5 is not None and self.t5_tokenizer is None:
            raise WeightsError(f"T5 ({self.t5}) needs its tokenizer: pass --t5-tokenizer (spiece.model or "
                               "tokenizer.json), or --no-t5 to run without T5")
        check_paths(self, flags)


@dataclass(frozen=True)
class SD3GenerationConfig:
    height: int = 1024
    width: int = 1024
    steps: int = 28
    # diffusers' guidance_scale: u + g (c - u) against the negative prompt; <= 1 turns CFG (and SLG) off. SAI
    # recommends 4.5 (large) / 5 (medium); SCFM's training w = 3.5 is g = 4.5 here (samplers.cfg_scale_from_w).
    guidance: float = 7.0
    negative_prompt: str = ""
    max_sequence_length: int = 256  # T5 tokens
    seed: int | None = 0
    grid: str = "diffusers"  # or "scfm": shifted linspace with s[0] = 1 - 1e-5, what SCFM LoRAs are trained on
    shift: float | str | None = None  # a number, "dynamic", or None for the schedule's own
    # Skip-layer guidance (SD3.5-medium: layers (7, 8, 9), scale 2.8): v += (c - c_skip) * slg_scale on the steps
    # i with steps * slg_start < i < steps * slg_stop (diffusers' rule, both strict), only while CFG is on.
    slg_layers: tuple[int, ...] = ()
    slg_scale: float = 2.8
    slg_start: float = 0.01
    slg_stop: float = 0.2


def slg_steps(steps: int, start: float, stop: float) -> list[int]:
    """The step indices on which diffusers runs the skip-layer pass."""
    return [i for i in range(steps) if steps * start < i < steps * stop]


def sd3_guidance(velocity: MMDiTVelocity, negative: Any, scale: float, *, slg_layers: Sequence[int] = (),
                 slg_scale: float = 0.0, slg_sigmas: Sequence[float] = ()) -> Velocity:
    """`samplers.sd3_cfg` plus skip-layer guidance: one batched call on [negative, cond], u + scale (c - u); on the
    steps whose sigma is in `slg_sigmas`, a third pass on cond alone with `slg_layers` skipped adds
    (c - c_skip) * slg_scale. Off (the plain velocity) for scale <= 1, as in diffusers."""
    if scale <= 1:
        return velocity
    skipping = velocity.skipping(slg_layers) if slg_layers else None
    # Steps are recognised by their sigma rather than by counting calls, so the function stays pure and can be
    # reused across runs; grid sigmas are strictly decreasing, hence distinct.
    active = set(slg_sigmas)

    def guided(x: Tensor, sigma: Tensor, cond: Any, guidance: Tensor | None) -> Tensor:
        both = velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), cat_cond(negative, cond), guidance)
        u, c = both.chunk(2)  # (2B, ...) -> 2 x (B, ...): negative first, as diffusers orders the batch
        v = u + scale * (c - u)
        if skipping is not None and sigma[0].item() in active:
            v = v + (c - skipping(x, sigma, cond, guidance)) * slg_scale
        return v

    return guided


class SD3Pipeline(Pipeline):
    default_config = SD3GenerationConfig
    family = SD3.name
    cond_names = ("context", "pooled")
    defaults = {"steps": 28, "guidance": 7.0, "max_sequence_length": 256}  # StableDiffusion3Pipeline's (CFG)
    # make_dataset's teacher is the one the recipe trains against: c + 3.5 (c - u) (docs/method.md §5), which is
    # diffusers' CFG 4.5 (u + 4.5 (c - u)), SAI's own setting for SD3.5-large
    teacher_defaults = {"steps": 32, "guidance": 4.5}
    own_flags = (("--clip-g", "clip_g"), ("--clip-g-tokenizer", "clip_g_tokenizer"), ("--no-t5", "no_t5"),
                 ("--slg-layers", "slg_layers"), ("--slg-scale", "slg_scale"), ("--slg-start", "slg_start"),
                 ("--slg-stop", "slg_stop"))
    flag_hint = "its classifier-free guidance scale is --cfg"
    needed_files = ("clip", "clip_g")  # the text encoders a cache build needs (T5 is optional)

    @classmethod
    def from_files(cls, model: Path, files: dict, **options) -> SD3Pipeline:
        names = {"vae": "vae", "clip_l": "clip", "clip_g": "clip_g", "t5": "t5", "clip_l_tokenizer": "clip_tokenizer",
                 "clip_g_tokenizer": "clip_g_tokenizer", "t5_tokenizer": "t5_tokenizer"}
        no_t5 = bool(files.get("no_t5"))
        given = {ours: Path(files[flag]) for ours, flag in names.items()
                 if files.get(flag) and not (no_t5 and ours == "t5")}
        if exists(model / "model_index.json"):
            return cls(SD3Sources.from_folder(model, without_t5=no_t5, **given), **options)
        # SAI's all-in-one files hold the VAE and (some) the text encoders: the defaults of those no flag names
        inside = {k: v for k, v in bundled_parts(model).items() if not (no_t5 and k == "t5")}
        return cls(SD3Sources(transformer=model, **{**inside, **given}), **options)

    def check_components(self) -> None:
        """The VAE (its channels, and SD3.5's latent statistics, not FLUX.1's), CLIP-L as --clip and bigG as
        --clip-g (768 + 1280 add up alike either way round: told apart by width, CLIP-L being the narrower), their
        projections against the pooled width, their states and T5 against the context width."""
        t, s = self.transformer_config(), self.sources
        check_vae_fit(self, t.in_channels, False, ("sd3.5",), "SD3 / SD3.5", "SD3.5's VAE (the pipeline folder's "
                      "vae/ or an SD3.5 single file)")
        lc = load_clip(s.clip_l, device="meta", prefix=encoder_prefix(s.clip_l, "clip_l")).config
        gc = load_clip(s.clip_g, device="meta", prefix=encoder_prefix(s.clip_g, "clip_g")).config
        if lc.hidden_size > gc.hidden_size:
            raise WeightsError(f"--clip {s.clip_l} is {lc.hidden_size} wide and --clip-g {s.clip_g} "
                               f"{gc.hidden_size}: swapped? SD3 takes CLIP-L (768) as --clip and CLIP-bigG (1280) "
                               f"as --clip-g; pass --clip {s.clip_g} --clip-g {s.clip_l}")
        for flag, path, c in (("--clip", s.clip_l, lc), ("--clip-g", s.clip_g, gc)):
            if c.projection_dim is None:
                raise WeightsError(f"{flag} {path}: a CLIP without its text projection (FLUX.1's CLIP-L?), which "
                                   "SD3's pooled vector needs; pass SD3's text encoder (clip_l.safetensors / "
                                   "clip_g.safetensors or the pipeline folder's)")
        pooled = lc.projection_dim + gc.projection_dim
        if pooled != t.adm_in_channels or lc.hidden_size + gc.hidden_size > t.context_in_dim:
            raise WeightsError(f"--clip {s.clip_l} and --clip-g {s.clip_g}: their pooled widths add up to {pooled} "
                               f"({lc.projection_dim} + {gc.projection_dim}), but --model {s.transformer} takes "
                               f"{t.adm_in_channels} (CLIP-L 768 + bigG 1280); pass SD3's CLIP-L as --clip and "
                               "its bigG as --clip-g")
        if s.t5 is not None:
            t5 = load_t5(s.t5, device="meta", prefix=encoder_prefix(s.t5, "t5")).config
            check_width("--t5", s.t5, "T5 (d_model)", t5.d_model, s.transformer, "its context width",
                        t.context_in_dim, "the T5 this model was trained with (T5-XXL: 4096), or --no-t5")

    @classmethod
    def generation_config(cls, args, rec, common: dict) -> SD3GenerationConfig:
        """The flags, then the LoRAs' recommendation, then diffusers' defaults; a setting that would do nothing
        (diffusers accepts each silently) is refused in one line."""
        scale, flag = cfg_scale({"--cfg": args.cfg, "--guidance": args.guidance}, "CFG",
                                "pass {flag} 1 to sample without CFG, or above 1 to use it (SD3.5-large: 4.5)")
        # SD3 metadata records guidance in diffusers' convention (SCFM's w = 3.5 is stored as 4.5), used as is
        guidance = pick(scale, rec.guidance, cls.defaults["guidance"])
        d = SD3GenerationConfig
        slg = dict(slg_scale=pick(args.slg_scale, d.slg_scale), slg_start=pick(args.slg_start, d.slg_start),
                   slg_stop=pick(args.slg_stop, d.slg_stop))
        tuned = [f for f, v in (("--slg-scale", args.slg_scale), ("--slg-start", args.slg_start),
                                ("--slg-stop", args.slg_stop)) if v is not None]
        if tuned and not args.slg_layers:
            raise ValueError(f"{', '.join(tuned)}: skip-layer guidance runs only with --slg-layers, and none are "
                             "given, so they would do nothing; add --slg-layers (SD3.5-medium: 7,8,9) or drop them")
        if guidance <= 1:  # no negative pass runs, and SLG rides on it (diffusers' rule)
            unused = [f for f, on in (("--negative-prompt", args.negative_prompt is not None),
                                      ("--slg-layers", bool(args.slg_layers))) if on]
            refuse_without_cfg(unused, flag, scale, guidance, "pass --cfg above 1 (SD3.5-large: 4.5)")
        elif args.slg_layers:
            steps, start, stop = common["steps"], slg["slg_start"], slg["slg_stop"]
            if slg["slg_scale"] == 0:
                raise ValueError("--slg-scale 0: skip-layer guidance would add nothing (and cost a pass per step); "
                                 "drop --slg-layers to sample without it, or pass --slg-scale 2.8")
            if not slg_steps(steps, start, stop):
                fix = ("pass --slg-start below --slg-stop" if start >= stop else
                       "pass --steps 2 or more" if steps < 2 else "widen --slg-start / --slg-stop or pass more --steps")
                raise ValueError(f"--slg-start {start:g} --slg-stop {stop:g} with {steps} steps: no step i has "
                                 f"{steps} x {start:g} < i < {steps} x {stop:g} (diffusers' rule), so skip-layer "
                                 f"guidance would never run; {fix}")
        return SD3GenerationConfig(**common, guidance=guidance, negative_prompt=args.negative_prompt or "",
                                   slg_layers=args.slg_layers, **slg)

    def check_config(self, cfg: SD3GenerationConfig) -> None:
        self.check_slg_layers(cfg.slg_layers)

    def text_encoder_names(self) -> tuple[str, ...]:
        return ("clip_l", "clip_g") + (() if self.sources.t5 is None else ("t5",))

    def size_multiple(self) -> int:
        """diffusers' check: sizes must be multiples of vae_scale * patch_size."""
        return self.vae_scale * self.transformer_config().patch_size

    def max_side(self) -> tuple[int, str]:
        """The position table covers pos_embed_max_size patches per side (SD3.5-large: 192, 3072 px): a larger
        image fails in the first step, after the text encoders ran."""
        config = self.transformer_config()
        table = config.pos_embed_max_size * config.patch_size * self.vae_scale
        if table >= MAX_SIDE:
            return super().max_side()
        return table, f"its position table covers {config.pos_embed_max_size} patches per side"

    def check_slg_layers(self, layers: Sequence[int]) -> None:
        depth = self.transformer_config().depth
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:  # diffusers silently skips nothing for these; a typo should not pass as guidance
            raise ValueError(f"--slg-layers {','.join(map(str, layers))}: layers {bad} are outside the model's "
                             f"{depth} blocks; pass indices from 0 to {depth - 1} (SD3.5-medium: 7,8,9)")

    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    def base_schedule(self) -> ScheduleConfig:
        return self.sources.schedule or SCHEDULES["sd3.5"]

    def wants_negative(self, cfg: SD3GenerationConfig) -> bool:
        return cfg.guidance > 1

    def tokenizers(self, max_sequence_length: int):
        s = self.sources
        g_pad = None
        if s.clip_g_tokenizer is None or not load_tokenizer(_pad_token_of, Path(s.clip_g_tokenizer),
                                                            "--clip-g-tokenizer"):
            g_pad = CLIP_G_PAD
        t5 = None if s.t5 is None else load_tokenizer(T5Tokenizer.load, s.t5_tokenizer, "--t5-tokenizer",
                                                      max_length=max_sequence_length)
        return (load_tokenizer(CLIPTokenizer.load, s.clip_l_tokenizer, "--clip-tokenizer"),
                load_tokenizer(CLIPTokenizer.load, s.clip_g_tokenizer, "--clip-g-tokenizer", pad_token=g_pad), t5)

    def text_encoder(self, max_sequence_length: int = 256):
        """CLIP-L, CLIP-bigG and T5 (or zeros): {context (B, 77 + T, 4096), pooled (B, 2048)}."""
        s = self.sources
        if s.clip_l is None or s.clip_g is None:
            raise WeightsError("SD3 needs CLIP-L and CLIP-bigG: pass --clip and --clip-g (or a pipeline folder)")
        tok_l, tok_g, tok_t5 = self.tokenizers(max_sequence_length)
        clip_l = load_clip(s.clip_l, dtype=self.dtype, device=self.device, loras=self.text_loras("clip_l"),
                           prefix=encoder_prefix(s.clip_l, "clip_l"))
        clip_g = load_clip(s.clip_g, dtype=self.dtype, device=self.device, loras=self.text_loras("clip_g"),
                           prefix=encoder_prefix(s.clip_g, "clip_g"))
        t5 = None if s.t5 is None else load_t5(s.t5, dtype=self.dtype, device=self.device,
                                               loras=self.text_loras("t5"), prefix=encoder_prefix(s.t5, "t5"))
        # Without T5 the zeros take the transformer's context width (its config: no weight is read).
        joint_dim = 4096 if t5 is not None else self.transformer_config().context_in_dim

        @torch.no_grad()
        def encode(prompts: Sequence[str]) -> dict[str, Tensor]:
            context, pooled = encode_sd3(list(prompts), clip_l=clip_l, clip_l_tokenizer=tok_l, clip_g=clip_g,
                                         clip_g_tokenizer=tok_g, t5=t5, t5_tokenizer=tok_t5,
                                         max_length=max_sequence_length, joint_dim=joint_dim)
            return {"context": context, "pooled": pooled}

        return encode

    # --- sampling ----------------------------------------------------------------------------------------------

    def velocity(self, cfg: SD3GenerationConfig, sigmas: Tensor, negative: dict[str, Tensor] | None) -> Velocity:
        """The guided velocity of one run: plain, CFG, or CFG + skip-layer guidance."""
        self.check_slg_layers(cfg.slg_layers)
        velocity = MMDiTVelocity(self.transformer)
        if cfg.guidance <= 1:
            return velocity
        if negative is None:
            raise ValueError("CFG (guidance > 1) needs the negative prompt's conditioning (pass negative=)")
        steps = len(sigmas) - 1
        slg_sigmas = [sigmas[i].item() for i in slg_steps(steps, cfg.slg_start, cfg.slg_stop)]
        return sd3_guidance(velocity, negative, cfg.guidance, slg_layers=cfg.slg_layers, slg_scale=cfg.slg_scale,
                            slg_sigmas=slg_sigmas)

    @torch.no_grad()
    def sample(self, cond: dict[str, Tensor], cfg: SD3GenerationConfig, *, negative: dict[str, Tensor] | None = None,
               generator: torch.Generator | None = None, callback=None, noise: Tensor | None = None) -> Tensor:
        """Latents (B, C, h, w) in the model's normalised latent space; from `noise` when given."""
        x = noise if noise is not None else self.noise(cond["context"].shape[0], cfg.height, cfg.width,
                                                       self.generator(cfg, generator))
        p = self.transformer.config.patch_size
        sigmas = get_sigmas(self.schedule(cfg), cfg.steps, (x.shape[2] // p) * (x.shape[3] // p), device=self.device)
        return euler(self.velocity(cfg, sigmas, negative), x, sigmas, cond, callback=callback)
