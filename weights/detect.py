"""Which model a file, folder or pipeline folder holds, and in which layout: the transformer families (Flux,
SD3 / SD3.5) and their official / diffusers key layouts, with a pointed one-line error for the wrong file.

The loaders (weights/flux.py, weights/mmdit.py), the LoRA merger, the converter and the CLIs all ask here, so a
file is recognised the same way everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

from .io import WeightsError, model_files, read_shapes


def _not_this(keys, source: str, others: list[tuple[str, str]], wanted: str, layouts: str) -> WeightsError:
    """The one-line error for a file that is not `wanted`: what it is instead when its keys tell, else its first
    keys."""
    for fragment, what in others:
        if any(fragment in k for k in keys):
            return WeightsError(f"{source}: this is {what}, not {wanted}")
    first = ", ".join(sorted(keys)[:3])
    return WeightsError(f"{source}: not {wanted} in {layouts} (first keys: {first})")


# Prefixes other tools put in front of the transformer's keys: ComfyUI and all-in-one files, some exporters.
_FLUX_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")

# Key fragments of the other families, so a wrong file gets a pointed message instead of "missing keys".
_NOT_FLUX = [
    ("joint_blocks.", "an SD3 / SD3.5 MMDiT checkpoint; load it with weights.load_mmdit"),
    ("lora_down", "a LoRA, not a base model; load the base model and apply it with --lora"),
    ("lora_A", "a LoRA, not a base model; load the base model and apply it with --lora"),
    ("encoder.down.", "a VAE (autoencoder) checkpoint; load it with weights.load_vae"),
    ("encoder.down_blocks.", "a VAE (autoencoder) checkpoint; load it with weights.load_vae"),
    ("encoder.block.", "a T5 text encoder; load it with weights.load_t5"),
    ("text_model.", "a CLIP text encoder; load it with weights.load_clip"),
]


def _flux_prefix(keys) -> str:
    for p in _FLUX_PREFIXES:
        if any(k.startswith(p + "img_in.") or k.startswith(p + "x_embedder.") for k in keys):
            return p
    return ""


def detect_flux_layout(keys, source: str) -> tuple[str, str]:
    """(prefix, layout) with layout "official" (BFL) or "diffusers"; a one-line error for anything else."""
    prefix = _flux_prefix(keys)
    bare = {k[len(prefix):] for k in keys if k.startswith(prefix)}
    if "img_in.weight" in bare or any(k.startswith("double_blocks.") for k in bare):
        return prefix, "official"
    if "x_embedder.weight" in bare or any(k.startswith("single_transformer_blocks.") for k in bare):
        return prefix, "diffusers"
    raise _not_this(keys, source, _NOT_FLUX, "a Flux transformer", "the BFL or diffusers layout")


# Prefixes in front of the transformer's keys: SAI single files and ComfyUI use the first.
_MMDIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "")

# Key fragments of the other families, so a wrong file gets a pointed message instead of "missing keys".
_NOT_MMDIT = [
    ("double_blocks.", "a Flux transformer (BFL layout); load it with weights.load_flux"),
    ("single_transformer_blocks.", "a Flux transformer (diffusers layout); load it with weights.load_flux"),
    ("lora_down", "a LoRA, not a base model; load the base model and apply the LoRA to it"),
    ("lora_A", "a LoRA, not a base model; load the base model and apply the LoRA to it"),
    ("encoder.down.", "a VAE (autoencoder) checkpoint; load it with weights.load_vae"),
    ("encoder.down_blocks.", "a VAE (autoencoder) checkpoint; load it with weights.load_vae"),
    ("encoder.block.", "a T5 text encoder; load it with weights.load_t5"),
    ("text_model.", "a CLIP text encoder; load it with weights.load_clip"),
]


def detect_mmdit_layout(keys, source: str) -> tuple[str, str]:
    """(prefix, layout) with layout "official" (SAI) or "diffusers"; a one-line error for anything else."""
    for prefix in _MMDIT_PREFIXES:
        if prefix + "x_embedder.proj.weight" in keys:
            return prefix, "official"
        if prefix + "pos_embed.proj.weight" in keys:
            return prefix, "diffusers"
    raise _not_this(keys, source, _NOT_MMDIT, "an SD3 / SD3.5 transformer", "the SAI or diffusers layout")


def detect_family(model: Path) -> str:
    """"flux" or "sd3": from model_index.json / config.json class names, else from the checkpoint's keys."""
    if model.is_dir():
        for name in ("model_index.json", "config.json", "transformer/config.json"):
            if (model / name).exists():
                cls = str(json.loads((model / name).read_text()).get("_class_name", ""))
                if cls.startswith("StableDiffusion3") or cls == "SD3Transformer2DModel":
                    return "sd3"
                if cls.startswith("Flux"):
                    return "flux"
    files, _ = model_files(model, "transformer")
    keys = read_shapes(files)[0].keys()
    # Flux: BFL double_blocks / diffusers single_transformer_blocks; SD3: SAI joint_blocks / diffusers pos_embed
    if any("double_blocks." in k or "single_transformer_blocks." in k for k in keys):
        return "flux"
    if any("joint_blocks." in k or k.endswith("pos_embed.proj.weight") for k in keys):
        return "sd3"
    raise WeightsError(f"{model}: neither a Flux nor an SD3 / SD3.5 transformer (by its keys)")
