"""What the sampling commands share (`generate`, `make_dataset`, `evaluate`): their run options (device, dtype, fp8
storage and compute, compiled blocks, block swap), --ignore-te-lora, the checks of their flags and output folders
made before any model loads, and the one line they print when the GPU runs out of memory."""

from __future__ import annotations

import argparse
import codecs
import math
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from weights.io import DTYPES

from .fields import add_dataclass_args, opt

# The most sampling steps we take: a sanity cap, as MAX_SIDE is. The released recipes sample with 4 to 50 steps, on
# schedulers configured with 1000 training timesteps (num_train_timesteps); an absurd count (--steps 10**10) used
# to fail only after the model loaded, when its sigma grid was allocated.
MAX_STEPS = 1000

FP8_HELP = ("store the transformer blocks' weights in float8 (e4m3, a scale per row): half of bf16's memory "
            "(Flux-dev: 11.9 instead of 23.7 GB); each layer computes in --dtype")
FP8_COMPUTE_HELP = ("run the transformer blocks' GEMMs on fp8 tensor cores (sm89 / sm90+: Ada, Hopper): e4m3 "
                    "weights as --fp8 stores them (implied), activations rounded to e4m3 per token; refused on "
                    "other GPUs, emulated exactly on the CPU")
COMPILE_HELP = ("compile each transformer block once (torch.compile; the first image of each size is slow, "
                "then each step is faster)")
SWAP_HELP = ("keep the last N transformer blocks' weights in CPU memory and copy each to the GPU as it runs: "
             "less GPU memory (Flux-dev bf16: ~0.4 GB per block, 57 blocks), slower")


IGNORE_TE_LORA_HELP = ("apply only the transformer part of the LoRAs: their text-encoder part (kohya lora_te*_, "
                       "diffusers text_encoder*.), which is otherwise merged into CLIP / T5 as diffusers and "
                       "ComfyUI do, is skipped with one line saying so")


def add_ignore_te_lora(group: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--ignore-te-lora, the one spelling every command has (train's config field is ignore_te_lora)."""
    group.add_argument("--ignore-te-lora", action="store_true", help=IGNORE_TE_LORA_HELP)


@dataclass(frozen=True)
class RunOptions:
    """Where and how a sampling command runs the transformer (the last four: sampling/base.py)."""

    device: str = opt("cuda" if torch.cuda.is_available() else "cpu", "cuda, cpu, or a device such as cuda:1")
    dtype: str | None = opt(None, "the models' compute dtype (default: bf16 on a GPU, fp32 on the CPU)",
                            choices=tuple(DTYPES))
    fp8: bool = opt(False, FP8_HELP)
    fp8_compute: bool = opt(False, FP8_COMPUTE_HELP)
    compile: bool = opt(False, COMPILE_HELP)
    blocks_to_swap: int = opt(0, SWAP_HELP, metavar="N")


RUN_OPTIONS = tuple(f.name for f in fields(RunOptions))


def add_run_options(group: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--device, --dtype, --fp8, --fp8-compute, --compile, --blocks-to-swap."""
    add_dataclass_args(group, RunOptions, defaults=True, spell="-")


def out_of_memory(args, smaller: str) -> str:
    """The one line a sampling command prints when the GPU runs out: what lowers the peak (also make_dataset's)."""
    tips = [] if args.fp8 else ["--fp8 (the transformer blocks in fp8: Flux-dev 23.7 -> 11.9 GB)"]
    more = "more than " + str(args.blocks_to_swap) if args.blocks_to_swap else "N"
    tips += [f"--blocks-to-swap {more} (blocks wait in CPU memory: slower)", smaller]
    return f"error: out of GPU memory; the images written so far are kept; run again with {' or '.join(tips)}"


def plain_warnings() -> None:
    """A command's warnings as one `warning: ...` line each on stderr, each text once, called where a command runs
    as one (its `__main__`): Python's default adds the warning's class, the file and line that warned and that
    line's source, which tell a user nothing and bury the message (`train.py:191: UserWarning: cfg_scale 3.5:
    ...`), and says a text again when another place warns it (a file read twice: convert's detection, then its
    reading)."""
    said = set()

    def show(message, category, filename, lineno, file=None, line=None):
        if str(message) not in said:
            said.add(str(message))
            print(f"warning: {message}", file=file or sys.stderr)

    warnings.showwarning = show


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one `error: ...` line, as the commands' own: the usage block argparse prints
    first runs to 15 lines for generate and buries the error; --help still shows it.

    Every flag takes both spellings: `--blocks-to-swap` and `--blocks_to_swap` (the sampling commands define the
    first, `train` the second, after its config fields); --help shows the one defined."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

    def spelled(self, token: str) -> str:
        """`token` with its flag in the spelling this parser defines (`--a_b=1` -> `--a-b=1` where that exists)."""
        name, eq, value = token.partition("=")
        if not token.startswith("--") or name in self._option_string_actions:
            return token
        key = name[2:].replace("_", "-")
        for option in self._option_string_actions:
            if option.startswith("--") and option[2:].replace("_", "-") == key:
                return option + eq + value
        return token

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        cut = args.index("--") if "--" in args else len(args)  # after `--` everything is positional
        return super().parse_known_args([self.spelled(t) for t in args[:cut]] + args[cut:], namespace)


def check_device(text: str, flag: str = "--device") -> None:
    """A device string torch cannot parse, or a GPU this machine does not have, fails here rather than as an
    assertion when the first weight moves."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"{flag} {text}: not a device name; pass {flag} cpu or {flag} cuda") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"{flag} {text}: no such CUDA device here ({count} visible to this PyTorch); "
                             f"pass {flag} cpu" + (f" or {flag} cuda:0" if count else ""))
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{flag} {text}: this PyTorch has no MPS (Apple GPU) device; pass {flag} cpu")
    elif device.type != "cpu":
        # torch parses xpu, meta, hpu, ... too, but nothing here runs on them: the first weight moved (or read, on
        # "meta") would fail deep inside torch instead
        raise ValueError(f"{flag} {text}: scfm runs on cpu, cuda (and mps where PyTorch has it); pass {flag} cpu"
                         + (f" or {flag} cuda" if torch.cuda.is_available() else ""))


def run_dtype(args) -> str:
    """--dtype, else the device's default: bf16 on a GPU (what diffusers' examples run), fp32 on the CPU (whose
    bf16 GEMMs are slow). By the device chosen, not the one present: `--device cpu` on a GPU machine is fp32."""
    return args.dtype or ("fp32" if torch.device(args.device).type == "cpu" else "bf16")


def check_run_options(args) -> None:
    """What add_run_options adds, checked before anything loads; the default dtype is filled in."""
    check_device(args.device)
    args.dtype = run_dtype(args)
    if args.blocks_to_swap < 0:
        raise ValueError(f"--blocks-to-swap {args.blocks_to_swap}: must be 0 (off) or more; pass --blocks-to-swap 0")


def check_finite(**values: float | None) -> None:
    """Float flags given as `dashed_name=value` (None: not given): nan and inf parse as floats but would sample
    black or noisy images with exit 0."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} {value}: must be a finite number; pass {flag} with a number such as 1.0")


def check_seed(seed: int, count: int = 1) -> None:
    """Seeds seed .. seed + count - 1 must be ones torch.Generator.manual_seed takes and A1111's infotext reads as
    a seed: -1 means "random" there, and we never draw one."""
    if seed < 0:
        raise ValueError(f"--seed {seed}: seeds are 0 or more (-1 does not mean random here); pass --seed 0")
    if seed + count - 1 >= 2**64:
        raise ValueError(f"--seed {seed}: over torch's largest seed 2**64 - 1 (with {count} images); pass --seed 0")


def check_writable(folder: str | os.PathLike, flag: str, value, need_bytes: int = 0) -> None:
    """Fail before any model loads when `folder` (made later if missing) cannot take the outputs: a file in the
    way, no permission, a read-only or full disk. The probe is an unnamed temp file in the nearest existing folder,
    so a refused run leaves nothing behind; `need_bytes` is a lower bound of what the run writes."""
    existing = Path(os.path.abspath(folder))
    try:
        while not existing.exists():  # the root always exists
            existing = existing.parent
        if not existing.is_dir():
            raise ValueError(f"{flag} {value}: {existing} is a file, not a folder; pass another {flag}")
        with tempfile.TemporaryFile(dir=existing):
            pass
        free = shutil.disk_usage(existing).free
    except OSError as e:
        raise ValueError(f"{flag} {value}: cannot write in {existing} ({e.strerror or e}); pass another {flag} "
                         "or make that folder writable") from None
    if free < need_bytes:
        raise ValueError(f"{flag} {value}: {free / 1e6:.1f} MB free on its disk, the outputs need at least "
                         f"{need_bytes / 1e6:.1f} MB; free some space or pass another {flag}")


def read_prompt_lines(path: str | os.PathLike, flag: str) -> list[str]:
    """The non-empty lines of a prompts file, stripped; a missing or non-text file is one line naming it."""
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as e:
        raise ValueError(f"{flag} {path}: {e.strerror or e}; pass a text file with one prompt per line") from None
    bom = codecs.BOM_UTF8 if data.startswith(codecs.BOM_UTF8) else b""
    try:
        # without the BOM Windows editors write first: it would otherwise begin the first prompt (U+FEFF)
        text = data[len(bom):].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {path}: not UTF-8 text (byte {e.start + len(bom)}); pass a text file with one "
                         "prompt per line") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def pick(*values):
    """The first value that is set: the command line, then a LoRA's recommendation, then the default."""
    return next((v for v in values if v is not None), None)


def one_scale(a: float | None, b: float | None, names: str) -> float | None:
    """Two flags that name the same scale: the one given, and an error when both disagree."""
    if a is not None and b is not None and a != b:
        raise ValueError(f"{names} name the same scale here; pass one (got {a} and {b})")
    return pick(a, b)


def cfg_scale(flags: dict[str, float | None], what: str, fix: str) -> tuple[float | None, str]:
    """The CFG scale two flags name ({flag: value}; one_scale) and the flag to name it by (the first unless only the
    second is given). CFG runs above 1 only (diffusers' rule), so a scale below 1 is off, as at 1, and would do
    nothing: refused, `fix` ({flag} filled in) saying what to pass instead. `what`: the CFG the family runs."""
    (a, va), (b, vb) = flags.items()
    scale = one_scale(va, vb, f"{a} and {b}")
    flag = b if va is None and vb is not None else a
    if scale is not None and scale < 1:
        raise ValueError(f"{flag} {scale:g}: below 1 {what} is off, as at 1, so it would do nothing; "
                         f"{fix.format(flag=flag)}")
    return scale, flag


def refuse_without_cfg(unused: list[str], flag: str, scale: float | None, guidance: float, fix: str) -> None:
    """`unused`: the flags given that only a CFG run reads (a negative prompt, SD3's skip layers), refused while
    CFG is off at `guidance` (<= 1), set by `flag` (`scale` given) or a LoRA's recommendation."""
    if not unused:
        return
    why = f"{flag} {guidance:g}" if scale is not None else f"guidance {guidance:g}, as a --lora recommends"
    they, them = ("they", "them") if len(unused) > 1 else ("it", "it")
    raise ValueError(f"{', '.join(unused)}: used only with CFG on, and it is off ({why}), so {they} would do "
                     f"nothing; {fix} or drop {them}")
