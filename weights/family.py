"""What a model family is, as data: the record each family file fills in (weights/families/) and the registry
(weights/families/__init__.py) hands to every caller that must know which family a model is or how it is driven.

A family is the set of its own files plus one record: no code outside those files branches on its name. The
weights floor (loading, key maps, LoRA read / write / merge, conversion) uses the fields directly. What sampling
and distill add (the velocity wrapper, the pipeline, the SCFM LoRA target table) lives above this floor, so the record
names it as "module:attribute" and `Family.part` imports it when an upper layer asks: the registry stays
importable by everything and imports nothing above it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .io import WeightsError

# How to mend a config that a file's keys cannot give (a key missing, a head dim no preset's RoPE axes fit), in
# words a CLI user can act on: the loaders take a diffusers config.json beside the weights in a folder.
CONFIG_JSON_FIX = "pass a folder holding the file and its diffusers config.json"


@dataclass(frozen=True)
class Family:
    name: str  # the one spelling: metadata, LoRA files, command lines
    title: str  # in messages: "Flux", "SD3 / SD3.5"
    display: str  # the published name, in messages about LoRA parts: "FLUX.1"
    model_class: type
    config_class: type
    aliases: tuple[str, ...] = ()  # older spellings that files written before still carry

    # ----- how it is driven
    # "embedding": a guidance input (FLUX.1-dev; absent in schnell); "cfg": classifier-free guidance against a
    # negative prompt, which SCFM can bake in (docs/method.md §5)
    guidance: str = "embedding"
    latent_channels: Callable = None  # config -> channels of the VAE latent it denoises
    token_side: Callable = None  # config -> latent pixels per token side (Flux packs 2x2 outside the model)
    # the resolution-dependent shift its pipeline samples with, which SCFM's dynamic-shift elements train on
    # (distill/scfm.py): "linear" FLUX.1's mu, linear in the image tokens; "empirical" FLUX.2's, in the tokens and
    # the step count (sampling/schedules.py)
    dynamic_shift: str = "linear"

    # ----- recognising files
    detect_layout: Callable = None  # keys -> (prefix, "official" | "diffusers"), or None: not this family's layout
    official_name: str = ""  # who names the official layout: "BFL", "SAI"
    diffusers_classes: tuple[str, ...] = ()  # `_class_name` prefixes of its model_index.json / config.json
    diffusers_class: str = ""  # its transformer's diffusers class, named when a diffusers file is incomplete
    claims: Callable = None  # keys -> bool: a checkpoint of this family's transformer (any layout)
    # key fragments only its files have: another family whose names its files also match does not read them
    markers: tuple[str, ...] = ()
    key_hints: tuple[tuple[str, str], ...] = ()  # (key fragment, "what such a file is"): other loaders' errors
    loader: str = ""  # how Python loads it, said in those errors after the CLI's way: "weights.load_flux"
    other_parts: tuple[str, ...] = ()  # key prefixes of the other parts of all-in-one files (never loaded)
    official_prefix: str = ""  # the prefix its official single files carry (written by conversion)

    # ----- config and key maps
    config_from_diffusers: Callable = None  # config.json dict -> config
    config_to_diffusers: Callable = None  # config -> config.json dict
    infer_config: Callable = None  # (official shapes, source) -> config
    rules: Callable = None  # config -> the official <-> diffusers table (weights/keymaps)
    diffusers_rules: Callable = None  # diffusers keys -> the table for the model shape they describe
    split_sizes: Callable = None  # config -> how fused official layers split into diffusers' pieces

    # ----- LoRA files
    lora_names: Callable = None  # key stems -> weights.keymaps.lora.LoRANames large enough for them
    lora_widths: frozenset = frozenset()  # layer widths only its released models have: a last resort
    text_encoders: tuple[str, ...] = ()  # encoder names (weights/lora_text.py ENCODER_NAMES)
    text_lora_prefixes: Mapping[str, str] = field(default_factory=dict)  # LoRA key prefix -> encoder
    architecture: str = ""  # ModelSpec `modelspec.architecture`, family-wide
    implementation: str = ""  # ModelSpec `modelspec.implementation`
    kohya_module: str = ""  # sd-scripts' `ss_network_module`
    kohya_base: str = ""  # sd-scripts' `ss_base_model_version`
    base_architecture: Callable = None  # config -> the exact ModelSpec id of a released size, or None
    # diffusers' kohya loader: None when it has none for this family, else the modules it silently drops
    diffusers_kohya_drops: tuple[str, ...] | None = ()
    describe: Callable = None  # config -> one line for `convert.py info` ("Flux dev (guidance-distilled), 12B, ...")

    # ----- above this floor, named lazily (see the module docstring)
    parts: Mapping[str, str] = field(default_factory=dict)

    @property
    def spellings(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def part(self, name: str) -> Any:
        """The object `parts[name]` names ("module:attribute"), imported now; a one-line error when the family
        does not have it."""
        ref = self.parts.get(name)
        if ref is None:
            raise WeightsError(f"scfm has no {name.replace('_', ' ')} for {self.title} models yet "
                             f"(weights/families/{self.name}.py lists what it has)")
        if not isinstance(ref, str):
            return ref  # a family registered at run time may hand the object itself
        module, attribute = ref.split(":")
        return getattr(importlib.import_module(module), attribute)
