"""A pipeline's parts on disk beyond its own folder rule: the model_index.json that lists them, the parts an
all-in-one file lends (SD3.5 / FLUX.1 checkpoints holding their VAE and text encoders), and whether the parts given
fit the transformer, checked from headers and configs before any weight loads (each pipeline's check_components)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from model.vae import VAE_CONFIGS, VAEConfig
from weights.io import WeightsError, exists, read_header
from weights.vae import PREFIXED

if TYPE_CHECKING:
    from .base import Pipeline


def read_model_index(folder: Path) -> dict | None:
    """A pipeline folder's model_index.json (None when there is none), damaged or broken as one line."""
    path = folder / "model_index.json"
    if not exists(path):
        return None
    try:
        index = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: damaged ({e}); download the pipeline folder again") from None
    if not isinstance(index, dict):
        raise WeightsError(f"{path}: not a model index (a JSON object); download the pipeline folder again")
    return index


# The prefixes SAI's SD3.5 and ComfyUI's all-in-one files keep each text encoder under (weights/text.py takes them
# as prefix=), and their VAE's (weights/vae.py SAI_PREFIX, COMFY_PREFIX).
BUNDLED_ENCODERS = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
                    "t5": "text_encoders.t5xxl.transformer."}
BUNDLED_VAE = tuple(f"{prefix}encoder.conv_in.weight" for prefix in PREFIXED.values())


def bundled_parts(model: Path) -> dict[str, Path]:
    """The parts an all-in-one `model` file holds beside its transformer ({"vae", "clip_l", ...}: model): the
    defaults of the parts no flag names. Read from the header alone."""
    if not model.is_file():
        return {}
    keys = read_header(model)[0]
    parts = {role: model for role, prefix in BUNDLED_ENCODERS.items() if any(k.startswith(prefix) for k in keys)}
    return {**parts, **({"vae": model} if any(k in keys for k in BUNDLED_VAE) else {})}


def encoder_prefix(path, role: str) -> str | None:
    """`role`'s prefix in a file that keeps it under the all-in-one name (None otherwise: the loader finds it): a
    file that holds several encoders needs it, and the command line has no flag for it."""
    path = Path(path)
    if not path.is_file():
        return None
    prefix = BUNDLED_ENCODERS[role]
    return prefix if any(k.startswith(prefix) for k in read_header(path)[0]) else None


# What the latent statistics tell of a 16-channel VAE: FLUX.1's and SD3.5's have the same network and tensor names
# and differ only in scaling_factor / shift_factor. Those come from config.json, the file's metadata, or, for a
# single file without either, from its layout as weights/vae.py reads it (BFL's bare names and ComfyUI's vae. are
# FLUX.1's, SAI's first_stage_model. SD3.5's): the statistics the VAE would be decoded with, so a VAE of the other
# kind is wrong whatever its weights are. Other statistics (a fine-tune, the demo) are not judged.
VAE_KINDS = {"flux1": "FLUX.1's", "sd3.5": "SD3.5's"}


def vae_kind(config: VAEConfig) -> str | None:
    """"batch_norm" (FLUX.2's: BatchNorm statistics), "flux1" or "sd3.5" by the scale / shift (VAE_CONFIGS' names),
    else None (not judged)."""
    if config.batch_norm_eps is not None:
        return "batch_norm"
    for kind in VAE_KINDS:
        preset = VAE_CONFIGS[kind]
        if math.isclose(config.scale_factor, preset.scale_factor, abs_tol=1e-6) and math.isclose(
                config.shift_factor, preset.shift_factor, abs_tol=1e-6):
            return kind
    return None


def check_vae_fit(pipe: Pipeline, channels: int, packed: bool, kinds: tuple[str, ...], title: str, fix: str) -> None:
    """The VAE's latent channels are what the transformer takes (`channels`: its in_channels, 2x2-`packed` or not),
    and its kind (vae_kind) one of `kinds` where it is known."""
    config, vae, model = pipe.vae_config(), pipe.sources.vae, pipe.sources.transformer
    z = config.z_channels * (4 if packed else 1)
    if z != channels:
        per = f"{config.z_channels} x 2 x 2 = {z}" if packed else str(z)
        raise WeightsError(f"--vae {vae}: its latents have {per} channels, but --model {model} ({title}) takes "
                           f"{channels}; pass {fix}")
    kind = vae_kind(config)
    if kind is not None and kind not in kinds:
        what = ("FLUX.2's VAE (BatchNorm latent statistics)" if kind == "batch_norm" else
                f"{VAE_KINDS[kind]} VAE (latent scale {config.scale_factor:g}, shift {config.shift_factor:g})")
        raise WeightsError(f"--vae {vae}: {what}, but --model {model} is {title}, whose latents it would decode "
                           f"wrongly; pass {fix}")


def check_width(flag: str, path, what: str, width: int, model: Path, takes: str, expected: int, fix: str) -> None:
    """One text encoder's `width` against what the transformer takes (`takes`: its config's name for it)."""
    if width != expected:
        raise WeightsError(f"{flag} {path}: {what} is {width} wide, but --model {model} takes {expected} ({takes}); "
                           f"pass {fix}")
