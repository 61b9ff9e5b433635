"""Checkpoint loading and saving: safetensors only, meta-device builds, declarative key maps."""

from .flux import load_flux, save_flux
from .io import WeightsError
from .mmdit import load_mmdit, save_mmdit
from .text import load_clip, load_t5
from .vae import load_vae

__all__ = ["WeightsError", "load_clip", "load_flux", "load_t5", "load_mmdit", "load_vae", "save_flux", "save_mmdit"]
