"""`python -m sampling.generate`: text to PNG with a Flux model, optionally with SCFM and style LoRAs.

    python -m sampling.generate --model FLUX.1-dev/ --prompt "a red fox in the snow" --steps 28
    python -m sampling.generate --model flux1-dev.safetensors --vae ae.safetensors --clip clip_l.safetensors \
        --t5 t5xxl_fp16.safetensors --t5-tokenizer t5_tokenizer/ --prompt "..." --lora scfm.safetensors:1.25

Every PNG carries its generation parameters (seed included) in a text chunk; existing files are never replaced
without --overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from weights.io import WeightsError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_lora(spec: str) -> tuple[str, float]:
    """`PATH[:SCALE]`: the suffix is a scale only if it parses as a number, so `C:\\loras\\x.safetensors` works."""
    path, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sampling.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model files")
    src.add_argument("--model", required=True, help="diffusers Flux pipeline folder, or the transformer file/folder")
    src.add_argument("--vae", help="ae.safetensors or a diffusers vae/ folder (default: the pipeline folder's)")
    src.add_argument("--clip", help="CLIP-L file or folder (default: the pipeline folder's text_encoder/)")
    src.add_argument("--t5", help="T5-XXL file or folder (default: the pipeline folder's text_encoder_2/)")
    src.add_argument("--clip-tokenizer", help="CLIP tokenizer folder (default: the vendored CLIP vocabulary)")
    src.add_argument("--t5-tokenizer", help="T5 spiece.model / tokenizer.json / folder")
    src.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                     help="a LoRA to merge, with an optional scale; repeatable")
    gen = p.add_argument_group("generation")
    gen.add_argument("--prompt", action="append", default=[], help="repeatable")
    gen.add_argument("--prompts-file", help="a text file, one prompt per line")
    gen.add_argument("--negative-prompt", help="used with --true-cfg > 1")
    gen.add_argument("--steps", type=int, default=28)
    gen.add_argument("--schedule", choices=["diffusers", "scfm"], default="diffusers",
                     help="sigma grid: the scheduler's, or SCFM's shifted linspace")
    gen.add_argument("--shift", help="a fixed shift (e.g. 3) or 'dynamic'; default: the schedule's own")
    gen.add_argument("--guidance", type=float, default=3.5, help="Flux-dev guidance embedding value")
    gen.add_argument("--true-cfg", type=float, default=1.0, help="> 1 with --negative-prompt: real CFG")
    gen.add_argument("--max-sequence-length", type=int, default=512, help="T5 tokens (SCFM recipe: 256)")
    gen.add_argument("--width", type=int, default=1024)
    gen.add_argument("--height", type=int, default=1024)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch-size", type=int, default=1, help="images per prompt, seeds seed, seed+1, ...")
    run = p.add_argument_group("run")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--dtype", choices=list(DTYPES), default="bf16" if torch.cuda.is_available() else "fp32")
    run.add_argument("--out", default="outputs", help="a folder, or a .png path for a single image")
    run.add_argument("--overwrite", action="store_true", help="replace existing files")
    return p


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            prompts += [ln.strip() for ln in Path(args.prompts_file).read_text().splitlines() if ln.strip()]
        except OSError as e:
            raise ValueError(f"--prompts-file {args.prompts_file}: {e.strerror}") from None
    if not prompts:
        raise ValueError("no prompt: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


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


def save_png(image, path: Path, params: dict) -> None:
    """Atomically: a crash never leaves half a PNG under the final name."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps(params))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def run(args) -> list[Path]:
    from tqdm import tqdm

    from .pipeline import FluxPipeline, FluxSources, GenerationConfig, to_pil

    prompts = _prompts(args)
    model = Path(args.model).expanduser()
    if not model.exists():
        raise WeightsError(f"--model {model}: no such file or folder")
    files = dict(vae=args.vae, clip=args.clip, t5=args.t5, clip_tokenizer=args.clip_tokenizer,
                 t5_tokenizer=args.t5_tokenizer)
    files = {k: Path(v) for k, v in files.items() if v}
    sources = FluxSources.from_folder(model, **files) if (model / "model_index.json").exists() else \
        FluxSources(transformer=model, **files)
    sources.check()
    pipe = FluxPipeline(sources, device=args.device, dtype=DTYPES[args.dtype])
    if args.lora:
        from weights.lora import apply_loras  # noqa: PLC0415  (only when asked: keeps --help fast)

        loras = [parse_lora(s) for s in args.lora]
        # one-shot generation never unloads, so no copy of the touched weights is kept
        pipe.transformer_hooks.append(lambda m: apply_loras(m, loras, restorable=False))
    shift = args.shift if args.shift in (None, "dynamic") else float(args.shift)
    cfg = GenerationConfig(
        height=args.height, width=args.width, steps=args.steps, guidance=args.guidance, true_cfg=args.true_cfg,
        negative_prompt=args.negative_prompt, max_sequence_length=args.max_sequence_length, grid=args.schedule,
        shift=shift,
    )
    paths = _targets(args, len(prompts) * args.batch_size)
    pipe.latent_size(args.height, args.width)  # a bad size fails before any model is loaded
    with_negative = args.negative_prompt is not None and args.true_cfg > 1
    conds = pipe.encode(prompts + ([args.negative_prompt] * len(prompts) if with_negative else []),
                        cfg.max_sequence_length)  # encoders run once, then are freed
    cond = {k: v[: len(prompts)] for k, v in conds.items()}
    negative = {k: v[len(prompts):] for k, v in conds.items()} if with_negative else None
    written: list[Path] = []
    with tqdm(total=args.batch_size * args.steps, desc="sampling", unit="step") as bar:
        for b in range(args.batch_size):
            cfg.seed = args.seed + b
            latents = pipe.sample(cond, cfg, negative=negative, callback=lambda *_: bar.update(1))
            for i, (prompt, image) in enumerate(zip(prompts, to_pil(pipe.decode(latents)))):
                path = paths[b * len(prompts) + i]
                params = dict(prompt=prompt, seed=cfg.seed, steps=cfg.steps, guidance=cfg.guidance,
                              true_cfg=cfg.true_cfg, negative_prompt=cfg.negative_prompt, schedule=cfg.grid,
                              shift=cfg.shift, width=cfg.width, height=cfg.height, model=str(model),
                              loras=args.lora, max_sequence_length=cfg.max_sequence_length)
                save_png(image, path, params)
                written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for path in run(args):
            print(path)
    except (WeightsError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
