"""`python -m distill.demo.render_world`: ground-truth renders of the demo world as a training folder.

    python -m distill.demo.render_world --world variant --n 512 --out data/pastel

Writes `{W}x{H}_{i:06d}.png` and `metadata.jsonl` lines {"file_name", "prompt"} (the layout `distill.train --data`
reads): scenes sampled from --seed with their captions, drawn in --world's colours. The `variant` world (the
palette swapped: red shapes drawn blue, ...) is the own-LoRA demo's "style" (README: Make your own LoRA fast): a
LoRA trained on it with `--objective flow_matching` makes the demo teacher draw that way. An existing non-empty
folder is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .world import SIZE, WORLDS, sample


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distill.demo.render_world", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--n", type=int, default=512, help="images")
    p.add_argument("--world", choices=list(WORLDS), default="variant")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from PIL import Image

    if args.n < 1:
        print(f"error: --n {args.n}: must be 1 or more", file=sys.stderr)
        return 2
    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: --out {args.out}: not empty; pass a new folder", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    images, captions, _ = sample(args.seed, args.n, world=args.world)
    with open(args.out / "metadata.jsonl", "w") as meta:
        for i, (image, caption) in enumerate(zip(images, captions)):
            name = f"{SIZE}x{SIZE}_{i:06d}.png"
            Image.fromarray(image).save(args.out / name)
            meta.write(json.dumps({"file_name": name, "prompt": caption}) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
