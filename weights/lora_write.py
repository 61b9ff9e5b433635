"""Writing LoRA files in our, diffusers / PEFT and kohya / ComfyUI layouts (the layouts are described in
weights/lora.py, whose names `write_lora`, `lora_state_dict` and `save_lora` re-export these)."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor

from .atomic import atomic_save
from .families import get_family
from .io import WeightsError
from .keymaps import swap_halves
from .keymaps.lora import KOHYA_PREFIX, kohya_name
from .lora import FORMAT, LAYOUTS, LoRA, LoRAPart, ModuleLoRA, Recommended
from .lora_foreign import PEFT_METADATA_KEY
from .lora_text import peft_text_parts


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _uniform(mod: ModuleLoRA) -> tuple[list[Tensor], list[Tensor], float]:
    """Parts with one rank and one alpha: absent parts and lower ranks padded with zeros (exact); parts with a
    different alpha / r get that ratio multiplied into their up (one rounding; only mixed-scale sources)."""
    present = [p for p in mod.parts if p is not None]
    r = max(p.up.shape[1] for p in present)
    # the alpha the others are scaled to: a slice at alpha 0 (no effect, as read) cannot be one
    ref = next((p for p in present if p.scale), present[0])
    alpha = ref.scale * r if ref.up.shape[1] != r else ref.alpha
    downs, ups = [], []
    for part, n in zip(mod.parts, mod.rows):
        if part is None:
            downs.append(ref.down.new_zeros(r, *ref.down.shape[1:]))
            ups.append(ref.up.new_zeros(n, r, *ref.up.shape[2:]))
            continue
        pad = r - part.up.shape[1]
        up = part.up
        if part.scale != alpha / r:
            up = (up.float() * (part.scale * r / alpha)).to(up.dtype)
        downs.append(torch.cat([part.down, part.down.new_zeros(pad, *part.down.shape[1:])]))
        ups.append(torch.cat([up, up.new_zeros(up.shape[0], pad, *up.shape[2:])], dim=1))
    return downs, ups, alpha


def _alpha_tensor(alpha: float) -> Tensor:
    t = torch.tensor(alpha, dtype=torch.float32)
    return t if float(t) == alpha else torch.tensor(alpha, dtype=torch.float64)  # exact, whatever alpha is


def _ours_state(lora: LoRA) -> dict[str, Tensor]:
    out = {}
    for m, mod in lora.modules.items():
        downs, ups, alpha = _uniform(mod)
        out |= {f"{m}.lora_down": torch.cat(downs), f"{m}.lora_up": torch.cat(ups),
                f"{m}.alpha": torch.tensor(alpha, dtype=torch.float64)}
    return out


def _kohya_state(lora: LoRA) -> dict[str, Tensor]:
    out = {}
    for m, mod in lora.modules.items():
        stem = KOHYA_PREFIX + kohya_name(m)
        p0 = mod.parts[0]
        dense = all(p is not None and p.alpha == p0.alpha and p.down.shape == p0.down.shape
                    and torch.equal(p.down, p0.down) for p in mod.parts)
        if dense:  # one shared down (a dense kohya source, or an unfused layer): written as is
            down, up, alpha = p0.down, torch.cat([p.up for p in mod.parts]), p0.alpha
        else:  # block-diagonal up; alpha * S so that alpha / (S * r) is our alpha / r
            downs, ups, alpha = _uniform(mod)
            r = ups[0].shape[1]
            down, up = torch.cat(downs), ups[0].new_zeros(sum(mod.rows), r * len(ups))
            for i, (u, start) in enumerate(zip(ups, [sum(mod.rows[:i]) for i in range(len(ups))])):
                up[start:start + u.shape[0], i * r:(i + 1) * r] = u
            alpha = alpha * len(ups)
        out |= {f"{stem}.lora_down.weight": down.clone(), f"{stem}.lora_up.weight": up.clone(),
                f"{stem}.alpha": _alpha_tensor(alpha)}
    for key, diff in lora.diffs.items():  # ComfyUI's spelling: `.diff_b` adds to the bias, `.diff` to the weight
        param, kind = key.rsplit(".", 1)
        out[f"{KOHYA_PREFIX}{kohya_name(param)}.{'diff_b' if kind == 'bias' else 'diff'}"] = diff.clone()
    return out


def _folded(p: LoRAPart) -> Tensor:
    """up * alpha / r, so that alpha = r (scale 1) gives the same delta: ComfyUI, Forge and every kohya-style
    loader ignore the `lora_adapter_metadata` diffusers keeps alpha in, and diffusers' SD3 loader refuses
    `.alpha` keys, so the scale travels in the weights. Exact when alpha / r is a power of two (alpha = r, the
    default, included); otherwise one rounding in the stored dtype."""
    if p.scale == 1:
        return p.up
    return (p.up.double() * p.scale).to(p.up.dtype)


def _diffusers_state(lora: LoRA) -> tuple[dict[str, Tensor], dict]:
    names = get_family(lora.family).lora_names(lora.modules)
    out, ranks = {}, {}
    for m, mod in lora.modules.items():
        rule = names.rules[m]
        parts = mod.parts
        if len(parts) == 1 and len(rule.others) > 1:  # one LoRA over a fused layer: A shared, B split by rows
            p = parts[0]
            rows = names.split_rows(m, p.up.shape[0], p.down.shape[1])
            parts = [LoRAPart(p.down, u, p.alpha) for u in p.up.split(rows)]
        for other, p in zip(rule.others, parts):
            if p is None:
                continue
            up = _folded(p)
            up = swap_halves(up) if names.swapped(m, p.up.shape[0], p.down.shape[1]) else up
            # clones: safetensors refuses tensors that share storage
            out[f"transformer.{other}.lora_A.weight"] = p.down.clone()
            out[f"transformer.{other}.lora_B.weight"] = up.clone()
            ranks[other] = p.up.shape[1]
    if not ranks:  # text encoders only: nothing of the transformer to describe
        return out, {}
    # the leading ^ keeps "proj_out" (the final layer) from also matching every single block's proj_out
    return out, _peft_entries(ranks, "transformer.", "^")


def _peft_entries(ranks: dict[str, int], prefix: str, anchor: str = "") -> dict:
    r"""The PEFT LoraConfig entries under `prefix` for modules of these ranks (alpha = r everywhere: folded).
    peft matches pattern keys as `(.*\.)?(key)$`, so `anchor` "^" pins a name to the top."""
    r = _most_common(ranks.values())
    others = {anchor + re.escape(k): v for k, v in ranks.items() if v != r}
    config = {"r": r, "lora_alpha": r, "target_modules": sorted(ranks), "rank_pattern": others,
              "alpha_pattern": others}
    return {f"{prefix}{k}": v for k, v in config.items()}


def _diffusers_text_state(lora: LoRA) -> tuple[dict[str, Tensor], dict]:
    """The text-encoder keys in the diffusers layout: under diffusers' prefixes (`text_encoder.`, ...) folded as
    the transformer's and described by a config per prefix (`text_encoder.r`, ...) in `lora_adapter_metadata`:
    diffusers builds each encoder's LoraConfig from its prefix's entries alone, and refuses a file whose metadata
    has none for an encoder it holds. Other keys (full differences, other tools' prefixes) are refused."""
    parts, rest = peft_text_parts(lora)
    if rest:  # written as they are, diffusers refused the file (SD3: a key without "lora"; Flux: `.alpha` keys beside
        # this metadata) or its kohya converter took the whole file over; they have no diffusers name
        raise WeightsError(f"{lora.source or 'this LoRA'} has text-encoder keys with no diffusers name ({len(rest)}, "
                           f"e.g. {min(rest)}), which diffusers' loaders refuse or drop; pass --ignore-te-lora to "
                           "write the transformer part alone (in Python: lora.text_encoders.clear())")
    out, config = {}, {}
    for prefix, modules in parts.items():
        ranks = {}
        for stem, p in modules.items():
            out[f"{prefix}{stem}.lora_A.weight"] = p.down.clone()
            out[f"{prefix}{stem}.lora_B.weight"] = _folded(p).clone()
            # transformers 5's CLIPTextModel has no `text_model.` level (WithProjection has): a name without it
            # matches the module in both, as peft matches names by suffix
            ranks[stem.removeprefix("text_model.")] = p.up.shape[1]
        config |= _peft_entries(ranks, prefix)  # never empty: a prefix is grouped only with a LoRA key under it
    return out, config


# Metadata that describes a file's tensors, which the written file states afresh or not at all: a converted or
# resized file's source passes on values of its own tensors (its layout, rank, alpha, PEFT config, hashes)
_LAYOUT_KEYS = {"scfm_format", "scfm_rank", "scfm_alpha", "scfm_targets", PEFT_METADATA_KEY, "ss_network_dim",
                "ss_network_alpha", "sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256"}
# up key suffix -> its LoRA's rank dimension, in each layout (ours, kohya, diffusers / PEFT)
_UP_SUFFIXES = (".lora_up", ".lora_up.weight", ".lora_B.weight")


# What A1111 / Forge, Civitai and kohya's tools read to tell a LoRA's base model (Stability AI's ModelSpec and
# sd-scripts' `ss_*` keys, as each family's record spells them). A caller that knows the exact base
# (distill/lora_export.py: `base_architecture`) overrides the family-wide id.
def base_architecture(family: str, config) -> str:
    """The ModelSpec id of a base model from its config (flux-1-dev, stable-diffusion-3-5-large, ...); the
    family-wide id for any other size (a tiny test model, the demo)."""
    family = get_family(family)
    return family.base_architecture(config) or family.architecture


def _tool_metadata(lora: LoRA, tensors: dict[str, Tensor]) -> dict[str, str]:
    """The `ss_*` keys: the rank and the alpha a kohya-style loader applies, read off the written `tensors` (the
    most common up width, and its `.alpha` key, else the rank: the diffusers layout's alpha is folded into the
    weights, kohya's missing alpha means the rank), so a block-diagonal kohya layer or a file of text-encoder
    parts is described as written; none for a file without LoRA pairs (full differences only)."""
    family = get_family(lora.family)
    meta = {"ss_network_module": family.kohya_module, "ss_base_model_version": family.kohya_base}
    ranks, alphas = [], []
    for key, up in tensors.items():
        suffix = next((s for s in _UP_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            continue
        ranks.append(up.shape[1])
        alpha = tensors.get(key[: -len(suffix)] + ".alpha")
        alphas.append(up.shape[1] if alpha is None else float(alpha))
    if ranks:
        meta |= {"ss_network_dim": str(_most_common(ranks)), "ss_network_alpha": f"{_most_common(alphas):g}"}
    return meta


def lora_state_dict(lora: LoRA, layout: str = "ours") -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and safetensors metadata of `lora` in `layout` (what `write_lora` writes)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if lora.text_encoders and layout != lora.layout:
        raise WeightsError(f"{lora.source or 'this LoRA'} has text-encoder keys in the {lora.layout} layout, "
                           f"which cannot be converted to {layout}; pass --ignore-te-lora to write the transformer "
                           "part alone (in Python: lora.text_encoders.clear())")
    if lora.diffs and layout != "kohya":
        raise WeightsError(f"{lora.source or 'this LoRA'} has {len(lora.diffs)} full differences (.diff / "
                           "diff_b), which only the kohya / ComfyUI layout holds; write it with --to kohya")
    meta = {"format": "pt", "scfm_family": lora.family, **lora.recommended.to_metadata()}
    # clones: safetensors refuses tensors that share storage (the diffusers layout folds its own)
    text = {} if layout == "diffusers" else {k: v.clone() for k, v in lora.text_encoders.items()}
    if layout == "ours":
        tensors = _ours_state(lora)
        ranks = Counter(t.shape[1] for k, t in tensors.items() if k.endswith(".lora_up"))
        alphas = Counter(float(t) for k, t in tensors.items() if k.endswith(".alpha"))
        meta |= {"scfm_format": FORMAT, "scfm_rank": str(ranks.most_common(1)[0][0]),
                 "scfm_alpha": str(alphas.most_common(1)[0][0]),
                 "scfm_targets": json.dumps(sorted(lora.modules))}
    elif layout == "kohya":
        tensors = _kohya_state(lora)
    else:
        tensors, config = _diffusers_state(lora)
        text, text_config = _diffusers_text_state(lora)
        meta[PEFT_METADATA_KEY] = json.dumps(config | text_config, sort_keys=True)
    return tensors | text, meta | _tool_metadata(lora, tensors | text)


def write_lora(lora: LoRA, path: str | os.PathLike, layout: str = "ours", *, overwrite: bool = False,
               metadata: dict[str, str] | None = None) -> Path:
    """`lora` as one safetensors file in `layout`; extra `metadata` is kept beside ours (and may name the
    exact base: `modelspec.architecture`). What the tensors fix (layout, rank, alpha, hints) is always ours."""
    tensors, meta = lora_state_dict(lora, layout)
    # keys that describe another layout's tensors (a converted file's metadata passed on) would mislead a reader
    metadata = {k: v for k, v in (metadata or {}).items() if k not in _LAYOUT_KEYS}
    family = get_family(lora.family)
    spec = {"modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": f"{family.architecture}/lora",
            "modelspec.implementation": family.implementation, "modelspec.title": Path(path).stem}
    return atomic_save(tensors, path, {**spec, **metadata, **meta}, overwrite=overwrite)


def save_lora(state: dict[str, Tensor], path: str | os.PathLike, *, layout: str = "ours", alpha: float,
              rank: int | None = None, slices: dict[str, tuple[int, ...]] | None = None,
              metadata: dict[str, str] | None = None, recommended: Recommended | None = None,
              overwrite: bool = False, family: str | None = None) -> Path:
    """A distill/ weight set (`set_state_dict`) of a `family` model in `layout`. `rank` and `slices`
    (module -> the LoRALayer's slice widths) are checked against the tensors, so a mis-sliced export fails
    here, not in a user's UI."""
    lora = LoRA.from_set_state(state, alpha, recommended=recommended, family=family)
    for m, mod in lora.modules.items():
        if (rank is not None and any(p.up.shape[1] != rank for p in mod.parts)) or (
                slices is not None and tuple(slices[m]) != mod.rows):
            want = slices and slices[m]
            raise WeightsError(f"{m}: the set's tensors do not match rank {rank} and slices {want}")
    return write_lora(lora, path, layout, overwrite=overwrite, metadata=metadata)
