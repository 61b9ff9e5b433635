"""What other tools' LoRA files need beyond the names (weights/lora.py reads them all): PEFT's configuration
(diffusers' `lora_adapter_metadata`, or a `save_pretrained` folder's `adapter_config.json`: lora_alpha, rank /
alpha patterns, rsLoRA; DoRA refused), ComfyUI's full differences (`.diff` / `.diff_b`) put together in official
row order, and which tool's spelling a file uses (for `convert.py info`)."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .io import WeightsError
from .keymaps import swap_halves
from .keymaps.lora import TEXT_ENCODER_PREFIXES

PEFT_METADATA_KEY = "lora_adapter_metadata"
PEFT_FILE = "adapter_model.safetensors"  # what peft's save_pretrained writes, beside adapter_config.json
# diffusers' text-encoder prefixes, whose alpha comes from `lora_adapter_metadata` (or `.alpha` keys) by peft's rule;
# every other text-encoder prefix is kohya's rule
PEFT_TEXT_PREFIXES = ("text_encoder.", "text_encoder_2.", "text_encoder_3.")


def peft_alpha(config: dict, module: str, rank: int, alpha_key: Tensor | None) -> float:
    """The alpha that gives peft's scale as alpha / r: peft scales by lora_alpha / r, or with `use_rslora` by
    lora_alpha / sqrt(r), which is alpha / r for alpha = lora_alpha * sqrt(r)."""
    rs = math.sqrt(rank) if config.get("use_rslora") else 1.0
    if alpha_key is not None:
        return float(alpha_key) * rs
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):  # peft's own pattern rule
            return float(value) * rs
    if config:  # diffusers builds peft's LoraConfig from this metadata, whose lora_alpha defaults to 8
        return float(config.get("lora_alpha", 8)) * rs
    return float(rank)  # no alpha anywhere: diffusers uses alpha = r (scale 1)


def whole_diff(names, official: str, pieces: dict, width: int | None, src: str) -> Tensor:
    """A full difference of `official`'s weight or bias in official row order: one piece (official names), or one
    per diffusers slice, all of which must be there (their widths are not known otherwise)."""
    rule = names.rules[official]
    if None in pieces:
        diff = pieces[None]
    else:
        missing = [rule.others[i] for i in range(len(rule.others)) if i not in pieces]
        if missing:
            raise WeightsError(f"{src}: full differences for part of {official} but not for {', '.join(missing)}; "
                               "ComfyUI would patch only those rows, scfm needs every slice")
        diff = torch.cat([pieces[i] for i in range(len(rule.others))])
        if names.swapped(official, diff.shape[0], width or 0):
            diff = swap_halves(diff)
    return diff


def peft_file(path: Path) -> Path:
    """A PEFT `save_pretrained` folder means the adapter file in it."""
    if path.is_dir():
        if not (path / PEFT_FILE).is_file():
            raise WeightsError(f"{path}: a folder without {PEFT_FILE}; pass a LoRA .safetensors file or a PEFT "
                               "save_pretrained folder")
        return path / PEFT_FILE
    return path


def peft_config(path: Path, meta: dict, src: str) -> dict:
    """peft's LoraConfig for the file: diffusers' `lora_adapter_metadata`, else the `adapter_config.json` of a
    PEFT save_pretrained folder (rank / alpha patterns, use_rslora), else none."""
    if PEFT_METADATA_KEY in meta:
        return {k.removeprefix("transformer."): v for k, v in peft_metadata(meta, src).items()}
    beside = path.parent / "adapter_config.json"
    if path.name != PEFT_FILE or not beside.is_file():
        return {}
    try:
        config = json.loads(beside.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{beside}: unreadable ({e}); the PEFT folder is damaged") from None
    _check_alphas(config, str(beside))
    if config.get("use_dora"):
        raise WeightsError(f"{beside}: a DoRA adapter (peft use_dora; its magnitude vector has no LoRA "
                           "equivalent); scfm reads plain LoRA files only")
    return config


def peft_metadata(meta: dict, src: str) -> dict:
    """diffusers' `lora_adapter_metadata` as written, every part's config under its prefix (`transformer.`,
    `text_encoder.`, ...), checked; {} without it."""
    if PEFT_METADATA_KEY not in meta:
        return {}
    try:
        config = json.loads(meta[PEFT_METADATA_KEY])
    except json.JSONDecodeError as e:
        raise WeightsError(f"{src}: its {PEFT_METADATA_KEY} metadata is not JSON ({e}); the file is damaged: "
                           "re-export it") from None
    _check_alphas(config, f"{src}: its {PEFT_METADATA_KEY} metadata")
    return config


def kohya_alpha(alpha: Tensor | None, rank: int) -> float:
    """kohya's rule as the generic loaders apply it (diffusers, ComfyUI): a missing alpha means alpha = rank,
    scale 1; an alpha of 0 is scale 0, no effect (sd-scripts' own loader reads it as rank: `warn_zero_alphas`)."""
    return float(rank) if alpha is None else float(alpha)


def warn_zero_alphas(tensors: dict[str, Tensor], layout: str, src: str) -> None:
    """One warning line for the `.alpha` keys of 0 that `kohya_alpha` reads (a kohya-layout file's, and the text
    encoders' but under diffusers' prefixes); sd-scripts never saves one."""
    kohya = [k for k in tensors if (layout == "kohya" or k.startswith(TEXT_ENCODER_PREFIXES))
             and not k.startswith(PEFT_TEXT_PREFIXES)]
    zeros = sorted(k for k in kohya if k.endswith(".alpha") and not tensors[k].any())
    if zeros:
        more = f" (and {len(zeros) - 1} more .alpha keys)" if len(zeros) > 1 else ""
        warnings.warn(f"{src}: {zeros[0]}{more} is 0: applied with no effect, as diffusers and ComfyUI apply it; "
                      "sd-scripts would apply it at full strength (alpha = rank)", stacklevel=3)


def _check_alphas(config, where: str) -> None:
    """A PEFT configuration must be a JSON object whose alphas (lora_alpha, alpha_pattern's values, also under
    diffusers' `transformer.` / `text_encoder.` prefixes) are finite numbers: they scale every delta."""
    if not isinstance(config, dict):
        raise WeightsError(f"{where} is not a JSON object (a PEFT LoraConfig); the file is damaged: re-export it")
    for key, value in config.items():
        name = key.rpartition(".")[2]
        if name == "lora_alpha":
            values = {key: value}
        elif name == "alpha_pattern" and value is not None:
            if not isinstance(value, dict):
                raise WeightsError(f"{where}: {key} is not a JSON object; the file is damaged: re-export it")
            values = {f"{key}[{k!r}]": v for k, v in value.items()}
        else:
            continue
        for label, v in values.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise WeightsError(f"{where}: {label} is {v!r}, not a finite number; the file is damaged: "
                                   "re-export it")


def flavour(stems: list[str], layout: str, path: Path, config: dict) -> str:
    """Which tool writes this spelling (ComfyUI maps them all, comfy/lora.py model_lora_keys_unet)."""
    spellings = {"lycoris_": "SimpleTuner LyCORIS (lycoris_)", "lora_transformer_": "OneTrainer (lora_transformer_)",
                 "lora_unet_": "kohya / sd-scripts (lora_unet_)", "diffusion_model.": "ComfyUI (diffusion_model.)",
                 "model.diffusion_model.": "ComfyUI (model.diffusion_model.)",
                 "base_model.model.": "PEFT save_pretrained (base_model.model.)",
                 "transformer.": "diffusers / PEFT (transformer.)"}
    seen = sorted({name for prefix, name in spellings.items() if any(s.startswith(prefix) for s in stems)})
    what = ", ".join(seen) or ("bare official names" if layout == "kohya" else "bare diffusers names (DiffSynth)")
    if config.get("use_rslora"):
        what += ", rsLoRA (scale alpha / sqrt(r))"
    if path.name == PEFT_FILE and (path.parent / "adapter_config.json").is_file():
        what += ", with adapter_config.json"
    return what
