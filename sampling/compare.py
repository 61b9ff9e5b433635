"""The comparison app's engine, without a UI (sampling/app.py is the gradio page over it): one model loaded once,
LoRA stacks changed on the loaded weights, and columns rendered exactly as `python -m sampling.generate` renders
them (the same flags, config resolution, sampler and PNG writer: a column is a generate command line run on the
loaded model). Only LoRA files given at launch (`--lora`) or inside the `--lora-dir` folders are read.

A LoRA change without fp8 unmerges the previous stack and merges the new one (weights/lora_merge.py apply_loras /
unload_loras: bit-exact, weights re-read from the model file); with `--fp8` the touched weights are re-read from the
file, merged in fp32 and quantized again (requantize_loras), as loading with those LoRAs does.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from weights.atomic import atomic_path
from weights.families import detect_family
from weights.io import WeightsError, file_sha256, read_header
from weights.lora import Recommended
from weights.lora_merge import lora_spec

from .components import COMPONENT_FILES, pipeline_from_args
from .demo import ASSETS, DEMO_FOLDER, DEMO_LORA, IMAGE_SIZE, demo_lora
from .flags import build_parser
from .job import check_args, check_job, check_sizes, render, resolve, with_demo_defaults
from .options import RUN_OPTIONS, check_writable

MAX_SEED = 2**31 - 1  # the random seeds the page draws
AXES = ("steps", "lora scale", "shift", "guidance", "seed")  # what a sweep varies
# the most cells a sweep renders: an 8 x 8 grid, a few minutes of a 4-step student at 1024 px on one GPU, and at
# 1024 px a 67 Mpx grid PNG (PIL warns of a decompression bomb past 89 Mpx when opening one); a list typed too long
# (or two long axes multiplying) is refused before the first render instead of queueing hundreds
MAX_CELLS = 64


@dataclass
class Column:
    """One image's settings as the page sets them; None: what generate would pick (the LoRA's hint, else the
    family default)."""

    loras: list[tuple[str, float]] = field(default_factory=list)  # (path, scale)
    steps: int | None = None
    shift: float | None = None
    guidance: float | None = None  # Flux-dev's guidance input; SD3's / klein's CFG scale
    schedule: str | None = None  # "scfm" or "diffusers"


@dataclass
class Result:
    path: Path  # the PNG our writer wrote
    seconds: float
    nfe: int  # transformer calls
    lora_seconds: float  # the LoRA change before it (0: the stack was already on)


class Session:
    def __init__(self, args):
        """`args`: the app's command line (generate's model-file and run flags, --lora-dir, --out). The model is
        read now, once; with no --model, the built-in demo and its SCFM LoRA."""
        self.launch = args
        self.demo = args.model is None
        self.model = str(DEMO_FOLDER) if self.demo else args.model
        lora_dirs = args.lora_dir or ([str(ASSETS)] if self.demo else [])
        self.lora_dirs = [Path(d).expanduser().resolve() for d in lora_dirs]
        for d in self.lora_dirs:
            if not d.is_dir():
                raise WeightsError(f"--lora-dir {d}: no such folder")
        # `--lora demo` is the shipped SCFM LoRA, as for generate
        self.launch_loras = []
        for spec in args.lora:
            path = Path(lora_spec(demo_lora(spec))[0]).expanduser().resolve()
            if not path.is_file():  # the page would not offer it: the user would never learn why it is missing
                raise WeightsError(f"--lora {spec}: no such file; pass an existing .safetensors LoRA or drop it")
            if path.suffix != ".safetensors":
                raise WeightsError(f"--lora {spec}: not a .safetensors file; only safetensors LoRAs are read")
            self.launch_loras.append(path)
        if self.demo and DEMO_LORA.resolve() not in self.launch_loras:
            self.launch_loras.append(DEMO_LORA.resolve())  # the demo's student (B's default) whatever --lora-dir says
        if args.out:
            self.out = Path(args.out).expanduser()
            check_writable(self.out, "--out", args.out)  # a file in the way, no permission: one line
        else:
            self.out = Path(tempfile.mkdtemp(prefix="scfm-app-"))
        self.out.mkdir(parents=True, exist_ok=True)
        self.family = detect_family(Path(self.model))
        self.pipe = pipeline_from_args(args, Path(self.model), self.family, ())
        self.pipe.transformer  # noqa: B018  (loaded now, once, without LoRAs)
        # (path, sha256, scale) per merged LoRA; None: unknown, after a change that failed
        self.stack: list[tuple[str, str, float]] | None = []
        # the last prompts' encoding and what it depends on (conditioning): a click's columns and a sweep's cells
        # share their text, and the text encoders (T5-XXL: 9 GB read) would otherwise load for each
        self.encoded: tuple[tuple, tuple] | None = None
        # one render at a time on the one model: a Generate and a sweep from two tabs would otherwise merge LoRAs
        # under each other's sampling and pick the same file number (the page also queues them as one job kind)
        self.busy = threading.RLock()

    # ----- files ----------------------------------------------------------------------------------------------

    def model_argv(self) -> list[str]:
        """The launch's model-file and run flags, as generate takes them (a column adds its own). The demo goes
        without --model, as generate's demo does (its own size and T5 length)."""
        argv = [] if self.demo else [f"--model={self.model}"]
        for name in (*COMPONENT_FILES, *RUN_OPTIONS, "ignore_te_lora"):
            value, flag = getattr(self.launch, name, None), f"--{name.replace('_', '-')}"
            if value is True:
                argv.append(flag)
            elif value is not None and value is not False:
                argv.append(f"{flag}={value}")  # one token: a path starting with '-' is not read as a flag
        return argv

    def lora_files(self) -> list[str]:
        """Every LoRA the page may offer: those given at launch and the .safetensors in the --lora-dir folders."""
        found = [*self.launch_loras, *(f for d in self.lora_dirs for f in sorted(d.rglob("*.safetensors")))]
        return [str(f) for f in dict.fromkeys(found) if f.is_file() and not self._is_model_part(f)]

    def column_path(self, seed: int) -> Path:
        """A new column's PNG, `NNNNN-SEED.png`, numbered on after the highest number in the folder and reserved
        (created empty, exclusively): a second session with the same --out never replaces the first one's
        images, even when both pick a number at once."""
        return reserve(self.out, _COLUMN, lambda i: f"{i:05d}-{seed}.png")

    def save_grid(self, grid) -> Path:
        """A sweep's grid (a PIL image) as `grid-NNNN.png`, numbered on after the highest grid in the folder, so that
        it never replaces one (nor fills the gap a deleted grid left: the numbers keep the order they were made in),
        reserved as column_path's names are and written atomically."""
        with self.busy:
            path = reserve(self.out, _GRID, lambda i: f"grid-{i:04d}.png")
            with unreserved_on_failure(path), atomic_path(path) as tmp:
                grid.save(tmp, format="PNG")
        return path

    def _is_model_part(self, path: Path) -> bool:
        return self.demo and DEMO_FOLDER.resolve() in path.parents  # the demo pipeline's own weights

    def allowed(self, path: str) -> Path:
        """A LoRA path from the page, refused unless given at launch or inside a --lora-dir folder: the page
        never makes the server read another file."""
        p = Path(path).expanduser().resolve()
        if p in self.launch_loras or any(d in p.parents for d in self.lora_dirs):
            if p.suffix != ".safetensors":
                raise ValueError(f"{path}: not a .safetensors file; only safetensors LoRAs are read")
            if not p.is_file():
                raise WeightsError(f"{path}: no such file")
            return p
        raise ValueError(f"{path}: outside the LoRA folders this app was started with; pass --lora-dir with its "
                         "folder when starting the app")

    def hints(self, path: str) -> Recommended:
        """The sampling settings a LoRA's metadata recommends (shown beside its column)."""
        return Recommended.from_metadata(read_header(self.allowed(path))[1])

    # ----- LoRAs and columns ----------------------------------------------------------------------------------

    def set_loras(self, loras: list) -> float:
        """Make `loras` ((LoRA, scale) as generate reads them) the merged stack (Pipeline.set_loras); seconds it
        took (0: unchanged)."""
        # the file's sha256 too (cached by its stat): a LoRA replaced under the same name is merged again, as its
        # PNG records the new file's hash
        key = [(lora.source, file_sha256(lora.source), scale) for lora, scale in loras]
        if key == self.stack:
            return 0.0
        start = time.perf_counter()
        # not known until the change succeeds: after a failure, the next column merges its stack whatever it is,
        # instead of rendering weights that may lack the LoRAs its PNG records
        self.stack = None
        self.pipe.set_loras(loras)
        self.stack = key
        return time.perf_counter() - start

    def conditioning(self, job) -> tuple:
        """The prompts' encoding (Pipeline.encode_prompts) for `job`, on the stack now merged: the last one again
        when nothing it depends on changed (the prompts, the negative prompt where a negative pass runs, the T5
        length, the LoRAs' text-encoder parts and scales, which --ignore-te-lora leaves out)."""
        cfg, pipe = job.cfg, self.pipe
        wants = pipe.wants_negative(cfg)
        sha = {source: digest for source, digest, _ in self.stack or []}
        text = tuple((p.encoder, p.source, sha.get(p.source), p.scale, p.prefix) for p in pipe.lora_parts().text)
        key = (tuple(job.prompts), wants, cfg.negative_prompt if wants else None, cfg.max_sequence_length, text)
        if self.encoded is None or self.encoded[0] != key:
            self.encoded = None  # freed before the encoders load, and not kept if they fail
            self.encoded = key, pipe.encode_prompts(job.prompts, cfg)
        return self.encoded[1]

    def column_argv(self, prompts: str | list[str], negative: str, seed: int, width: int, height: int,
                    col: Column) -> list[str]:
        # free text as `--flag=TEXT`, one token: a prompt such as `-blurry` or `--help` would otherwise be read as
        # a flag
        argv = self.model_argv() + [f"--prompt={p}" for p in ([prompts] if isinstance(prompts, str) else prompts)]
        argv += ["--seed", str(seed), "--width", str(width), "--height", str(height)]
        if negative:
            argv.append(f"--negative-prompt={negative}")
        for flag, value in (("--steps", col.steps), ("--shift", col.shift), ("--schedule", col.schedule)):
            if value is not None:
                argv += [flag, str(value)]
        if col.guidance is not None:  # FLUX.1: its guidance input; SD3 / klein: their CFG scale
            argv += ["--guidance" if self.family.guidance == "embedding" else "--cfg", str(col.guidance)]
        for path, scale in col.loras:
            if not math.isfinite(scale):
                raise ValueError(f"{path}: the scale must be a finite number")
            argv.append(f"--lora={self.allowed(path)}:{scale}")
        return argv

    @staticmethod
    def parse(argv: list[str]):
        """generate's parser on a column's command line, its refusal a one-line ValueError: argparse's exit
        (SystemExit) would escape the page's handler and end its worker."""
        parser = build_parser()

        def refuse(status=0, message=None):
            raise ValueError((message or "these settings are refused").strip().removeprefix("error: "))

        parser.exit = refuse
        return parser.parse_args(argv)

    def render(self, prompts: str | list[str], negative: str, seed: int, width: int, height: int, col: Column,
               callback=None, *, noises: int = 1, paths: list[Path] | None = None,
               latents_out: list | None = None) -> Result:
        """One column: generate's command line for these settings, sampled on the loaded model into PNGs (one
        prompt for the page; several prompts x `noises` seeds from `seed` on for distill.evaluate, written to
        `paths` in generate's order: noise-major)."""
        with self.busy:
            many = [prompts] if isinstance(prompts, str) else list(prompts)
            args = self.parse(self.column_argv(many, negative, seed, width, height, col))
            check_args(args)
            with_demo_defaults(args)
            check_sizes(args, IMAGE_SIZE if self.demo else 1024)
            job = resolve(args, many)
            lora_seconds = self.set_loras(job.loras)
            check_job(self.pipe, job)
            start = time.perf_counter()
            reserved = not paths
            paths = paths or [self.column_path(seed)]
            with unreserved_on_failure(paths[0]) if reserved else contextlib.nullcontext():
                render(self.pipe, job, paths, noises, seed, callback, latents_out, self.conditioning(job))
            nfe = job.cfg.steps * (2 if self.pipe.wants_negative(job.cfg) else 1)
            return Result(paths[0], time.perf_counter() - start, nfe, lora_seconds)


_COLUMN = re.compile(r"(\d+)--?\d+\.png")  # Session.column_path's names
_GRID = re.compile(r"grid-(\d+)\.png")  # Session.save_grid's


def next_index(folder: Path, pattern: re.Pattern) -> int:
    """One past the highest number (`pattern`'s group 1) among the names in `folder` that `pattern` matches, 0
    when none does: counting the files instead would reuse the last number after a gap."""
    found = (pattern.fullmatch(p.name) for p in folder.iterdir())
    return max((int(m[1]) + 1 for m in found if m), default=0)


def reserve(folder: Path, pattern: re.Pattern, name) -> Path:
    """`folder / name(i)` for the first free i from next_index on, created empty with O_EXCL: another session
    (another process) picking the same number at once gets FileExistsError and moves on, where a rename onto the
    name would replace its image. The writer then renames its temp file onto this reservation."""
    index = next_index(folder, pattern)
    while True:
        path = folder / name(index)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))
        except FileExistsError:
            index = max(index + 1, next_index(folder, pattern))
            continue
        # another name with this number (another seed, made at once by another session): the next number, so
        # that the numbers keep the order the images were made in
        if not any(p != path and (m := pattern.fullmatch(p.name)) and int(m[1]) == index for p in folder.iterdir()):
            return path
        path.unlink()
        index = max(index + 1, next_index(folder, pattern))


@contextlib.contextmanager
def unreserved_on_failure(path: Path):
    """The reservation `reserve` made is removed if the write fails: no empty PNG is left under the name."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            if path.stat().st_size == 0:
                path.unlink()
        raise


def random_seed() -> int:
    return secrets.randbelow(MAX_SEED)


def sweep_columns(base: Column, seed: int, axes: list[tuple[str, list]]) -> list[tuple[dict, Column, int]]:
    """The grid's cells, row-major: (axis values, column, seed) for every combination of one or two axes, the
    first axis along each row (grid_image's columns)."""
    if len(axes) == 2 and axes[0][0] == axes[1][0]:  # the second would overwrite the first in every cell
        raise ValueError(f"both sweep axes are {axes[0][0]!r}; give one axis its values, or choose another second axis")
    count = math.prod(len(v) for _, v in axes)
    if count > MAX_CELLS:
        sizes = " x ".join(str(len(v)) for _, v in axes)
        raise ValueError(f"a sweep of {count} cells ({sizes} values) is refused: at most {MAX_CELLS}; give fewer "
                         "values")
    cells = []
    for reverse in itertools.product(*[v for _, v in reversed(axes)]):
        values = reverse[::-1]
        col, s = Column(list(base.loras), base.steps, base.shift, base.guidance, base.schedule), seed
        for (axis, _), v in zip(axes, values):
            if axis == "steps":
                col.steps = int(v)
            elif axis == "shift":
                col.shift = float(v)
            elif axis == "guidance":
                col.guidance = float(v)
            elif axis == "seed":
                s = int(v)
            elif axis == "lora scale":  # the first LoRA of the stack (the SCFM one)
                if not col.loras:
                    raise ValueError("a 'lora scale' sweep needs a LoRA in the column")
                col.loras[0] = (col.loras[0][0], float(v))
            else:
                raise ValueError(f"unknown sweep axis {axis!r}; one of {', '.join(AXES)}")
        cells.append((dict(zip([a for a, _ in axes], values)), col, s))
    return cells


def parse_values(axis: str, text: str) -> list:
    """'2, 4, 8' -> [2, 4, 8] (ints for steps and seeds, floats otherwise); one line when a value is no number."""
    kind = int if axis in ("steps", "seed") else float
    try:
        values = [kind(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{axis}: {text!r} is not a list of numbers such as '2, 4, 8'") from None
    if not values:
        raise ValueError(f"{axis}: give at least one value")
    return values


def grid_image(images: list, axes: list[tuple[str, list]], cell_labels: list[dict]):
    """The sweep's images in one labelled grid: columns along the first axis, rows along the second."""
    from PIL import Image, ImageDraw

    cols = len(axes[0][1])
    rows = len(images) // cols
    w, h = images[0].size
    band = 14  # a line of PIL's default font above the grid, and the row labels' width to its left
    left = 0 if len(axes) == 1 else 7 * max(len(f"{axes[1][0]}={v}") for v in axes[1][1])
    grid = Image.new("RGB", (left + cols * w, band + rows * h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, labels) in enumerate(zip(images, cell_labels)):
        r, c = divmod(i, cols)
        x, y = left + c * w, band + r * h
        grid.paste(image, (x, y))
        if r == 0:
            draw.text((x + 2, 1), f"{axes[0][0]}={labels[axes[0][0]]}", fill="black")
        if c == 0 and len(axes) > 1:
            draw.text((2, y + h // 2 - 5), f"{axes[1][0]}={labels[axes[1][0]]}", fill="black")
    return grid
