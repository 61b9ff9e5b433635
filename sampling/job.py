"""One `python -m sampling.generate` job, shared by that command line (sampling/generate.py) and the comparison
app (sampling/app.py, whose columns are generate command lines run on a model it keeps loaded): the checks of
every flag (the parser is sampling/flags.py), the generation config (flags, then a LoRA's recommendation, then the
family default, or a PNG's record: sampling/from_png.py), and the render that writes each PNG with its parameters.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

from weights.families import article, detect_family, families, get_family
from weights.family import Family
from weights.io import DTYPES, WeightsError

from .base import MAX_SIDE
from .components import refuse_lora_model
from .demo import DEMO_FOLDER, IMAGE_SIZE, T5_LENGTH, demo_lora
from .from_png import png_config, png_loras
from .options import MAX_STEPS, check_finite, check_run_options, check_seed, pick, read_prompt_lines
from .png_record import save_png

# Image formats `--out` might name: we write PNG alone (its settings inside), so `--out img.jpg` would otherwise be
# read as a folder name and fill a folder `img.jpg/` with PNGs.
OTHER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif", ".heic",
                        ".heif", ".jxl", ".apng", ".ppm", ".tga")


def with_demo_defaults(args) -> None:
    """No --model: the shipped demo pipeline at its own size and T5 length; `--lora demo` is its SCFM LoRA."""
    demo = args.model is None
    if demo:
        args.model = str(DEMO_FOLDER)
        if args.max_sequence_length is None:
            args.max_sequence_length = T5_LENGTH  # what the demo teacher was trained with
    side = IMAGE_SIZE if demo else 1024
    # `is None`, not `or`: --width 0 is refused by check_sizes, not silently replaced by the default
    args.width = side if args.width is None else args.width
    args.height = side if args.height is None else args.height
    args.lora = [demo_lora(spec) for spec in args.lora]


def prompt_list(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += read_prompt_lines(args.prompts_file, "--prompts-file")
    if not prompts:
        raise ValueError("no prompt: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def check_args(args) -> None:
    """Every flag that can be wrong by itself, before anything is read: one line naming the flag and the fix."""
    if args.image:
        raise ValueError(f"--image {args.image[0]}: image editing (reference images) is not supported; scfm "
                         "generates from text only, so drop --image")
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size),
                        ("--max-sequence-length", args.max_sequence_length)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be 1 or more; pass {flag} 1 or more")
    if args.steps is not None and args.steps > MAX_STEPS:
        raise ValueError(f"--steps {args.steps}: over {MAX_STEPS}, the most sampled (sampling/job.py MAX_STEPS: "
                         f"the schedulers' training timesteps); pass --steps 28 (diffusers' default) or at most "
                         f"{MAX_STEPS}")
    if args.max_sequence_length is not None and args.max_sequence_length > 512:
        raise ValueError(f"--max-sequence-length {args.max_sequence_length}: T5 is used with at most 512 tokens "
                         "(as diffusers); pass --max-sequence-length 512")
    check_seed(args.seed, args.batch_size)
    check_finite(guidance=args.guidance, cfg=args.cfg, true_cfg=args.true_cfg, slg_scale=args.slg_scale,
                 slg_start=args.slg_start, slg_stop=args.slg_stop)
    for flag, value, default in (("--slg-start", args.slg_start, 0.01), ("--slg-stop", args.slg_stop, 0.2)):
        if value is not None and not 0 <= value <= 1:
            raise ValueError(f"{flag} {value}: a fraction of the steps, from 0 to 1; pass {flag} {default}")
    if args.shift is not None:
        args.shift = parse_shift(args.shift, "--shift")
    check_run_options(args)


def parse_shift(text, flag: str) -> float | str:
    """A shift as given (flag) or recommended: 'dynamic' or a positive finite number."""
    if text == "dynamic":
        return text
    try:
        shift = float(text)
    except (TypeError, ValueError):
        shift = math.nan
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"{flag} {text}: expected a positive number (1 = unshifted, 3 = SD3.5's) or 'dynamic'; "
                         "pass --shift 3")
    return shift


def check_sizes(args, default: int) -> None:
    """Sizes any model refuses; the model's own multiple and limit are Pipeline.check_size's, before any weight."""
    for name in ("width", "height"):
        size = getattr(args, name)
        if size <= 0:
            raise ValueError(f"--{name} {size}: image sizes are positive; pass --{name} {default} (the default)")
        if size > MAX_SIDE:
            raise ValueError(f"--{name} {size}: over {MAX_SIDE} px, the largest side sampled (sampling/base.py "
                             f"MAX_SIDE); pass --{name} {default} (the default) or at most {MAX_SIDE}")


def output_paths(args, count: int) -> list[Path]:
    out = Path(args.out)
    if out.suffix.lower() in OTHER_IMAGE_SUFFIXES:
        raise ValueError(f"--out {out}: generate writes PNG files (their settings inside), not {out.suffix}; pass "
                         f"--out {out.with_suffix('.png')} or a folder")
    if out.suffix.lower() == ".png":
        if count != 1:
            raise ValueError(f"--out {out} names one file but {count} images will be made; pass a folder")
        paths = [out]
    else:
        paths = [out / f"{args.seed + i // len(prompt_list(args)):06d}_{i:03d}.png" for i in range(count)]
    clash = [p for p in paths if p.exists()]
    folder = next((p for p in clash if p.is_dir()), None)
    if folder is not None:  # --overwrite replaces files: a folder in the way would fail only after sampling
        raise ValueError(f"--out {args.out}: {folder} is a folder, where a PNG would be written; pass another --out"
                         + ("" if folder == out else " or move that folder"))
    if clash and not args.overwrite:
        raise ValueError(f"{clash[0]} exists; pass --overwrite or another --out")
    return paths


def lora_recommendations(paths: list[str]):
    """The sampling settings the LoRAs' metadata recommends (the first LoRA stating a field wins), with the grid
    set to `scfm` for an SCFM LoRA that does not state one: SCFM is trained on that grid."""
    from weights.io import read_header
    from weights.lora import Recommended

    merged: dict = {}
    for path in paths:
        if not Path(path).exists():
            raise WeightsError(f"--lora {path}: no such file")
        meta = read_header(Path(path))[1]
        rec = dataclasses.asdict(Recommended.from_metadata(meta))
        if rec["shift"] is not None:
            try:
                rec["shift"] = parse_shift(rec["shift"], f"--lora {path}: its scfm_shift")
            except ValueError as e:
                raise WeightsError(f"{e} to override it") from None
        if is_scfm_lora(meta):
            rec["schedule"] = rec["schedule"] or "scfm"
        merged = {k: merged.get(k) if merged.get(k) is not None else v for k, v in rec.items()}
    return Recommended(**merged) if merged else Recommended()


def is_scfm_lora(meta: dict[str, str]) -> bool:
    """An SCFM LoRA, sampled on the `scfm` grid it was trained on unless it says otherwise: one our trainer made
    (`scfm_training`, or an older export's `scfm_lora`) with the SCFM objective, or one recommending how to sample
    it few-step (a grid, steps or a shift). Not `scfm_format`: that only names our layout, which write_lora
    stamps on any LoRA, a style LoRA converted with `tools/convert.py lora ... --to ours` too."""
    made_here = "scfm_training" in meta or "scfm_lora" in meta
    recommends = any(f"scfm_{k}" in meta for k in ("schedule", "steps", "shift"))
    return (made_here or recommends) and not plain(meta)


def plain(meta: dict[str, str]) -> bool:
    """A LoRA our trainer made with the flow-matching objective (a style LoRA): sampled on its base's schedule."""
    try:
        return json.loads(meta.get("scfm_training", "{}")).get("objective") == "flow_matching"
    except (json.JSONDecodeError, AttributeError):
        return False


def missing_base_loras(loras: list[tuple[str, float]]) -> list[str]:
    """One warning per LoRA that an SCFM LoRA among `loras` was trained on top of (distill.train --base_loras)
    and that is not given here at the same scale (files compared by sha256)."""
    from weights.io import file_sha256, read_header

    wanted = []
    for path, _ in loras:
        wanted += [(Path(path).name, base) for base in _base_loras(path, read_header(Path(path))[1])]
    if not wanted:
        return []
    given = {(file_sha256(path), scale) for path, scale in loras}
    return [f"warning: {name} was trained on top of {b['file']} at scale {b['scale']:g}; add --lora "
            f"{b['file']}:{b['scale']:g} to sample it as trained" for name, b in wanted
            if (b["sha256"], b["scale"]) not in given]


def _base_loras(path: str, meta: dict[str, str]) -> list[dict]:
    """The `base_loras` an SCFM LoRA's `scfm_training` metadata records ({file, sha256, scale} each); damaged
    metadata is one line naming the file, not a bare JSON error."""
    raw = meta.get("scfm_training")
    if raw is None:
        return []
    try:
        info = json.loads(raw)
        bases = info.get("base_loras", []) if isinstance(info, dict) else None
        ok = isinstance(bases, list) and all(
            isinstance(b, dict) and isinstance(b.get("file"), str) and isinstance(b.get("sha256"), str)
            and isinstance(b.get("scale"), (int, float)) for b in bases)
    except json.JSONDecodeError:
        ok = False
    if not ok:
        raise WeightsError(f"--lora {path}: its scfm_training metadata is damaged (not a JSON object with "
                           "base_loras entries {file, sha256, scale}); re-export the LoRA with "
                           "`python -m distill.export` or pass an intact file")
    return bases


def lora_records(loras: list[tuple[str, float]]) -> list[dict]:
    """What a PNG records of each LoRA: file name, path, the scale used, sha256 (as train's base_loras records
    do) and the short hash A1111 / Forge write under `Lora hashes` (sampling/infotext.py)."""
    from weights.io import a1111_lora_hash, file_sha256

    # the absolute path: `--from-png` finds the file from any working directory
    return [{"file": Path(path).name, "path": str(Path(path).resolve()), "scale": scale, "sha256": file_sha256(path),
             "a1111_hash": a1111_lora_hash(path)} for path, scale in loras]


def flag_given(value) -> bool:
    """A flag set on the command line: not its default None, False or empty list (a value such as 0 counts:
    `--slg-scale 0` is given too)."""
    return value is not None and value is not False and value != () and value != []


def check_family_flags(args, family: Family | str) -> None:
    """A flag only another family reads would be ignored silently; refuse it instead. A flag `args` lacks (make_dataset
    has no --true-cfg) is not given."""
    family = get_family(family)
    pipeline = family.part("pipeline")
    unread = [flag for flag, attr in pipeline.unread_flags if flag_given(getattr(args, attr, None))]
    if unread:
        raise ValueError(f"{', '.join(unread)}: {article(family.title)} model has no such part; {pipeline.unread_hint}")
    for other in families():
        if other is family or "pipeline" not in other.parts:
            continue
        used = [flag for flag, attr in other.part("pipeline").own_flags if flag_given(getattr(args, attr, None))]
        if used:
            hint = pipeline.flag_hint
            raise ValueError(f"{', '.join(used)}: {other.title} options, but {args.model} is {article(family.title)} "
                             f"model" + (f"; {hint}" if hint else ""))


def generation_config(args, family: Family | str, rec):
    """The family's generation config: command line, then the LoRA's recommendation, then the family default."""
    pipeline = get_family(family).part("pipeline")
    d = pipeline.defaults
    common = dict(height=args.height, width=args.width, steps=pick(args.steps, rec.steps, d["steps"]),
                  max_sequence_length=pick(args.max_sequence_length, rec.max_sequence_length,
                                           d["max_sequence_length"]),
                  grid=pick(args.schedule, rec.schedule, "diffusers"), seed=args.seed,
                  shift=pick(args.shift, rec.shift))
    return pipeline.generation_config(args, rec, common)


def used_settings(pipe, cfg, negative_prompt: str | None) -> dict:
    """The config as sampled, for the PNG: the negative prompt only when a negative pass ran, the shift the
    schedule used when --shift left it to the model, less what the model ignored (the family says)."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("extra", "grid")}
    schedule = pipe.schedule(cfg)
    settings.update(negative_prompt=negative_prompt, shift="dynamic" if schedule.dynamic else schedule.shift)
    return pipe.used_settings(settings)


@dataclasses.dataclass
class Job:
    """What one `generate` call samples, resolved and checked before any weight is read."""

    model: Path
    family: Family
    prompts: list[str]
    loras: list  # (LoRA, scale), read for the family
    records: list[dict]  # what the PNGs record of them
    skipped: dict  # what was left out on purpose, for the PNG
    cfg: object  # the family's generation config
    # --from-png of an image from an n-prompt run: (r, n), its noise being row r of an n-row draw of its seed
    noise_row: tuple[int, int] | None = None


def resolve(args, prompts: list[str], png: dict | None = None) -> Job:
    """The model's family, the LoRAs (read and checked) and the generation config: from the flags, the LoRAs'
    recommendations and the family's defaults, or from a PNG's record (`png`). Nothing heavy is read."""
    model = Path(args.model).expanduser()
    if not model.exists():
        raise WeightsError(f"--model {model}: no such file or folder")
    refuse_lora_model(model)
    family = detect_family(model)
    if png is not None and png["family"] != family.name:
        raise WeightsError(f"--from-png: the image was made with {article(get_family(png['family']).title)} model, "
                           f"but {model} is {article(family.title)} one; pass its --model")
    check_family_flags(args, family)
    from weights.lora_merge import lora_spec  # here, not at the top: keeps --help fast

    loras = png_loras(png) if png is not None else [lora_spec(s) for s in args.lora]  # no :SCALE: recommended
    for path, scale in loras:
        if not math.isfinite(scale):
            raise ValueError(f"--lora {path}:{scale}: the scale must be a finite number; pass --lora {path}:1")
    if png is not None:
        cfg = png_config(png, family)
    else:
        cfg = generation_config(args, family, lora_recommendations([path for path, _ in loras]))
    # only a LoRA's metadata can get here: check_args refused the flags, from_png the PNG's values
    for flag, value in (("--steps", cfg.steps), ("--max-sequence-length", cfg.max_sequence_length)):
        if value < 1:
            raise WeightsError(f"{flag} {value}, as a --lora recommends: must be 1 or more; pass {flag} yourself")
    if cfg.steps > MAX_STEPS:
        raise WeightsError(f"--steps {cfg.steps}, as a --lora recommends: over {MAX_STEPS}, the most sampled; pass "
                           "--steps yourself")
    for warning in missing_base_loras(loras):
        print(warning, file=sys.stderr)
    records = lora_records(loras)
    skipped = {"ignore_te_lora": True} if loras and args.ignore_te_lora else {}  # the PNG says what was left out
    if loras:
        from weights.lora import read_lora

        # read once: the checks and the loads take these (merged for good as the transformer and, for a
        # text-encoder part, CLIP / T5 are read)
        loras = [(read_lora(path, family=family.name), scale) for path, scale in loras]
    row = png.get("noise_row") if png is not None else None
    return Job(model, family, prompts, loras, records, skipped, cfg, None if row is None else tuple(row))


def check_job(pipe, job: Job) -> None:
    """What the pipeline can judge before the big models load (configs read on "meta"): the size, a wrong file,
    a LoRA for another model, a part of another model, a setting only this model refuses. Nothing is read yet."""
    cfg = job.cfg
    pipe.check_size(cfg.height, cfg.width, len(job.prompts) * (2 if pipe.wants_negative(cfg) else 1))
    pipe.check_transformer()
    pipe.tokenizers(cfg.max_sequence_length)  # milliseconds; a wrong file then fails before the encoders load
    if not pipe.components_checked:  # once per pipeline: the app's columns and sweep cells ask again
        pipe.check_components()  # a VAE or text encoder of another model: from headers, before any weight is read
        pipe.components_checked = True
    pipe.check_config(cfg)


def render(pipe, job: Job, paths: list[Path], batch_size: int, seed: int, callback=None,
           latents_out: list | None = None, conditioning: tuple | None = None,
           written: list[Path] | None = None) -> list[Path]:
    """Encode the prompts once, then per batch index (seed, seed + 1, ...) sample, decode and write each PNG with
    its parameters: `generate` and the app (sampling/app.py) both end here, after `check_job`. `latents_out`
    collects each batch index's final latents (distill.evaluate compares them); `conditioning`: what
    pipe.encode_prompts returns for this job, when the caller kept it (the app's Session.conditioning); `written`:
    the list each PNG's path joins once it is saved, and which is returned (what generate counts when interrupted)."""
    from .base import to_pil

    negative_prompt = job.cfg.negative_prompt if pipe.wants_negative(job.cfg) else None
    # the encoders run once, then are freed
    cond, negative = conditioning or pipe.encode_prompts(job.prompts, job.cfg)
    # how the transformer ran, which moves pixels too (--from-png takes it back)
    run = {"dtype": next(k for k, v in DTYPES.items() if v == pipe.dtype), "fp8": pipe.fp8,
           "fp8_compute": pipe.fp8_compute}
    written = [] if written is None else written
    for b in range(batch_size):
        cfg = dataclasses.replace(job.cfg, seed=seed + b)  # generation configs are frozen: one per image batch
        noise = None
        if job.noise_row is not None:  # the row this prompt had in its first run's draw of the seed
            r, n = job.noise_row
            noise = pipe.noise(n, cfg.height, cfg.width, pipe.generator(cfg, None))[r:r + 1]
        latents = pipe.sample(cond, cfg, negative=negative, callback=callback, noise=noise)
        if latents_out is not None:
            latents_out.append(latents.detach().float().cpu())
        for i, (prompt, image) in enumerate(zip(job.prompts, to_pil(pipe.decode(latents)))):
            path = paths[b * len(job.prompts) + i]
            # an image of a many-prompt run: its noise is row i of the draw (what --from-png draws again)
            row = job.noise_row or ((i, len(job.prompts)) if len(job.prompts) > 1 else None)
            params = dict(prompt=prompt, family=job.family.name, model=str(job.model.resolve()), loras=job.records,
                          schedule=cfg.grid, **job.skipped, **used_settings(pipe, cfg, negative_prompt), **run,
                          **({} if row is None else {"noise_row": list(row)}))
            save_png(image, path, params)
            written.append(path)
    return written
