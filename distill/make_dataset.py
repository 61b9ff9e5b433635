"""`python -m distill.make_dataset`: render a teacher dataset (distill/teacher_data.py says how)."""

from __future__ import annotations

import sys

import torch

from sampling.components import refuse_lora_model
from sampling.options import out_of_memory, plain_warnings
from weights.io import WeightsError

from .teacher_data import build_parser, run


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        refuse_lora_model(args.model)  # before teacher_data guesses a family from the LoRA's layer names
        print(run(args))
    except (WeightsError, ValueError, OSError) as e:  # OSError: a disk that fills up or vanishes while writing
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every finished image is listed (render writes its row after its PNG): none is lost
        print(f"interrupted: rerun the same command to continue where it stopped ({args.out})", file=sys.stderr)
        return 130
    except torch.OutOfMemoryError:
        print(out_of_memory(args, "a smaller --batch-size (it goes on where it stopped)"), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    plain_warnings()
    sys.exit(main())
