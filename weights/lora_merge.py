"""Merge Flux or SD3 / SD3.5 LoRAs into a loaded model and unload them bit-exactly.

`apply_loras` merges LoRAs, each with its own scale, into the weights (no per-call cost); `unload_loras`
restores the weights bit-exactly. No second copy of the model is kept: with `base=` (the path the model was
loaded from) the touched weights are re-read from that memory-mapped file on unload, after checking at apply
time that they equal the model's (a model changed since loading is refused, not silently reset to the file).
Without `base=`, CPU copies of the touched weights only are kept; an SCFM LoRA touches nearly every Linear,
so pass `base=` for large models.

`merge_while_reading` is the one-shot alternative the loaders' `loras=` use: each weight gets its LoRAs as it is
read, before an fp8 loader quantizes it, so an fp8 model with LoRAs never exists in full precision.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from model.fp8 import E4M3

from .families import family_of, find_layout, names, title_of
from .io import WeightsError, parse_lora, read_header
from .keymaps import to_official
from .lora import LoRA, Recommended, read_lora
from .lora_foreign import peft_file
from .reader import TensorReader, model_files, read_shapes


@dataclass
class _Applied:
    names: list[str]  # "source @ scale" of every applied LoRA, in order
    touched: list[str]  # parameters (official keys) that differ from the originals
    base: str | None  # the checkpoint the originals are re-read from, or None: `originals` holds them
    stats: dict[str, tuple[int, int]]  # base file -> (size, mtime_ns) when applied
    originals: dict[str, Tensor] = field(default_factory=dict)
    restorable: bool = True  # False once a LoRA was applied with restorable=False


def _fit_error(model, lora: LoRA, src: str) -> str | None:
    family = family_of(model)
    if lora.family != family.name:
        made_for = title_of(lora.family)
        return (f"{src}: a LoRA for {made_for}; this model is {family.title}: pass a LoRA trained on {family.title}, "
                f"or use this one with the {made_for} model it was made for")
    for m, mod in lora.modules.items():
        try:
            weight = model.get_submodule(m).weight
        except AttributeError:
            if m.startswith("guidance_in"):
                hint = "a FLUX.1-dev LoRA on a model without a guidance embedding (schnell?)"
            elif ".attn2." in m:
                hint = "an SD3.5-medium LoRA (dual attention blocks) on another SD3 model"
            else:
                hint = f"the LoRA is for a different {family.title} variant"
            return f"{src}: LoRA module {m} is not in this model; {hint}"
        if mod.weight_shape != tuple(weight.shape) or any(
                p is not None and (p.up.shape[0], *p.down.shape[1:]) != (n, *weight.shape[1:])
                for p, n in zip(mod.parts, mod.rows)):
            return (f"{src}: LoRA for {m} has shape {list(mod.weight_shape)}, the model's weight "
                    f"{list(weight.shape)}; the LoRA is for a different model size")
    for key, diff in lora.diffs.items():
        try:
            param = _tensor(model, key)
        except AttributeError:
            return f"{src}: a full difference for {key}, which this model does not have; another model's LoRA?"
        if tuple(diff.shape) != tuple(param.shape):
            return (f"{src}: the difference for {key} has shape {list(diff.shape)}, the model's "
                    f"{list(param.shape)}; the LoRA is for a different model size")
    return None


def _tensor(model, key: str) -> Tensor:
    """The model's tensor under an official key (a Parameter, or an fp8 module's stored weight)."""
    module, name = key.rsplit(".", 1)
    return getattr(model.get_submodule(module), name)


def touched_keys(lora: LoRA) -> list[str]:
    """The official parameters `lora` changes: its layers' weights and its full differences' parameters."""
    return list(dict.fromkeys([f"{m}.weight" for m in lora.modules] + list(lora.diffs)))


def param_delta(lora: LoRA, key: str, device=None) -> Tensor | float:
    """`lora`'s fp32 delta of the official parameter `key` (0 when it has none): a layer's LoRA delta on its
    weight plus any full difference."""
    module = key.removesuffix(".weight")
    delta = lora.modules[module].delta(device) if key.endswith(".weight") and module in lora.modules else 0.0
    if key in lora.diffs:
        delta = delta + lora.diffs[key].to(device, torch.float32)
    return delta


def _base_weights(source: str, model, keys: list[str]):
    """Yield (key, tensor) of official parameters re-read from the checkpoint `model` was loaded from, in its
    stored dtype."""
    files, _ = model_files(source, "transformer")
    raw, _ = read_shapes(files)
    family = family_of(model)
    prefix, layout = find_layout(family, raw.keys(), source)
    rules = {r.official: r for r in family.rules(model.config)}
    with TensorReader(files, prefix=prefix) as read:
        for key in keys:
            try:
                # a diffusers file's fused (or swapped) weights are rebuilt exactly as the loaders do
                yield key, read(key) if layout == "official" else next(to_official([rules[key]], read))[1]
            except KeyError:
                raise WeightsError(f"{source}: no tensor for {key}; base= must be the model's file") from None


def _same_bits(a: Tensor, b: Tensor) -> bool:
    # bit patterns, not values: torch.equal calls -0.0 == 0.0 and NaN != NaN
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(as_int), b.view(as_int))


def _file_stats(source: str) -> dict[str, tuple[int, int]]:
    files, _ = model_files(source, "transformer")
    return {str(f): (f.stat().st_size, f.stat().st_mtime_ns) for f in files}


def _resolve(model, loras: Sequence, ignore_text_encoders: bool) -> list[tuple[LoRA, float]]:
    """(LoRA, scale) pairs from LoRAs or paths, alone (scale 1) or as (lora, scale), each checked to fit `model`
    (a meta model will do: only names and shapes are read)."""
    items = [x if isinstance(x, tuple) else (x, 1.0) for x in loras]
    try:
        family = family_of(model).name
    except TypeError:
        raise TypeError(f"LoRAs merge into a transformer of a family scfm knows ({', '.join(names())}), "
                        f"not a {type(model).__name__}") from None
    items = [(x if isinstance(x, LoRA) else read_lora(x, family=family), float(s)) for x, s in items]
    for lora, _ in items:
        src = lora.source or "LoRA"
        if (error := _fit_error(model, lora, src)) is not None:
            raise WeightsError(error)
        if lora.text_encoders and not ignore_text_encoders:
            # the pipelines and the CLIs split such files first (weights/lora_text.py); this is the Python API
            raise WeightsError(f"{src}: has {len(lora.text_encoders)} text-encoder LoRA keys, which a "
                               "transformer cannot use; load it through a pipeline (its loras= also go to the "
                               "text encoders) or pass ignore_text_encoders=True to apply the transformer part")
    return items


def lora_spec(spec: str) -> tuple[str, float]:
    """A command line's `PATH[:SCALE]` LoRA as (path, scale): the scale given, else the one the file recommends
    (`scfm_lora_scale`, `Recommended.lora_scale`), else 1. generate, make_dataset and train all resolve here, so
    the scale a run records for a base LoRA is the one generate compares with."""
    path, scale = parse_lora(spec)
    if Path(path).is_dir():  # a PEFT save_pretrained folder: its adapter file (adapter_config.json beside it)
        path = str(peft_file(Path(path)))
    if scale is None:
        recommended = None
        if Path(path).is_file():  # else the LoRA reader names the problem
            recommended = Recommended.from_metadata(read_header(Path(path))[1]).lora_scale
        scale = 1.0 if recommended is None else recommended
    return path, scale


def _names(items: list[tuple[LoRA, float]]) -> list[str]:
    return [f"{lora.source or 'LoRA'} @ {s}" for lora, s in items]


def merged_param(t: Tensor, key: str, items: list[tuple[LoRA, float]]) -> Tensor:
    """The parameter `key` plus every LoRA's delta on it, summed in fp32 and rounded once to its dtype."""
    delta = sum(s * param_delta(lora, key, t.device) for lora, s in items)
    return (t.float() + delta).to(t.dtype)


def apply_loras(model, loras: Sequence, *, base: str | os.PathLike | None = None,
                ignore_text_encoders: bool = False, restorable: bool = True) -> None:
    """Merge LoRAs into a loaded Flux or SD3 / SD3.5: `loras` holds LoRA objects or paths, each alone (scale
    1) or as (lora, scale); a path is read for this model's family. Several LoRAs on one layer are summed in
    fp32 and rounded once. Call again to add more; `unload_loras` undoes them all. See the module docstring
    for `base=`. `restorable=False` (one-shot generation) keeps nothing and checks nothing, and
    `unload_loras` then refuses."""
    items = _resolve(model, loras, ignore_text_encoders)
    base = None if base is None else str(base)
    state = getattr(model, "_scfm_loras", None)
    if state is not None and state.base != base:
        raise WeightsError("LoRAs are already applied with a different base=; unload_loras first")
    state = state or _Applied([], [], base, _file_stats(base) if base else {})
    keys = dict.fromkeys(k for lora, _ in items for k in touched_keys(lora))  # ordered, unique
    weights = {k: _tensor(model, k) for k in keys}
    if any(w.dtype == E4M3 for w in weights.values()):
        raise WeightsError("the model's weights are stored in fp8; merge LoRAs before quantizing (the loaders' "
                           "and pipelines' loras= do), or load the model again")
    new = [k for k in keys if k not in state.touched]
    state.restorable = state.restorable and restorable
    with torch.no_grad():
        if not state.restorable:
            pass  # nothing to keep: the caller will never unload
        elif base is None:
            state.originals |= {k: weights[k].detach().to("cpu", copy=True) for k in new}
        else:
            for k, t in _base_weights(base, model, new):  # one tensor at a time: nothing is kept
                if not _same_bits(t.to(weights[k].device, weights[k].dtype), weights[k]):
                    raise WeightsError(f"{base}: {k} differs from the model's, so unloading could not restore "
                                       "it; pass the file the model was loaded from, or base=None")
        state.touched += new
        for k, w in weights.items():
            w.copy_(merged_param(w, k, items))
    state.names += _names(items)
    model._scfm_loras = state


def merge_while_reading(model, loras: Sequence, *, ignore_text_encoders: bool = False
                        ) -> Callable[[str, Tensor], Tensor]:
    """For a loader: check `loras` (as `apply_loras` takes them) against the meta `model` before anything is read,
    and return what merges them into each weight as it arrives: (official key, tensor in the load dtype) -> the
    tensor, bit for bit what `apply_loras(..., restorable=False)` gives after loading. The model records them
    (`applied_loras`) as not restorable."""
    items = _resolve(model, loras, ignore_text_encoders)
    keys = dict.fromkeys(k for lora, _ in items for k in touched_keys(lora))
    model._scfm_loras = _Applied(_names(items), list(keys), None, {}, restorable=False)

    def merge(key: str, t: Tensor) -> Tensor:
        return merged_param(t, key, items) if key in keys else t

    return merge


def requantize_loras(model, loras: Sequence, *, source: str | os.PathLike, dtype: torch.dtype) -> list[str]:
    """An fp8 model's weights made those its loader gives with `loras` (bit for bit what loading `source` with
    fp8=True, loras=`loras` in `dtype` gives): every weight the LoRAs merged so far (at load, or by the last call)
    or these touch is re-read from `source`, cast to `dtype`, its LoRAs merged in fp32 and rounded once
    (merged_param), and an e4m3 one quantized again. e4m3 weights cannot be unmerged, so a change of LoRAs goes
    back to the file (Pipeline.set_loras with fp8; without it, apply_loras / unload_loras). Returns the keys
    rewritten."""
    from model.fp8 import quantize_rows

    items = _resolve(model, loras, ignore_text_encoders=True)
    new = dict.fromkeys(k for lora, _ in items for k in touched_keys(lora))
    state = getattr(model, "_scfm_loras", None)
    keys = list(dict.fromkeys([*(state.touched if state else []), *new]))
    with torch.no_grad():
        for key, t in _base_weights(str(source), model, keys):
            w = _tensor(model, key)
            t = t.to(dtype).to(w.device)
            t = merged_param(t, key, items) if key in new else t
            if w.dtype == E4M3:
                q, scale = quantize_rows(t)
                w.copy_(q)
                _tensor(model, key.removesuffix("weight") + "weight_scale").copy_(scale)
            else:
                w.copy_(t)
    model._scfm_loras = _Applied(_names(items), list(new), None, {}, restorable=False)  # as merge_while_reading
    return keys


def applied_loras(model) -> list[str]:
    state = getattr(model, "_scfm_loras", None)
    return [] if state is None else list(state.names)


def unload_loras(model) -> None:
    """Restore every weight `apply_loras` changed, bit-exactly."""
    state = getattr(model, "_scfm_loras", None)
    if state is None:
        return
    if not state.restorable:
        raise WeightsError("these LoRAs were applied with restorable=False; reload the model to remove them")
    if any(_tensor(model, k).dtype == E4M3 for k in state.touched):
        raise WeightsError("the model was quantized to fp8 after its LoRAs were merged; reload it to remove them")
    with torch.no_grad():
        if state.base is not None:
            if _file_stats(state.base) != state.stats:
                raise WeightsError(f"{state.base} changed since the LoRAs were applied; reload the model")
            for k, t in _base_weights(state.base, model, state.touched):
                w = _tensor(model, k)
                w.copy_(t.to(w.dtype))
        else:
            for k, t in state.originals.items():
                _tensor(model, k).copy_(t)
    del model._scfm_loras
