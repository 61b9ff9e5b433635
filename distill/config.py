"""DistillConfig: every knob of `python -m distill.train`, its tables and the values each field allows (the
TOML files, presets and flags that build one: distill/config_files.py).

DistillConfig holds the `[lora]`, `[scfm]` and `[ema]` tables as sub-configs (`cfg.lora.rank`, `cfg.scfm.t_skip`,
`cfg.ema.fast_decay`), which make the trainer's LoRAConfig, SCFMConfig and EMAConfig; the other tables (`[data]`,
`[optim]`, `[runtime]`, `[run]`) group its own fields. Every field keeps one flat name, unique across tables: the
flag (`--rank`), the TOML key under whichever table a file puts it (files from before the nesting had the EMA
decays under `[scfm]`), and the key in checkpoints and log lines (`to_dict`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field

from sampling.fields import field_index, opt
from weights.families import default_family, names

from .ema import EMAConfig
from .scfm import SCFMConfig


class ConfigError(ValueError):
    """A bad config file, field or value, reported as one line."""


AUTO = -1  # unchecked_blocks = "auto": planned under max_memory (distill/memory_plan.py)


# What objective flow_matching (one trained set, the plain target) takes in place of SCFM's, and the flag spelling
# of each; distill/config_files.py lets a file's or preset's value give way to it
FLOW_MATCHING_OWN = {"export_set": ("live", "live"), "cfg_scale": (0.0, "0"), "teacher_lora": ("", "''")}


@dataclass(frozen=True)
class Range:
    """An interval of allowed values; `ends` says which ends belong to it ("[]", "[)", "(]", "()")."""

    low: float
    high: float
    ends: str = "[]"

    def __contains__(self, x: float) -> bool:
        above = x >= self.low if self.ends[0] == "[" else x > self.low
        below = x <= self.high if self.ends[1] == "]" else x < self.high
        return math.isfinite(x) and above and below

    def __str__(self) -> str:
        return f"{self.ends[0]}{self.low:g}, {self.high:g}{self.ends[1]}"


# Every float field's allowed values, checked at start: a NaN, inf or huge lr otherwise trains to a NaN (or
# 1e6-sized) LoRA that is exported with exit 0. tests/test_config_resume.py asserts every float field is here.
# lr: up to 1 (the recipe uses 2e-5, the demo 1e-3); decays and betas below 1 (1 would never move);
# eps above 0 (Adam divides by sqrt(v) + eps, v starts at 0); max_grad_norm 0 means no clipping.
INF = math.inf
FLOAT_RANGES = {
    "alpha": Range(0, INF, "()"), "teacher_ratio": Range(0, 1), "non_shortcut_ratio": Range(0, 1),
    "dynamic_shift_prob": Range(0, 1), "shift_min": Range(0, INF, "()"), "shift_max": Range(0, INF, "()"),
    "guidance_max": Range(0, INF, "[)"), "cfg_scale": Range(0, INF, "[)"), "fast_decay": Range(0, 1, "[)"),
    "slow_decay": Range(0, 1, "[)"), "lr": Range(0, 1, "(]"), "lr_final": Range(0, 1),
    "weight_decay": Range(0, 1),
    "beta1": Range(0, 1, "[)"), "beta2": Range(0, 1, "[)"), "eps": Range(0, 1, "()"),
    "max_grad_norm": Range(0, INF, "[)"), "sample_shift": Range(0, INF, "()"),
    "sample_guidance": Range(0, INF, "[)"),
}


def range_error(name: str, value: float, default) -> str | None:
    """The line refusing a float field's value outside FLOAT_RANGES (None: allowed). `default`: what the field is
    without the flag (a config file's or preset's value where one sets it: config_files.build_config says that)."""
    allowed = FLOAT_RANGES[name]
    return None if value in allowed else f"{name} must lie in {allowed}, got {value} (--{name}; default {default})"


LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_at(config: DistillConfig, step: int) -> float:
    """The lr of (0-based) step `step`: a pure function of the step, so a resumed run continues the schedule."""
    if config.lr_schedule == "constant":
        return config.lr
    done = min(step / max(config.steps - 1, 1), 1.0)
    fall = 1 - done if config.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * done))
    return config.lr * (config.lr_final + (1 - config.lr_final) * fall)


def count_or_auto(text) -> int:
    """A flag's or TOML's block count, or "auto" (stored as AUTO, which a -1 given by hand must not mean)."""
    if text == "auto":
        return AUTO
    try:
        count = int(text)
    except (TypeError, ValueError):
        count = AUTO - 1
    if count < 0:
        raise ConfigError(f"unchecked_blocks must be a block count (0 or more) or 'auto', got {text!r}")
    return count


@dataclass(frozen=True)
class LoRASettings:
    """[lora]: the LoRA the run trains, the table it targets, and the LoRAs under it."""

    rank: int = opt(64, "LoRA rank")
    alpha: float = opt(64.0, "LoRA alpha (scale = alpha / rank)")
    targets: str = opt(default_family().name, "LoRA target table, by model family (distill/lora_targets.py: "
                                              "the released list for flux, SAI names for sd3); must match the "
                                              "model, whose own a new run takes where no flag or file sets it")
    teacher_lora: str = opt("", "optional teacher LoRA (any layout: ours, diffusers, kohya); both EMAs "
                                "start from it too")
    base_loras: tuple[str, ...] = opt((), "LoRAs merged for good into the frozen base before training, "
                                          "PATH[:SCALE] in any layout (e.g. a style LoRA; repeat the flag for "
                                          "several): teacher and student "
                                          "both run on base + these, so the SCFM LoRA is made for that stack; "
                                          "recorded in the exported LoRA")
    ignore_te_lora: bool = opt(False, "merge only the transformer part of the base_loras: their text-encoder "
                                      "part (kohya lora_te*_, diffusers text_encoder*.), otherwise merged into "
                                      "CLIP / T5 when the text cache is built, is skipped with one line saying so")


@dataclass(frozen=True)
class SCFMSettings:
    """[scfm]: the objective (docs/method.md §2-§5). `scfm_config` makes the sampler's SCFMConfig of it."""

    objective: str = opt("scfm", "scfm: velocity-field self-distillation (teacher, fast and slow EMA); "
                                 "flow_matching: ordinary LoRA training on the data's images (every element the "
                                 "plain target eps - x0: no target calls, no EMA or teacher sets; a style LoRA)")
    t_skip: int = opt(2, "grid steps per student step")
    teacher_steps_min: int = opt(32, "smallest teacher grid")
    teacher_steps_max: int = opt(32, "largest teacher grid")
    teacher_ratio: float = opt(0.4, "share of teacher elements (first jump with the teacher weights)")
    non_shortcut_ratio: float = opt(0.0, "share of elements trained on the plain flow-matching target")
    dynamic_shift_prob: float = opt(0.1, "probability of Flux's resolution-dependent shift per element")
    shift_min: float = opt(2.5, "fixed shift ~ U[shift_min, shift_max)")
    shift_max: float = opt(4.5, "see shift_min")
    guidance_max: float = opt(7.5, "Flux-dev guidance ~ U[0, guidance_max); ignored by models without one")
    cfg_scale: float = opt(0.0, "SD3.5 and klein base: every call (the student's too, both branches with "
                                "gradient) is c + w (c - u) against the empty prompt, w = cfg_scale (SD3.5's recipe "
                                "3.5, which is diffusers' guidance 4.5; klein's 3, its guidance 4); 0 = off. Set by "
                                "no flag or file: the family's preset's, said in one line (FLUX.1 and the distilled "
                                "klein: 0); a resumed run keeps its own")

    def scfm_config(self, guidance: bool, dynamic_shift: str = "linear") -> SCFMConfig:
        """`guidance`: the model has a guidance input (Flux-dev). `cfg_scale` > 0 bakes SD3.5's CFG in.
        `dynamic_shift`: the family's resolution-dependent shift rule (weights/family.py). The flow-matching
        objective gives every element the plain target: no target calls."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(SCFMConfig) if hasattr(self, f.name)}
        return SCFMConfig(**shared | dict(
            non_shortcut_ratio=1.0 if self.objective == "flow_matching" else self.non_shortcut_ratio,
            guidance_max=self.guidance_max if guidance else None, cfg_scale=self.cfg_scale or None,
            dynamic_shift=dynamic_shift))


@dataclass(frozen=True)
class EMASettings:
    """[ema]: the fast and slow EMA of the live set (docs/method.md §4)."""

    fast_decay: float = opt(0.99, "fast EMA decay")
    slow_decay: float = opt(0.999, "slow EMA decay")
    ema_restart_every: int = opt(0, "restart both EMAs from live every N updates, after updates N+1, 2N+1, ... "
                                    "as the released trainer does (0 = never; SD3.5: 2000)")

    def ema_config(self) -> EMAConfig:
        return EMAConfig(self.fast_decay, self.slow_decay, self.ema_restart_every)


# The tables DistillConfig holds, by field name: each of their fields keeps its flat name everywhere it is spelled
# (flags, TOML keys under any table, checkpoints, log lines), so files and command lines from before the tables
# nested still read (tests/test_config_fixture.py).
TABLES = {"lora": LoRASettings, "scfm": SCFMSettings, "ema": EMASettings}
TABLE_OF = {f.name: table for table, cls in TABLES.items() for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class DistillConfig:
    # --- files --------------------------------------------------------------------------------------------
    model: str = opt("", "Flux or SD3 / SD3.5 transformer: .safetensors file, model folder or diffusers "
                         "pipeline folder; 'demo': the built-in demo pipeline (distill/demo); 'tiny' / "
                         "'tiny-sd3' build a random tiny Flux / SD3.5 (tests)")
    data: str = opt("", "dataset folder: images + metadata.jsonl (file_name, prompt), or image + .txt pairs")
    demo_images: int = opt(512, "model 'demo' without --data: images the teacher renders into <output>/data "
                                "first (32 Euler steps, the recipe's way)")
    cache: str = opt("", "cache folder for latents and text embeddings (default: <output>/cache)")
    output: str = opt("runs/scfm", "run folder: checkpoints/, log.jsonl, samples/, the exported LoRA")
    vae: str = opt("", "VAE file/folder: builds the latent cache and decodes sample images")
    clip: str = opt("", "CLIP-L file/folder: builds the text cache only")
    clip_g: str = opt("", "SD3: CLIP-bigG file/folder (text_encoder_2): builds the text cache only")
    clip_g_tokenizer: str = opt("", "SD3: CLIP-bigG tokenizer folder (default: the vendored vocabulary, "
                                    "padded with '!')")
    t5: str = opt("", "T5-XXL file/folder: builds the text cache only (optional for SD3: zeros without)")
    t5_tokenizer: str = opt("", "T5 spiece.model / tokenizer.json / folder")
    qwen: str = opt("", "FLUX.2 [klein]: the Qwen3 text encoder (transformers folder or single file)")
    qwen_tokenizer: str = opt("", "FLUX.2 [klein]: its tokenizer.json or tokenizer/ folder")
    clip_tokenizer: str = opt("", "CLIP tokenizer folder (default: the vendored CLIP vocabulary)")
    t5_length: int = opt(0, "text tokens per prompt, recorded in the LoRA metadata; 0: the family's (FLUX.1 / "
                            "SD3.5: the released recipe's 256 T5 tokens; FLUX.2 [klein]: the 512 Qwen3 tokens "
                            "every klein pipeline gives its transformer)")
    resolution: int = opt(512, "training buckets have about resolution^2 pixels (the 512-px list at 512)")
    cache_only: bool = opt(False, "build the cache and stop")
    flip: bool = opt(False, "also train on every image mirrored left-right, 'left' and 'right' swapped in its "
                            "caption (re-embedded): twice the pairs. Off by default: a caption or image with "
                            "any other handedness (text, a one-sided detail) would be taught mirrored")
    # --- LoRA, SCFM objective, EMA: the tables above -------------------------------------------------------
    lora: LoRASettings = field(default_factory=LoRASettings)
    scfm: SCFMSettings = field(default_factory=SCFMSettings)
    ema: EMASettings = field(default_factory=EMASettings)
    # --- optimisation -------------------------------------------------------------------------------------
    steps: int = opt(10_000, "training steps (one global batch each)")
    batch_size: int = opt(8, "global batch: split evenly over the processes")
    micro_batch: int = opt(0, "elements per forward/backward (gradient accumulation); 0 = the whole "
                              "per-process batch. A fixed value makes runs bitwise independent of the "
                              "process count (powers of two)")
    lr: float = opt(2e-5, "AdamW learning rate (the peak of --lr_schedule)")
    lr_schedule: str = opt("constant", "constant (the recipe's), or linear / cosine: from lr down to lr x "
                                       "lr_final at the last step")
    lr_final: float = opt(0.0, "the decaying schedules' last lr, as a fraction of lr")
    weight_decay: float = opt(1e-4, "AdamW weight decay")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.999, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    max_grad_norm: float = opt(10.0, "gradient clipping max-norm (Flux 10, SD3.5 2); 0 = off")
    seed: int = opt(0, "seed of the LoRA init, the data order and every per-element draw")
    max_bad_steps: int = opt(5, "stop after this many NaN/inf steps in a row (each one is skipped)")
    # --- runtime ------------------------------------------------------------------------------------------
    device: str = opt("auto", "'auto' (cuda when available, one GPU per process), 'cuda', 'cpu'")
    dtype: str = opt("bf16", "frozen base weights: bf16, fp16 or fp32 (LoRA and EMAs are always fp32)")
    autocast: bool = opt(True, "bf16 autocast of the forward passes (on CUDA)")
    gradient_checkpointing: bool = opt(True, "recompute block activations in backward")
    unchecked_blocks: int = opt(0, "with gradient_checkpointing: the first N transformer blocks keep their "
                                   "activations for backward instead of recomputing them: faster where memory "
                                   "is left over; 'auto': as many as keep the step's peak under --max_memory "
                                   "(measured on the first batch)", parse=count_or_auto)
    max_memory: str = opt("", "the peak --unchecked_blocks auto plans for, e.g. 40GB or 38GiB (default: 90%% "
                              "of the device memory free before the model loaded)")
    fp8_base: bool = opt(False, "store the frozen transformer blocks' Linear weights in float8 (e4m3, a "
                                "power-of-two scale per row): half of bf16's memory (Flux-dev 23.7 -> 11.9 GB), "
                                "for 24 GB cards; each layer computes in --dtype from them, and the teacher is "
                                "this fp8 model too. Weights are quantized as they are read")
    fp8_compute: bool = opt(False, "run the frozen blocks' GEMMs on fp8 tensor cores (sm89 / sm90+: Ada, Hopper): "
                                   "e4m3 weights as --fp8_base stores them (implied), activations rounded to "
                                   "e4m3 per token, the input gradient likewise; the LoRA stays in bf16. On "
                                   "the CPU an exact emulation runs (for checking, not speed)")
    compile: bool = opt(False, "compile each transformer block once (torch.compile, static shapes: one "
                               "compilation per bucket and per LoRA set selection, the first steps are slow)")
    fsdp: bool = opt(False, "with torchrun: shard the frozen base and every LoRA set over the processes "
                            "(FSDP2, one group per transformer block) instead of a whole copy on each GPU, "
                            "so Flux-dev in bf16 trains on several 24 GB cards")
    blocks_to_swap: int = opt(0, "keep the frozen weights of the last N transformer blocks in host memory and "
                                 "copy each to the GPU as it runs, overlapped with the block before (Flux-dev "
                                 "bf16: ~0.4 GB per block, 57 blocks); needs gradient_checkpointing, not fsdp")
    # --- logging, samples, checkpoints, export ------------------------------------------------------------
    log_every: int = opt(10, "steps between JSONL log lines")
    wandb_project: str = opt("", "also log to Weights & Biases under this project (needs `pip install wandb`; "
                                 "rank 0; a resumed run continues the same W&B run); empty = off")
    sample_every: int = opt(0, "steps between sample images (0 = off); a run whose cache holds no "
                               "sample_prompts is refused before training (the cache's captions are not used)")
    sample_prompts: tuple[str, ...] = opt((), "prompts for sample images (embedded when the cache is built)")
    sample_steps: int = opt(4, "Euler steps of the sample images")
    sample_shift: float = opt(3.0, "fixed shift of the samples' SCFM grid")
    sample_guidance: float = opt(3.5, "Flux: guidance value of the sample images (SD3 samples use 1 + "
                                      "cfg_scale, as trained)")
    sample_size: int = opt(512, "sample image side in pixels: a multiple of the VAE's downscale x 2 (16 for "
                                "FLUX.1 / SD3.5, 8 for the demo)")
    checkpoint_every: int = opt(200, "steps between checkpoints (0 = only at the end)")
    keep_checkpoints: int = opt(3, "keep the newest K checkpoints")
    resume: bool = opt(False, "continue from the newest complete checkpoint in <output>/checkpoints")
    export_set: str = opt("live", "LoRA set to export at the end: live, slow_ema or fast_ema (the packaged "
                                  "recipes: slow_ema)")
    export_formats: tuple[str, ...] = opt(("diffusers", "kohya"), "LoRA file layouts to export: diffusers "
                                          "(scfm-lora-SET.safetensors, loads in ComfyUI, Forge, diffusers; FLUX.2: "
                                          "diffusers, ComfyUI takes -kohya), "
                                          "kohya (-kohya), ours (-scfm-only, read by scfm alone)")

    def __post_init__(self):
        positive = ("rank", "steps", "demo_images", "batch_size", "resolution", "log_every",
                    "keep_checkpoints", "sample_steps", "sample_size", "max_bad_steps", "t_skip",
                    "teacher_steps_min", "teacher_steps_max")
        for name in positive:
            if self.get(name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {self.get(name)}")
        non_negative = ("checkpoint_every", "sample_every", "micro_batch", "ema_restart_every", "blocks_to_swap",
                        "t5_length")
        for name in non_negative:
            if self.get(name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {self.get(name)}")
        if self.micro_batch and self.batch_size % self.micro_batch:  # it must divide each process's share too
            fits = max(d for d in range(1, min(self.micro_batch, self.batch_size) + 1) if self.batch_size % d == 0)
            raise ConfigError(f"micro_batch {self.micro_batch} does not divide batch_size {self.batch_size}; pass a "
                              f"divisor of it (--micro_batch {fits}, say)")
        if self.seed < 0:  # as generate and evaluate refuse it: -1 is "random" to A1111, and we never draw one
            raise ConfigError(f"seed {self.seed}: seeds are 0 or more (-1 does not mean random here); pass --seed 0")
        if self.seed >= 2**64:  # torch.Generator.manual_seed's limit (the LoRA's initial values are drawn with it)
            raise ConfigError(f"seed {self.seed}: over torch's largest seed 2**64 - 1; pass --seed 0")
        for name in FLOAT_RANGES:
            if (refused := range_error(name, self.get(name), flat_fields()[name][0].default)) is not None:
                raise ConfigError(refused)
        low, high = self.scfm.shift_min, self.scfm.shift_max
        if low > high:
            raise ConfigError(f"shift_min {low} > shift_max {high}: fixed shifts are drawn "
                              "from [shift_min, shift_max); pass --shift_min <= --shift_max")
        fast, slow = self.ema.fast_decay, self.ema.slow_decay
        if fast > slow:
            raise ConfigError(f"fast_decay {fast} > slow_decay {slow}: the fast EMA would average over more steps "
                              "than the slow one; pass --fast_decay <= --slow_decay")
        try:  # the grids t_skip and the teacher step range allow: here, not after the cache and model load
            self.scfm.scfm_config(guidance=False)
        except ValueError as e:
            raise ConfigError(f"{e}: change --t_skip, --teacher_steps_min or --teacher_steps_max") from None
        choices = {"dtype": ("bf16", "fp16", "fp32"), "export_set": ("live", "slow_ema", "fast_ema"),
                   "targets": names(), "lr_schedule": LR_SCHEDULES, "objective": ("scfm", "flow_matching")}
        for name, allowed in choices.items():
            if self.get(name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {self.get(name)!r}")
        if self.scfm.objective == "flow_matching":  # one trained set, the plain target: what SCFM adds is refused
            for name, (own, flag) in FLOW_MATCHING_OWN.items():
                if self.get(name) != own:
                    raise ConfigError(f"{name}: objective flow_matching trains the live set alone on the plain "
                                      f"target (no EMAs, no teacher, no CFG); pass --{name} {flag}")
        unknown = set(self.export_formats) - {"ours", "diffusers", "kohya"}
        if unknown:
            raise ConfigError(f"export_formats: unknown {sorted(unknown)}; use ours, diffusers, kohya")
        if self.wandb_project and importlib.util.find_spec("wandb") is None:
            raise ConfigError("wandb_project needs Weights & Biases: pip install wandb (or leave it empty)")
        if self.blocks_to_swap and self.fsdp:
            raise ConfigError("blocks_to_swap and fsdp both cut the weights each GPU holds; choose one")
        if self.blocks_to_swap and not self.gradient_checkpointing:
            raise ConfigError("blocks_to_swap needs gradient_checkpointing (without it backward keeps every "
                              "swapped block on the GPU): add --gradient_checkpointing")
        if self.unchecked_blocks < AUTO:
            raise ConfigError(f"unchecked_blocks must be >= 0 or 'auto', got {self.unchecked_blocks}")
        if self.max_memory:
            from .memory_plan import parse_memory

            try:
                budget = parse_memory(self.max_memory)
            except ValueError as e:
                raise ConfigError(f"max_memory: {e}") from None
            if budget <= 0:
                raise ConfigError(f"max_memory {self.max_memory!r} is no memory at all; give the peak to plan for, "
                                  "e.g. 40GB")
        if self.max_memory and self.unchecked_blocks != AUTO:
            raise ConfigError("max_memory is the budget of --unchecked_blocks auto; add it or drop --max_memory")
        if self.compile and self.fsdp:
            raise ConfigError("compile with fsdp is not supported (FSDP2's per-block hooks around compiled "
                              "blocks are untested here); drop one")
        if self.unchecked_blocks and not self.gradient_checkpointing:
            raise ConfigError("unchecked_blocks exempts blocks from gradient_checkpointing, which is off; add "
                              "--gradient_checkpointing or drop --unchecked_blocks")
        if self.resolution % 64:
            raise ConfigError(f"resolution must be a multiple of 64, got {self.resolution}")

    @property
    def fp8_storage(self) -> bool:
        """The blocks' weights are e4m3: asked for, or needed by fp8 compute."""
        return self.fp8_base or self.fp8_compute

    @classmethod
    def from_flat(cls, **values) -> DistillConfig:
        """From fields by their flat names (`rank=16, lr=1e-3`), as flags, TOML files and checkpoints name them."""
        tables: dict[str, dict] = {name: {} for name in TABLES}
        top = {}
        for name, value in values.items():
            if name in TABLES:
                raise TypeError(f"pass the fields of [{name}] by their names, not the table")
            (tables[TABLE_OF[name]] if name in TABLE_OF else top)[name] = value
        return cls(**top, **{name: TABLES[name](**kw) for name, kw in tables.items()})

    def get(self, name: str):
        """A field by its flat name, wherever it lives (`get("rank")` is `self.lora.rank`)."""
        return getattr(getattr(self, TABLE_OF[name]), name) if name in TABLE_OF else getattr(self, name)

    def replace(self, **values) -> DistillConfig:
        """A copy with fields changed, by their flat names (dataclasses.replace for the nested config)."""
        return DistillConfig.from_flat(**self.to_dict() | values)

    def to_dict(self) -> dict:
        """Every field by its flat name: what checkpoints and log lines store (the same keys as before the tables
        nested, so older checkpoints compare and resume)."""
        return {name: self.get(name) for name in flat_fields()}


def flat_fields() -> dict[str, tuple[dataclasses.Field, type]]:
    """name -> (field, its type) for every field of DistillConfig, the tables' fields in their place."""
    return field_index(DistillConfig)
