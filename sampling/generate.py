"""`python -m sampling.generate`: text to PNG with a Flux or SD3 / SD3.5 model, optionally with SCFM and style LoRAs.

    python -m sampling.generate --model FLUX.1-dev/ --prompt "a red fox in the snow" --steps 28
    python -m sampling.generate --model flux1-dev.safetensors --vae ae.safetensors --clip clip_l.safetensors \
        --t5 t5xxl_fp16.safetensors --t5-tokenizer t5_tokenizer/ --prompt "..." --lora scfm.safetensors:1.25
    python -m sampling.generate --model stable-diffusion-3.5-large/ --prompt "..." --cfg 4.5 --steps 40
    python -m sampling.generate --model stable-diffusion-3.5-medium/ --prompt "..." --slg-layers 7,8,9

The family (Flux or SD3) is read from the model: a pipeline folder's model_index.json, a transformer folder's
config.json, or the checkpoint's keys. Settings not given on the command line come from an SCFM LoRA's metadata
(steps, grid, shift, guidance, T5 length), so an SCFM LoRA samples on the `scfm` grid it was trained on; otherwise
from the family's diffusers defaults. A LoRA without :SCALE is merged at the scale its metadata recommends, else 1;
its text-encoder part, if any (kohya lora_te*_, diffusers text_encoder*.), goes into CLIP / T5 at that scale unless
--ignore-te-lora. Every PNG carries its generation parameters (seed and LoRA scales included) twice: as the infotext
A1111 / Forge's PNG Info and Civitai read, and as our JSON (sampling.base.read_png_params); existing files are never
replaced without --overwrite.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

from weights.families import article, detect_family, families, get_family
from weights.family import Family
from weights.io import WeightsError

from .base import MAX_SIDE, pipeline_from_args, save_png
from .demo import DEMO_FOLDER, DEMO_LORA, IMAGE_SIZE, T5_LENGTH
from .options import (
    OneLineParser,
    add_ignore_te_lora,
    add_run_options,
    check_finite,
    check_run_options,
    check_seed,
    check_writable,
    out_of_memory,
    pick,
    read_prompt_lines,
)


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
    args.lora = [str(DEMO_LORA) + spec[4:] if spec == "demo" or spec.startswith("demo:") else spec
                 for spec in args.lora]


def parse_layers(text: str) -> tuple[int, ...]:
    """`7,8,9` -> (7, 8, 9); an empty string turns skip-layer guidance off."""
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices such as 7,8,9, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m sampling.generate", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model files")
    src.add_argument("--model", help="diffusers Flux / SD3 pipeline folder, or the transformer file or folder "
                     "(default: the built-in 64-px demo model, distill/demo)")
    src.add_argument("--vae", help="VAE file or diffusers vae/ folder (default: the pipeline folder's)")
    src.add_argument("--clip", help="CLIP-L file or folder (default: the pipeline folder's text_encoder/)")
    src.add_argument("--clip-g", help="SD3: CLIP-bigG file or folder (default: the pipeline folder's text_encoder_2/)")
    src.add_argument("--t5", help="T5-XXL file or folder (default: the pipeline folder's text_encoder_2/ (Flux) "
                                  "or text_encoder_3/ (SD3))")
    src.add_argument("--no-t5", action="store_true", help="SD3: run without T5 (zeros in its place, as diffusers)")
    src.add_argument("--clip-tokenizer", help="CLIP-L tokenizer folder (default: the vendored CLIP vocabulary)")
    src.add_argument("--clip-g-tokenizer", help="SD3: CLIP-bigG tokenizer folder (default: the vendored "
                                                "vocabulary padded with '!')")
    src.add_argument("--t5-tokenizer", help="T5 spiece.model / tokenizer.json / folder")
    src.add_argument("--qwen", help="FLUX.2 [klein]: the Qwen3 text encoder folder or file (default: the pipeline "
                                    "folder's text_encoder/)")
    src.add_argument("--qwen-tokenizer", help="FLUX.2 [klein]: its tokenizer.json or folder (default: the pipeline "
                                              "folder's tokenizer/)")
    src.add_argument("--variant", choices=["base", "distilled"],
                     help="FLUX.2 [klein]: base (real CFG, 50 steps) or distilled (4 steps, no CFG); default: the "
                          "folder's is_distilled, else the file name (their weights look alike)")
    src.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                     help="a LoRA to merge, at SCALE if given, else at the scale its metadata recommends, else 1; "
                     "repeatable ('demo': the shipped SCFM LoRA of the demo model)")
    add_ignore_te_lora(src)
    gen = p.add_argument_group("generation (unset values: an SCFM LoRA's recommendation, else the family default)")
    gen.add_argument("--prompt", action="append", default=[], help="repeatable")
    gen.add_argument("--prompts-file", help="a text file, one prompt per line")
    gen.add_argument("--negative-prompt", help="Flux: used with --true-cfg > 1; SD3: the CFG negative (default '')")
    gen.add_argument("--steps", type=int, help="default 28")
    gen.add_argument("--schedule", choices=["diffusers", "scfm"],
                     help="sigma grid: the scheduler's, or SCFM's shifted linspace (default: scfm with an SCFM "
                          "LoRA, else diffusers)")
    gen.add_argument("--shift", help="a fixed shift (e.g. 3) or 'dynamic'; default: the schedule's own")
    gen.add_argument("--guidance", type=float,
                     help="diffusers' guidance_scale: Flux-dev's guidance embedding (default 3.5); SD3's CFG scale, "
                          "the same as --cfg (default 7.0)")
    gen.add_argument("--cfg", type=float,
                     help="real classifier-free guidance, uncond + s (cond - uncond): SD3's guidance scale "
                          "(default 7.0, <= 1 off); Flux's --true-cfg")
    gen.add_argument("--true-cfg", type=float, help="Flux: > 1 with --negative-prompt: real CFG (default 1, off)")
    gen.add_argument("--slg-layers", type=parse_layers, default=(), metavar="I,J,...",
                     help="SD3: skip-layer guidance blocks (SD3.5-medium: 7,8,9); needs CFG on")
    gen.add_argument("--slg-scale", type=float, default=2.8, help="SD3: skip-layer guidance scale")
    gen.add_argument("--slg-start", type=float, default=0.01, help="SD3: SLG from this fraction of the steps")
    gen.add_argument("--slg-stop", type=float, default=0.2, help="SD3: SLG until this fraction of the steps")
    gen.add_argument("--max-sequence-length", type=int, help="T5 tokens (default: Flux 512, SD3 256)")
    gen.add_argument("--width", type=int, help="default 1024 (the demo: 64)")
    gen.add_argument("--height", type=int, help="default 1024 (the demo: 64)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch-size", type=int, default=1, help="images per prompt, seeds seed, seed+1, ...")
    # accepted only to be refused in words: klein's image= references (editing) are out of scope, and argparse's
    # "unrecognized arguments" would not say so
    gen.add_argument("--image", action="append", default=[], help=argparse.SUPPRESS)
    run = p.add_argument_group("run")
    add_run_options(run)
    run.add_argument("--out", default="outputs", help="a folder, or a .png path for a single image")
    run.add_argument("--overwrite", action="store_true", help="replace existing files")
    return p


def _prompts(args) -> list[str]:
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
    if args.max_sequence_length is not None and args.max_sequence_length > 512:
        raise ValueError(f"--max-sequence-length {args.max_sequence_length}: T5 is used with at most 512 tokens "
                         "(as diffusers); pass --max-sequence-length 512")
    check_seed(args.seed, args.batch_size)
    check_finite(guidance=args.guidance, cfg=args.cfg, true_cfg=args.true_cfg, slg_scale=args.slg_scale,
                 slg_start=args.slg_start, slg_stop=args.slg_stop)
    for flag, value, default in (("--slg-start", args.slg_start, 0.01), ("--slg-stop", args.slg_stop, 0.2)):
        if not 0 <= value <= 1:
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


def _targets(args, count: int) -> list[Path]:
    out = Path(args.out)
    if out.suffix.lower() == ".png":
        if count != 1:
            raise ValueError(f"--out {out} names one file but {count} images will be made; pass a folder")
        paths = [out]
    else:
        paths = [out / f"{args.seed + i // len(_prompts(args)):06d}_{i:03d}.png" for i in range(count)]
    clash = [p for p in paths if p.exists()]
    if clash and not args.overwrite:
        raise ValueError(f"{clash[0]} exists; pass --overwrite or another --out")
    return paths


def lora_recommendations(paths: list[str]):
    """The sampling settings the LoRAs' metadata recommends (the first LoRA stating a field wins), with the grid
    set to `scfm` for an SCFM LoRA that does not state one: SCFM is trained on that grid."""
    from weights.io import read_header
    from weights.lora import FORMAT, Recommended

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
        if meta.get("scfm_format") == FORMAT or "scfm_lora" in meta or "scfm_training" in meta:
            rec["schedule"] = rec["schedule"] or "scfm"
        merged = {k: merged.get(k) if merged.get(k) is not None else v for k, v in rec.items()}
    return Recommended(**merged) if merged else Recommended()


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

    return [{"file": Path(path).name, "path": path, "scale": scale, "sha256": file_sha256(path),
             "a1111_hash": a1111_lora_hash(path)} for path, scale in loras]


def check_family_flags(args, family: Family | str) -> None:
    """A flag only another family reads would be ignored silently; refuse it instead."""
    family = get_family(family)
    for other in families():
        if other is family or "pipeline" not in other.parts:
            continue
        used = [flag for flag, attr in other.part("pipeline").own_flags if getattr(args, attr)]
        if used:
            hint = family.part("pipeline").flag_hint
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


def run(args) -> list[Path]:
    from tqdm import tqdm

    from .pipeline import to_pil

    check_args(args)
    prompts = _prompts(args)
    default_side = IMAGE_SIZE if args.model is None else 1024
    with_demo_defaults(args)
    check_sizes(args, default_side)
    paths = _targets(args, len(prompts) * args.batch_size)
    # before any model loads: an unwritable --out used to fail only when the first PNG was saved
    check_writable(paths[0].parent, "--out", args.out,
                   need_bytes=len(paths) * (3 * args.width * args.height + 65536))  # raw RGB bounds a PNG
    model = Path(args.model).expanduser()
    if not model.exists():
        raise WeightsError(f"--model {model}: no such file or folder")
    family = detect_family(model)
    check_family_flags(args, family)
    from weights.lora_merge import lora_spec  # here, not at the top: keeps --help fast

    loras = [lora_spec(s) for s in args.lora]  # no :SCALE: the LoRA's recommended scale, else 1
    for path, scale in loras:
        if not math.isfinite(scale):
            raise ValueError(f"--lora {path}:{scale}: the scale must be a finite number; pass --lora {path}:1")
    cfg = generation_config(args, family, lora_recommendations([path for path, _ in loras]))
    for flag, value in (("--steps", cfg.steps), ("--max-sequence-length", cfg.max_sequence_length)):
        if value < 1:  # only a LoRA's metadata can get here: check_args refused the flags
            raise WeightsError(f"{flag} {value}, as a --lora recommends: must be 1 or more; pass {flag} yourself")
    for warning in missing_base_loras(loras):
        print(warning, file=sys.stderr)
    records = lora_records(loras)
    skipped = {"ignore_te_lora": True} if loras and args.ignore_te_lora else {}  # the PNG says what was left out
    if loras:
        from weights.lora import read_lora

        # read once: the check below and the loads take these (merged for good as the transformer and, for a
        # text-encoder part, CLIP / T5 are read)
        loras = [(read_lora(path, family=family.name), scale) for path, scale in loras]
    pipe = pipeline_from_args(args, model, family, loras)
    negative_prompt = cfg.negative_prompt if pipe.wants_negative(cfg) else None
    # a bad size fails before the big models are loaded (the configs are read on "meta"), so do a wrong file or
    # a LoRA for another model: nothing is read yet
    pipe.check_size(args.height, args.width, len(prompts) * (2 if negative_prompt is not None else 1))
    pipe.check_transformer()
    pipe.tokenizers(cfg.max_sequence_length)  # milliseconds; a wrong file then fails before the encoders load
    pipe.check_config(cfg)
    cond, negative = pipe.encode_prompts(prompts, cfg)  # the encoders run once, then are freed
    written: list[Path] = []
    with tqdm(total=args.batch_size * cfg.steps, desc="sampling", unit="step") as bar:
        for b in range(args.batch_size):
            cfg.seed = args.seed + b
            latents = pipe.sample(cond, cfg, negative=negative, callback=lambda *_: bar.update(1))
            for i, (prompt, image) in enumerate(zip(prompts, to_pil(pipe.decode(latents)))):
                path = paths[b * len(prompts) + i]
                params = dict(prompt=prompt, family=family.name, model=str(model), loras=records, schedule=cfg.grid,
                              **skipped, **used_settings(pipe, cfg, negative_prompt))
                save_png(image, path, params)
                written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for path in run(args):
            print(path)
    except (WeightsError, ValueError, OSError) as e:  # OSError: a disk that fills up or vanishes while writing
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print(out_of_memory(args, "fewer prompts per run or a smaller --width / --height"), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
