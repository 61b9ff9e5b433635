"""A pipeline's component files: the names the flags and config fields share (COMPONENT_FILES), the pipeline a
sampling command builds from them, their presence checked before anything loads, tokenizers read with a wrong file as
one line, the model_index.json that lists the parts of a folder, the parts an all-in-one file lends (SD3.5 / FLUX.1
checkpoints holding their VAE and text encoders), and whether the parts given fit the transformer, checked from
headers and configs before any weight loads (each pipeline's check_components)."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from model.vae import VAE_CONFIGS, VAEConfig
from weights.io import DTYPES, WeightsError, exists, file_version, read_header, read_json_object
from weights.lora_text import COMFY_PREFIXES
from weights.vae import PREFIXED

from .options import run_dtype

if TYPE_CHECKING:
    from .base import Pipeline


# The component files every family's `from_files` picks from, by the names generate's flags, make_dataset's and
# DistillConfig's fields share; `no_t5` (SD3 without T5) and `variant` (FLUX.2 [klein] base or distilled) ride along.
COMPONENT_FILES = ("vae", "clip", "clip_g", "t5", "clip_tokenizer", "clip_g_tokenizer", "t5_tokenizer", "qwen",
                   "qwen_tokenizer", "no_t5", "variant")


def component_files(options) -> dict:
    """`COMPONENT_FILES` read off a command line's args or a config (None where it has no such field)."""
    return {k: getattr(options, k, None) for k in COMPONENT_FILES}


def pipeline_from_args(args, model: Path, family, loras: Sequence = ()) -> Pipeline:
    """`family`'s pipeline for a sampling command (generate, make_dataset): its component files and run options
    (sampling/options.py add_run_options) from the command line, checked before anything loads."""
    pipe = family.part("pipeline").from_files(
        model, component_files(args), device=args.device, dtype=DTYPES[run_dtype(args)], fp8=args.fp8, loras=loras,
        blocks_to_swap=args.blocks_to_swap, fp8_compute=args.fp8_compute, compile=args.compile,
        ignore_te_lora=args.ignore_te_lora)
    pipe.sources.check()
    return pipe


def refuse_lora_model(model) -> None:
    """A LoRA given as --model, refused first, in one line: the model's family is otherwise guessed from the
    LoRA's layer names and it fails later as a pipeline with no VAE or a transformer missing its keys. Told apart
    as `tools/convert.py` tells it (weights/convert_plan.py detect: LoRA tensor names, or our LoRA metadata), from
    the header alone; a file that is no checkpoint at all is left to the family's detection, which says so."""
    from weights.convert_plan import detect  # here: keeps --help fast

    model = Path(model).expanduser()
    if not model.is_file():  # a LoRA is one file; a folder is a pipeline or transformer
        return
    try:
        lora = detect(model).family == "lora"
    except WeightsError:
        return
    if lora:
        raise WeightsError(f"--model {model} is a LoRA, not a model: pass the base model as --model and this file "
                           f"as --lora {model}")


def require_sources(sources, flags: dict[str, str], required, what=lambda name: name.replace("_", " ")) -> None:
    """Every `required` component of a pipeline's sources given (`what` names it; `flags`: field -> the generate
    flag that sets it), one line for the first that is not: before anything loads."""
    for name in required:
        if getattr(sources, name) is None:
            raise WeightsError(f"no {what(name)} given: pass {flags[name]} (or a diffusers pipeline folder)")


def check_paths(sources, flags: dict[str, str]) -> None:
    """Every path the sources were given exists; one line naming the flag of the first that does not, or, for a
    part the pipeline folder (`sources.folder`) should hold, the folder: the user passed no such flag."""
    folder = getattr(sources, "folder", None)
    for name, flag in flags.items():
        path = getattr(sources, name)
        if path is None or exists(Path(path)):
            continue
        if folder is not None and Path(path).parent == folder:
            raise WeightsError(f"{folder}: the pipeline folder has no {Path(path).name}/; download it again, or "
                               f"pass {flag} (a file or folder)")
        raise WeightsError(f"{flag} {path}: no such file or folder")


def load_tokenizer(load, path, flag: str, **kwargs):
    """`load(path, **kwargs)` with a file that is no tokenizer as one line naming `flag`: sentencepiece raises a
    bare RuntimeError, tokenizers a bare Exception, a damaged config a JSON error. Callers load tokenizers before
    the text encoders, so a wrong file costs no encoder load."""
    try:
        return load(path, **kwargs)
    except Exception as e:  # noqa: BLE001  (any of the libraries' errors means the same: not a tokenizer)
        reason = first_sentences(" ".join(str(e).split())) or type(e).__name__
        raise WeightsError(f"{flag} {path}: not a tokenizer ({reason}); pass the model's tokenizer folder or "
                           "file") from None


def first_sentences(text: str, limit: int = 160) -> str:
    """The whole sentences of `text` that fit in `limit` characters, at least the first one whole: a library's
    reason cut mid-sentence reads as a different reason."""
    sentences = re.split(r"(?<=[.!?;])\s+", text)
    kept = sentences[0]
    for sentence in sentences[1:]:
        if len(kept) + 1 + len(sentence) > limit:
            break
        kept += " " + sentence
    return kept


def read_model_index(folder: Path) -> dict | None:
    """A pipeline folder's model_index.json (None when there is none), damaged or broken as one line."""
    path = folder / "model_index.json"
    if not exists(path):
        return None
    return read_json_object(path, "download the pipeline folder again", "a model index")


# The prefixes SAI's SD3.5 and ComfyUI's all-in-one files keep each text encoder under (weights/text.py takes them
# as prefix=), ComfyUI's LoRA names for the same encoders turned round (weights/lora_text.py); and their VAE's
# (weights/vae.py SAI_PREFIX, COMFY_PREFIX).
BUNDLED_ENCODERS = {role: prefix for prefix, role in COMFY_PREFIXES.items()}
BUNDLED_VAE = tuple(f"{prefix}encoder.conv_in.weight" for prefix in PREFIXED.values())


def existing(path: Path) -> Path | None:
    """`path` where it exists (a broken link refused), None where not: a pipeline folder's optional part."""
    return path if exists(path) else None


def bundled_parts(model: Path) -> dict[str, Path]:
    """The parts an all-in-one `model` file holds beside its transformer ({"vae", "clip_l", ...}: model): the
    defaults of the parts no flag names. Read from the header alone."""
    if not model.is_file():
        return {}
    return {role: model for role in _bundled(model)}


def encoder_prefix(path, role: str) -> str | None:
    """`role`'s prefix in a file that keeps it under the all-in-one name (None otherwise: the loader finds it): a
    file that holds several encoders needs it, and the command line has no flag for it."""
    path = Path(path)
    if not path.is_file():
        return None
    prefix = BUNDLED_ENCODERS[role]
    return prefix if role in _bundled(path) else None


def _bundled(path: Path) -> tuple[str, ...]:
    """The roles of BUNDLED_ENCODERS, then "vae", that the file at `path` holds. A pipeline asks up to seven times
    (from_files, check_components, text_encoder), and an all-in-one file's header lists thousands of tensors: it
    is read once per version of the file (weights/io.py file_version, as its hashes)."""
    return _bundled_in(str(path), *file_version(path))  # errors name the path as given


@functools.lru_cache(maxsize=16)
def _bundled_in(path: str, *_version) -> tuple[str, ...]:
    keys = read_header(Path(path))[0]
    roles = tuple(role for role, prefix in BUNDLED_ENCODERS.items() if any(k.startswith(prefix) for k in keys))
    return roles + (("vae",) if any(k in keys for k in BUNDLED_VAE) else ())


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
