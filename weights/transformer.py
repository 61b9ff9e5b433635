"""Load and save any family's transformer (weights/families) in its official and diffusers layouts: one
skeleton, the family record supplies the layout detection, the config sources and the key tables.

The loaders read a single file (official or diffusers names, behind any prefix ComfyUI or all-in-one files
put there; an all-in-one file's other parts are skipped), a diffusers `transformer/` folder (one file or
shards) or a pipeline folder. The config comes from `config=` (a preset name or a config), else config.json,
else the config our saver writes into the metadata, else the key names and shapes. The model is built on the
meta device and each tensor assigned as it is read (weights/assign.py): peak memory is one copy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .assign import assign_tensors, check_keys_and_shapes
from .atomic import atomic_save
from .families import article, family_of, find_layout, get_family
from .families.flux import FLUX
from .families.flux2 import FLUX2
from .families.sd3 import SD3
from .family import CONFIG_JSON_FIX, Family
from .io import CONFIG_METADATA_KEY, WeightsError, config_from_metadata
from .keymaps import official_shapes, to_official, to_others
from .reader import TensorReader, model_files, read_shapes

# Where a config read from the checkpoint came from, and how to mend it, for the one-line errors.
_FROM_JSON = ("its config.json", "fix or delete the config.json")
_FROM_METADATA = (f"its metadata ({CONFIG_METADATA_KEY})", f"re-export the file, or {CONFIG_JSON_FIX}")
_FROM_SHAPES = ("its key shapes", CONFIG_JSON_FIX)


def _bad_config(family: Family, source: str, origin: tuple[str, str], problem: str) -> WeightsError:
    return WeightsError(f"{source}: the {family.title} config from {origin[0]} {problem}; {origin[1]}")


def resolve_config(family: Family, config, config_json: dict | None, metadata: dict[str, str], shapes, source: str):
    """(The model config, (where it came from, the fix)), the latter None for the caller's `config=`. The config
    comes from (in order): `config=` (an instance or a preset name), a diffusers config.json, the config our savers
    write into the file's metadata (any spelling of the family), and the key names and shapes. WeightsError (one
    line, naming the source) for a config.json or stored config that is damaged."""
    if isinstance(config, str):
        return family.config_class.preset(config), None
    if config is not None:
        return config, None
    if config_json is not None:
        try:
            return family.config_from_diffusers(config_json), _FROM_JSON
        except WeightsError:
            raise  # already one line that names the problem
        except (TypeError, ValueError) as e:  # a field of the wrong type: "24" for a head count, a list
            raise _bad_config(family, source, _FROM_JSON, f"is invalid ({e})") from None
    meta = config_from_metadata(metadata)
    if meta is not None and meta.get("family") in family.spellings:
        stored = meta.get("config")
        if not isinstance(stored, dict):
            raise _bad_config(family, source, _FROM_METADATA, f"is a {type(stored).__name__}, not an object")
        try:
            return family.config_class.from_dict(stored), _FROM_METADATA
        except (TypeError, ValueError) as e:  # the config class's own checks
            raise _bad_config(family, source, _FROM_METADATA, f"is invalid ({e})") from None
    return family.infer_config(shapes, source), _FROM_SHAPES


def meta_model(family: Family, config, config_json: dict | None, metadata: dict[str, str], shapes, source: str,
               layout: str) -> nn.Module:
    """The model its config resolves to (`resolve_config`), built on the meta device, with the checkpoint's
    official `shapes` checked against it: every check before a tensor is read, for loading and conversion alike."""
    cfg, origin = resolve_config(family, config, config_json, metadata, shapes, source)
    try:
        with torch.device("meta"):
            model = family.model_class(cfg)
    except (TypeError, ValueError) as e:
        # The config classes hold any value; the model is what checks them (a width its heads do not divide,
        # "2" for a depth). From the checkpoint, that is damaged input; the caller's own config= is theirs.
        if origin is None or isinstance(e, WeightsError):
            raise
        raise _bad_config(family, source, origin, f"is invalid ({e})") from None
    check_keys_and_shapes(model, shapes, source=source,
                          layout=f"{family.official_name if layout == 'official' else layout} {family.title}")
    return model


def read_layout(family: Family, raw: dict, source: str):
    """(key prefix, layout, official shapes, rules or None) of `family`'s transformer in a checkpoint whose header
    is `raw` (key -> (shape, dtype)): the diffusers keys checked whole and mapped to official names (rules), the
    official ones as they are."""
    prefix, layout = find_layout(family, raw.keys(), source)
    keys = {k[len(prefix):]: tuple(s) for k, (s, _) in raw.items()
            if k.startswith(prefix) and not k[len(prefix):].startswith(family.other_parts)}
    if layout == "diffusers":
        rules = family.diffusers_rules(keys)
        wanted = {k for r in rules for k in r.others}
        missing, unexpected = wanted - keys.keys(), keys.keys() - wanted
        if missing or unexpected:
            which, names = ("missing", missing) if missing else ("unexpected", unexpected)
            raise WeightsError(f"{source}: {len(names)} {which} keys for the diffusers {family.title} layout "
                               f"({', '.join(sorted(names)[:3])}); the file is incomplete or not "
                               f"{article(family.diffusers_class or family.title)}")
        return prefix, layout, official_shapes(rules, keys), rules
    return prefix, layout, keys, None


def load_transformer(
    family: Family | str,
    source: str | os.PathLike,
    *,
    config=None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    fp8: bool = False,
    loras: Sequence = (),
) -> nn.Module:
    """`family`'s transformer from `source` (see the module docstring).
    fp8: the blocks' Linear weights are quantized to e4m3 as they are read (model/fp8.py).
    loras: LoRAs merged into the weights as they are read, before fp8 rounds them (LoRAs or paths, alone or as
    (lora, scale), as weights.lora_merge.apply_loras takes them; checked before anything is read).
    device="meta": every check (files, keys, shapes, config, LoRAs) and no tensor read; a meta model back."""
    family = get_family(family)
    files, config_json = model_files(source, "transformer")
    src = str(source)
    raw, metadata = read_shapes(files)
    prefix, layout, shapes, rules = read_layout(family, raw, src)
    model = meta_model(family, config, config_json, metadata, shapes, src, layout)

    with TensorReader(files, dtype=dtype, prefix=prefix) as read:
        tensors = to_official(rules, read) if rules is not None else ((k, read(k)) for k in shapes)
        assign_tensors(model, tensors, dtype=dtype, device=device, source=src, fp8=fp8, loras=loras)
    return model.eval()


def transformer_state_dict(model: nn.Module, layout: str = "official") -> dict[str, torch.Tensor]:
    """The model's tensors in its family's official layout (also called by its owner's name: "bfl", "sai") or
    the diffusers one."""
    family = family_of(model)
    sd = model.state_dict()
    if layout in ("official", family.official_name.lower()):
        return dict(sd)
    if layout != "diffusers":
        raise ValueError(f"layout must be 'official' ({family.official_name}) or 'diffusers', got {layout!r}")
    return dict(to_others(family.rules(model.config), sd.__getitem__, family.split_sizes(model.config)))


def save_transformer(model: nn.Module, path: str | os.PathLike, *, layout: str = "official",
                     overwrite: bool = False) -> Path:
    """One safetensors file (official keys without a prefix, or diffusers keys); our config goes into its
    metadata so it loads without a config.json."""
    family = family_of(model)
    tensors = transformer_state_dict(model, layout)
    meta = {CONFIG_METADATA_KEY: json.dumps({"family": family.name, "config": model.config.to_dict()}),
            "format": "pt", "layout": "diffusers" if layout == "diffusers" else "official"}
    return atomic_save(tensors, path, meta, overwrite=overwrite)


def load_flux(source: str | os.PathLike, **kwargs) -> nn.Module:
    """`load_transformer` for FLUX.1 (BFL or diffusers layout)."""
    return load_transformer(FLUX, source, **kwargs)


def load_flux2(source: str | os.PathLike, **kwargs) -> nn.Module:
    """`load_transformer` for FLUX.2 (BFL or diffusers layout; ComfyUI's prefixed files too)."""
    return load_transformer(FLUX2, source, **kwargs)


def load_mmdit(source: str | os.PathLike, **kwargs) -> nn.Module:
    """`load_transformer` for SD3 / SD3.5 (SAI or diffusers layout; all-in-one files too)."""
    return load_transformer(SD3, source, **kwargs)
