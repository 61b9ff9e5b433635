"""`python -m distill.evaluate`: what an SCFM LoRA buys over its teacher at few steps, measured on the demo world.

    python -m distill.evaluate                                   # the shipped demo teacher and its SCFM LoRA
    python -m distill.evaluate --lora run/scfm.safetensors --per-prompt 4 --json eval.json --overwrite

From the same prompts and noises it samples the teacher at --teacher-steps (the reference), the teacher at each of
--steps, and the teacher with the LoRA merged at each of --steps, all with plain Euler on the demo's grid (schnell's
unshifted linear one), and reads every image back with the world's checker (distill/demo/quality.py):

- adherence: percent of images whose read attributes match everything the prompt fixes;
- paired: mean |pixel| difference (0..1) to the reference image from the same noise;
- hist: distance of the read-attribute histograms to the reference's (0: the same distribution of attributes);
- crispness: mean distance of the pixels to the world's palette (lower is crisper); iou: shape-template fit.

The `world` row scores ground-truth renders of the same prompts: the ceiling for adherence and crispness. With
--floor, a `teacher N new noises` row runs the reference sampler from other noises: a sampler that draws exactly the
teacher's distribution still scores its `hist` (finitely many samples), so hist distances mean little below it. The table
is printed; --json writes it with the settings used, --grid a PNG with one column per prompt (its first noise) and
one row per table row. Existing files are never replaced without --overwrite.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sampling.demo import DEMO_FOLDER, DEMO_LORA
from sampling.options import OneLineParser, check_device, check_writable, read_prompt_lines
from weights.io import WeightsError

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
    p.add_argument("--model", type=Path, default=DEMO_FOLDER, help="the teacher's pipeline folder (default: the demo)")
    p.add_argument("--lora", type=Path, default=DEMO_LORA, help="the SCFM LoRA, any layout (default: the demo's)")
    p.add_argument("--lora-scale", type=float, help="default: the LoRA's recommended scale, else 1")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--prompts", nargs="+", metavar="TEXT", help="default: distill/demo/quality.PROMPTS")
    which.add_argument("--prompts-file", type=Path, help="one prompt per line")
    p.add_argument("--per-prompt", type=int, default=16, help="noises per prompt")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--teacher-steps", type=int, default=32, help="steps of the reference run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shift", type=float,
                   help="sample the --steps rows (teacher and LoRA) on the SCFM grid with this shift, as a LoRA "
                        "trained with shift_min/shift_max > 1 is meant to be sampled (default: the demo's grid)")
    p.add_argument("--fp8", action="store_true",
                   help="sample the LoRA rows (named scfm-fp8) with the transformer blocks' weights in e4m3, the "
                        "LoRA merged before rounding, as `generate --fp8 --lora` does; teacher rows stay fp32")
    p.add_argument("--fp8-compute", "--fp8_compute", action="store_true",
                   help="as --fp8, with the LoRA rows' GEMMs on fp8 tensor cores (named scfm-fp8c; an exact "
                        "emulation on the CPU)")
    p.add_argument("--compile", action="store_true", help="compile each transformer block once (torch.compile)")
    p.add_argument("--floor", action="store_true",
                   help="add a row: the reference sampler from other noises (the distances' floor)")
    p.add_argument("--json", type=Path, help="write the table and settings here")
    p.add_argument("--grid", type=Path, default=Path("evaluate_grid.png"), help="PNG of the first noise per prompt")
    p.add_argument("--no-grid", action="store_true", help="write no grid")
    p.add_argument("--grid-scale", type=int, default=2, help="nearest-neighbour upscaling of the grid")
    p.add_argument("--overwrite", action="store_true", help="replace existing --json / --grid files")
    p.add_argument("--device", default="cpu", help="cuda works too; results differ from the CPU's by rounding")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (the demo models gain little from more)")
    return p


def _prompts(args) -> tuple[str, ...]:
    if args.prompts_file is None:
        return tuple(args.prompts or quality.PROMPTS)
    return tuple(read_prompt_lines(args.prompts_file, "--prompts-file"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()  # restored on the way out: main() is also called in-process (tests)
    try:
        if args.threads < 1 or args.grid_scale < 1:
            raise ValueError("--threads and --grid-scale must be positive integers")
        torch.set_num_threads(args.threads)
        outputs = [p for p in (args.json, None if args.no_grid else args.grid) if p is not None]
        cfg = EvalConfig(model=args.model, lora=args.lora, prompts=_prompts(args), per_prompt=args.per_prompt,
                         steps=tuple(args.steps), teacher_steps=args.teacher_steps, seed=args.seed,
                         lora_scale=args.lora_scale, device=args.device, floor=args.floor, shift=args.shift,
                         fp8=args.fp8, fp8_compute=args.fp8_compute, compile=args.compile)
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
    except (WeightsError, ValueError, OSError) as e:
        raise SystemExit("evaluate: " + " ".join(str(e).split())) from None
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
