"""Flux LoRA files: read and write three layouts, merge several into a loaded model, unload them bit-exactly.

Layouts (`read_lora` detects which; `write_lora(lora, path, layout)` writes any of them):

- **ours** (`"ours"`, metadata `scfm_format = "scfm-lora/1"`), per LoRA'd Linear under its BFL name M:
    M.lora_down  (S*r, in)   the S slices' down matrices stacked: S = 3 for a per-slice `qkv`, 4 for a
                             per-slice single-block `linear1` (q, k, v, mlp), else 1 (also a plain fused LoRA)
    M.lora_up    (out, r)    the rows of slice i (q | k | v | mlp) act on rows i*r:(i+1)*r of lora_down @ x
    M.alpha      () float64  delta_W(slice i) = alpha / r * up_i @ down_i, r = lora_up.shape[1] the rank of
                             one slice (kohya divides by lora_down.shape[0] instead; see below)
  Tensors keep the dtype they were trained in (fp32 from distill/). Without alpha this is exactly
  `distill.lora.set_state_dict`, so a training set saves as is (`LoRA.from_set_state`). Metadata, all
  strings: scfm_format, scfm_family ("flux"), scfm_rank and scfm_alpha (the most common values),
  scfm_targets (JSON list of M), and the recommended sampling settings when known: scfm_steps,
  scfm_schedule ("scfm" | "diffusers"), scfm_shift (a number or "dynamic"), scfm_guidance,
  scfm_lora_scale, scfm_max_sequence_length (the T5 length).
- **diffusers / PEFT** (`"diffusers"`): `transformer.<diffusers module>.lora_A.weight` (r, in) and
  `.lora_B.weight` (out, r), one module per slice (to_q / to_k / to_v, proj_mlp); delta_W = alpha / r * B @ A.
  Alpha comes from the `lora_adapter_metadata` JSON (r, lora_alpha, rank_pattern, alpha_pattern: what
  diffusers writes, and we do) or `.alpha` keys, else alpha = r. The final adaLN's B rows are (scale, shift)
  there, (shift, scale) in BFL.
- **kohya / ComfyUI** (`"kohya"`): `lora_unet_<BFL path, '.' -> '_'>.lora_down.weight` (R, in),
  `.lora_up.weight` (out, R), `.alpha`; delta_W = alpha / R * up @ down, R = lora_down.shape[0], alpha = R
  when missing or 0. Also read as `diffusion_model.<BFL path>` and with lora_A / lora_B. A fused layer is
  dense (one down for all of q, k, v) or, from sd-scripts' split_qkv, block-diagonal: up (out, S*r) holds
  slice i's up in column block i. The alpha trap (reference.md §7.2): sd-scripts trained such a file at
  alpha / r, but every generic loader (ComfyUI, diffusers) uses alpha / (S*r). We read it as they do, so an
  image matches ComfyUI (`kohya_split_alpha="per_slice"` gives the training-time strength), and when we write
  a block-diagonal layer we store alpha * S, so a generic loader reproduces our alpha / r exactly.

Reading a kohya file keeps every key, embedders and final layer included. **diffusers 0.42.1's own kohya
loader silently drops** the img_in, txt_in, time_in, vector_in, guidance_in and final_layer LoRA weights (and
ignores the final layer's alpha); to use such a file in diffusers, convert it first:
`write_lora(read_lora(f), out, "diffusers")`. LoKr, LoHa, DoRA and other adapters that are not plain LoRA are
refused in one line. Text-encoder keys (`lora_te*`, `text_encoder*.`) are kept apart in `LoRA.text_encoders`
and written back only to their own layout.

Merging into a loaded model (`apply_loras`, `unload_loras`) lives in `weights/lora_merge.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .io import TensorReader, WeightsError, atomic_save, read_header
from .keymaps import swap_halves
from .keymaps.flux import flux_split_sizes
from .keymaps.lora import (
    KOHYA_PREFIX,
    TEXT_ENCODER_PREFIXES,
    LoRANames,
    block_counts,
    flux_lora_names,
    kohya_name,
    parse_key,
    refuse_non_lora,
)

FORMAT = "scfm-lora/1"
LAYOUTS = ("ours", "diffusers", "kohya")
PEFT_METADATA_KEY = "lora_adapter_metadata"


@dataclass(frozen=True)
class Recommended:
    """Sampling settings stored with an SCFM LoRA; None = not stated."""

    steps: int | None = None
    schedule: str | None = None  # "scfm" (shifted linspace) or "diffusers"
    shift: float | str | None = None  # a number, or "dynamic" (Flux's resolution-dependent shift)
    guidance: float | None = None
    lora_scale: float | None = None
    max_sequence_length: int | None = None  # T5 tokens

    def to_metadata(self) -> dict[str, str]:
        return {f"scfm_{k}": str(v) for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> Recommended:
        def parse(name, kind):
            raw = meta.get(f"scfm_{name}")
            try:
                return None if raw is None else kind(raw)
            except ValueError:
                return raw if name == "shift" else None  # "dynamic"; an unreadable hint is no hint

        kinds = {"steps": int, "schedule": str, "shift": float, "guidance": float, "lora_scale": float,
                 "max_sequence_length": int}
        return cls(**{k: parse(k, kind) for k, kind in kinds.items()})


@dataclass
class LoRAPart:
    down: Tensor  # (r, in)
    up: Tensor  # (rows, r)
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.up.shape[1]

    @property
    def in_features(self) -> int:
        return self.down.shape[1]


@dataclass
class ModuleLoRA:
    """The LoRA of one official Linear: one part per output-row slice (None: that slice has no LoRA)."""

    parts: list[LoRAPart | None]
    rows: tuple[int, ...]

    @property
    def in_features(self) -> int:
        return next(p.down.shape[1] for p in self.parts if p is not None)

    def delta_times(self, x: Tensor) -> Tensor:
        """delta_W @ x (out, k) in fp32 without forming delta_W: cheap probes of full-size layers."""
        out = []
        for part, n in zip(self.parts, self.rows):
            if part is None:
                out.append(x.new_zeros(n, x.shape[1], dtype=torch.float32))
            else:
                out.append(part.up.float() @ (part.down.float() @ x.float()) * part.scale)
        return torch.cat(out)

    def delta(self, device=None) -> Tensor:
        """delta_W (out, in) in fp32 on `device`: scale * up @ down per slice, as distill/lora.py does."""
        out = []
        for part, n in zip(self.parts, self.rows):
            if part is None:
                out.append(torch.zeros(n, self.in_features, device=device))
            else:
                up, down = (t.to(device, torch.float32) for t in (part.up, part.down))
                out.append((up @ down) * part.scale)
        return torch.cat(out)


@dataclass
class LoRA:
    modules: dict[str, ModuleLoRA]  # official (BFL) module name -> its LoRA
    family: str = "flux"
    layout: str = "ours"  # the layout it was read from
    recommended: Recommended = field(default_factory=Recommended)
    text_encoders: dict[str, Tensor] = field(default_factory=dict)  # as read, untouched
    source: str = ""

    @classmethod
    def from_set_state(cls, state: dict[str, Tensor], alpha: float, *, recommended: Recommended | None = None,
                       family: str = "flux") -> LoRA:
        """From `distill.lora.set_state_dict(model, name)` and the LoRAConfig's alpha."""
        tensors = {k: v.detach() for k, v in state.items()}
        tensors |= {k.removesuffix(".lora_down") + ".alpha": torch.tensor(float(alpha), dtype=torch.float64)
                    for k in state if k.endswith(".lora_down")}
        return cls(_modules_from_ours(tensors, "set state"), family, "ours", recommended or Recommended())


# ----- reading ----------------------------------------------------------------------------------------------


def _fused_rows(names: LoRANames, official: str, out: int, in_features: int) -> list[int]:
    rule = names.rules[official]
    if rule.kind != "fuse":
        return [out]
    return flux_split_sizes(in_features)(rule, torch.empty(out, 0))


def _modules_from_ours(tensors: dict[str, Tensor], source: str) -> dict[str, ModuleLoRA]:
    stems = {k.rsplit(".", 1)[0] for k in tensors}
    names = flux_lora_names(*block_counts(s + "." for s in stems))
    modules = {}
    for m in sorted(stems):
        if m not in names.rules:
            raise WeightsError(f"{source}: {m} is not a Linear of Flux (an scfm LoRA for another model?)")
        try:
            down, up, alpha = tensors[f"{m}.lora_down"], tensors[f"{m}.lora_up"], float(tensors[f"{m}.alpha"])
        except KeyError as e:
            raise WeightsError(f"{source}: {m} lacks {e.args[0]}; the file is incomplete") from None
        r = up.shape[1]
        slices = down.shape[0] // r
        rows = [up.shape[0]] if slices == 1 else _fused_rows(names, m, up.shape[0], down.shape[1])
        if down.shape[0] != slices * r or len(rows) != slices:
            raise WeightsError(f"{source}: {m}: lora_down {list(down.shape)} and lora_up {list(up.shape)} "
                               "do not form 1 or one-per-slice LoRAs")
        parts = [LoRAPart(d, u, alpha) for d, u in zip(down.chunk(slices), up.split(rows))]
        modules[m] = ModuleLoRA(parts, tuple(rows))
    return modules


def _peft_alpha(config: dict, module: str, rank: int, alpha_key: Tensor | None) -> float:
    if alpha_key is not None:
        return float(alpha_key)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):  # peft's own pattern rule
            return float(value)
    if config:  # diffusers builds peft's LoraConfig from this metadata, whose lora_alpha defaults to 8
        return float(config.get("lora_alpha", 8))
    return float(rank)  # no alpha anywhere: diffusers uses alpha = r (scale 1)


def _kohya_module(names, official, down, up, alpha, split_alpha) -> ModuleLoRA:
    R = down.shape[0]
    alpha = R if alpha is None or float(alpha) == 0 else float(alpha)
    rows = _fused_rows(names, official, up.shape[0], down.shape[1])
    S = len(rows)
    if S > 1 and R % S == 0:
        r = R // S
        blocks = [u.split(r, dim=1) for u in up.split(rows)]  # [i][j]: rows of slice i, columns of part j
        if all(not blocks[i][j].any() for i in range(S) for j in range(S) if i != j):
            part_alpha = alpha / S if split_alpha == "generic" else alpha
            return ModuleLoRA([LoRAPart(d, blocks[i][i], part_alpha) for i, d in enumerate(down.chunk(S))],
                              tuple(rows))
    return ModuleLoRA([LoRAPart(down, up, alpha)], (up.shape[0],))


def read_lora(path: str | os.PathLike, *, kohya_split_alpha: str = "generic") -> LoRA:
    """Read a Flux LoRA in our, diffusers / PEFT or kohya / ComfyUI layout (detected). Every key is used or
    refused: nothing is dropped (unlike diffusers' kohya loader, see the module docstring)."""
    if kohya_split_alpha not in ("generic", "per_slice"):
        raise ValueError(f"kohya_split_alpha must be 'generic' or 'per_slice', got {kohya_split_alpha!r}")
    path = Path(path)
    src = str(path)
    header, meta = read_header(path)
    refuse_non_lora(header, src)
    with TensorReader([path]) as read:
        tensors = {k: read(k) for k in header}
    recommended = Recommended.from_metadata(meta)
    if meta.get("scfm_family", "flux") != "flux":
        raise WeightsError(f"{src}: a LoRA for {meta['scfm_family']}; this reader is for Flux")
    if meta.get("scfm_format") == FORMAT:
        return LoRA(_modules_from_ours(tensors, src), "flux", "ours", recommended, source=src)
    downs = [k for k in header if k.endswith(".lora_down")]
    if "scfm_lora" in meta and downs:  # distill/train.py's own export: alpha and T5 length in JSON metadata
        info = json.loads(meta["scfm_lora"])
        alpha = torch.tensor(float(info["alpha"]), dtype=torch.float64)
        tensors |= {k.removesuffix(".lora_down") + ".alpha": alpha for k in downs}
        if recommended.max_sequence_length is None and info.get("t5_length"):
            recommended = dataclasses.replace(recommended, max_sequence_length=int(info["t5_length"]))
        return LoRA(_modules_from_ours(tensors, src), "flux", "ours", recommended, source=src)
    text = {k: v for k, v in tensors.items() if k.startswith(TEXT_ENCODER_PREFIXES)}
    parsed = {k: parse_key(k) for k in tensors if k not in text}
    if not any(p and p[1] != "alpha" for p in parsed.values()):
        if text:
            raise WeightsError(f"{src}: only text-encoder LoRA keys ({len(text)}), none for the transformer")
        first = ", ".join(sorted(header)[:3])
        raise WeightsError(f"{src}: no LoRA tensors in this file (first keys: {first}); is it a base model? "
                           "load it with weights.load_flux")
    names = flux_lora_names(*block_counts(k + "." for k in tensors))
    groups: dict[str, dict] = {}
    namings = set()
    for key, p in parsed.items():
        resolved = names.resolve(p[0]) if p else None
        if resolved is None:
            raise WeightsError(f"{src}: key {key} names no Flux Linear layer; a LoRA for another model?")
        naming, official, index = resolved
        namings.add(naming)
        groups.setdefault(official, {}).setdefault(index, {})[p[1]] = tensors[key]
    if len(namings) > 1:
        raise WeightsError(f"{src}: mixes kohya and diffusers module names; not a single LoRA layout")
    layout = namings.pop()
    config = json.loads(meta.get(PEFT_METADATA_KEY, "{}"))
    config = {k.removeprefix("transformer."): v for k, v in config.items()}
    modules = {}
    for official, by_slice in sorted(groups.items()):
        for index, g in by_slice.items():
            if "down" not in g or "up" not in g:
                raise WeightsError(f"{src}: {official} has {sorted(g)} but needs both down (A) and up (B)")
        if layout == "kohya":
            g = by_slice[None]
            modules[official] = _kohya_module(names, official, g["down"], g["up"], g.get("alpha"),
                                              kohya_split_alpha)
            continue
        rule = names.rules[official]
        parts: list[LoRAPart | None] = [None] * len(rule.others)
        for index, g in by_slice.items():
            alpha = _peft_alpha(config, rule.others[index], g["up"].shape[1], g.get("alpha"))
            up = swap_halves(g["up"]) if rule.kind == "swap" else g["up"]
            parts[index] = LoRAPart(g["down"], up, alpha)
        first = next(p for p in parts if p is not None)
        # the width of a slice absent from the file: q, k, v are equal; diffusers' Flux fixes MLP ratio 4
        default = {1: [first.up.shape[0]], 3: [first.up.shape[0]] * 3, 4: [first.in_features] * 3}
        rows = default[len(parts)] + ([4 * first.in_features] if len(parts) == 4 else [])
        rows = [n if p is None else p.up.shape[0] for p, n in zip(parts, rows)]
        modules[official] = ModuleLoRA(parts, tuple(rows))
    return LoRA(modules, "flux", layout, recommended, text, src)


# ----- writing ----------------------------------------------------------------------------------------------


def _uniform(mod: ModuleLoRA) -> tuple[list[Tensor], list[Tensor], float]:
    """Parts with one rank and one alpha: absent parts and lower ranks padded with zeros (exact); parts with a
    different alpha / r get that ratio multiplied into their up (one rounding; only mixed-scale sources)."""
    present = [p for p in mod.parts if p is not None]
    r = max(p.up.shape[1] for p in present)
    ref = present[0]
    alpha = ref.scale * r if ref.up.shape[1] != r else ref.alpha
    downs, ups = [], []
    for part, n in zip(mod.parts, mod.rows):
        if part is None:
            downs.append(ref.down.new_zeros(r, ref.down.shape[1]))
            ups.append(ref.up.new_zeros(n, r))
            continue
        pad = r - part.up.shape[1]
        up = part.up
        if part.scale != alpha / r:
            up = (up.float() * (part.scale * r / alpha)).to(up.dtype)
        downs.append(torch.cat([part.down, part.down.new_zeros(pad, part.down.shape[1])]))
        ups.append(torch.cat([up, up.new_zeros(up.shape[0], pad)], dim=1))
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
    return out


def _diffusers_state(lora: LoRA) -> tuple[dict[str, Tensor], dict]:
    names = flux_lora_names(*block_counts(m + "." for m in lora.modules))
    out, ranks, alphas = {}, {}, {}
    for m, mod in lora.modules.items():
        rule = names.rules[m]
        parts = mod.parts
        if len(parts) == 1 and len(rule.others) > 1:  # one LoRA over a fused layer: A shared, B split by rows
            p = parts[0]
            rows = _fused_rows(names, m, p.up.shape[0], p.down.shape[1])
            parts = [LoRAPart(p.down, u, p.alpha) for u in p.up.split(rows)]
        for other, p in zip(rule.others, parts):
            if p is None:
                continue
            up = swap_halves(p.up) if rule.kind == "swap" else p.up
            # clones: safetensors refuses tensors that share storage
            out[f"transformer.{other}.lora_A.weight"] = p.down.clone()
            out[f"transformer.{other}.lora_B.weight"] = up.clone()
            ranks[other], alphas[other] = p.up.shape[1], p.alpha
    r, alpha = Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]
    # peft matches pattern keys as `(.*\.)?(key)$`; the leading ^ keeps "proj_out" (the final layer) from also
    # matching every single block's proj_out
    config = {"r": r, "lora_alpha": alpha, "target_modules": sorted(ranks),
              "rank_pattern": {"^" + re.escape(k): v for k, v in ranks.items() if v != r},
              "alpha_pattern": {"^" + re.escape(k): v for k, v in alphas.items() if v != alpha}}
    return out, {f"transformer.{k}": v for k, v in config.items()}


def lora_state_dict(lora: LoRA, layout: str = "ours") -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and safetensors metadata of `lora` in `layout` (what `write_lora` writes)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if lora.text_encoders and layout != lora.layout:
        raise WeightsError(f"{lora.source or 'this LoRA'} has text-encoder keys in the {lora.layout} layout, "
                           f"which cannot be converted to {layout}; lora.text_encoders.clear() drops them")
    meta = {"format": "pt", "scfm_family": lora.family, **lora.recommended.to_metadata()}
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
        meta[PEFT_METADATA_KEY] = json.dumps(config, sort_keys=True)
    return tensors | {k: v.clone() for k, v in lora.text_encoders.items()}, meta


def write_lora(lora: LoRA, path: str | os.PathLike, layout: str = "ours", *, overwrite: bool = False,
               metadata: dict[str, str] | None = None) -> Path:
    """`lora` as one safetensors file in `layout`; extra `metadata` is kept beside ours."""
    tensors, meta = lora_state_dict(lora, layout)
    return atomic_save(tensors, path, {**(metadata or {}), **meta}, overwrite=overwrite)


def save_lora(state: dict[str, Tensor], path: str | os.PathLike, *, layout: str = "ours", alpha: float,
              rank: int | None = None, slices: dict[str, tuple[int, ...]] | None = None,
              metadata: dict[str, str] | None = None, recommended: Recommended | None = None,
              overwrite: bool = False) -> Path:
    """A distill/ weight set (`set_state_dict`) in `layout`. `rank` and `slices` (module -> the LoRALayer's
    slice widths) are checked against the tensors, so a mis-sliced export fails here, not in a user's UI."""
    lora = LoRA.from_set_state(state, alpha, recommended=recommended)
    for m, mod in lora.modules.items():
        if (rank is not None and any(p.up.shape[1] != rank for p in mod.parts)) or (
                slices is not None and tuple(slices[m]) != mod.rows):
            want = slices and slices[m]
            raise WeightsError(f"{m}: the set's tensors do not match rank {rank} and slices {want}")
    return write_lora(lora, path, layout, overwrite=overwrite, metadata=metadata)


# Merging lives next door; re-exported so `from weights.lora import apply_loras` keeps working.
from .lora_merge import applied_loras, apply_loras, unload_loras  # noqa: E402, F401
