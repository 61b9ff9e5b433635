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
A1111 / Forge's PNG Info and Civitai read, and as our JSON (sampling.png_record.read_png_params); existing files are
never replaced without --overwrite.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from weights.io import WeightsError

from .components import pipeline_from_args
from .demo import IMAGE_SIZE
from .flags import build_parser
from .from_png import from_png
from .job import (
    check_args,
    check_job,
    check_sizes,
    output_paths,
    prompt_list,
    render,
    resolve,
    with_demo_defaults,
)
from .options import check_writable, out_of_memory, plain_warnings


@dataclasses.dataclass
class Progress:
    """How far a run got: the PNGs it will write once its flags are checked, and those written (whole: each is
    renamed into place once saved), for the line an interrupted run prints."""

    planned: list[Path] = dataclasses.field(default_factory=list)
    written: list[Path] = dataclasses.field(default_factory=list)

    def interrupted(self) -> str:
        if not self.planned:
            return "interrupted: no image written"
        if len(self.planned) == 1 and not self.written:
            return f"interrupted: {self.planned[0]} not written"
        where = self.planned[0] if len(self.planned) == 1 else self.planned[0].parent
        return f"interrupted: {len(self.written)} of {len(self.planned)} images written to {where}"


def run(args, progress: Progress | None = None) -> list[Path]:
    from tqdm import tqdm

    progress = Progress() if progress is None else progress
    png = from_png(args) if args.from_png else None
    check_args(args)
    prompts = prompt_list(args)
    default_side = IMAGE_SIZE if args.model is None else 1024
    with_demo_defaults(args)
    check_sizes(args, default_side)
    paths = progress.planned = output_paths(args, len(prompts) * args.batch_size)
    # before any model loads: an unwritable --out used to fail only when the first PNG was saved
    check_writable(paths[0].parent, "--out", args.out,
                   need_bytes=len(paths) * (3 * args.width * args.height + 65536))  # raw RGB bounds a PNG
    job = resolve(args, prompts, png)
    pipe = pipeline_from_args(args, job.model, job.family, job.loras)
    check_job(pipe, job)
    with tqdm(total=args.batch_size * job.cfg.steps, desc="sampling", unit="step") as bar:
        return render(pipe, job, paths, args.batch_size, args.seed, callback=lambda *_: bar.update(1),
                      written=progress.written)


def main(argv: list[str] | None = None) -> int:
    args = build_parser(__doc__).parse_args(argv)
    progress = Progress()
    try:
        for path in run(args, progress):
            print(path)
    except KeyboardInterrupt:  # Ctrl-C: the PNGs written are listed as a finished run lists them, then one line
        for path in progress.written:
            print(path)
        print(progress.interrupted(), file=sys.stderr)
        return 130
    except (WeightsError, ValueError, OSError) as e:  # OSError: a disk that fills up or vanishes while writing
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print(out_of_memory(args, "fewer prompts per run or a smaller --width / --height"), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    plain_warnings()
    sys.exit(main())
