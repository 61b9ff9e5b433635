"""Render a teacher dataset the way the released recipe does (`python -m distill.make_dataset` is its command
line; `python -m distill.train` calls it for the demo).

    python -m distill.make_dataset --model FLUX.1-dev/ --prompts prompts.txt --out teacher_data/ \
        --images-per-bucket 500

Image j of bucket b uses prompt (j * buckets + b) mod P (so prompts spread over the buckets) and its own seed
(seed + job number), 32 Euler steps of the model's own schedule at guidance 3.5 (docs/method.md §7; FLUX.2
[klein] base: its pipeline's 50 steps at real CFG 4, against the empty prompt). The
folder gets `{W}x{H}_{j:06d}.png` files and `metadata.jsonl` lines {"file_name", "prompt"}: the layout
`python -m distill.train --data` reads. Killed and restarted with the same arguments, it continues where it
stopped; with different arguments it refuses to mix two datasets in one folder.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
from pathlib import Path

import torch

from sampling.base import MAX_SIDE
from sampling.components import component_files, pipeline_from_args
from sampling.options import (
    MAX_STEPS,
    OneLineParser,
    add_ignore_te_lora,
    add_run_options,
    check_finite,
    check_run_options,
    check_seed,
    check_writable,
    read_prompt_lines,
)
from weights.atomic import atomic_path, folder_lock
from weights.io import WeightsError, file_sha256, read_json_object
from weights.lora_merge import lora_spec

from .data import file_identity, weights_identity
from .dataset import DataError, buckets_at, inside_folder

ENCODE_CHUNK = 128  # prompts encoded per text-encoder load: 128 x 512 x 4096 bf16 = 0.5 GB
# the whole job list is planned in memory (one dict per image, every bucket): 100k per bucket is a few hundred MB
# at most and far past the recipe's 500; a larger set is several runs with other --out and --seed
MAX_IMAGES_PER_BUCKET = 100_000


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m distill.make_dataset", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers pipeline folder, or the transformer file (its family is "
                   "read from it)")
    for name in ("vae", "clip", "t5", "t5-tokenizer", "clip-tokenizer", "qwen", "qwen-tokenizer"):
        p.add_argument(f"--{name}", help=f"{name} file/folder (default: the pipeline folder's)")
    p.add_argument("--variant", choices=["base", "distilled"], help="FLUX.2 [klein] given as a file: which one")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--out", required=True, help="dataset folder to create or continue")
    p.add_argument("--images-per-bucket", type=int, required=True,
                   help="images rendered per aspect-ratio bucket (the recipe: 500); the prompts are spread over the "
                        "buckets")
    p.add_argument("--resolution", type=int, default=512,
                   help="bucket area resolution^2 (default 512: the 512-px list)")
    p.add_argument("--steps", type=int, help="teacher Euler steps (default 32; FLUX.2 [klein]: 50)")
    p.add_argument("--guidance", type=float, help="default: FLUX.1 guidance 3.5; SD3.5 CFG 4.5 (the recipe's "
                   "teacher, c + 3.5 (c - u)); FLUX.2 [klein] CFG 4")
    p.add_argument("--max-sequence-length", type=int, default=512,
                   help="T5 tokens when rendering (default 512, the pipelines' full length; train re-encodes the "
                        "prompts at its own --t5_length (FLUX.1 / SD3.5: 256 by default), so the two need not match)")
    p.add_argument("--batch-size", type=int, default=4, help="images sampled at once (default 4)")
    p.add_argument("--seed", type=int, default=0, help="image j's seed is seed + j (default 0)")
    add_run_options(p)
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a LoRA merged into the teacher, its text-encoder part into CLIP / T5 (e.g. a style LoRA; "
                        "train with the same --base_loras and --ignore-te-lora); repeatable")
    add_ignore_te_lora(p)
    return p


def plan_jobs(prompts: list[str], buckets, per_bucket: int, seed: int) -> list[dict]:
    jobs = []
    for b, (w, h) in enumerate(buckets):
        for j in range(per_bucket):
            prompt = prompts[(j * len(buckets) + b) % len(prompts)]
            jobs.append({"file_name": f"{w}x{h}_{j:06d}.png", "prompt": prompt, "width": w, "height": h,
                         "seed": seed + len(jobs)})
    return jobs


def read_prompts(path: str) -> list[str]:
    prompts = read_prompt_lines(path, "--prompts")
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts in the file")
    return prompts


def done_files(out: Path, repair: bool = True) -> set[str]:
    """Files listed in metadata.jsonl that exist: a PNG written but not yet listed is rendered again.

    A kill while a row was written leaves a last line without its newline: that row is cut off here (its image
    is rendered again), else the next row would be appended to it. A row whose PNG is gone (deleted) is dropped
    too, and a row listed twice kept once: its image is rendered again and listed anew, and training must not
    read it twice. Any other unreadable row, or one naming a file outside the folder, is refused: this folder
    holds another dataset or was edited. `repair=False` only checks (nothing is cut)."""
    meta = out / "metadata.jsonl"
    if not meta.exists():
        return set()
    text = meta.read_bytes()
    complete = text[: text.rfind(b"\n") + 1]
    if len(complete) < len(text) and repair:
        print(f"note: {meta}: dropping a row cut off by an interrupted run; its image is rendered again",
              file=sys.stderr)
        os.truncate(meta, len(complete))
    done, keep = set(), []
    lines = complete.decode("utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            name = json.loads(line)["file_name"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{meta}:{n}: not a row {{\"file_name\": ..., \"prompt\": ...}}; fix or delete "
                            "that line, or use another --out") from None
        path = inside_folder(out, name, f"{meta}:{n}")
        if path.exists() and name not in done:
            done.add(name)
            keep.append(line)
    if repair and len(keep) < sum(1 for line in lines if line.strip()):
        print(f"note: {meta}: dropping rows whose image is missing or listed twice; those images are rendered again",
              file=sys.stderr)
        with atomic_path(meta) as tmp:  # a kill mid-rewrite leaves the old file, never half of it
            tmp.write_text("".join(line + "\n" for line in keep))
    return done


def model_record(model: str) -> str:
    """--model as make_dataset.json records it: by content (file_identity), so `M`, `M/` and `$PWD/M` are one
    model and a moved folder still resumes. Only a pipeline not read from files (a test's) has no path."""
    return weights_identity(model) or str(Path(model).expanduser().resolve())


def same_model(old: str, new: str) -> bool:
    """A record from before models were recorded by content holds the --model path then given: that record still
    matches when the path holds the same content now (a model replaced at that path makes another dataset)."""
    if old == new:
        return True
    path = Path(old).expanduser()
    return path.exists() and model_record(old) == new


def read_settings(path: Path) -> dict:
    fix = f"delete it only if {path.parent} holds no make_dataset images, or choose another --out"
    return read_json_object(path, fix, "make_dataset's record of settings", DataError)


# The recorded settings a flag sets, by that flag.
FLAG_OF = {"images_per_bucket": "--images-per-bucket", "resolution": "--resolution", "steps": "--steps",
           "guidance": "--guidance", "max_sequence_length": "--max-sequence-length", "seed": "--seed"}


def check_settings(out: Path, settings: dict) -> None:
    path = out / "make_dataset.json"
    if path.exists():
        old = read_settings(path)
        # "run" and "parts" of a dataset from before they were recorded (2026-12-05): not known, not compared
        settings = {k: v for k, v in settings.items() if k in old or k not in ("run", "parts")}
        if isinstance(old.get("model"), str) and same_model(old["model"], settings["model"]):
            settings["model"] = old["model"]  # the same model, recorded by its path before (see same_model)
        if old != settings:
            # both sides' keys: a setting given then and absent now (a --lora dropped) is a difference too
            diff = sorted(k for k in old.keys() | settings.keys() if old.get(k) != settings.get(k))
            # a flag's value then (a default that changed, say SD3.5's teacher CFG): the way to continue that dataset
            then = [f"{FLAG_OF[k]} {old[k]}" for k in diff if k in FLAG_OF and old.get(k) is not None]
            again = f"pass {' '.join(then)} to continue it, or " if then else ""
            raise ValueError(f"{out} holds a dataset made with other {', '.join(diff)}; {again}use another --out")
    else:
        # no record: rows appended here would mix into another dataset (or one whose record was deleted, whose
        # settings are unknown); hidden files (our lock, a .DS_Store) are no dataset
        if (out / "metadata.jsonl").exists() or any(not p.name.startswith(".") for p in out.glob("*")):
            raise DataError(f"{out}: holds files but no make_dataset.json (another dataset, or one whose record was "
                            "deleted); choose another --out (a new or empty folder)")
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(settings, indent=1))


@torch.no_grad()
def render(pipe, jobs: list[dict], args, out: Path, bar) -> None:
    """One bucket's jobs: encode their prompts once, then batches of independent per-image noise, sampled by the
    family's pipeline as `generate` samples (its guidance, and its negative prompt when it uses one)."""
    from sampling.base import to_pil
    from sampling.png_record import save_png

    w, h = jobs[0]["width"], jobs[0]["height"]
    cfg = pipe.default_config(height=h, width=w, steps=args.steps, guidance=args.guidance,
                              max_sequence_length=args.max_sequence_length)
    prompts = list(dict.fromkeys(j["prompt"] for j in jobs))
    conds, negatives = pipe.encode_prompts(prompts, cfg)  # the negative's rows only when cfg runs that pass
    row = {p: i for i, p in enumerate(prompts)}
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start:start + args.batch_size]
        # each image's noise from its own seed: the dataset does not depend on --batch-size
        x = torch.cat([pipe.noise(1, h, w, torch.Generator().manual_seed(j["seed"])) for j in batch])
        pick = torch.tensor([row[j["prompt"]] for j in batch])
        cond = {k: v[pick.to(v.device)] for k, v in conds.items()}
        negative = None if negatives is None else {k: v[pick.to(v.device)] for k, v in negatives.items()}
        images = to_pil(pipe.decode(pipe.sample(cond, cfg, negative=negative, noise=x)))
        with open(out / "metadata.jsonl", "a") as meta:
            for job, image in zip(batch, images, strict=True):
                save_png(image, out / job["file_name"], {**job, "steps": cfg.steps, "guidance": cfg.guidance})
                meta.write(json.dumps({"file_name": job["file_name"], "prompt": job["prompt"]}) + "\n")
            meta.flush()
            os.fsync(meta.fileno())
        bar.update(len(batch))


def make_pipeline(args):
    """The teacher: the model's family's pipeline (weights/families), as `generate` builds it."""
    from sampling.job import check_family_flags
    from weights.families import detect_family

    model = Path(args.model).expanduser()
    if not model.exists():
        raise WeightsError(f"--model {model}: no such file or folder")
    family = detect_family(model)
    # generate's check: a flag of another family (--variant, --qwen on FLUX.1) would be ignored and recorded
    check_family_flags(args, family)
    return pipeline_from_args(args, model, family, [lora_spec(spec) for spec in args.lora])


def resolution_buckets(resolution: int) -> tuple[tuple[int, int], ...]:
    """--resolution's buckets, refused when there are none or one is over the largest side sampled."""
    if resolution > MAX_SIDE:  # before buckets_at, whose loop grows with the resolution
        raise ValueError(f"--resolution {resolution}: over the {MAX_SIDE} px sampled (sampling/base.py MAX_SIDE); "
                         "pass --resolution 512 or 1024")
    buckets = buckets_at(resolution)
    if not buckets:
        raise ValueError(f"--resolution {resolution}: no bucket of 64-px multiples fits (the smallest is 64x64); "
                         "pass --resolution 512")
    widest = max(max(b) for b in buckets)
    if widest > MAX_SIDE:
        raise ValueError(f"--resolution {resolution}: its buckets reach {widest} px, over the {MAX_SIDE} px sampled "
                         "(sampling/base.py MAX_SIDE); pass --resolution 512 or 1024")
    return buckets


def check_args(args) -> None:
    """Every flag that can be wrong by itself, before anything is read or written."""
    for flag, value in (("--images-per-bucket", args.images_per_bucket), ("--batch-size", args.batch_size),
                        ("--steps", args.steps), ("--max-sequence-length", args.max_sequence_length)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be 1 or more; pass {flag} 1 or more")
    if args.steps is not None and args.steps > MAX_STEPS:
        raise ValueError(f"--steps {args.steps}: over {MAX_STEPS}, the most sampled (sampling/options.py MAX_STEPS: "
                         f"the schedulers' training timesteps); pass --steps 32 (the recipe's) or at most {MAX_STEPS}")
    if args.images_per_bucket > MAX_IMAGES_PER_BUCKET:
        raise ValueError(f"--images-per-bucket {args.images_per_bucket}: over {MAX_IMAGES_PER_BUCKET}, whose job list "
                         "is planned in memory at once; pass at most that (the recipe uses 500), and render more in "
                         "another --out with another --seed")
    if args.ignore_te_lora and not args.lora:
        raise ValueError("--ignore-te-lora: no --lora given, so it would do nothing; drop it, or pass --lora")
    if args.max_sequence_length > 512:
        raise ValueError(f"--max-sequence-length {args.max_sequence_length}: T5 is used with at most 512 tokens "
                         "(as diffusers); pass --max-sequence-length 512")
    check_finite(guidance=args.guidance)
    check_run_options(args)


def family_defaults(args, pipe) -> None:
    """--steps and --guidance left unset: the teacher defaults of the model's pipeline (Pipeline.teacher_defaults)."""
    defaults = pipe.teacher_defaults
    args.steps = defaults["steps"] if args.steps is None else args.steps
    args.guidance = defaults["guidance"] if args.guidance is None else args.guidance


def run(args) -> Path:
    from tqdm import tqdm

    check_args(args)
    guidance_given = args.guidance  # before family_defaults: a model without guidance refuses only a given one
    prompts = read_prompts(args.prompts)
    buckets = resolution_buckets(args.resolution)
    check_seed(args.seed, len(buckets) * args.images_per_bucket)  # image j's seed is seed + j
    out = Path(args.out).expanduser()
    # before any model loads: room for one batch of the largest bucket at least (raw RGB bounds a PNG)
    check_writable(out, "--out", args.out, need_bytes=args.batch_size * max(w * h for w, h in buckets) * 3)
    loras = [lora_spec(spec) for spec in args.lora]  # no :SCALE: the LoRA's recommended scale
    for path, scale in loras:
        if not Path(path).is_file():
            raise WeightsError(f"--lora {path}: no such file")
        if not math.isfinite(scale):
            raise ValueError(f"--lora {path}:{scale}: the scale must be a finite number; pass --lora {path}:1")
    pipe = make_pipeline(args)
    family_defaults(args, pipe)
    settings = {k: getattr(args, k) for k in ("images_per_bucket", "resolution", "steps", "guidance",
                                              "max_sequence_length", "seed")}
    settings.update(model=model_record(args.model), prompts=prompts)
    # how the teacher ran moves its pixels too: a restart in another dtype would mix two renders in one dataset
    settings["run"] = {"dtype": args.dtype, "fp8": args.fp8 or args.fp8_compute, "fp8_compute": args.fp8_compute,
                       "variant": args.variant}
    # the parts given beside --model (a VAE, text encoders, tokenizers) render the images too: recorded by content
    # (distill/data.py file_identity), not path, so a file moved or its path spelled otherwise is the same part
    settings["parts"] = {k: v if isinstance(v, bool) else file_identity(v)
                         for k, v in component_files(args).items() if v and k != "variant"}
    if loras:  # other LoRAs make another dataset (recorded only when given: older datasets stay valid)
        settings["loras"] = [[Path(path).name, scale, file_sha256(path)] for path, scale in loras]
        if args.ignore_te_lora:  # the prompts were encoded without their text-encoder parts
            settings["ignore_te_lora"] = True
    pipe.check_transformer()  # a wrong --model fails now, not after the first bucket's prompts are encoded
    pipe.check_components()  # so does a VAE or text encoder of another model (headers only)
    for w, h in buckets:  # so does a bucket the model or the device cannot take (configs only: nothing is read)
        pipe.check_size(h, w, args.batch_size)
    pipe.tokenizers(args.max_sequence_length)  # and a wrong tokenizer file, before anything is written
    # generate's checks of what only the model can judge: --guidance on a model without a guidance embedding
    pipe.check_guidance_flag(guidance_given)
    w, h = buckets[0]
    pipe.check_config(pipe.default_config(height=h, width=w, steps=args.steps, guidance=args.guidance,
                                          max_sequence_length=args.max_sequence_length))
    done_files(out, repair=False)  # an existing metadata.jsonl's rows are checked before anything is written
    # a second run on this folder would render every image again and list it twice: refused while we render
    with folder_lock(out, "make_dataset run"):
        try:
            check_settings(out, settings)  # the first write: every check above leaves --out as it was
            jobs = plan_jobs(prompts, buckets, args.images_per_bucket, args.seed)
            done = done_files(out)
            todo = [j for j in jobs if j["file_name"] not in done]
            with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="rendering", unit="image") as bar:
                for w, h in buckets:
                    mine = [j for j in todo if (j["width"], j["height"]) == (w, h)]
                    for start in range(0, len(mine), ENCODE_CHUNK):  # bounded memory for the text embeddings
                        render(pipe, mine[start:start + ENCODE_CHUNK], args, out, bar)
        except OSError as e:  # a disk that fills up or fails mid-run
            raise write_error(out, e) from None
    return out


def write_error(out: Path, e: OSError) -> DataError:
    """A failed write while rendering, as one line naming the folder and the fix: PIL's save raises the OS's error
    without the file's name ("[Errno 28] No space left on device"). Every image listed so far stays listed, so a
    rerun continues where this one stopped."""
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):  # a full disk, or the user's quota
        problem, fix = "no space left on its disk", "free some space"
    else:  # a failing or vanished disk, a permission changed mid-run
        problem, fix = f"rendering stopped ({e.strerror or e}{f': {e.filename}' if e.filename else ''})", "fix that"
    return DataError(f"{out}: {problem}; {fix}, then rerun python -m distill.make_dataset with the same flags: it "
                     "continues where it stopped")
