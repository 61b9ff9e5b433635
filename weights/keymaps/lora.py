"""LoRA key names for Flux and SD3 / SD3.5 in our, diffusers / PEFT and kohya / ComfyUI layouts, all derived
from the official <-> diffusers module tables (keymaps/flux.py, keymaps/mmdit.py): kohya names are the
official (BFL / SAI) path with '.' -> '_', PEFT names are the table's diffusers modules, so no mapping is
written twice.

A LoRA key is `<prefix><module><suffix>`; `parse_key` splits it into (stem, role) with role down / up /
alpha (or diff / diff_b, ComfyUI's full differences), and `LoRANames.resolve` maps the stem to an official
Linear (or SD3's patch-embedding Conv2d) and, for diffusers names, the slice of a fused layer it covers;
`LoRANames.param` maps a `.diff` stem to a norm weight. Which family a LoRA is for is the registry's
(weights/families: `lora_family`).

SD3 in ComfyUI: its `model_lora_keys_unet` maps every weight `diffusion_model.<SAI path>.weight` of the loaded
model to the LoRA stems `lora_unet_<SAI path, '.' -> '_'>` and `diffusion_model.<SAI path>`, and for SD3 also
the diffusers stems `transformer.<diffusers module>` (q / k / v as slices of the fused qkv). sd-scripts' SD3
LoRAs use the same `lora_unet_<SAI path>` names, so that is the kohya layout we write for SD3.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..io import WeightsError
from . import Rule
from .flux import flux_rules, flux_split_sizes
from .flux2 import flux2_rules, flux2_split_sizes
from .mmdit import mmdit_rules, mmdit_split_sizes

# (suffix, role). kohya writes lora_down / lora_up / alpha; PEFT lora_A / lora_B; ComfyUI accepts both.
SUFFIXES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),  # a raw peft model state dict
    (".alpha", "alpha"),
    # ComfyUI's full differences (its Extract and Save LoRA writes `.diff_b` for every bias and, for SD3, `.diff`
    # for the 1-D norm weights; `full_diff` writes `.diff` for every weight): added to the parameter as they are
    (".diff_b", "diff_b"), (".diff", "diff"),
)
# Prefixes of diffusers module names written with '.' -> '_': SimpleTuner's LyCORIS files and OneTrainer's
# (ComfyUI maps both, comfy/lora.py model_lora_keys_unet).
FLAT_DIFFUSERS_PREFIXES = ("lycoris_", "lora_transformer_")
# Prefixes in front of the module name, by naming scheme. "lora_unet_" is followed by the flattened BFL path.
KOHYA_PREFIX = "lora_unet_"
BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
PEFT_PREFIXES = ("transformer.", "base_model.model.")
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_",
                         "text_encoder.", "text_encoder_2.", "text_encoder_3.", "text_encoders.")

# Key patterns (regex, searched) of adapters that are not plain LoRA, with what to tell the user. Checked
# before anything else so such a file is refused whole instead of half-applied (but after a base model's check, see
# `refuse_non_lora`: a FLUX.1 model's own q / k norm keys match the control LoRA's pattern).
NOT_LORA = (
    ("lokr_", "a LoKr (LyCORIS Kronecker) adapter"),
    ("hada_", "a LoHa (LyCORIS Hadamard) adapter"),
    ("dora_scale", "a DoRA adapter (weight-decomposed LoRA; its magnitude vector has no LoRA equivalent)"),
    ("lora_magnitude_vector", "a DoRA adapter (peft use_dora; its magnitude vector has no LoRA equivalent)"),
    # ai-toolkit's DoRA (toolkit/network_mixins.py) saves the magnitude where a LoRA keeps its alpha
    (r"\.magnitude$", "a DoRA adapter (ai-toolkit; its magnitude vector has no LoRA equivalent)"),
    # LyCORIS trains norm layers whole and saves them as w_norm / b_norm (ComfyUI adds them as full differences)
    (r"\.[wb]_norm$", "a LyCORIS adapter with trained norm layers (w_norm / b_norm)"),
    ("lora_mid", "a LoCon / Tucker-decomposed adapter (lora_mid)"),
    (r"(^|[._])b?oft_", "an OFT / BOFT adapter"),
    (r"ia3_", "an IA3 adapter"),
    ("processor", "an XLabs-layout Flux LoRA; convert it to kohya or diffusers first"),
    (r"query_norm\.scale", "a BFL control LoRA (it replaces norm weights), not a plain LoRA"),
    (r"lora_B\.bias", "a LoRA with bias terms (peft lora_bias), which scfm does not support"),
    (r"lora_up\.bias", "a LoRA with bias terms, which scfm does not support"),
)
# Our layout's tensor names (weights/lora_write.py), which `parse_key` does not take for a foreign LoRA's
OUR_SUFFIXES = (".lora_down", ".lora_up")


def kohya_name(official: str) -> str:
    return official.replace(".", "_")


class NotLoRAError(WeightsError):
    """An adapter that is not a plain LoRA (LoKr, LoHa, DoRA, ...): `convert.py info` describes it instead."""


def refuse_non_lora(keys, source: str, *, as_lora: bool = True, base_model=None) -> None:
    """One line for a file that is not a plain LoRA: an adapter of another kind (NotLoRAError) and, read as a LoRA
    (`as_lora`), a file with no LoRA tensor: a base model said as such (`base_model(keys)`: its family's title, or
    None; given by the caller, as the families import this module), before the adapter patterns (its norm keys
    match a control LoRA's), anything else with the command that tells what it holds. `as_lora` False: the
    adapters only (a checkpoint's detection, which names the rest itself)."""
    keys = list(keys)
    # read as a LoRA, none of its keys a LoRA tensor (only then are the keys parsed: detect reads whole checkpoints)
    no_lora = as_lora and bool(keys) and not any(
        k.endswith(OUR_SUFFIXES) or ((p := parse_key(k)) is not None and p[1] != "alpha") for k in keys)
    if no_lora and base_model is not None:
        title = base_model(keys)
        if title is not None:
            raise WeightsError(f"{source}: no LoRA tensors: this is {title} base model, not a LoRA; pass it as "
                               "--model (generate) or --base (convert.py merge), or convert it with convert.py "
                               "checkpoint")
    for pattern, what in NOT_LORA:
        hit = next((k for k in keys if re.search(pattern, k)), None)
        if hit is not None:
            raise NotLoRAError(f"{source}: this is {what} (key {hit}); scfm reads plain LoRA files only")
    if no_lora:
        raise WeightsError(f"{source}: no LoRA tensors in this file (first keys: {', '.join(sorted(keys)[:3])}); "
                           f"`python tools/convert.py info {source}` says what it holds")


def parse_key(key: str) -> tuple[str, str] | None:
    """(stem, role) for a LoRA tensor key, None for anything else."""
    for suffix, role in SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def block_counts(stems) -> tuple[int, int]:
    """Double / single block counts large enough for every index named in `stems`, whatever the naming."""
    stems, counts = list(stems), []
    for pattern in (r"(?:double_blocks|transformer_blocks)[._](\d+)[._]",
                    r"(?:single_blocks|single_transformer_blocks)[._](\d+)[._]"):
        found = [int(m.group(1)) for s in stems for m in [re.search(pattern, s)] if m]
        counts.append(max(found) + 1 if found else 0)
    return counts[0], counts[1]


def mmdit_depth(stems) -> int:
    """Joint blocks enough for every index in `stems`, plus one: no named block is taken for the last one,
    whose context stream lacks modules (its 2-way adaLN is recognised by shape, see `LoRANames.swapped`)."""
    pattern = re.compile(r"(?:joint_blocks|transformer_blocks)[._](\d+)[._]")
    found = [int(m.group(1)) for s in stems for m in [pattern.search(s)] if m]
    return max(found) + 2 if found else 1


@dataclass(frozen=True)
class LoRANames:
    rules: dict[str, Rule]  # official Linear / Conv2d module -> its table rule
    by_diffusers: dict[str, tuple[str, int]]  # diffusers module -> (official module, slice index)
    by_kohya: dict[str, str]  # flattened official path -> official module
    by_flat_diffusers: dict[str, tuple[str, int]]  # diffusers module, '.' -> '_' -> (official module, slice)
    params: dict[str, str]  # official parameter path without .weight / .bias, and flattened -> the parameter
    split_sizes: Callable  # in_features -> the row split of a fused layer (weights/keymaps: *_split_sizes)
    # official modules whose diffusers halves are swapped only when they have 2 * D rows (SD3's last-block
    # context adaLN; see `swapped`)
    swapped_by_rows: tuple[str, ...] = ()

    def split_rows(self, official: str, out: int, in_features: int) -> list[int]:
        """Output rows of each slice of `official` (one entry for a layer that is not fused)."""
        rule = self.rules[official]
        if rule.kind != "fuse":
            return [out]
        return self.split_sizes(in_features)(rule, torch.empty(out, 0))

    def swapped(self, official: str, rows: int, in_features: int) -> bool:
        """Whether diffusers stores this layer's rows as (scale, shift), halves swapped from the official
        order: the final adaLN, and SD3's last-block context adaLN, told by its 2 * D rows (not 6 * D), so a
        LoRA need not reach the last block for its blocks to be named right."""
        if official.endswith(self.swapped_by_rows):
            return rows == 2 * in_features
        return self.rules[official].kind == "swap"

    def resolve(self, stem: str) -> tuple[str, str, int | None] | None:
        """(naming, official module, slice index or None for the whole module) of a key stem, or None.

        naming is "kohya" (lora_unet_ or BFL dotted names) or "diffusers" (PEFT names, also flattened under
        `lycoris_` / `lora_transformer_`)."""
        for p in FLAT_DIFFUSERS_PREFIXES:
            if stem.startswith(p) and stem[len(p):] in self.by_flat_diffusers:
                return ("diffusers", *self.by_flat_diffusers[stem[len(p):]])
        if stem.startswith(KOHYA_PREFIX):
            official = self.by_kohya.get(stem[len(KOHYA_PREFIX):])
            return None if official is None else ("kohya", official, None)
        for p in BFL_PREFIXES:
            if stem.startswith(p) and stem[len(p):] in self.rules:
                return "kohya", stem[len(p):], None
        for p in (*PEFT_PREFIXES, ""):
            name = stem[len(p):] if stem.startswith(p) else None
            if name in self.by_diffusers:
                return ("diffusers", *self.by_diffusers[name])
            # bare BFL names with lora_A / lora_B: a ComfyUI variant; under base_model.model.: a PEFT model built
            # on the BFL module tree, which diffusers' FLUX.2 loader reads as diffusion_model. names
            if p in ("", "base_model.model.") and name in self.rules:
                return "kohya", name, None
        return None


    def param(self, stem: str) -> str | None:
        """The official parameter a `.diff` stem names that is not a Linear / Conv2d (a norm weight), in
        kohya or BFL spelling; None if none."""
        for p in (KOHYA_PREFIX, *BFL_PREFIXES, ""):
            if stem.startswith(p) and stem[len(p):] in self.params:
                return self.params[stem[len(p):]]
        return None


def flux_lora_names(depth: int, depth_single_blocks: int) -> LoRANames:
    """Names for a Flux with at least these block counts; the guidance embedder is always included (a dev
    LoRA read for a schnell model is refused when applied, where the model is known)."""
    return _linear_names(flux_rules, depth, depth_single_blocks, flux_split_sizes)


def flux2_lora_names(depth: int, depth_single_blocks: int) -> LoRANames:
    """Names for a FLUX.2 with at least these block counts, the guidance embedder (dev) included."""
    return _linear_names(flux2_rules, depth, depth_single_blocks, lambda _: flux2_split_sizes)


def _linear_names(rules_of, depth: int, depth_single_blocks: int, split_sizes) -> LoRANames:
    """The LoRA names of a double / single block model: its Linear layers (not the q / k norm scales)."""
    params = rules_of(depth, depth_single_blocks, True)
    linear = {r.official.removesuffix(".weight") for r in params if r.official.endswith(".weight")}
    modules = rules_of(depth, depth_single_blocks, True, modules=True)
    return _names({r.official: r for r in modules if r.official in linear}, params, split_sizes)


def mmdit_lora_names(depth: int) -> LoRANames:
    """Names for an SD3 / SD3.5 of at least `depth` joint blocks, attn2 allowed in every block (a LoRA for
    blocks the model lacks is refused when applied, where the model is known)."""
    params = mmdit_rules(depth, tuple(range(depth)), True)
    # Linear and Conv2d layers: the modules with a bias (not the position table, not the q / k norms)
    layers = {r.official.removesuffix(".bias") for r in params if r.official.endswith(".bias")}
    modules = mmdit_rules(depth, tuple(range(depth)), True, modules=True)
    return _names({r.official: r for r in modules if r.official in layers}, params, lambda _: mmdit_split_sizes,
                  ("context_block.adaLN_modulation.1",))


def _names(rules: dict[str, Rule], params: list[Rule], split_sizes, swapped_by_rows=()) -> LoRANames:
    by_diffusers = {other: (r.official, i) for r in rules.values() for i, other in enumerate(r.others)}
    flat = {kohya_name(k): v for k, v in by_diffusers.items()}
    # parameters that are not a LoRA-able layer's weight or bias (norm weights), as a `.diff` may name them
    others = [r.official for r in params if r.official.rsplit(".", 1)[0] not in rules]
    stems = {k.removesuffix(".weight"): k for k in others if k.endswith(".weight")}
    stems |= {kohya_name(k): v for k, v in stems.items()}
    return LoRANames(rules, by_diffusers, {kohya_name(official): official for official in rules}, flat, stems,
                     split_sizes, swapped_by_rows)
