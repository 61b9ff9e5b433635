"""What a PNG of ours records: the settings written into it (as JSON under `scfm`, and as the A1111 infotext other
tools read) and read back, for `generate --from-png` checked key by key: a missing file, another image format, a PNG
without our chunk or with a value edited by hand is one line, not a TypeError (or a run that writes nothing) later.
from_png.png_config turns these settings into a config."""

from __future__ import annotations

import json
import math
from pathlib import Path

from weights.atomic import atomic_path
from weights.families import families
from weights.io import DTYPES

from .base import MAX_SIDE
from .infotext import infotext
from .options import MAX_STEPS

# The PNG text chunk holding our settings as JSON; `parameters` holds the A1111 infotext other tools read.
PNG_PARAMS_KEY = "scfm"


def save_png(image, path: Path, params: dict) -> None:
    """Atomically (a crash never leaves half a PNG under the final name), with `params` twice: as JSON under
    `scfm`, which `read_png_params` reads, and as A1111 infotext under `parameters` (sampling/infotext.py)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext(params))
    info.add_text(PNG_PARAMS_KEY, json.dumps(params))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def read_png_params(image) -> dict:
    """The params `save_png` stored, from a path or an open PIL image. PNGs written before the infotext hold the
    JSON under `parameters`; a PNG without either is a ValueError."""
    from PIL import Image

    if hasattr(image, "text"):
        text = image.text
    else:
        with Image.open(image) as im:
            text = im.text
    raw = text.get(PNG_PARAMS_KEY) or text.get("parameters", "")
    try:
        params = json.loads(raw)
        if isinstance(params, dict):
            return params
    except json.JSONDecodeError:
        pass
    raise ValueError(f"{getattr(image, 'filename', image)}: no scfm settings in this PNG (not written by scfm?)")


def png_params(path: str) -> dict:
    """The scfm settings of the PNG at `path`, each of the right type and range: a file that is missing, no PNG,
    without our chunk or with a value edited by hand is one line, not a TypeError (or a run writing nothing)
    later."""
    from PIL import Image

    fix = "pass a PNG that sampling.generate (or the app) wrote"
    try:
        with Image.open(path) as image:
            kind = image.format
            params = read_png_params(image) if kind == "PNG" else {}
    except FileNotFoundError:
        raise ValueError(f"--from-png {path}: no such file; {fix}") from None
    except OSError as e:  # PIL's UnidentifiedImageError (no image at all), a folder, a truncated PNG, no permission
        raise ValueError(f"--from-png {path}: not a readable image ({e.strerror or e}); {fix}") from None
    except ValueError:  # read_png_params: a PNG without our chunk
        raise ValueError(f"--from-png {path}: no scfm settings in this PNG (not written by scfm?); {fix}") from None
    if kind != "PNG":
        raise ValueError(f"--from-png {path}: a {kind} image, not a PNG; {fix}")
    missing = [k for k in PNG_REQUIRED if k not in params]
    if missing:
        raise ValueError(f"--from-png {path}: its scfm settings lack {', '.join(missing)}; only PNGs "
                         "sampling.generate (or the app) wrote can be rendered again")
    for key, value in params.items():
        check = PNG_CHECKS.get(key)
        if check is None or (value is None and key not in PNG_REQUIRED):  # None: a value the model ignored
            continue
        ok, what = check
        if not ok(value):
            raise ValueError(f"--from-png {path}: its recorded {key} {json.dumps(value)[:60]} is not {what} (the "
                             f"file was edited?); {fix}, unchanged")
    return params


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _lora_record(r) -> bool:
    return (isinstance(r, dict) and isinstance(r.get("path"), str) and isinstance(r.get("sha256"), str)
            and _number(r.get("scale")))


PNG_REQUIRED = ("prompt", "model", "family", "loras", "width", "height", "seed", "schedule")
# what a PNG's recorded value must be, key by key (render writes them; keys not here are not read back)
PNG_CHECKS = {
    "prompt": (lambda v: isinstance(v, str), "a string"),
    "model": (lambda v: isinstance(v, str) and v != "", "a path"),
    "family": (lambda v: isinstance(v, str) and v in {f.name for f in families()},
               f"one of {', '.join(f.name for f in families())}"),
    "loras": (lambda v: isinstance(v, list) and all(_lora_record(r) for r in v),
              "a list of LoRA records {file, path, scale, sha256}"),
    "width": (lambda v: _int(v) and 0 < v <= MAX_SIDE, f"a width from 1 to {MAX_SIDE} px"),
    "height": (lambda v: _int(v) and 0 < v <= MAX_SIDE, f"a height from 1 to {MAX_SIDE} px"),
    "seed": (lambda v: _int(v) and 0 <= v < 2**64, "a seed from 0 to 2**64 - 1"),
    "schedule": (lambda v: isinstance(v, str) and v in ("diffusers", "scfm"), "'diffusers' or 'scfm'"),
    "steps": (lambda v: _int(v) and 1 <= v <= MAX_STEPS, f"a step count from 1 to {MAX_STEPS}"),
    "max_sequence_length": (lambda v: _int(v) and 1 <= v <= 512, "a text length from 1 to 512 tokens"),
    "guidance": (_number, "a finite number"),
    "true_cfg": (_number, "a finite number"),
    "negative_prompt": (lambda v: isinstance(v, str), "a string"),
    "shift": (lambda v: v == "dynamic" if isinstance(v, str) else _number(v) and v > 0,
              "a positive number or 'dynamic'"),
    "slg_layers": (lambda v: isinstance(v, list) and all(_int(i) and i >= 0 for i in v), "a list of block indices"),
    "slg_scale": (_number, "a finite number"),
    "slg_start": (lambda v: _number(v) and 0 <= v <= 1, "a fraction from 0 to 1"),
    "slg_stop": (lambda v: _number(v) and 0 <= v <= 1, "a fraction from 0 to 1"),
    "dtype": (lambda v: isinstance(v, str) and v in DTYPES, f"one of {', '.join(DTYPES)}"),
    "fp8": (lambda v: isinstance(v, bool), "true or false"),
    "fp8_compute": (lambda v: isinstance(v, bool), "true or false"),
    "ignore_te_lora": (lambda v: isinstance(v, bool), "true or false"),
    "variant": (lambda v: isinstance(v, str) and v in ("base", "distilled"), "'base' or 'distilled'"),
    # row r of an n-row draw of the seed: r outside the draw would render no image at all
    "noise_row": (lambda v: isinstance(v, list) and len(v) == 2 and all(map(_int, v)) and 0 <= v[0] < v[1],
                  "[row, rows] with 0 <= row < rows"),
}
