"""The text-encoder part of a LoRA file, applied to our CLIP-L, CLIP-bigG and T5 (model/clip.py, model/t5.py) as
diffusers and ComfyUI apply it; weights/lora.py keeps those keys apart in `LoRA.text_encoders`.

Which encoder a key is for, by its prefix (sd-scripts networks/lora_flux.py and lora_sd3.py, ComfyUI comfy/lora.py
`model_lora_keys_clip`, diffusers' pipelines):

    prefix                          FLUX.1      SD3 / SD3.5   written by
    lora_te_, lora_te1_             CLIP-L      CLIP-L        kohya / sd-scripts (te1), ComfyUI reads both
    lora_te2_                       T5          CLIP-bigG     sd-scripts (SD3); OneTrainer (Flux, per ComfyUI)
    lora_te3_                       T5          T5            sd-scripts
    text_encoder.                   CLIP-L      CLIP-L        diffusers / PEFT
    text_encoder_2.                 T5          CLIP-bigG     diffusers / PEFT (the pipeline's second encoder)
    text_encoder_3.                 -           T5            diffusers / PEFT
    text_encoders.clip_l.transformer.  (and clip_g, t5xxl)    ComfyUI's Extract and Save LoRA

After the prefix comes the module's transformers path, which is also ours (`text_model.encoder.layers.0.self_attn
.q_proj`, `encoder.block.0.layer.0.SelfAttention.q`), with '.' -> '_' under the kohya prefixes; CLIP's
`text_model.` level may be missing (transformers 5's CLIPTextModel has none, and diffusers drops it likewise). The
suffixes are the transformer part's: delta_W = scale * alpha / r * up @ down, alpha from the `.alpha` key (kohya:
alpha = r when missing; 0 is no effect, as diffusers and ComfyUI apply it), for diffusers names else from
`lora_adapter_metadata` (the `text_encoder.` / `text_encoder_2.` prefixed config), else r; ComfyUI's `.diff` /
`.diff_b` full differences are added as they are. Written in the diffusers layout (weights/lora_write.py), the
diffusers names get the transformer part's treatment: alpha / r folded into up, and each prefix's config with
alpha = r in `lora_adapter_metadata`.

Names are resolved against the encoder being loaded (its parameters) when the loader has built it on meta, so a key
naming no weight of it is refused before a tensor is read. Each weight then gets its LoRAs as it is read, summed in
fp32 and rounded once to the load dtype: weights/lora_merge.py's arithmetic for the transformer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from .families import get_family
from .io import WeightsError, read_header
from .keymaps.lora import TEXT_ENCODER_PREFIXES, parse_key
from .lora import LoRA, LoRAPart, ModuleLoRA, read_lora
from .lora_foreign import PEFT_TEXT_PREFIXES, kohya_alpha, peft_alpha, peft_metadata
from .lora_merge import merged_param, touched_keys

ENCODER_NAMES = {"clip_l": "CLIP-L", "clip_g": "CLIP-bigG", "t5": "T5"}
# prefix -> encoder beyond each family's own table (weights/families: text_lora_prefixes): ComfyUI's names, which
# are also where SAI's and ComfyUI's all-in-one checkpoints keep the encoders (sampling/components.py)
COMFY_PREFIXES = {"text_encoders.clip_l.transformer.": "clip_l", "text_encoders.clip_g.transformer.": "clip_g",
                  "text_encoders.t5xxl.transformer.": "t5"}


@dataclass(frozen=True)
class EncoderLoRA:
    """One file's LoRA for one text encoder at the scale it is merged with, its modules named as the file names
    them after `prefix` (resolved against the encoder when that is built)."""

    source: str
    encoder: str  # a key of ENCODER_NAMES
    scale: float
    prefix: str
    parts: dict[str, LoRAPart]  # module -> its LoRA
    diffs: dict[str, Tensor]  # "<module>.diff" (onto its weight) or "<module>.diff_b" (its bias) -> difference


@dataclass
class SplitLoRAs:
    """LoRAs split for a pipeline: the transformer parts (as the loaders' `loras=` take them), the text-encoder
    parts to merge, and one line for each part that is not applied."""

    transformer: list[tuple[LoRA, float]]
    text: list[EncoderLoRA]
    notes: list[str]

    def text_for(self, encoder: str) -> list[EncoderLoRA]:
        return [p for p in self.text if p.encoder == encoder]


def has_text_part(path) -> bool:
    """Whether the LoRA file at `path` holds text-encoder keys (read from its header alone)."""
    path = Path(path).expanduser()
    return path.is_file() and any(k.startswith(TEXT_ENCODER_PREFIXES) for k in read_header(path)[0])


def _peft_configs(source: str, prefixes) -> dict[str, dict]:
    """prefix -> the peft LoraConfig diffusers saved for the encoder under it in the file's metadata ({} if none),
    for those of `prefixes` diffusers names (the header read once)."""
    prefixes = [p for p in prefixes if p in PEFT_TEXT_PREFIXES]
    readable = prefixes and source and Path(source).is_file()
    config = peft_metadata(read_header(Path(source))[1], source) if readable else {}
    return {p: {k[len(p):]: v for k, v in config.items() if k.startswith(p)} for p in prefixes}


def _part(src: str, prefix: str, stem: str, g: dict[str, Tensor], config: dict) -> LoRAPart:
    down, up = g["down"], g["up"]
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise WeightsError(f"{src}: {prefix}{stem}: down {list(down.shape)} and up {list(up.shape)} do not form a "
                           "LoRA of a Linear layer")
    if prefix in PEFT_TEXT_PREFIXES:
        return LoRAPart(down, up, peft_alpha(config, stem, up.shape[1], g.get("alpha")))
    return LoRAPart(down, up, kohya_alpha(g.get("alpha"), down.shape[0]))  # as for the transformer part


def _parts_of(src: str, prefix: str, modules: dict[str, dict[str, Tensor]], config: dict) -> dict[str, LoRAPart]:
    parts = {}
    for stem, g in modules.items():
        if {"down", "up", "alpha"} & g.keys():
            if not {"down", "up"} <= g.keys():
                raise WeightsError(f"{src}: {prefix}{stem} has {sorted(g)} but needs both down (A) and up (B)")
            parts[stem] = _part(src, prefix, stem, g, config)
    return parts


_Groups = dict[str, dict[str, dict[str, Tensor]]]  # prefix -> module -> role -> tensor


def _grouped(tensors: dict[str, Tensor], prefixes, roles=None) -> tuple[_Groups, dict[str, Tensor]]:
    """prefix -> module -> role -> tensor for the keys under one of `prefixes` (the longest that fits) that parse
    as a LoRA key (of one of `roles`, when given), and the other keys as they are, in their order."""
    by_length = sorted(prefixes, key=len, reverse=True)
    groups: _Groups = {}
    rest = {}
    for key, t in tensors.items():
        prefix = next((p for p in by_length if key.startswith(p)), None)
        parsed = parse_key(key[len(prefix):]) if prefix else None
        if parsed is None or (roles is not None and parsed[1] not in roles):
            rest[key] = t
            continue
        groups.setdefault(prefix, {}).setdefault(parsed[0], {})[parsed[1]] = t
    return groups, rest


def peft_text_parts(lora: LoRA) -> tuple[dict[str, dict[str, LoRAPart]], dict[str, Tensor]]:
    """The LoRAs under diffusers' prefixes (`text_encoder.`, ...: prefix -> module as the file names it -> its
    LoRA, alpha as `encoder_parts` reads it), and the text-encoder keys they do not hold (full differences, other
    tools' prefixes), as they are: what the diffusers layout writes (weights/lora_write.py)."""
    src = lora.source or "LoRA"
    groups, rest = _grouped(lora.text_encoders, PEFT_TEXT_PREFIXES, ("down", "up", "alpha"))
    configs = _peft_configs(lora.source, groups)
    parts = {prefix: _parts_of(src, prefix, modules, configs[prefix]) for prefix, modules in groups.items()}
    return parts, rest


def encoder_parts(lora: LoRA, scale: float, family: str) -> list[EncoderLoRA]:
    """`lora.text_encoders` as one EncoderLoRA per prefix, each for the encoder its prefix names in `family`."""
    src = lora.source or "LoRA"
    family = get_family(family)
    table = {**family.text_lora_prefixes, **COMFY_PREFIXES}
    groups, unread = _grouped(lora.text_encoders, table)
    if unread:
        raise WeightsError(f"{src}: text-encoder key {next(iter(unread))} is not one scfm reads (lora_te*_ / "
                           "text_encoder*. / text_encoders.<clip_l|clip_g|t5xxl>.transformer. + a module + a LoRA "
                           "suffix)")
    out, configs = [], _peft_configs(lora.source, groups)
    for prefix, modules in groups.items():
        encoder = table[prefix]
        if encoder not in family.text_encoders:
            raise WeightsError(f"{src}: keys {prefix}... are for a {ENCODER_NAMES[encoder]}, which "
                               f"{family.display} does not have; a LoRA for another model?")
        config = configs.get(prefix, {})
        diffs = {f"{stem}.{role}": g[role] for stem, g in modules.items() for role in ("diff", "diff_b") if role in g}
        parts = _parts_of(src, prefix, modules, config)
        out.append(EncoderLoRA(src, encoder, scale, prefix, parts, diffs))
    return out


def split_loras(loras: Sequence, family: str, *, encoders: Sequence[str] = (),
                ignore_text: bool = False) -> SplitLoRAs:
    """Split LoRAs (objects or paths, alone or as (lora, scale), as apply_loras takes them; a path is read once,
    for `family`) into their transformer parts and the text-encoder parts for `encoders` (those the caller loads).
    A part for an encoder not loaded, or every text-encoder part with `ignore_text`, gets a line in `notes`."""
    items = [x if isinstance(x, tuple) else (x, 1.0) for x in loras]
    items = [(x if isinstance(x, LoRA) else read_lora(x, family=family), float(s)) for x, s in items]
    split = SplitLoRAs([], [], [])
    for lora, scale in items:
        split.transformer.append((dataclasses.replace(lora, text_encoders={}), scale))
        if not lora.text_encoders:
            continue
        name = Path(lora.source).name or "LoRA"
        if ignore_text:
            split.notes.append(f"--ignore-te-lora: the text-encoder part of {name} ({len(lora.text_encoders)} "
                               "keys) is not applied")
            continue
        parts = encoder_parts(lora, scale, family)
        for encoder in dict.fromkeys(p.encoder for p in parts if p.encoder not in encoders):
            what = ENCODER_NAMES[encoder]
            count = sum(len(p.parts) + len(p.diffs) for p in parts if p.encoder == encoder)
            modules = f"{count} module{'s' * (count != 1)}"
            split.notes.append(f"{name}: its {what} part ({modules}) is not applied: no {what} is loaded")
        split.text += [p for p in parts if p.encoder in encoders]
    return split


def transformer_parts(loras: Sequence, family: str) -> list[tuple[LoRA, float]]:
    """The transformer parts alone, for a caller that loads no text encoder (their text parts go unread)."""
    return split_loras(loras, family, ignore_text=True).transformer


# ----- merging into an encoder ------------------------------------------------------------------------------


def _spellings(model: nn.Module) -> dict[str, str]:
    """How a file may name each module of `model`: ours (transformers' path), flattened ('.' -> '_', kohya), and
    for CLIP either without the `text_model.` level."""
    names = {}
    for module in {name.rsplit(".", 1)[0] for name, _ in model.named_parameters()}:
        for spelling in (module, module.replace(".", "_")):
            names[spelling] = module
            if module.startswith("text_model."):
                names[spelling[len("text_model."):]] = module
    return names


def _resolved(model: nn.Module, part: EncoderLoRA) -> LoRA:
    """`part` with our module and parameter names, each checked against `model` (a meta model will do)."""
    params, names = dict(model.named_parameters()), _spellings(model)
    what = ENCODER_NAMES[part.encoder]
    layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "num_layers", "?")

    def target(stem: str, param: str) -> str:
        key = f"{names[stem]}.{param}" if stem in names else None
        if key not in params:
            raise WeightsError(f"{part.source}: {part.prefix}{stem} names no {param} of the {what} being loaded "
                               f"({layers} layers); a LoRA for another model?")
        return key

    modules, diffs = {}, {}
    for stem, p in part.parts.items():
        key = target(stem, "weight")
        shape = (p.up.shape[0], p.down.shape[1])
        if shape != tuple(params[key].shape):
            raise WeightsError(f"{part.source}: LoRA for {part.prefix}{stem} has shape {list(shape)}, the {what}'s "
                               f"weight {list(params[key].shape)}; the LoRA is for a different model size")
        modules[names[stem]] = ModuleLoRA([p], (shape[0],))
    for name, diff in part.diffs.items():
        stem, role = name.rsplit(".", 1)
        key = target(stem, "weight" if role == "diff" else "bias")
        if diff.shape != params[key].shape:
            raise WeightsError(f"{part.source}: the difference {part.prefix}{name} has shape {list(diff.shape)}, the "
                               f"{what}'s {list(params[key].shape)}; the LoRA is for a different model size")
        diffs[key] = diff
    return LoRA(modules, source=part.source, diffs=diffs)


def text_lora_merger(model: nn.Module, loras: Sequence[EncoderLoRA]) -> Callable[[str, Tensor], Tensor] | None:
    """For a text-encoder loader: check `loras` (this encoder's parts) against the meta `model` before anything is
    read, and return what merges them into each tensor as it arrives ((our key, tensor in the load dtype) -> the
    tensor), as lora_merge.merge_while_reading does for a transformer; None without LoRAs."""
    if not loras:
        return None
    items = [(_resolved(model, part), part.scale) for part in loras]
    keys = {k for lora, _ in items for k in touched_keys(lora)}

    def merge(key: str, t: Tensor) -> Tensor:
        return merged_param(t, key, items) if key in keys else t

    return merge
