"""What the sampling commands share (`generate`, `make_dataset`): their run options (device, dtype, fp8 storage
and compute, compiled blocks, block swap), --ignore-te-lora, and the one line they print when the GPU runs out of
memory."""

from __future__ import annotations

import argparse

import torch

from weights.io import DTYPES

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
    group.add_argument("--ignore-te-lora", "--ignore_te_lora", action="store_true", help=IGNORE_TE_LORA_HELP)


def add_run_options(group: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--device, --dtype, --fp8, --fp8-compute, --compile, --blocks-to-swap (the last four: sampling/base.py)."""
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    group.add_argument("--dtype", choices=list(DTYPES), default="bf16" if torch.cuda.is_available() else "fp32")
    group.add_argument("--fp8", action="store_true", help=FP8_HELP)
    group.add_argument("--fp8-compute", "--fp8_compute", action="store_true", help=FP8_COMPUTE_HELP)
    group.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    group.add_argument("--blocks-to-swap", type=int, default=0, metavar="N", help=SWAP_HELP)


def out_of_memory(args, smaller: str) -> str:
    """The one line a sampling command prints when the GPU runs out: what lowers the peak (also make_dataset's)."""
    tips = [] if args.fp8 else ["--fp8 (the transformer blocks in fp8: Flux-dev 23.7 -> 11.9 GB)"]
    more = "more than " + str(args.blocks_to_swap) if args.blocks_to_swap else "N"
    tips += [f"--blocks-to-swap {more} (blocks wait in CPU memory: slower)", smaller]
    return f"error: out of GPU memory; the images written so far are kept; run again with {' or '.join(tips)}"
