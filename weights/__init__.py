"""Checkpoint loading and saving: safetensors only, meta-device builds, declarative key maps."""

from .flux import load_flux, save_flux
from .io import WeightsError

# weights.lora before its two halves: lora_write / lora_merge import from it and it re-exports them, so entering
# through either half first would find weights.lora half-built
from .lora import apply_loras, read_lora, unload_loras, write_lora
from .mmdit import load_mmdit, save_mmdit
from .text import load_clip, load_t5
from .vae import load_vae

__all__ = ["WeightsError", "apply_loras", "load_clip", "load_flux", "load_mmdit", "load_t5", "load_vae",
           "read_lora", "save_flux", "save_mmdit", "unload_loras", "write_lora"]
