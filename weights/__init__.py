"""Checkpoint loading and saving: safetensors only, meta-device builds, declarative key maps."""

from .io import WeightsError
from .lora import read_lora
from .lora_merge import apply_loras, unload_loras
from .lora_write import write_lora
from .text import load_clip, load_t5
from .transformer import load_flux, load_flux2, load_mmdit, load_transformer, save_transformer
from .vae import load_vae
from .vision import load_clip_vision

__all__ = ["WeightsError", "apply_loras", "load_clip", "load_clip_vision", "load_flux", "load_flux2", "load_mmdit",
           "load_t5", "load_transformer", "load_vae", "read_lora", "save_transformer", "unload_loras", "write_lora"]
