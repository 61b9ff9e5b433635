"""LoRA key names for Flux in our, diffusers / PEFT and kohya / ComfyUI layouts, all derived from the one
BFL <-> diffusers module table (keymaps/flux.py): kohya names are the BFL path with '.' -> '_', PEFT names
are the table's diffusers modules, so no mapping is written twice.

A LoRA key is `<prefix><module><suffix>`; `parse_key` splits it into (stem, role) with role down / up /
alpha, and `LoRANames.resolve` maps the stem to an official (BFL) Linear and, for diffusers names, the slice
of a fused layer it covers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..io import WeightsError
from . import Rule
from .flux import flux_rules

# (suffix, role). kohya writes lora_down / lora_up / alpha; PEFT lora_A / lora_B; ComfyUI accepts both.
SUFFIXES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),  # a raw peft model state dict
    (".alpha", "alpha"),
)
# Prefixes in front of the module name, by naming scheme. "lora_unet_" is followed by the flattened BFL path.
KOHYA_PREFIX = "lora_unet_"
BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
PEFT_PREFIXES = ("transformer.", "base_model.model.")
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_",
                         "text_encoder.", "text_encoder_2.", "text_encoders.")

# Key patterns (regex, searched) of adapters that are not plain LoRA, with what to tell the user. Checked
# before anything else so such a file is refused whole instead of half-applied.
NOT_LORA = (
    ("lokr_", "a LoKr (LyCORIS Kronecker) adapter"),
    ("hada_", "a LoHa (LyCORIS Hadamard) adapter"),
    ("dora_scale", "a DoRA adapter (weight-decomposed LoRA; its magnitude vector has no LoRA equivalent)"),
    ("lora_magnitude_vector", "a DoRA adapter (peft use_dora; its magnitude vector has no LoRA equivalent)"),
    ("lora_mid", "a LoCon / Tucker-decomposed adapter (lora_mid)"),
    (r"(^|[._])b?oft_", "an OFT / BOFT adapter"),
    (r"ia3_", "an IA3 adapter"),
    (r"\.diff(_b)?$", "a full-weight difference (.diff / .diff_b), not a LoRA"),
    ("processor", "an XLabs-layout Flux LoRA; convert it to kohya or diffusers first"),
    (r"query_norm\.scale", "a BFL control LoRA (it replaces norm weights), not a plain LoRA"),
    (r"lora_B\.bias", "a LoRA with bias terms (peft lora_bias), which scfm does not support"),
    (r"lora_up\.bias", "a LoRA with bias terms, which scfm does not support"),
)


def kohya_name(official: str) -> str:
    return official.replace(".", "_")


def refuse_non_lora(keys, source: str) -> None:
    for pattern, what in NOT_LORA:
        hit = next((k for k in keys if re.search(pattern, k)), None)
        if hit is not None:
            raise WeightsError(f"{source}: this is {what} (key {hit}); scfm reads plain LoRA files only")


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


@dataclass(frozen=True)
class LoRANames:
    rules: dict[str, Rule]  # official Linear module -> its table rule
    by_diffusers: dict[str, tuple[str, int]]  # diffusers module -> (official module, slice index)
    by_kohya: dict[str, str]  # flattened BFL path -> official module

    def resolve(self, stem: str) -> tuple[str, str, int | None] | None:
        """(naming, official module, slice index or None for the whole module) of a key stem, or None.

        naming is "kohya" (lora_unet_ or BFL dotted names) or "diffusers" (PEFT names)."""
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
            if p == "" and name in self.rules:  # bare BFL names with lora_A / lora_B: a ComfyUI variant
                return "kohya", name, None
        return None


def flux_lora_names(depth: int, depth_single_blocks: int) -> LoRANames:
    """Names for a Flux with at least these block counts; the guidance embedder is always included (a dev
    LoRA read for a schnell model is refused when applied, where the model is known)."""
    params = flux_rules(depth, depth_single_blocks, True)
    linear = {r.official.removesuffix(".weight") for r in params if r.official.endswith(".weight")}
    modules = flux_rules(depth, depth_single_blocks, True, modules=True)
    rules = {r.official: r for r in modules if r.official in linear}  # not the q / k norm scales
    by_diffusers = {other: (r.official, i) for r in rules.values() for i, other in enumerate(r.others)}
    by_kohya = {kohya_name(official): official for official in rules}
    return LoRANames(rules, by_diffusers, by_kohya)
