"""Checkpoint loading and saving: safetensors only, meta-device builds, declarative key maps."""

from .flux import load_flux, save_flux
from .io import WeightsError

__all__ = ["WeightsError", "load_flux", "save_flux"]
