"""`generate --from-png`: one of our PNGs rendered again. The flags it refuses beside it (the PNG records every
generation setting), its prompt, model, size and seed put onto the command line's `args`, and the generation config
and LoRAs it records turned back into a job's (sampling/job.py resolve). Reading the PNG's record: png_record.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from weights.family import Family
from weights.io import WeightsError

from .flags import GenerationFlags, ModelFiles
from .png_record import png_params

# What --from-png refuses beside it (one line naming each given), per flag: every generation flag, since the PNG
# records the value its image was made with (prompt, LoRAs, size, seed, steps, grid, shift, guidance, CFG and its
# negative prompt, SLG, T5 length) and a changed one would render another image than the one it says it renders
# (render without --from-png for variations); --lora and --ignore-te-lora too: the PNG records the LoRAs at their
# scales and whether their text-encoder parts were skipped. Allowed: the model files (the PNG's paths may not exist
# on this machine; --variant and --no-t5 say what those files are), where and how the transformer runs (--device,
# --compile, --blocks-to-swap: the same pixels; --dtype, --fp8, --fp8-compute: the PNG's unless given, for a
# machine without bf16 or fp8 tensor cores), and the outputs (--out, --overwrite).
FROM_PNG_TAKES = (*(f.name for f in dataclasses.fields(GenerationFlags) if f.name != "from_png"), "lora",
                  "ignore_te_lora")


def from_png(args) -> dict:
    """--from-png: the settings one of our PNGs records, checked; its prompt, model, size and seed go onto `args`."""
    fields = {f.name: f for cls in (GenerationFlags, ModelFiles) for f in dataclasses.fields(cls)}
    flags = [name for name in FROM_PNG_TAKES if getattr(args, name) != (
        list(fields[name].default) if fields[name].metadata.get("repeat") else fields[name].default)]
    if flags:
        raise ValueError(f"--from-png takes every generation setting from the PNG (prompt, LoRAs, size, seed, steps, "
                         f"guidance, ...); drop {', '.join('--' + f.replace('_', '-') for f in flags)}, or render "
                         "without --from-png to change them")
    params = png_params(args.from_png)
    args.prompt, args.model = [params["prompt"]], args.model or params["model"]
    args.width, args.height, args.seed, args.batch_size = params["width"], params["height"], params["seed"], 1
    args.ignore_te_lora = bool(params.get("ignore_te_lora"))
    # what moves the pixels besides the generation config (recorded since 2026-12-05), unless given now: the
    # dtype, fp8 storage / compute, klein's variant
    args.dtype = args.dtype or params.get("dtype")
    args.fp8 = args.fp8 or bool(params.get("fp8"))
    args.fp8_compute = args.fp8_compute or bool(params.get("fp8_compute"))
    args.variant = args.variant or params.get("variant")
    return params


def png_config(params: dict, family: Family):
    """The generation config a PNG records (used_settings wrote it: None where the model ignored a value)."""
    config = family.part("pipeline").default_config
    names = {f.name for f in dataclasses.fields(config)} - {"extra", "grid"}
    given = {k: params[k] for k in names if params.get(k) is not None}
    if "slg_layers" in given:
        given["slg_layers"] = tuple(given["slg_layers"])
    return config(**given, grid=params["schedule"])


def png_loras(params: dict) -> list[tuple[str, float]]:
    """The LoRAs a PNG records, each checked to be the same file (sha256) as when it was made."""
    from weights.io import file_sha256

    loras = []
    for rec in params["loras"]:
        path = rec["path"]
        if not Path(path).is_file():
            raise WeightsError(f"--from-png: {path}, one of its LoRAs, is not there; put it back at that path")
        if file_sha256(path) != rec["sha256"]:
            raise WeightsError(f"--from-png: {path} is not the file the image was made with (its sha256 differs); "
                               "restore that file")
        loras.append((path, float(rec["scale"])))
    return loras
