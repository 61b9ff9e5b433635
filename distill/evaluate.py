"""`python -m distill.evaluate`: what an SCFM LoRA buys over its teacher at few steps.

    python -m distill.evaluate                                   # the shipped demo teacher and its SCFM LoRA
    python -m distill.evaluate --lora run/scfm.safetensors --per-prompt 4 --json eval.json --overwrite
    python -m distill.evaluate --model FLUX.1-dev/ --lora run/scfm.safetensors --compare hyper.safetensors:0.125 \
        --prompts-file prompts.txt --per-prompt 8 --steps 2 4 8 --teacher-steps 32 --out eval/

Any model, with --out (distill/judge.py): rows of the same prompts and noises (the teacher at --teacher-steps, the
reference; the teacher, the --lora student and each --compare LoRA at every --steps; --base-lora under all of them;
the teacher rows at the guidance the --lora recommends, the teacher it was distilled with, unless --guidance),
every image a generate PNG with its final latent under OUT/<row>/ beside a manifest (a rerun renders only what is
missing; a row whose settings changed is refused without --overwrite), OUT/report.json and OUT/grid.png (--json,
--grid, --no-grid, --grid-scale and --floor are the demo table's). Rows are named by their LoRA file's name, with its
parent folders when two files share it (runs/a/x.safetensors and runs/b/x.safetensors: a/x and b/x). Per row,
against the reference from the same noise: mean |d| (pixels, 0..1), PSNR (dB; identical: null), SSIM, the latents'
MSE; as sets, on the final latents average-pooled to 4 x 4 per channel (the VAE's space, coarsened: colour and
layout, no fine texture or semantics): the Fréchet distance (fd; biased upward with fewer images than features,
a warning says so) and KID; across each prompt's noises: the mean pairwise distance and the Vendi score (diversity:
1 = all alike, N = all different); distill/metrics.py defines each, null where undefined (fd and kid need two
images per row, diversity two noises per prompt). NFE, and sec/img: seconds per image of the sampler's calls and
the VAE decode, after a warm-up call; not the text encoders, the LoRA merge or PNG writing, which each row here
repeats and a user's run pays once. With --clip-vision (your CLIP weights): CLIP score (100 max(cos, 0) of image and
prompt embeddings), and the Fréchet distance and CMMD of the CLIP image embeddings to the reference's. On the demo
the world's adherence and hist columns are added (and style with --world variant).

Without --out, on the demo world:

From the same prompts and noises it samples the teacher at --teacher-steps (the reference), the teacher at each of
--steps, and the teacher with the LoRA merged at each of --steps, all with plain Euler on the demo's grid (schnell's
unshifted linear one), and reads every image back with the world's checker (distill/demo/quality.py):

- adherence: percent of images whose read attributes match everything the prompt fixes;
- paired: mean |pixel| difference (0..1) to the reference image from the same noise;
- hist: distance of the read-attribute histograms to the reference's (0: the same distribution of attributes);
- crispness: mean distance of the pixels to the world's palette (lower is crisper); iou: shape-template fit;
- style, with --world variant (the checker then reads the swapped palette and the world row is drawn in it): percent
  of the colour-naming prompts drawn the variant's way, e.g. whether a style LoRA (--lora) took.

The `world` row scores ground-truth renders of the same prompts: the ceiling for adherence and crispness. With
--floor, a `teacher N new noises` row runs the reference sampler from other noises: a sampler that draws exactly the
teacher's distribution still scores its `hist` (finitely many samples), so hist distances mean little below it. The
table is printed; --json writes it with the settings used, --grid a PNG with one column per prompt (its first noise)
and one row per table row. Existing files are never replaced without --overwrite.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

from sampling.demo import DEMO_FOLDER, DEMO_LORA, IMAGE_SIZE, demo_lora
from sampling.flags import add_model_files
from sampling.options import (
    MAX_STEPS,
    OneLineParser,
    add_run_options,
    check_device,
    check_writable,
    one_scale,
    plain_warnings,
    read_prompt_lines,
)
from weights.families import detect_family
from weights.io import WeightsError, parse_lora
from weights.lora_merge import lora_spec

from .demo import quality
from .evaluation import (
    EvalConfig,
    check,
    check_grid_scale,
    evaluate,
    format_table,
    refuse_existing,
    write_grid,
    write_json,
)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m distill.evaluate", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_files(p)  # generate's: --model (default: the demo), --vae, --clip, ..., --lora (the student)
    p.add_argument("--lora-scale", type=float, help="default: the LoRA's recommended scale, else 1")
    p.add_argument("--compare", action="append", default=[], metavar="PATH[:SCALE]",
                   help="another few-step LoRA, a row per --steps (repeatable)")
    p.add_argument("--compare-model", action="append", default=[], metavar="MODEL",
                   help="with --out: another whole few-step model (a pipeline folder, e.g. FLUX.1-schnell), a row per "
                        "--steps on its own schedule, from the same noises (repeatable)")
    p.add_argument("--base-lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a LoRA under every row, the reference included (a style LoRA the student was trained on)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--prompts", nargs="+", metavar="TEXT", help="the prompts' text (a file of them: "
                       "--prompts-file) (default: distill/demo/quality.PROMPTS)")
    which.add_argument("--prompts-file", type=Path, metavar="FILE", help="a text file, one prompt per line")
    p.add_argument("--per-prompt", type=int, default=16, help="noises per prompt [16]")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="the few-step rows' step counts [1 2 4 8]")
    p.add_argument("--teacher-steps", type=int, default=32, help="steps of the reference run [32]")
    p.add_argument("--seed", type=int, default=0, help="the first noise's seed [0]")
    p.add_argument("--shift", type=float,
                   help="sample the --steps rows (teacher and LoRA) on the SCFM grid with this shift, as a LoRA "
                        "trained with shift_min/shift_max > 1 is meant to be sampled (default: the demo's grid; "
                        "with --out, the LoRA's own)")
    p.add_argument("--guidance", type=float,
                   help="with --out: the teacher rows' guidance, as generate's --guidance for the family (FLUX.1: "
                        "its guidance input; SD3.5 and klein: the CFG scale) (default: the one the --lora "
                        "recommends, the teacher it was distilled with, else generate's default)")
    p.add_argument("--width", type=int, help="with --out: image width (default: 1024; the demo 64)")
    p.add_argument("--height", type=int, help="with --out: image height (default: as --width)")
    p.add_argument("--out", type=Path, help="any model: render the rows into this folder and report there (below)")
    p.add_argument("--world", choices=["base", "variant"], default="base",
                   help="on the demo: the world whose colours the checker reads and the world row draws (variant: "
                        "the swapped palette, the own-LoRA demo's style, distill/demo/world.py); adds a style column")
    p.add_argument("--clip-vision", metavar="CLIP", help="with --out: your CLIP weights (a transformers CLIPModel "
                   "folder or safetensors file, e.g. clip-vit-large-patch14) for CLIP score and the Fréchet "
                   "distance and CMMD in CLIP space; never downloaded")
    add_run_options(p.add_argument_group("run (--fp8 / --fp8-compute: on the demo, the LoRA rows only)"))
    p.add_argument("--floor", action="store_true",
                   help="add a row: the reference sampler from other noises (the distances' floor; without --out)")
    p.add_argument("--json", type=Path, help="write the table and settings here (without --out)")
    p.add_argument("--grid", type=Path, help="PNG of the first noise per prompt (default: evaluate_grid.png; "
                   "without --out)")
    p.add_argument("--no-grid", action="store_true", help="write no grid (without --out)")
    p.add_argument("--grid-scale", type=int, help="nearest-neighbour upscaling of the grid (default: 2; without "
                   "--out)")
    p.add_argument("--overwrite", action="store_true", help="replace existing --json / --grid files; with --out, "
                   "rows rendered with other settings")
    p.add_argument("--threads", type=int, help="CPU threads (default: 2 without --out, the demo models gain little "
                   "from more; with --out, PyTorch's default)")
    return p


def _prompts(args) -> tuple[str, ...]:
    if args.prompts_file is None:
        check_prompt_text(args.prompts or ())
        return tuple(args.prompts or quality.PROMPTS)
    return tuple(read_prompt_lines(args.prompts_file, "--prompts-file"))


def check_prompt_text(prompts) -> None:
    """--prompts takes the text itself; make_dataset's --prompts reads a file, so `--prompts p3.txt` here would
    score the file's name as the prompt, silently, into every row and report: refused for a file that exists, and
    for one word ending in .txt (a file name mistyped or in another folder), naming the flag that reads one."""
    for text in prompts:
        # os.path's: False for a prompt too long to be a file name, where Path.is_file raises
        is_file = os.path.isfile(os.path.expanduser(text))
        if is_file or (Path(text).suffix.lower() == ".txt" and len(text.split()) == 1):
            where, fix = (("a file", text) if is_file else ("a file name (no such file here)", "FILE"))
            raise ValueError(f"--prompts {text}: {where}, but --prompts takes the prompt text; pass --prompts-file "
                             f"{fix} to read one prompt per line")


# Flags that only the --out mode reads (any model: distill/judge.py): the demo world's table has no place for them
OUT_ONLY = ("vae", "clip", "clip_g", "t5", "no_t5", "clip_tokenizer", "clip_g_tokenizer", "t5_tokenizer", "qwen",
            "qwen_tokenizer", "variant", "ignore_te_lora", "compare", "compare_model", "base_lora", "width",
            "height", "clip_vision", "dtype", "blocks_to_swap", "guidance")
# and those only the demo table reads: --out writes OUT/report.json and OUT/grid.png and has no floor row
TABLE_ONLY = ("json", "grid", "no_grid", "grid_scale", "floor")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _main(parser, args)
    except KeyboardInterrupt:  # a traceback of whatever was sampling says nothing to the user
        # generate's and make_dataset's form: `interrupted: what is left`
        again = ": run it again to continue with the rows done" if args.out is not None else ""
        print(f"interrupted{again}", file=sys.stderr)
        return 130
    except (WeightsError, ValueError, OSError) as e:  # every refusal: one line and status 2, as the other commands
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # a message with line breaks: still one line
        return 2


def check_steps(args) -> None:
    """The step counts before anything loads: at most sampling.options.MAX_STEPS, as generate's."""
    if args.per_prompt < 1 or args.teacher_steps < 1 or min(args.steps) < 1:
        raise ValueError("--per-prompt, --steps and --teacher-steps must be positive integers")
    if max(args.teacher_steps, *args.steps) > MAX_STEPS:
        raise ValueError(f"--steps / --teacher-steps {max(args.teacher_steps, *args.steps)}: at most {MAX_STEPS}; "
                         "pass fewer steps")


def check_table_outputs(args) -> None:
    """The demo table's --json and --grid, refused in one line before the run: each would otherwise be lost or
    fail only after minutes of sampling."""
    if args.no_grid and (args.grid is not None or args.grid_scale is not None):
        raise ValueError("--no-grid with --grid / --grid-scale: pass one or the other")
    grid = None if args.no_grid else args.grid or Path("evaluate_grid.png")
    if args.json is not None and grid is not None and args.json.resolve() == grid.resolve():
        raise ValueError(f"--json and --grid are both {grid}: one would replace the other; pass two file names")
    if grid is not None and grid.suffix.lower() != ".png":
        raise ValueError(f"--grid {grid}: the grid is a PNG; name it *.png")
    for flag, path in (("--json", args.json), ("--grid", grid)):
        if path is not None and (str(path) in ("", ".") or path.is_dir()):
            raise ValueError(f"--{flag[2:]} {str(path) or repr('')}: a folder or empty; pass a file path")


def _main(parser, args) -> int:
    if args.out is not None:
        unread = [f"--{name.replace('_', '-')}" for name in TABLE_ONLY if getattr(args, name) not in (None, False)]
        fixes = [f"it writes {args.out}/report.json and {args.out}/grid.png, so drop them"] if unread else []
        if len(args.lora) > 1:
            unread.append("a second --lora")
            fixes.append("pass the other LoRAs as --compare PATH[:SCALE]")
        if unread:  # refused before anything loads: a run that ignored them would look as if it had read them
            raise ValueError(f"{', '.join(unread)}: not read with --out; {'; '.join(fixes)}")
        return judge_main(args)
    unread = [f"--{name.replace('_', '-')}" for name in OUT_ONLY if getattr(args, name) != parser.get_default(name)]
    unread += ["a second --lora"] if len(args.lora) > 1 else []
    if unread:  # read by --out alone: taking them silently would print a table that ignored them
        raise ValueError(f"{', '.join(unread)}: read with --out DIR only (any model, the demo's too); "
                         "the demo world's table takes the demo model and one --lora")
    args.model = DEMO_FOLDER if args.model is None else Path(args.model)
    check_steps(args)
    check_table_outputs(args)
    if args.lora:  # the demo world's rows take one LoRA: PATH[:SCALE] (no header read yet: errors come below)
        path, scale = parse_lora(demo_lora(args.lora[0]))
        args.lora = Path(path)
        args.lora_scale = one_scale(scale, args.lora_scale, "--lora PATH:SCALE and --lora-scale")
    else:
        args.lora = DEMO_LORA
    args.grid = Path("evaluate_grid.png") if args.grid is None else args.grid
    args.grid_scale = 2 if args.grid_scale is None else args.grid_scale
    args.threads = 2 if args.threads is None else args.threads
    threads = torch.get_num_threads()  # restored on the way out: main() is also called in-process (tests)
    try:
        if args.threads < 1 or args.grid_scale < 1:
            raise ValueError("--threads and --grid-scale must be positive integers")
        torch.set_num_threads(args.threads)
        outputs = [p for p in (args.json, None if args.no_grid else args.grid) if p is not None]
        cfg = EvalConfig(model=args.model, lora=args.lora, prompts=_prompts(args), per_prompt=args.per_prompt,
                         steps=tuple(args.steps), teacher_steps=args.teacher_steps, seed=args.seed,
                         lora_scale=args.lora_scale, device=args.device, floor=args.floor, shift=args.shift,
                         fp8=args.fp8, fp8_compute=args.fp8_compute, compile=args.compile, world=args.world)
        check(cfg)  # inputs, then outputs: both before the run, not after minutes of sampling
        check_device(cfg.device)
        if not args.no_grid:
            check_grid_scale(cfg, args.grid_scale)
        refuse_existing(outputs, args.overwrite)
        for flag, path in (("--json", args.json), ("--grid", None if args.no_grid else args.grid)):
            if path is not None:  # a few MB at most: the grid is 64-px tiles
                check_writable(path.parent, flag, path, need_bytes=1 << 20)
        report = evaluate(cfg)
        print(format_table(report["rows"]))
        refuse_existing(outputs, args.overwrite)  # a file that appeared meanwhile is still someone's
        if args.json is not None:
            write_json(args.json, {"config": report["config"], "rows": report["rows"]})
            print(f"wrote {args.json}")
        if not args.no_grid:
            write_grid(args.grid, report["grid"], args.grid_scale, report)
            print(f"wrote {args.grid} (rows: {', '.join(r['name'] for r in report['rows'])})")
    finally:
        torch.set_num_threads(threads)
    return 0


def check_cfg_guidance(args) -> None:
    """--guidance below 1 on a family guided by CFG (SD3.5, klein), where it is the teacher rows' CFG scale: off
    below 1 as at 1, which generate refuses. Refused here from the model's headers, before anything loads, in
    evaluate's own flag (generate's refusal, met after loading, names --cfg)."""
    if args.guidance is None or args.guidance >= 1:
        return
    family = detect_family(Path(args.model or DEMO_FOLDER).expanduser())
    if family.guidance == "cfg":
        raise ValueError(f"--guidance {args.guidance:g}: on {family.display} it is the teacher rows' CFG scale, "
                         "which must lie in [1, inf) (1 = no CFG); pass --guidance 1 to judge the teacher without "
                         "CFG, or above 1 to use it")


def check_image_size(args) -> None:
    """--width / --height (defaults: the demo's 64, else 1024; --height alone keeps its height, --width alone sets
    both) against each model's multiple and largest side, from its configs before any weight loads or any row's
    folder is made. Each flag is checked beside a valid other side, so the one refused is the one the user gave."""
    from sampling.components import pipeline_from_args
    from sampling.job import check_sizes

    default = IMAGE_SIZE if args.model is None else 1024
    # `is None`, not `or`: --width 0 is refused by check_sizes, not silently replaced by the default
    args.width = default if args.width is None else args.width
    args.height = args.width if args.height is None else args.height
    check_sizes(args, default)  # generate's: positive, at most MAX_SIDE
    for flag, model in [("--model", args.model), *(("--compare-model", m) for m in args.compare_model)]:
        path = Path(model or DEMO_FOLDER).expanduser()
        try:  # a missing or unreadable model in its flag's name (a --compare-model's: after the other rows)
            family = detect_family(path)
        except (WeightsError, ValueError) as e:
            raise type(e)(f"{flag} {e}" if model is not None else str(e)) from None
        pipe = pipeline_from_args(args, path, family)  # a missing --vae, --t5, ...: named by their flags
        multiple = pipe.size_multiple()
        try:
            pipe.latent_size(multiple, args.width)  # names --width
            pipe.latent_size(args.height, multiple)  # names --height
        except ValueError as e:
            raise ValueError(f"{e} (--compare-model {model})" if flag == "--compare-model" else str(e)) from None


def judge_main(args) -> int:
    """Any model (distill/judge.py): the rows rendered into --out, the table printed, report.json written."""
    from .judge import check_out, judge
    from .judge_scores import format_report

    threads = torch.get_num_threads()
    try:
        if args.threads is not None:  # the CPU's share of the work (all of it with --device cpu)
            if args.threads < 1:
                raise ValueError(f"--threads {args.threads}: must be a positive integer; pass --threads 2")
            torch.set_num_threads(args.threads)
        if args.model is not None and not args.prompts and args.prompts_file is None:
            raise ValueError("no prompts: pass --prompts-file FILE (one per line) or --prompts TEXT ...")
        check_steps(args)
        if args.shift is not None and not (math.isfinite(args.shift) and args.shift > 0):
            raise ValueError(f"--shift {args.shift}: must be a positive number (1 = unshifted, ~3 = the recipe's)")
        if args.lora_scale is not None and not math.isfinite(args.lora_scale):
            raise ValueError(f"--lora-scale {args.lora_scale}: must be a finite number; pass --lora-scale 1")
        if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance > 0):
            raise ValueError(f"--guidance {args.guidance}: must be a positive number (SD3.5-large's CFG: 4.5)")
        check_cfg_guidance(args)
        if args.lora_scale is not None and not args.lora:
            raise ValueError("--lora-scale without --lora: pass --lora PATH (the student), or a --compare "
                             "PATH:SCALE")
        args.lora, args.compare, args.base_lora = ([demo_lora(s) for s in v] for v in (args.lora, args.compare,
                                                                                        args.base_lora))
        if args.lora:  # one scale, from PATH:SCALE or --lora-scale (both: they must agree)
            try:
                path, scale = lora_spec(args.lora[0])
            except WeightsError as e:  # a folder without a PEFT save, a missing file: in the flag's name
                raise WeightsError(f"--lora {e}") from None
            given = parse_lora(args.lora[0])[1]
            scale = one_scale(given, args.lora_scale, "--lora PATH:SCALE and --lora-scale")
            if scale is not None:
                args.lora = [f"{path}:{scale}", *args.lora[1:]]
        args.prompt_list = _prompts(args)
        check_image_size(args)
        check_out(args)
        report = judge(args)
        print(format_report(report))
        print(f"wrote {args.out / 'report.json'} and {args.out / 'grid.png'}")
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    plain_warnings()
    raise SystemExit(main())
