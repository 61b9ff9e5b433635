"""Checkpoint loading and saving: safetensors only, meta-device builds, declarative key maps."""

from .flux import load_flux, save_flux
from .io import WeightsError
from .lora import read_lora
from .lora_merge import apply_loras, unload_loras
from .lora_write import write_lora
from .mmdit import load_mmdit, save_mmdit
from .text import load_clip, load_t5
from .vae import load_vae

__all__ = ["WeightsError", "apply_loras", "load_clip", "load_flux", "load_mmdit", "load_t5", "load_vae",
           "read_lora", "save_flux", "save_mmdit", "unload_loras", "write_lora"]
