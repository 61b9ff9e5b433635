"""The family registry: every question "which family is this and how is it driven" is asked here.

Each family is one record (weights/family.py) filled in by its own file (weights/families/flux.py, sd3.py,
flux2.py); `register` adds another at run time. Callers look a family up by its name (or an older spelling), by a
loaded model, by a model file or folder, or by a LoRA's key names; none of them branches on a family's name.
"""

from __future__ import annotations

from pathlib import Path

from ..family import Family
from ..io import WeightsError, config_from_metadata, exists, read_json_object
from ..reader import model_files, read_shapes
from .flux import FLUX
from .flux2 import FLUX2
from .sd3 import SD3

_FAMILIES: list[Family] = [FLUX, SD3, FLUX2]

# Files that are no family's transformer, so a wrong file gets a pointed message instead of "missing keys".
NOT_A_TRANSFORMER = (
    ("lora_down", "a LoRA, not a base model; load the base model and apply it with --lora"),
    ("lora_A", "a LoRA, not a base model; load the base model and apply it with --lora"),
    ("encoder.down.", "a VAE (autoencoder) checkpoint; pass it with --vae"),
    ("encoder.down_blocks.", "a VAE (autoencoder) checkpoint; pass it with --vae"),
    ("encoder.block.", "a T5 text encoder; pass it with --t5"),
    ("text_model.", "a CLIP text encoder; pass it with --clip"),
)


def register(family: Family) -> Family:
    """Add a family (or replace the one of the same name): from then on every lookup knows it."""
    clash = [f for f in _FAMILIES if f.name != family.name and set(f.spellings) & set(family.spellings)]
    if clash:
        raise ValueError(f"family {family.name!r}: a spelling of {clash[0].name!r} is taken")
    _FAMILIES[:] = [f for f in _FAMILIES if f.name != family.name] + [family]
    return family


def unregister(name: str) -> None:
    _FAMILIES[:] = [f for f in _FAMILIES if f.name != name]


def families() -> tuple[Family, ...]:
    return tuple(_FAMILIES)


def names() -> tuple[str, ...]:
    return tuple(f.name for f in _FAMILIES)


def default_family() -> Family:
    """The family a LoRA is taken for when nothing else tells (the first registered: FLUX.1)."""
    return _FAMILIES[0]


def get_family(name: str | Family) -> Family:
    """The family by its name or an older spelling; a one-line error naming the known ones."""
    if isinstance(name, Family):
        return name
    for f in _FAMILIES:
        if name in f.spellings:
            return f
    raise WeightsError(f"unknown model family {name!r}; scfm knows {', '.join(names())}")


def title_of(name: str) -> str:
    """A family's title for messages ("FLUX.1"), or `name` as stated where no family of scfm has it (a LoRA's
    metadata naming another model)."""
    return get_family(name).title if name in names() else name


def family_of(model) -> Family:
    """The family of a loaded model, by its class (the nearest registered class in its MRO)."""
    for cls in type(model).__mro__:
        for f in _FAMILIES:
            if f.model_class is cls:
                return f
    raise TypeError(f"{type(model).__name__} is not a model of any family scfm knows ({', '.join(names())})")


def not_this_hints(family: Family) -> list[tuple[str, str]]:
    """(key fragment, what it is and what to do) for the files `family`'s loader must refuse: the other
    families' transformers, then LoRAs, VAEs and text encoders."""
    # A CLI run reads the family from a file's keys, so it meets another family's file only inside a folder
    # whose model_index.json or config.json names the wrong model: passed alone, the file loads. Python names
    # the family itself, in the loader it calls.
    return [(fragment, f"{what}, not {article(family.title)} transformer; pass that file itself as --model (in "
                       f"Python: {f.loader or 'weights.load_transformer'})")
            for f in _FAMILIES if f is not family for fragment, what in f.key_hints] + \
        [(fragment, f"{what}, not {article(family.title)} transformer") for fragment, what in NOT_A_TRANSFORMER]


def transformer_hints() -> list[tuple[str, str]]:
    """(key fragment, what it is) of every family's transformer files: what other loaders (the VAE's) refuse."""
    return [h for f in _FAMILIES for h in f.key_hints]


def reads(family: Family, keys) -> tuple[str, str] | None:
    """(key prefix, "official" | "diffusers") when `family` reads a checkpoint with `keys`: its layout is there and
    no other family's marker is (a FLUX.2 file also matches FLUX.1's names)."""
    found = family.detect_layout(keys)
    if found is None:
        return None
    others = [m for f in _FAMILIES if f is not family for m in f.markers if m not in family.markers]
    return None if any(m in k for k in keys for m in others) else found


def find_layout(family: Family, keys, source: str) -> tuple[str, str]:
    """(key prefix, "official" | "diffusers") of `family`'s transformer in a checkpoint with `keys`; for any other
    file one line saying what it is instead when its keys tell, else its first keys."""
    found = reads(family, keys)
    if found is not None:
        return found
    for fragment, what in not_this_hints(family):
        if any(fragment in k for k in keys):
            raise WeightsError(f"{source}: this is {what}")
    first = ", ".join(sorted(keys)[:3])
    raise WeightsError(f"{source}: not {article(family.title)} transformer in the {family.official_name} or diffusers "
                       f"layout (first keys: {first})")


def article(title: str) -> str:
    """"a Flux", "an SD3 / SD3.5": a title with its article, for messages."""
    return f"{'an' if title.startswith(('A', 'E', 'I', 'O', 'U', 'SD')) else 'a'} {title}"


def checkpoint_family(keys, metadata: dict[str, str]) -> Family | None:
    """The family whose layout reads a checkpoint's keys whole; where several do (one family's diffusers layout
    can be another's), the one its metadata names (our savers write it), else the first registered."""
    found = [f for f in _FAMILIES if reads(f, keys) is not None]
    stated = (config_from_metadata(metadata) or {}).get("family")
    return next((f for f in found if stated in f.spellings), found[0] if found else None)


def detect_family(model: Path) -> Family:
    """The family of a model file or folder: model_index.json / config.json class names, else the keys."""
    if model.is_dir():
        for name in ("model_index.json", "config.json", "transformer/config.json"):
            if exists(model / name):  # a broken link is refused, not skipped for a guess from the keys
                index = read_json_object(model / name, "re-download the model or repair the pipeline folder (its "
                                         "_class_name names the model)")
                cls = str(index.get("_class_name", ""))
                # the longest matching prefix: "Flux2..." is FLUX.2's, not FLUX.1's "Flux"
                found = [(len(p), f) for f in _FAMILIES for p in f.diffusers_classes if cls.startswith(p)]
                if found:
                    return max(found, key=lambda x: x[0])[1]
    files, _ = model_files(model, "transformer")
    header, metadata = read_shapes(files)
    found = checkpoint_family(header.keys(), metadata)
    if found is None:  # no layout any family reads whole: the key names alone (markers first), for the loader's error
        found = next((f for f in sorted(_FAMILIES, key=lambda f: not f.markers) if f.claims(header.keys())), None)
    if found is not None:
        return found
    raise WeightsError(f"{model}: not the transformer of any family scfm knows "
                       f"({', '.join(f.title for f in _FAMILIES)}), by its keys")


def lora_family(stems, official: bool, widths=(), stated: str | None = None, hint: str | None = None) -> str:
    """The family of a LoRA from its key stems: `stated` (the file's scfm_family) wins; then the names, when
    only one family has them all (`official`: the stems are official module names, as in our layout); then,
    for names several have (diffusers calls SD3's and Flux's double-block attention alike), the caller's `hint`
    (the model it is for), then the width of its layers, then the first family that fits."""
    if stated is not None:
        try:
            return get_family(stated).name
        except WeightsError:
            raise WeightsError(f"a LoRA for {stated}; scfm reads {', '.join(names())} LoRAs") from None
    stems = list(stems)
    fits = []
    for f in _FAMILIES:
        table = f.lora_names(stems)
        if all((s in table.rules) if official else table.resolve(s) or table.param(s) for s in stems):
            fits.append(f.name)
    if len(fits) == 1:
        return fits[0]
    if hint in fits:
        return hint
    # only among the families whose names fit: SD3's widths say nothing of a LoRA only Flux names read
    by_width = [f.name for f in _FAMILIES if set(widths) & f.lora_widths and (f.name in fits or not fits)]
    return (by_width or fits or [default_family().name])[0]
