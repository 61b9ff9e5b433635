"""Inspect, convert and merge checkpoints and LoRAs between the official, diffusers and kohya layouts.

    python tools/convert.py info FILE_OR_FOLDER
    python tools/convert.py checkpoint flux1-dev.safetensors flux-dev-diffusers/ --to diffusers --dtype bf16
    python tools/convert.py lora my_lora.safetensors my_lora_kohya.safetensors --to kohya
    python tools/convert.py lora klein_attn.safetensors klein_attn_peft.safetensors --to diffusers --family flux2
    python tools/convert.py lora scfm.safetensors scfm-r32.safetensors --to ours --rank 32 --dtype bf16
    python tools/convert.py merge --base flux1-dev.safetensors --lora scfm.safetensors:1.0 \
        --out flux-4step.safetensors

Checkpoints (Flux BFL <-> diffusers, SD3 / SD3.5 SAI <-> diffusers, the 16-channel VAE) are streamed tensor by
tensor, so peak memory is about one tensor whatever the model's size. An OUT ending in .safetensors (in any case,
without a trailing /) is one file, any other OUT a folder (diffusers: config.json, shards and index, loadable by
`from_pretrained`); a LoRA's OUT is always one file. Outputs are written atomically and never replace an existing
path without --overwrite, nor, even with it, a file read (an input, a merge's LoRA), a path inside an input
folder or a folder holding anything but a conversion's own output (weights/convert.py check_output). Every error
is one line on stderr and exit code 2 (bad input, and the disk's own: a full disk, a path through a file, no
permission).
A merge into an all-in-one file (ComfyUI / SAI: VAE and text encoders beside the transformer) keeps those parts
as stored. A LoRA's family comes from its metadata or names, else from which released model sizes its shapes fit
(FLUX.1 and FLUX.2 [klein] share block names); when several fit, --family chooses. All the key mapping lives in
weights/ (see weights/convert_plan.py and weights/convert.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import math
import os
import re
import sys
from collections import Counter
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python tools/convert.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sampling.options import OneLineParser, plain_warnings
from weights.convert import check_output, convert_checkpoint, merge_loras, outside_transformer
from weights.convert_plan import detect, plan_conversion
from weights.families import get_family, names
from weights.io import DTYPES, WeightsError, parse_lora, read_header
from weights.keymaps.lora import NotLoRAError
from weights.lora import LAYOUTS, read_lora
from weights.lora_alone import fits_alike, read_lora_alone, undecided_family
from weights.lora_foreign import PEFT_FILE, peft_file
from weights.lora_resize import resize_lora, summary
from weights.lora_write import write_lora

# Modules whose kohya keys diffusers 0.42.1's kohya loader silently drops (docs/models.md §7.3).


# The smallest --shard-size. A shard is a file the loader opens; below 1MB a real model's shards hold one or a few
# tensors each (hundreds of files for FLUX.1), which nobody means: such a size is a slip of the unit (5KB, 5B for
# 5GB) or none at all (0, negative, a fraction of a byte), and is refused rather than obeyed.
MIN_SHARD_BYTES = 10**6


def _size(text: str) -> int:
    units = {"kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "b": 1}
    low = text.strip().lower()
    for unit in sorted(units, key=len, reverse=True):
        if low.endswith(unit):
            try:
                size = float(low[: -len(unit)]) * units[unit]
            except ValueError:
                break
            if not (math.isfinite(size) and size >= MIN_SHARD_BYTES):  # inf, nan, 1e400GB: no int; 0, -5GB, 5KB
                raise argparse.ArgumentTypeError(f"{text!r}: a shard size must be finite and at least 1MB "
                                                 "(examples: 5GB, 500MB)")
            return int(size)
    raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 5GB, 500MB)")


def _lora_arg(text: str) -> tuple[str, float]:
    """FILE or FILE:SCALE (weights/io.py parse_lora: a colon followed by no number is part of the path, a word after
    an existing FILE a mistyped scale); scale 1 when not given. A scale of nan or inf (1e999 reads as inf) is
    refused: it would write a checkpoint of NaN / infinite weights (generate refuses it alike)."""
    try:
        path, value = parse_lora(text)
    except WeightsError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value is None or not path:
        return text, 1.0
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text}: the scale must be a finite number; pass --lora {path}:1")
    return path, value


# ----- info -------------------------------------------------------------------------------------------------


def _variant(src, cfg) -> str:
    if src.transformer is not None:
        return src.transformer.describe(cfg)
    return f"VAE, {cfg.z_channels} latent channels, scale {cfg.scale_factor} shift {cfg.shift_factor}"


# Which text encoder a LoRA's text-encoder keys name, by prefix (sd-scripts: te1 CLIP-L, te2 CLIP-G, te3 T5;
# diffusers: text_encoder CLIP-L, text_encoder_2 SD3's CLIP-G or Flux's T5; ComfyUI: text_encoders.<name>.)
_TEXT_PARTS = {"lora_te_": "CLIP-L", "lora_te1_": "CLIP-L", "lora_te2_": "CLIP-G", "lora_te3_": "T5",
               "text_encoder.": "CLIP-L", "text_encoder_2.": "CLIP-G (SD3) / T5 (Flux)",
               "text_encoders.": "ComfyUI text_encoders."}


def _family_line(lora, sizes: dict[str, list[str]]) -> str:
    """What the family rests on when the names alone did not tell (weights/lora_alone.py read_lora_alone)."""
    if (alike := fits_alike(sizes)) is not None:
        fitting = [n for n, fits in sizes.items() if fits]
        return (f"family: LoRA for {' or '.join(fitting)}: its layers fit {alike} alike; read here as "
                f"{lora.family}, pass --family to choose (convert.py lora needs it)")
    if sizes.get(lora.family):
        return f"family: LoRA for {lora.family} (by its shapes: {', '.join(sizes[lora.family])})"
    if sizes:
        return (f"family: LoRA for {lora.family} (its names fit {' and '.join(sizes)}, its shapes no released size; "
                "pass --family to choose)")
    return f"family: LoRA for {lora.family}"


def _lora_lines(path, family: str | None = None) -> list[str]:
    lora, sizes = read_lora_alone(path, family)
    parts = [p for mod in lora.modules.values() for p in mod.parts if p is not None]
    ranks, alphas = Counter(p.up.shape[1] for p in parts), Counter(p.alpha for p in parts)
    groups = Counter(re.sub(r"\.\d+\.", ".*.", m) for m in lora.modules)
    blocks = {"double_blocks": 0, "single_blocks": 0, "joint_blocks": 0}
    for m in [*lora.modules, *lora.diffs]:
        head, _, rest = m.partition(".")
        if head in blocks:
            blocks[head] = max(blocks[head], int(rest.split(".")[0]) + 1)
    fits = ", ".join(f"{k} >= {v}" for k, v in blocks.items() if v)
    dev_only = any(m.startswith("guidance_in.") for m in lora.modules)
    lines = [_family_line(lora, sizes), f"layout: {lora.layout}" + (f", {lora.flavour}" if lora.flavour
                                                                          else ""),
             f"rank(s): {dict(ranks)}",
             # alpha as applied: scale alpha / r (an rsLoRA's lora_alpha / sqrt(r) is stated as that alpha)
             f"alpha(s): {dict(alphas)}" + (" (rsLoRA, as alpha / r)" if "rsLoRA" in lora.flavour else ""),
             f"targets: {len(lora.modules)} layers: " + ", ".join(f"{g} x{n}" for g, n in sorted(groups.items())),
             f"fits: {lora.family} with {fits or 'any depth'}"
             + ("; FLUX.1-dev only (has guidance_in)" if dev_only else "")]
    if lora.diffs:
        kinds = Counter("bias" if k.endswith(".bias") else "weight" for k in lora.diffs)
        lines.append(f"full differences: {dict(kinds)} (ComfyUI .diff_b / .diff), added to those parameters")
    if lora.text_encoders:
        found = Counter(next((name for prefix, name in _TEXT_PARTS.items() if k.startswith(prefix)), "other")
                        for k in lora.text_encoders)
        counts = ", ".join(f"{n}: {c}" for n, c in found.items())
        lines.append(f"text encoders: {len(lora.text_encoders)} keys ({counts})"
                     "; generate, make_dataset and train --base_loras apply them (--ignore-te-lora skips them, "
                     "as it leaves them out of convert.py lora and merge)")
    lines.append(f"scfm applies: {len(lora.modules)} LoRA layers" + (f", {len(lora.diffs)} full differences"
                                                                       if lora.diffs else ""))
    return lines


def info_lines(path, family: str | None = None) -> list[str]:
    if (Path(path) / PEFT_FILE).is_file():  # a PEFT save_pretrained folder: its adapter, with its config
        path = Path(path) / PEFT_FILE
    try:
        src = detect(path)
        if src.family == "lora":
            return [f"file: {src.path}", *_lora_lines(path, family)]
    except NotLoRAError as e:  # LoKr, LoHa, DoRA, ...: say what it is and why scfm does not apply it
        return [f"file: {path}", "layout: not a plain LoRA", f"scfm refuses it: {e}"]
    # dtypes as stored: src.header is as read, where a scaled fp8 weight is its fp32 product and the scales hidden
    stored = {k: d for f in src.files for k, (_, d) in read_header(f)[0].items()}
    params = sum(math.prod(s) for s, _ in src.header.values())
    lines = [f"file: {src.path}" + (f" ({len(src.files)} files)" if len(src.files) > 1 else ""),
             f"layout: {src.layout}" + (f" (key prefix {src.prefix!r})" if src.prefix else ""),
             f"dtypes: {dict(Counter(stored.values()))}", f"parameters: {params:,} in {len(src.header)} tensors"]
    scaled = sum(stored[k].startswith("F8") and not d.startswith("F8") for k, (_, d) in src.header.items())
    if scaled:  # ComfyUI's scaled fp8 (weights/io.py): each fp8 weight times its scale, which the counts above hold
        lines.insert(3, f"scaled fp8 (ComfyUI): {scaled} fp8 weights, read times their scales in fp32; "
                        f"{len(stored) - len(src.header)} scale / marker tensors beside them")
    if src.transformer is not None or src.family == "vae":
        cfg = plan_conversion(src, "official").config
        lines.insert(1, f"family: {_variant(src, cfg)}")
        if src.transformer is not None and any(k.startswith("first_stage_model.") for k in src.header):
            clips = any(k.startswith("text_encoders.") for k in src.header)
            lines.append("also holds: VAE (first_stage_model.*)" + (", text encoders" if clips else ""))
    else:
        lines.insert(1, f"family: {src.family.upper()} text encoder")
    return lines


# ----- commands ---------------------------------------------------------------------------------------------


def cmd_info(args) -> None:
    print("\n".join(info_lines(args.path, args.family)))


def _out_dtype(args, src, path) -> torch.dtype | None:
    """--dtype, else the stored dtypes kept, except fp8 transformer weights: read dequantized (times their scales,
    in fp32), kept they would be written in fp32 (four times the fp8 file), and rounded back to fp8 a merged
    LoRA's delta would mostly vanish under e4m3's 3 mantissa bits. Those are written in bf16, said in one line."""
    if args.dtype:
        return DTYPES[args.dtype]
    stored = {k: d for f in src.files for k, (_, d) in read_header(f)[0].items()}  # src.header: as read
    if src.transformer is not None and any(d.startswith("F8") for k, d in stored.items()
                                           if k.startswith(src.prefix) and k.endswith(".weight")):
        print(f"note: {path} stores its transformer's weights in fp8; they are written in bf16 (--dtype fp32 keeps "
              "every bit of the dequantized values; --fp8 quantizes the result again when it is loaded)",
              file=sys.stderr)
        return torch.bfloat16
    return None


def cmd_checkpoint(args) -> None:
    src = detect(args.input)
    out = convert_checkpoint(args.input, args.output, args.to, dtype=_out_dtype(args, src, args.input),
                             overwrite=args.overwrite, shard_bytes=args.shard_size)
    print(f"wrote {out}")
    if src.transformer is not None and (left := outside_transformer(src)):  # said, not silently dropped
        print(f"note: {args.input} also holds {len(left)} tensors outside the transformer (VAE, text encoders: "
              f"{', '.join(sorted({k.split('.')[0] for k in left}))}), which a checkpoint conversion does not "
              "write (merge keeps them)", file=sys.stderr)


def _without_text_encoders(lora, ignore: bool, what: str):
    """--ignore-te-lora: the LoRA without its text-encoder part, said in one line (as generate says it)."""
    if not (ignore and lora.text_encoders):
        return lora
    print(f"--ignore-te-lora: the text-encoder part of {Path(lora.source).name} ({len(lora.text_encoders)} keys) "
          f"is {what}", file=sys.stderr)
    return dataclasses.replace(lora, text_encoders={})


def cmd_lora(args) -> None:
    # Path() drops a trailing slash: the LoRA would be a file named like the folder. An existing folder is never
    # replaced by the file (--overwrite or not): name the file, in it or elsewhere
    if args.output.endswith(("/", os.sep)) or Path(args.output).is_dir():
        where = "an existing folder" if Path(args.output).is_dir() else "a folder"
        raise WeightsError(f"{args.output}: {where}, and a LoRA is one file, not a folder; name a .safetensors "
                           f"file (e.g. {Path(args.output) / Path(args.input).stem}.safetensors)")
    check_output(Path(args.output), args.overwrite, [Path(args.input)])
    # the family by metadata, names, then the released sizes its shapes fit (weights/lora_alone.py read_lora_alone)
    lora, sizes = read_lora_alone(args.input, args.family)
    if (undecided := undecided_family(args.input, sizes)) is not None:
        raise WeightsError(undecided)  # the file's scfm_family and the output's names would be a guess
    if sizes and not any(sizes.values()):  # a model of another size: read_lora's rule chose; say so
        print(f"note: {args.input}: its names fit {' and '.join(sizes)}, its shapes no released size of either; "
              f"read as {lora.family} (pass --family to choose)", file=sys.stderr)
    lora = _without_text_encoders(lora, args.ignore_te_lora, "left out")
    drops = get_family(lora.family).diffusers_kohya_drops
    if args.to == "kohya" and drops is None:
        print(f"note: diffusers has no kohya loader for {get_family(lora.family).title}; ComfyUI and scfm read "
              "this file. For diffusers, convert with --to diffusers", file=sys.stderr)
    elif args.to == "kohya":
        dropped = sorted(m for m in lora.modules if m.startswith(drops))
        if dropped:
            print(f"warning: {len(dropped)} LoRA layers ({', '.join(dropped[:3])}{', ...' if len(dropped) > 3 else ''})"
                  " are written, but diffusers' kohya loader silently drops them; ComfyUI and scfm read them. For "
                  "diffusers, convert with --to diffusers", file=sys.stderr)
    resize = args.rank is not None or args.energy is not None
    if resize or args.dtype:
        before = _lora_bytes(lora)
        lora, report = resize_lora(lora, rank=args.rank, energy=args.energy, dtype=DTYPES.get(args.dtype))
        if resize:
            print(summary(report))
        print(f"LoRA tensors: {before / 1e6:.2f} MB -> {_lora_bytes(lora) / 1e6:.2f} MB")
    # what the source says of its base and its training travels on; the new file's title is its own name
    carried = {k: v for k, v in read_header(peft_file(Path(args.input)))[1].items() if k != "modelspec.title"}
    write_lora(lora, args.output, args.to, overwrite=args.overwrite, metadata=carried)
    print(f"wrote {args.output} ({args.to}, {len(lora.modules)} layers)")


def _lora_bytes(lora) -> int:
    return sum(t.numel() * t.element_size() for mod in lora.modules.values() for p in mod.parts if p is not None
               for t in (p.up, p.down))


def cmd_merge(args) -> None:
    # the LoRAs too: --out L.safetensors --overwrite would replace the user's LoRA (the base's files: write_plan)
    check_output(Path(args.out), args.overwrite, [Path(args.base), *(Path(path) for path, _ in args.lora)])
    base = detect(args.base)
    # the base's family decides names several families share (FLUX.2 [klein] LoRAs use FLUX.1's block names)
    hint = base.family if base.transformer is not None else None
    loras = [(_without_text_encoders(read_lora(path, family=hint), args.ignore_te_lora, "not merged"), scale)
             for path, scale in args.lora]
    out = merge_loras(args.base, loras, args.out, dtype=_out_dtype(args, base, args.base), overwrite=args.overwrite,
                      shard_bytes=args.shard_size)
    print(f"wrote {out} ({len(loras)} LoRA(s) merged)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="convert.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    family_help = ("the model family a LoRA is for ({}), when its layers fit released models of several (an "
                   "attention-only LoRA of FLUX.1 or FLUX.2 [klein] 4B); refused when its metadata or names say "
                   "another").format(", ".join(names()))
    ignore_help = ("{} only the transformer part of the LoRAs: their text-encoder part (kohya lora_te*_, diffusers "
                   "text_encoder*.), which {}, is left out with one line saying so")

    p = sub.add_parser("info", help="family, layout, dtypes, size; a LoRA's ranks, alphas, targets and fit")
    p.add_argument("path", help="a .safetensors file or a model / pipeline folder")
    p.add_argument("--family", choices=names(), help=family_help)
    p.set_defaults(run=cmd_info)

    def common(p, dtype=True):
        if dtype:
            p.add_argument("--dtype", choices=sorted(DTYPES),
                           help="cast float tensors (default: keep; a transformer's fp8 weights: bf16)")
            p.add_argument("--shard-size", type=_size, default="5GB", metavar="SIZE",
                           help="largest shard of a folder output (default 5GB, at least 1MB)")
        p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    p = sub.add_parser("checkpoint", help="Flux BFL <-> diffusers, SD3.5 SAI <-> diffusers, the VAE")
    p.add_argument("input", metavar="IN", help="a file or folder in any supported layout (detected)")
    p.add_argument("output", metavar="OUT", help="*.safetensors for one file, anything else for a folder")
    p.add_argument("--to", required=True, choices=["official", "diffusers"])
    common(p)
    p.set_defaults(run=cmd_checkpoint)

    p = sub.add_parser("lora", help="a LoRA between our, diffusers / PEFT and kohya / ComfyUI layouts")
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT", help="a .safetensors file")
    p.add_argument("--to", required=True, choices=list(LAYOUTS))
    p.add_argument("--rank", type=int, help="cut every slice to at most this rank (truncated SVD: the closest "
                                             "delta of that rank); alpha becomes the new rank")
    p.add_argument("--energy", type=float, metavar="SHARE",
                   help="per slice, the lowest rank keeping this share of the delta's squared norm (e.g. 0.99); "
                        "with --rank, the smaller of the two")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast the LoRA's tensors (default: keep)")
    p.add_argument("--family", choices=names(), help=family_help)
    p.add_argument("--ignore-te-lora", action="store_true",
                   help=ignore_help.format("write", "has no names in another layout"))
    common(p, dtype=False)
    p.set_defaults(run=cmd_lora)

    p = sub.add_parser("merge", help="bake LoRAs into a standalone checkpoint in the base's layout")
    p.add_argument("--base", required=True, metavar="CKPT")
    p.add_argument("--lora", required=True, action="append", type=_lora_arg, metavar="FILE[:SCALE]",
                   help="repeatable; scale 1 when omitted")
    p.add_argument("--out", required=True, metavar="OUT")
    p.add_argument("--ignore-te-lora", action="store_true",
                   help=ignore_help.format("merge", "a merge does not bake into the text encoders"))
    common(p)
    p.set_defaults(run=cmd_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk's own refusals while reading or writing: one line too, not a traceback
        print(f"error: {_os_error(e)}", file=sys.stderr)
        return 2
    return 0


# What to do about the usual OSErrors of a conversion, by errno; anything else: check the path.
_OS_FIXES = {errno.ENOSPC: "free disk space or write OUT to another disk",
             errno.EDQUOT: "free disk space or write OUT to another disk",
             errno.EACCES: "check its permissions or write somewhere else",
             errno.EPERM: "check its permissions or write somewhere else",
             errno.EROFS: "the file system is read-only: write somewhere else",
             errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
             errno.EEXIST: "a file stands where a folder is needed: choose another path",
             errno.EISDIR: "it is a folder: name a file, or remove the folder first",
             errno.ENAMETOOLONG: "choose a shorter name"}


def _os_error(e: OSError) -> str:
    # a rename's error names the temp file first and the user's path second: the second is the one to name
    where = e.filename2 or e.filename
    where = where if where is not None else "(writing the output)"
    return f"{where}: {e.strerror or e}; {_OS_FIXES.get(e.errno, 'check the path and try again')}"


if __name__ == "__main__":
    plain_warnings()
    sys.exit(main())
