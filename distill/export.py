"""`python -m distill.export`: a checkpoint's LoRA set as the files the run's final export writes
(distill/lora_export.py says what a checkpoint holds and how the files are named).

    python -m distill.export runs/a                      # the newest checkpoint, in the run's set and layouts
    python -m distill.export runs/a/checkpoints/step-001200 --set slow_ema --formats kohya
"""

from __future__ import annotations

import argparse
import sys

from sampling.options import OneLineParser, plain_warnings
from weights.io import WeightsError

from .config import ConfigError
from .lora_export import export_checkpoint

# The LoRA sets a checkpoint holds, as the config's export_set takes them (distill/config.py)
SETS = ("live", "fast_ema", "slow_ema")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m distill.export", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a run folder (its newest intact checkpoint) or a checkpoints/step-N folder")
    p.add_argument("--set", dest="lora_set", help=f"LoRA set: {', '.join(SETS)} (default: the run's export_set)")
    p.add_argument("--formats", nargs="+", choices=["ours", "diffusers", "kohya"],
                   help="file layouts (default: the run's export_formats)")
    p.add_argument("--output", help="folder for the files (default: the run folder)")
    p.add_argument("--overwrite", action="store_true", help="replace files that exist")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.lora_set and args.lora_set not in SETS:  # the config's own refusal would name export_set
            raise ConfigError(f"--set {args.lora_set}: no such LoRA set; pass {', '.join(SETS)} (or leave --set "
                              "out for the run's export_set)")
        for path in export_checkpoint(args.source, args.lora_set, args.formats, args.output, args.overwrite):
            print(path)
    except (ConfigError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    plain_warnings()
    sys.exit(main())
