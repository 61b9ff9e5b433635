"""Flux and SD3 / SD3.5 LoRA files: read and write three layouts, merge several into a loaded model, unload
them bit-exactly.

Layouts (`read_lora` detects which; `write_lora(lora, path, layout)` writes any of them, in lora_write.py):

- **ours** (`"ours"`, metadata `scfm_format = "scfm-lora/1"`), per LoRA'd layer under its official (BFL / SAI)
  name M:
    M.lora_down  (S*r, in)   the S slices' down matrices stacked: S = 3 for a per-slice `qkv`, 4 for a
                             per-slice single-block `linear1` (q, k, v, mlp), else 1 (also a plain fused LoRA)
    M.lora_up    (out, r)    the rows of slice i (q | k | v | mlp) act on rows i*r:(i+1)*r of lora_down @ x
    M.alpha      () float64  delta_W(slice i) = alpha / r * up_i @ down_i, r = lora_up.shape[1] the rank of
                             one slice (kohya divides by lora_down.shape[0] instead; see below)
  SD3's patch embedding (`x_embedder.proj`, a Conv2d) has lora_down (r, in, kh, kw), a conv with the base's
  kernel and stride, and lora_up (out, r, 1, 1), as peft, kohya and ComfyUI store conv LoRAs.
  Tensors keep the dtype they were trained in (fp32 from distill/). Without alpha this is exactly
  `distill.lora.set_state_dict`, so a training set saves as is (`LoRA.from_set_state`). Metadata, all
  strings: scfm_format, scfm_family ("flux" | "sd3"), scfm_rank and scfm_alpha (the most common values),
  scfm_targets (JSON list of M), and the recommended sampling settings when known: scfm_steps,
  scfm_schedule ("scfm" | "diffusers"), scfm_shift (a number or "dynamic"), scfm_guidance (Flux: the
  guidance embedding; SD3: diffusers' CFG scale g of u + g (c - u)), scfm_lora_scale,
  scfm_max_sequence_length (the T5 length) and, for an SD3 LoRA distilled with CFG baked in,
  scfm_training_cfg_scale: the w of c + w (c - u) it was trained with (scfm_guidance is then 1 + w).
- **diffusers / PEFT** (`"diffusers"`): `transformer.<diffusers module>.lora_A.weight` (r, in) and
  `.lora_B.weight` (out, r), one module per slice (to_q / to_k / to_v, proj_mlp); delta_W = alpha / r * B @ A.
  Alpha comes from the `lora_adapter_metadata` JSON (r, lora_alpha, rank_pattern, alpha_pattern: what
  diffusers writes) or `.alpha` keys, else alpha = r. We write alpha / r folded into B and alpha = r in that
  metadata: ComfyUI and Forge ignore the metadata, diffusers' SD3 loader refuses `.alpha` keys, so only
  folded weights have the same strength everywhere. The final adaLN's B rows are (scale, shift) there,
  (shift, scale) officially; SD3's last-block context adaLN likewise. diffusers' SD3 loader accepts only this
  layout (with no `.alpha` keys), the patch embedding's conv LoRA included. It is the layout of a training
  run's main export: ComfyUI, Forge, diffusers and we all load it as it is.
- **kohya / ComfyUI** (`"kohya"`): `lora_unet_<official path, '.' -> '_'>.lora_down.weight` (R, in),
  `.lora_up.weight` (out, R), `.alpha`; delta_W = alpha / R * up @ down, R = lora_down.shape[0], alpha = R
  when missing. An alpha of 0 is no effect, as diffusers and ComfyUI apply it (sd-scripts' own loader reads 0 as R
  and never saves it; one warning line names the key). Also read as `diffusion_model.<official path>` and with
  lora_A / lora_B. ComfyUI reads both spellings for Flux and SD3 (keymaps/lora.py). A fused layer is dense (one
  down for all of q, k, v) or, from sd-scripts' split_qkv, block-diagonal: up (out, S*r) holds slice i's up in
  column block i. The alpha trap (docs/models.md §7.2): sd-scripts trained such a file at
  alpha / r, but every generic loader (ComfyUI, diffusers) uses alpha / (S*r). We read it as they do, so an
  image matches ComfyUI (`kohya_split_alpha="per_slice"` gives the training-time strength), and when we write
  a block-diagonal layer we store alpha * S, so a generic loader reproduces our alpha / r exactly.

Every layout also carries what other tools read to tell the base model and the strength: ModelSpec's
`modelspec.architecture` (e.g. `flux-1-dev/lora`), `.implementation`, `.title`, and sd-scripts'
`ss_network_module`, `ss_network_dim`, `ss_network_alpha`, `ss_base_model_version` (A1111 / Forge, Civitai,
kohya's tools); `write_lora` writes them, a caller's metadata may add more (a training run: date, resolution,
steps, a usage hint).

Other tools' spellings, all read at the strength those tools apply (ComfyUI maps each of them):
- kohya names under `diffusion_model.` / `model.diffusion_model.` or bare (ComfyUI, its Extract and Save LoRA);
- diffusers names with '.' -> '_' under `lycoris_` (SimpleTuner's LyCORIS) or `lora_transformer_` (OneTrainer),
  with lora_down / lora_up / alpha;
- PEFT: `base_model.model.` names; a `save_pretrained` folder (or its adapter_model.safetensors) with the
  `adapter_config.json` beside it giving lora_alpha, rank_pattern, alpha_pattern; `use_rslora` (there or in
  diffusers' metadata) scales by alpha / sqrt(r), kept as alpha * sqrt(r) / r;
- full differences, ComfyUI's `.diff_b` (a bias) and `.diff` (a whole weight, or a 1-D norm weight such as SD3's
  ln_q): kept in `LoRA.diffs` by official parameter and added times the scale; refused where the parameter has
  no place in the model. Only the kohya layout writes them back.

The family comes from the file's scfm_family, else from the names (only one family has them all), else,
for diffusers names both families use, from `family=` (the model it is for: `apply_loras` passes it), else
from the layers' width (SD3.5 large 2432, SD3 / SD3.5 medium 1536), else Flux.

Reading a kohya file keeps every key, embedders and final layer included. **diffusers 0.42.1's own kohya
loader silently drops** the img_in, txt_in, time_in, vector_in, guidance_in and final_layer LoRA weights (and
ignores the final layer's alpha), and has no kohya loader for SD3 at all; to use such a file in diffusers,
convert it first: `write_lora(read_lora(f), out, "diffusers")`. LoKr, LoHa, DoRA and other adapters that are
not plain LoRA are refused in one line. Text-encoder keys (`lora_te*`, `text_encoder*.`) are kept apart in
`LoRA.text_encoders` and written back only to their own layout; in the diffusers layout, `text_encoder*.` parts
get the transformer's treatment (alpha / r folded into B, each prefix's config in `lora_adapter_metadata`).

Merging into a loaded model (`apply_loras`, `unload_loras`) lives in `weights/lora_merge.py`, the PEFT
configuration, full differences and tool spellings in `weights/lora_foreign.py`, the text-encoder part in
`weights/lora_text.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .families import article, checkpoint_family, default_family, get_family, lora_family
from .io import WeightsError, read_header
from .keymaps import swap_halves
from .keymaps.lora import TEXT_ENCODER_PREFIXES, parse_key, refuse_non_lora
from .lora_foreign import flavour, kohya_alpha, peft_alpha, peft_config, peft_file, warn_zero_alphas, whole_diff
from .reader import TensorReader

FORMAT = "scfm-lora/1"
LAYOUTS = ("ours", "diffusers", "kohya")


@dataclass(frozen=True)
class Recommended:
    """Sampling settings stored with an SCFM LoRA; None = not stated."""

    steps: int | None = None
    schedule: str | None = None  # "scfm" (shifted linspace) or "diffusers"
    shift: float | str | None = None  # a number, or "dynamic" (Flux's resolution-dependent shift)
    guidance: float | None = None
    lora_scale: float | None = None
    max_sequence_length: int | None = None  # T5 tokens
    # SD3 distilled with CFG baked in (docs/method.md §5): the w of c + w (c - u) in training; `guidance`
    # then holds diffusers' scale 1 + w, with an empty negative prompt
    training_cfg_scale: float | None = None

    def to_metadata(self) -> dict[str, str]:
        return {f"scfm_{k}": str(v) for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> Recommended:
        def parse(name, kind):
            raw = meta.get(f"scfm_{name}")
            try:
                value = None if raw is None else kind(raw)
            except ValueError:
                return raw if name == "shift" else None  # "dynamic"; an unreadable hint is no hint
            return None if isinstance(value, float) and not math.isfinite(value) else value  # "nan" too

        kinds = {"steps": int, "schedule": str, "shift": float, "guidance": float, "lora_scale": float,
                 "max_sequence_length": int, "training_cfg_scale": float}
        return cls(**{k: parse(k, kind) for k, kind in kinds.items()})


@dataclass
class LoRAPart:
    down: Tensor  # (r, in), or (r, in, kh, kw) for a Conv2d
    up: Tensor  # (rows, r), or (rows, r, 1, 1)
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

    @property
    def kernel(self) -> tuple[int, ...]:
        """() for a Linear, (kh, kw) for a Conv2d."""
        return tuple(next(p.down.shape[2:] for p in self.parts if p is not None))

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (sum(self.rows), self.in_features, *self.kernel)

    def delta_times(self, x: Tensor) -> Tensor:
        """delta_W @ x (out, k) in fp32 without forming delta_W (x: (in * kh * kw, k) for a conv): cheap
        probes of full-size layers."""
        out = []
        for part, n in zip(self.parts, self.rows):
            if part is None:
                out.append(x.new_zeros(n, x.shape[1], dtype=torch.float32))
            else:
                up, down = part.up.flatten(1).float(), part.down.flatten(1).float()
                out.append(up @ (down @ x.float()) * part.scale)
        return torch.cat(out)

    def delta(self, device=None) -> Tensor:
        """delta_W in the layer's weight shape, fp32 on `device`: scale * up @ down per slice, as
        distill/lora.py does (a conv's 1x1 up times its kernel-sized down)."""
        out = []
        for part, n in zip(self.parts, self.rows):
            if part is None:
                out.append(torch.zeros(n, math.prod(self.weight_shape[1:]), device=device))
            else:
                up, down = (t.to(device, torch.float32).flatten(1) for t in (part.up, part.down))
                out.append((up @ down) * part.scale)
        return torch.cat(out).view(self.weight_shape)


@dataclass
class LoRA:
    modules: dict[str, ModuleLoRA]  # official (BFL / SAI) module name -> its LoRA
    family: str = field(default_factory=lambda: default_family().name)  # a registered family's name
    layout: str = "ours"  # the layout it was read from
    recommended: Recommended = field(default_factory=Recommended)
    text_encoders: dict[str, Tensor] = field(default_factory=dict)  # as read, untouched
    source: str = ""
    # full differences (ComfyUI's `.diff_b` / `.diff`): official parameter -> delta in its official layout, added
    # times the LoRA's scale; biases, norm weights, or whole weights
    diffs: dict[str, Tensor] = field(default_factory=dict)
    flavour: str = ""  # which tool's spelling the file uses, for `convert.py info`

    @classmethod
    def from_set_state(cls, state: dict[str, Tensor], alpha: float, *, recommended: Recommended | None = None,
                       family: str | None = None) -> LoRA:
        """From `distill.lora.set_state_dict(model, name)` and the LoRAConfig's alpha."""
        tensors = {k: v.detach() for k, v in state.items()}
        tensors |= {k.removesuffix(".lora_down") + ".alpha": torch.tensor(float(alpha), dtype=torch.float64)
                    for k in state if k.endswith(".lora_down")}
        family = get_family(family or default_family()).name
        return cls(_modules_from_ours(tensors, "set state", family), family, "ours",
                   recommended or Recommended())


# ----- reading ----------------------------------------------------------------------------------------------


def _modules_from_ours(tensors: dict[str, Tensor], source: str, family: str) -> dict[str, ModuleLoRA]:
    stems = {k.rsplit(".", 1)[0] for k in tensors}
    family = get_family(family)
    names, what = family.lora_names(stems), family.title
    modules = {}
    for m in sorted(stems):
        if m not in names.rules:
            raise WeightsError(f"{source}: {m} is not a layer of {what} (an scfm LoRA for another model?)")
        try:
            down, up, alpha = tensors[f"{m}.lora_down"], tensors[f"{m}.lora_up"], float(tensors[f"{m}.alpha"])
        except KeyError as e:
            raise WeightsError(f"{source}: {m} lacks {e.args[0]}; the file is incomplete") from None
        r = up.shape[1]
        slices = down.shape[0] // r
        rows = [up.shape[0]] if slices == 1 else names.split_rows(m, up.shape[0], down.shape[1])
        if down.shape[0] != slices * r or len(rows) != slices:
            raise WeightsError(f"{source}: {m}: lora_down {list(down.shape)} and lora_up {list(up.shape)} "
                               "do not form 1 or one-per-slice LoRAs")
        parts = [LoRAPart(d, u, alpha) for d, u in zip(down.chunk(slices), up.split(rows))]
        modules[m] = ModuleLoRA(parts, tuple(rows))
    return modules


def _kohya_module(names, official, down, up, alpha, split_alpha) -> ModuleLoRA:
    R = down.shape[0]
    alpha = kohya_alpha(alpha, R)
    rows = names.split_rows(official, up.shape[0], down.shape[1])
    S = len(rows)
    if S > 1 and R % S == 0:
        r = R // S
        blocks = [u.split(r, dim=1) for u in up.split(rows)]  # [i][j]: rows of slice i, columns of part j
        if all(not blocks[i][j].any() for i in range(S) for j in range(S) if i != j):
            part_alpha = alpha / S if split_alpha == "generic" else alpha
            return ModuleLoRA([LoRAPart(d, blocks[i][i], part_alpha) for i, d in enumerate(down.chunk(S))],
                              tuple(rows))
    return ModuleLoRA([LoRAPart(down, up, alpha)], (up.shape[0],))


def _diffusers_module(names, official, by_slice, config) -> ModuleLoRA:
    rule = names.rules[official]
    parts: list[LoRAPart | None] = [None] * len(rule.others)
    for index, g in by_slice.items():
        alpha = peft_alpha(config, rule.others[index], g["up"].shape[1], g.get("alpha"))
        swap = names.swapped(official, g["up"].shape[0], g["down"].shape[1])
        parts[index] = LoRAPart(g["down"], swap_halves(g["up"]) if swap else g["up"], alpha)
    first = next(p for p in parts if p is not None)
    # the width of a slice absent from the file: q, k, v are equal; diffusers' Flux fixes MLP ratio 4
    default = {1: [first.up.shape[0]], 3: [first.up.shape[0]] * 3, 4: [first.in_features] * 3}
    rows = default[len(parts)] + ([4 * first.in_features] if len(parts) == 4 else [])
    rows = [n if p is None else p.up.shape[0] for p, n in zip(parts, rows)]
    return ModuleLoRA(parts, tuple(rows))


def _family(src, stems, official, widths, meta, hint) -> str:
    try:
        return lora_family(stems, official, widths, meta.get("scfm_family"), hint)
    except WeightsError as e:
        raise WeightsError(f"{src}: {e}") from None


def _read_ours(tensors, meta, src, recommended, family) -> LoRA | None:
    """Our layout (or distill/train.py's older export: alpha and T5 length in `scfm_lora` JSON), else None."""
    downs = [k for k in tensors if k.endswith(".lora_down")]
    if meta.get("scfm_format") != FORMAT:
        if "scfm_lora" not in meta or not downs:
            return None
        try:
            info = json.loads(meta["scfm_lora"])
            alpha = torch.tensor(float(info["alpha"]), dtype=torch.float64)
        except (ValueError, TypeError, KeyError):
            info = None
        if info is None or not torch.isfinite(alpha):
            raise WeightsError(f"{src}: its scfm_lora metadata holds no finite alpha ({meta['scfm_lora'][:60]!r}); "
                               "the file is damaged: re-export it")
        tensors |= {k.removesuffix(".lora_down") + ".alpha": alpha for k in downs}
        if recommended.max_sequence_length is None and info.get("t5_length"):
            recommended = dataclasses.replace(recommended, max_sequence_length=int(info["t5_length"]))
    stems = {k.rsplit(".", 1)[0] for k in tensors}
    widths = [tensors[k].shape[1] for k in downs]
    family = _family(src, stems, True, widths, meta, family)
    return LoRA(_modules_from_ours(tensors, src, family), family, "ours", recommended, source=src)


def _check_finite(tensors: dict[str, Tensor], src: str) -> None:
    """Refuse a LoRA holding NaN or infinity in any tensor (transformer, text encoders, full differences,
    alphas): one such value blackens every image it touches, and fails an SVD (`convert.py lora --rank`)."""
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t.float()).all():
            bad = int((~torch.isfinite(t.float())).sum())
            raise WeightsError(f"{src}: tensor {key} holds {bad} NaN / infinite value(s) of {t.numel()}; the LoRA "
                               "is corrupt (a diverged training run?): use an earlier export or retrain it")


def _base_model(keys) -> str | None:
    """'a FLUX.1' for a file holding a base model of a family we know (refuse_non_lora names it), else None."""
    family = checkpoint_family(keys, {})
    return None if family is None else article(family.title)


def read_lora(path: str | os.PathLike, *, kohya_split_alpha: str = "generic",
              family: str | None = None) -> LoRA:
    """Read a Flux or SD3 / SD3.5 LoRA in our, diffusers / PEFT or kohya / ComfyUI layout (detected).
    `family` (a family's name) decides only names both families share (see the module docstring). Every key
    is used or refused: nothing is dropped (unlike diffusers' kohya loader)."""
    if kohya_split_alpha not in ("generic", "per_slice"):
        raise ValueError(f"kohya_split_alpha must be 'generic' or 'per_slice', got {kohya_split_alpha!r}")
    path = peft_file(Path(path))
    src = str(path)
    header, meta = read_header(path)
    refuse_non_lora(header, src, base_model=_base_model)
    with TensorReader([path]) as read:
        tensors = {k: read(k) for k in header}
    _check_finite(tensors, src)
    recommended = Recommended.from_metadata(meta)
    ours = _read_ours(tensors, meta, src, recommended, family)
    if ours is not None:
        return ours
    config = peft_config(path, meta, src)  # before any use, so damaged PEFT metadata fails alike for every file
    text = {k: v for k, v in tensors.items() if k.startswith(TEXT_ENCODER_PREFIXES)}
    parsed = {k: parse_key(k) for k in tensors if k not in text}
    if not any(p and p[1] != "alpha" for p in parsed.values()):
        if text and not any(parsed.values()):  # sd-scripts can train the text encoders alone
            stated = get_family(meta.get("scfm_family") or family or default_family()).name
            layout = "kohya" if any(k.startswith("lora_te") for k in text) else "diffusers"
            warn_zero_alphas(tensors, layout, src)
            return LoRA({}, stated, layout, recommended, text, src, flavour="text encoders only")
        first = ", ".join(sorted(header)[:3])
        raise WeightsError(f"{src}: no transformer LoRA tensors in this file (first keys: {first}); "
                           f"`python tools/convert.py info {src}` says what it holds")
    stems = [p[0] for p in parsed.values() if p]
    widths = [tensors[k].shape[1] for k, p in parsed.items() if p and p[1] == "down"]
    family = _family(src, stems, False, widths, meta, family)
    names = get_family(family).lora_names(stems)
    groups: dict[str, dict] = {}
    diffs: dict[str, Tensor] = {}
    namings = set()
    for key, p in parsed.items():
        resolved = names.resolve(p[0]) if p else None
        if resolved is None and p and p[1] == "diff" and names.param(p[0]):  # a norm weight's difference
            diffs[names.param(p[0])] = tensors[key]
            namings.add("kohya")
            continue
        if resolved is None:
            what = "names no parameter with a place for a full difference" if p and p[1].startswith("diff") \
                else "names no Flux Linear layer (nor an SD3 / SD3.5 one)"
            raise WeightsError(f"{src}: key {key} {what}; a LoRA for another model?")
        naming, official, index = resolved
        namings.add(naming)
        groups.setdefault(official, {}).setdefault(index, {})[p[1]] = tensors[key]
    if len(namings) > 1:
        raise WeightsError(f"{src}: mixes kohya and diffusers module names; not a single LoRA layout")
    layout = namings.pop()
    warn_zero_alphas(tensors, layout, src)
    modules = {}
    width = max(widths, default=None)  # the model's width, for SD3's last context adaLN (see LoRANames.swapped)
    for official, by_slice in sorted(groups.items()):
        lora = {i: g for i, g in by_slice.items() if "down" in g or "up" in g}
        for index, g in lora.items():
            if "down" not in g or "up" not in g:
                raise WeightsError(f"{src}: {official} has {sorted(g)} but needs both down (A) and up (B)")
        if lora and layout == "kohya":
            g = lora[None]
            modules[official] = _kohya_module(names, official, g["down"], g["up"], g.get("alpha"),
                                              kohya_split_alpha)
        elif lora:
            modules[official] = _diffusers_module(names, official, lora, config)
        for role, param in (("diff", "weight"), ("diff_b", "bias")):
            pieces = {i: g[role] for i, g in by_slice.items() if role in g}
            if pieces:
                diffs[f"{official}.{param}"] = whole_diff(names, official, pieces, width, src)
    return LoRA(modules, family, layout, recommended, text, src, diffs, flavour(stems, layout, path, config))
