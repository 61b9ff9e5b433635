"""A LoRA's model family with no model at hand (`tools/convert.py lora` / `info`): its metadata, its names, else
which released sizes its shapes fit. FLUX.1 and FLUX.2 [klein] share block names, so names alone cannot always tell.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .families import families, get_family, lora_family
from .io import WeightsError, read_header
from .keymaps.lora import TEXT_ENCODER_PREFIXES, parse_key
from .lora import LoRA, read_lora
from .lora_foreign import peft_file
from .lora_merge import _fit_error


def _released_fits(lora: LoRA) -> list[str]:
    """The released sizes (its family's config presets) whose every layer `lora`'s shapes fit, as `apply_loras`
    checks them, on models built on the meta device."""
    family = get_family(lora.family)
    fits = []
    for name, cfg in getattr(family.config_class, "PRESETS", {}).items():
        with torch.device("meta"):
            model = family.model_class(cfg)
        if _fit_error(model, lora, "") is None:
            fits.append(name)
    return fits


def read_lora_alone(path: str | os.PathLike, family: str | None = None) -> tuple[LoRA, dict[str, list[str]]]:
    """A LoRA read with no base model to tell its family, and, when its names fit several families, each one's
    released sizes its shapes fit (empty when metadata, names or `family` decide).

    The family is `family` when given (refused when the file's scfm_family or its names say another), else
    read_lora's: the file's scfm_family, else the one family whose names read it. Names several families share
    (FLUX.1's and FLUX.2's block layers, musubi-tuner / ai-toolkit / diffusers attention) are told by the shapes:
    the family one of whose released sizes every layer fits (klein's SwiGLU MLP is 3 x width, FLUX.1's 4 x; klein
    9B is 4096 wide). When several fit (klein 4B and FLUX.1 are both 3072 wide, so an attention-only LoRA fits
    both) the caller must ask for a family; when none does (a LoRA of a model of another size) read_lora's rule
    stands (the widths, then the first registered family)."""
    path = Path(path).expanduser()
    lora = read_lora(path, family=family)
    header, meta = read_header(peft_file(path))
    stated = meta.get("scfm_family")
    if family is not None:
        want = get_family(family).name
        if lora.family != want:
            why = f"scfm_family metadata says {stated}" if stated else \
                f"layer names are no {want} model's (they read as {lora.family})"
            raise WeightsError(f"{path}: --family {want}, but its {why}; leave --family out")
        return lora, {}
    if stated or not (lora.modules or lora.diffs):  # stated, or text encoders only: no layer to tell by
        return lora, {}
    stems = [p[0] for k in header if not k.startswith(TEXT_ENCODER_PREFIXES) and (p := parse_key(k))]
    readers = [f.name for f in families() if stems and lora_family(stems, False, hint=f.name) == f.name]
    if len(readers) < 2:
        return lora, {}
    readings, sizes = {}, {}
    for name in readers:
        try:
            readings[name] = lora if name == lora.family else read_lora(path, family=name)
        except WeightsError:  # its names, but not its tensors' split: not this family's LoRA
            continue
        sizes[name] = _released_fits(readings[name]) if readings[name].family == name else []
    fitting = [name for name, fits in sizes.items() if fits]
    return (readings[fitting[0]] if len(fitting) == 1 else lora), sizes


def fits_alike(sizes: dict[str, list[str]]) -> str | None:
    """'FLUX.1 (flux-dev) and FLUX.2 (klein-4b)' when `read_lora_alone`'s shapes fit released sizes of several
    families, None when they do not."""
    fitting = {name: fits for name, fits in sizes.items() if fits}
    if len(fitting) < 2:
        return None
    return " and ".join(f"{get_family(n).display} ({', '.join(f)})" for n, f in fitting.items())


def undecided_family(path, sizes: dict[str, list[str]]) -> str | None:
    """The one line for a LoRA whose shapes fit released sizes of several families (`read_lora_alone`)."""
    alike = fits_alike(sizes)
    if alike is None:
        return None
    flags = " or ".join(f"--family {n}" for n, fits in sizes.items() if fits)
    return f"{path}: its layers fit {alike} alike, by names and shapes; pass {flags}"
