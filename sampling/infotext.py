"""A1111-style "infotext": the PNG `parameters` text that A1111 / Forge's PNG Info and Civitai read.

The format, as A1111 writes it (modules/processing.py, create_infotext) and reads it back
(modules/infotext_utils.py, parse_generation_parameters): the prompt, on any number of lines; then
`Negative prompt: ...` when there is one; then one last line of `Key: value` pairs joined by ", ", where a value
holding a comma, colon or newline is JSON-quoted. The reader takes that last line as settings only when it
holds at least three pairs, so a shorter one is left out: it would be read as part of the prompt.

Only what is true of our samplers is written, from the keys a caller's params have (generate's have them all;
a training sample has only its prompt): no value is filled in. Our full settings stay in the PNG as JSON
(`sampling.png_record.save_png`).
"""

from __future__ import annotations

import json
from pathlib import Path

_NUMBER = (int, float)


def quote(value) -> str:
    """A value as A1111 writes it: JSON-quoted when it holds what would split the settings line."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n') else text


def lora_name(record: dict) -> str:
    """The file's stem, less the `:` and `,` that would split `<lora:name:scale>` and `Lora hashes` (A1111 drops
    them too)."""
    return Path(record["file"]).stem.translate(str.maketrans("", "", ":,"))


def schedule_type(grid, shift) -> str | None:
    """Our sigma grid in words, e.g. `SCFM shift 3`; A1111's own names (Simple, Karras, ...) would be untrue."""
    if grid not in ("scfm", "diffusers"):
        return None
    words = ["SCFM" if grid == "scfm" else "Diffusers"]
    if shift == "dynamic":
        words.append("dynamic shift")
    elif isinstance(shift, _NUMBER):
        words.append(f"shift {shift:g}")
    return " ".join(words)


def infotext(params: dict) -> str:
    """The infotext of one image from its params (see the module docstring for which keys are used)."""
    get = params.get
    family = get("family")
    loras = [r for r in get("loras") or () if isinstance(r, dict)]  # generate's records
    # A1111 writes the LoRAs into the prompt as <lora:name:scale> (so "Send to txt2img" applies them again at
    # that scale) and the files' hashes under "Lora hashes" (Forge and Civitai find the files by them)
    prompt = " ".join([str(get("prompt") or ""), *(f"<lora:{lora_name(r)}:{r['scale']:g}>" for r in loras)])
    pairs: dict[str, object] = {}
    if isinstance(get("steps"), int):
        pairs.update(Steps=get("steps"), Sampler="Euler")  # the only sampler we have
    pairs["Schedule type"] = schedule_type(get("schedule"), get("shift"))
    # generate's negative_prompt is None when no negative pass ran: CFG was off, which A1111 writes as scale 1
    cfg_on = get("negative_prompt") is not None
    # which scale is CFG's is told by the settings the family's config has, not by its name: a guidance-embedding
    # model (Flux) has `true_cfg` beside its `guidance`; a CFG model (SD3) has `guidance` alone
    if "true_cfg" in params:
        pairs["CFG scale"] = get("true_cfg") if cfg_on else 1  # real CFG against the negative prompt
        pairs["Distilled CFG Scale"] = get("guidance")  # the guidance embedding: Forge's name for it
    elif family is not None:
        pairs["CFG scale"] = get("guidance") if cfg_on else 1
    pairs["Seed"] = get("seed")
    if isinstance(get("width"), int) and isinstance(get("height"), int):
        pairs["Size"] = f"{get('width')}x{get('height')}"
    if isinstance(get("model"), str):
        pairs["Model"] = Path(get("model")).name.removesuffix(".safetensors")
    if loras:
        pairs["Lora hashes"] = ", ".join(f"{lora_name(r)}: {r['a1111_hash']}" for r in loras)
    pairs["Version"] = "scfm"
    pairs = {k: v for k, v in pairs.items() if isinstance(v, (*_NUMBER, str))}
    lines = [prompt.strip()]
    if get("negative_prompt"):
        lines.append(f"Negative prompt: {get('negative_prompt')}")
    if len(pairs) >= 3:
        lines.append(", ".join(f"{k}: {quote(v)}" for k, v in pairs.items()))
    return "\n".join(lines).strip()
