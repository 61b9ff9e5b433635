"""Load the T5 v1.1, CLIP and Qwen3 (FLUX.2 [klein]) text encoders from the layouts users have.

Accepted sources:
- a transformers folder (config.json + model.safetensors, or shards with an index), or a diffusers pipeline
  folder with `subfolder=` ("text_encoder", "text_encoder_2", "text_encoder_3");
- a single safetensors file with transformers names, with or without a prefix (ComfyUI `t5xxl_fp16` / `clip_l`
  / `clip_g`, SD3 all-in-one files with `text_encoders.clip_l.transformer.` and the like);
- for CLIP, also transformers 5 `CLIPTextModel` saves (no `text_model.` prefix) and the OpenCLIP-native layout
  (`transformer.resblocks.*` with fused `in_proj` and a transposed `text_projection`).

Without a config.json the config is inferred from tensor shapes. Loading builds the model on the meta device,
checks every key and shape from the headers, then streams tensors in one at a time, cast straight from the
file dtype to the requested one: a bf16 T5-XXL from an fp16 file never has an fp32 copy (an fp16 T5 keeps its
feed-forward `wo` weights in fp32, as transformers does; see load_t5). `loras=` (the text-encoder parts of LoRA
files, weights/lora_text.py) are checked on the meta model and merged into each weight as it is read.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from model.clip import CLIP_CONFIGS, CLIPConfig, CLIPTextEncoder
from model.qwen3 import Qwen3Config, Qwen3TextEncoder
from model.t5 import T5Config, T5Encoder

from .assign import assign_tensors, check_keys_and_shapes
from .io import WeightsError, exists
from .lora_text import EncoderLoRA, text_lora_merger
from .reader import iter_tensors, read_config_json, read_shapes, weight_files

# ours-key -> (file key, transform of the file tensor); the transform also applies to shapes via a meta
# tensor.
Plan = dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor] | None]]

_T5_ANCHOR = "encoder.final_layer_norm.weight"
_CLIP_ANCHOR = "embeddings.token_embedding.weight"
_OPENCLIP_ANCHOR = "ln_final.weight"
# Keys that carry no weights we need: stale position_ids buffers of old transformers saves, OpenCLIP's
# logit_scale / attn_mask, and the vision tower of full CLIP checkpoints.
_CLIP_IGNORED = re.compile(r"(^|\.)(position_ids|logit_scale|attn_mask)$"
                           r"|^(vision_model|visual_projection|visual)\.")


def _resolve(source: str | os.PathLike, subfolder: str | None) -> tuple[list[Path], dict | None, str]:
    path = Path(source).expanduser()
    if not exists(path):
        raise WeightsError(f"{path}: no such file or folder; pass a .safetensors file or a model folder")
    if path.is_file():
        return [path], None, str(path)
    if subfolder:
        if not (path / subfolder).is_dir():
            raise WeightsError(f"{path}: no {subfolder}/ subfolder")
        path = path / subfolder
    elif exists(path / "model_index.json"):
        raise WeightsError(f"{path}: a pipeline folder; pass its text encoder's own folder, e.g. --clip "
                           f"{path / 'text_encoder'}, --t5 {path / 'text_encoder_2'} (SD3.5: text_encoder_3) or "
                           f"--qwen {path / 'text_encoder'}")
    return weight_files(path), read_config_json(path), str(path)


def _find_prefix(keys, anchor: str, source: str, what: str, prefix: str | None) -> str | None:
    """The text in front of `anchor` (e.g. `text_encoders.t5xxl.transformer.`); None without the anchor."""
    if prefix is not None:
        return prefix if prefix + anchor in keys else None
    # Only whole-name matches: "encoder.final_layer_norm.weight" must not match "text_encoder.final_...".
    found = sorted({k[: -len(anchor)] for k in keys if k == anchor or k.endswith("." + anchor)})
    if len(found) > 1:
        names = ", ".join(repr(p) for p in found)
        raise WeightsError(f"{source}: holds several {what} ({names}); pass prefix=")
    return found[0] if found else None


def _count(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _fields(cls, d: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _shapes_after(plan: Plan, shapes: dict) -> dict[str, tuple[int, ...]]:
    out = {}
    for ours, (key, fn) in plan.items():
        shape = tuple(shapes[key][0])
        out[ours] = tuple(fn(torch.empty(shape, device="meta")).shape) if fn else shape
    return out


def _stream(files: list[Path], plan: Plan) -> Iterator[tuple[str, torch.Tensor]]:
    by_file_key: dict[str, list[tuple[str, Callable | None]]] = {}
    for ours, (key, fn) in plan.items():
        by_file_key.setdefault(key, []).append((ours, fn))
    # No dtype here: assign_tensors casts each tensor once, from the file dtype straight to the target dtype.
    for key, t in iter_tensors(files, keys=set(by_file_key)):
        for ours, fn in by_file_key[key]:
            yield ours, (fn(t).contiguous() if fn else t)


def _infer(fn, shapes, source: str, what: str):
    try:
        return fn(shapes)
    except KeyError as e:
        raise WeightsError(f"{source}: cannot infer the {what} config ({e.args[0]} is missing); the file is "
                           "incomplete") from None


def _load(model_cls, config, files, plan, shapes, *, source, layout, dtype, device, loras=(), fp32_modules=()):
    """`fp32_modules`: names of Linears whose weights load in fp32 whatever `dtype` is (T5's `wo` in fp16)."""
    with torch.device("meta"):
        model = model_cls(config)
    check_keys_and_shapes(model, _shapes_after(plan, shapes), source=source, layout=layout)
    fp32_keys = {name + ".weight" for name in fp32_modules}
    tensors = _stream(files, plan)
    merge = text_lora_merger(model, loras)  # the LoRAs' names and shapes are checked here, before any read
    if merge is not None:
        # cast as assign_tensors would, then merge: the LoRA adds to the weight as loaded, rounded once
        tensors = ((k, merge(k, t.to(device, torch.float32 if k in fp32_keys else dtype))
                    if t.is_floating_point() else t) for k, t in tensors)
    return assign_tensors(model, tensors, dtype=dtype, device=device, source=source, fp32_keys=fp32_keys).eval()


# ---------------------------------------------------------------------------------------------------- T5


def t5_config_from_shapes(shapes: dict[str, tuple[list[int], str]]) -> T5Config:
    """Infer a T5Config from transformers-named keys (prefix already removed). The max distance (128) and the
    epsilon (1e-6) leave no trace in the shapes and are T5 v1.1's values."""
    emb = "shared.weight" if "shared.weight" in shapes else "encoder.embed_tokens.weight"
    vocab, d_model = shapes[emb][0]
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"][0]
    inner = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0][0]
    d_ff = shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0][0]
    layers = _count(shapes, r"encoder\.block\.(\d+)\.")
    return T5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_layers=layers,
                    num_heads=heads, relative_attention_num_buckets=buckets)


def t5_config_from_transformers(d: dict) -> T5Config:
    gated = d.get("feed_forward_proj", "relu")
    if gated != "gated-gelu":
        raise WeightsError(f"config.json has feed_forward_proj={gated!r}; only T5 v1.1 ('gated-gelu') is "
                           "supported")
    return T5Config(**_fields(T5Config, d))


def load_t5(source: str | os.PathLike, *, config: T5Config | None = None, dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu", subfolder: str | None = None,
            prefix: str | None = None, loras: Sequence[EncoderLoRA] = ()) -> T5Encoder:
    """A T5 v1.1 encoder from a transformers folder or a single safetensors file (see the module docstring).

    `config`: overrides config.json / shape inference. `subfolder`: for diffusers pipeline folders.
    `prefix`: the text in front of the transformers key names (e.g. `text_encoders.t5xxl.transformer.`), found
    automatically unless a file holds several encoders.
    `loras`: LoRAs' parts for this encoder (weights/lora_text.py), merged into the weights as they are read.
    """
    files, cfg_json, source = _resolve(source, subfolder)
    shapes, _ = read_shapes(files)
    found = _find_prefix(shapes, _T5_ANCHOR, source, "T5 encoders", prefix)
    if found is None:
        clip_like = any("text_model." in k or "resblocks." in k for k in shapes)
        hint = " (this looks like a CLIP text encoder: pass it with --clip)" if clip_like else ""
        raise WeightsError(f"{source}: not a T5 encoder (no {_T5_ANCHOR}){hint}")
    # An encoder-decoder checkpoint (T5ForConditionalGeneration: google's t5-v1_1-xxl) also holds the decoder and
    # the LM head; only the encoder is used, so those keys are left unread rather than reported as unexpected.
    bare = {k[len(found):]: v for k, v in shapes.items()
            if k.startswith(found) and not k[len(found):].startswith(("decoder.", "lm_head."))}
    if any(".DenseReluDense.wi." in k for k in bare):
        raise WeightsError(f"{source}: an original T5 (ReLU feed-forward); only T5 v1.1 (gated-GELU) is "
                           "supported")
    if "shared.weight" not in bare and "encoder.embed_tokens.weight" not in bare:
        raise WeightsError(f"{source}: no token embedding (shared.weight or encoder.embed_tokens.weight)")
    # The encoder's embedding is tied to `shared`; files carry either name or both (then they are equal).
    embeddings = ("shared.weight", "encoder.embed_tokens.weight")
    plan: Plan = {k: (found + k, None) for k in bare if k not in embeddings}
    plan["shared.weight"] = (found + next(k for k in embeddings if k in bare), None)
    if config is None:
        config = (t5_config_from_transformers(cfg_json) if cfg_json
                  else _infer(t5_config_from_shapes, bare, source, "T5"))
    # In fp16, every `wo` stays fp32, as transformers' from_pretrained(dtype=float16) keeps it
    # (`_keep_in_fp32_modules`, fp16 only, not bf16) and so as diffusers' Flux / SD3 pipelines run T5: fp16 T5-XXL
    # overflows in the feed-forward output, and model/t5.py then runs its residual stream in fp32. Costs 2 bytes
    # a parameter more on a fifth of the weights (2.0 GB for T5-XXL).
    fp32_modules = ([f"encoder.block.{i}.layer.1.DenseReluDense.wo" for i in range(config.num_layers)]
                    if dtype == torch.float16 else [])
    return _load(T5Encoder, config, files, plan, shapes, source=source, layout="transformers T5", dtype=dtype,
                 device=device, loras=loras, fp32_modules=fp32_modules)


# -------------------------------------------------------------------------------------------------- CLIP


def clip_config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> CLIPConfig:
    """Infer a CLIPConfig from our (transformers) names. Head count and activation leave no trace in the
    shapes: heads = width / 64 (true for every released CLIP text tower), and the activation follows the
    width: 768 is OpenAI CLIP-L (quick_gelu), other widths are taken to be OpenCLIP towers (bigG: gelu)."""
    vocab, width = shapes["text_model.embeddings.token_embedding.weight"]
    proj = shapes.get("text_projection.weight")
    known = {c.hidden_size: c for c in CLIP_CONFIGS.values()}
    act = known[width].hidden_act if width in known else ("quick_gelu" if width in (512, 768) else "gelu")
    return CLIPConfig(
        vocab_size=vocab, hidden_size=width, num_attention_heads=max(1, width // 64), hidden_act=act,
        intermediate_size=shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=_count(shapes, r"text_model\.encoder\.layers\.(\d+)\."),
        max_position_embeddings=shapes["text_model.embeddings.position_embedding.weight"][0],
        projection_dim=proj[0] if proj else None,
    )


def clip_config_from_transformers(d: dict) -> CLIPConfig:
    d = d.get("text_config", d)  # a full CLIPModel config nests the text tower
    act = d.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise WeightsError(f"config.json has hidden_act={act!r}; only quick_gelu and gelu are supported")
    return CLIPConfig(**_fields(CLIPConfig, d))


def _openclip_plan(bare: dict, base: str) -> Plan:
    """OpenCLIP names -> ours: split the fused q/k/v rows, transpose text_projection ([width, proj] there)."""
    plan: Plan = {}
    width = bare["token_embedding.weight"][0][1]
    simple = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
              "positional_embedding": "text_model.embeddings.position_embedding.weight",
              "ln_final.weight": "text_model.final_layer_norm.weight",
              "ln_final.bias": "text_model.final_layer_norm.bias"}
    renames = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
               "attn.out_proj": "self_attn.out_proj"}
    for k in bare:
        if _CLIP_IGNORED.search(k):
            continue
        if k in simple:
            plan[simple[k]] = (base + k, None)
        elif k == "text_projection":
            plan["text_projection.weight"] = (base + k, lambda t: t.t())
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", k):
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                # rows [j*width, (j+1)*width) of the fused (3*width, ...) tensor are q, k, v in that order
                plan[f"text_model.encoder.layers.{m[1]}.self_attn.{name}.{m[2]}"] = (
                    base + k, lambda t, j=j: t[j * width:(j + 1) * width])
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", k):
            plan[f"text_model.encoder.layers.{m[1]}.{renames.get(m[2], m[2])}.{m[3]}"] = (base + k, None)
        else:
            plan[k] = (base + k, None)  # unknown: reported as an unexpected key by the shape check
    return plan


def _clip_prefixes(shapes: dict) -> dict[str, bool]:
    """Outer prefix -> whether its keys have the `text_model.` level (transformers 5 CLIPTextModel saves
    drop it)."""
    found = {}
    for k in shapes:
        if k == _CLIP_ANCHOR or k.endswith("." + _CLIP_ANCHOR):
            base = k[: -len(_CLIP_ANCHOR)]
            nested = base.endswith("text_model.")
            found[base[: -len("text_model.")] if nested else base] = nested
    return found


def _clip_plan(shapes: dict, source: str, prefix: str | None) -> tuple[Plan, str]:
    found = _clip_prefixes(shapes)
    if prefix is not None:
        found = {p: n for p, n in found.items() if p == prefix}
    if len(found) > 1:
        names = ", ".join(map(repr, sorted(found)))
        raise WeightsError(f"{source}: holds several CLIP text encoders ({names}); pass prefix=")
    if found:
        [(outer, nested)] = found.items()
        plan: Plan = {}
        for k in shapes:
            rest = k[len(outer):]
            if not k.startswith(outer) or _CLIP_IGNORED.search(rest):
                continue
            if not nested and rest != "text_projection.weight":
                rest = "text_model." + rest
            plan[rest] = (k, None)  # anything unknown stays under its own name and fails the shape check
        return plan, "transformers CLIP"
    base = _find_prefix(shapes, _OPENCLIP_ANCHOR, source, "OpenCLIP text towers", prefix)
    if base is not None and base + "token_embedding.weight" in shapes:
        bare = {k[len(base):]: v for k, v in shapes.items() if k.startswith(base)}
        return _openclip_plan(bare, base), "OpenCLIP"
    t5_like = any(k.endswith(_T5_ANCHOR) for k in shapes)
    hint = " (this looks like a T5 encoder: pass it with --t5)" if t5_like else ""
    raise WeightsError(f"{source}: not a CLIP text encoder in the transformers or OpenCLIP layout{hint}")


def load_clip(source: str | os.PathLike, *, config: CLIPConfig | None = None,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
              subfolder: str | None = None, prefix: str | None = None,
              loras: Sequence[EncoderLoRA] = ()) -> CLIPTextEncoder:
    """A CLIP text encoder (CLIP-L, bigG, ...) from a folder or a single safetensors file (see the module
    docstring).

    `config`, `subfolder`, `prefix`, `loras` as for `load_t5` (the CLIP prefix is what precedes `text_model.`, e.g.
    `text_encoders.clip_g.transformer.`, or the OpenCLIP names, e.g. `conditioner.embedders.1.model.`).
    Whether `text_projection` exists is decided by the file (Flux's CLIP-L folder has none, SD3's has one):
    the projection_dim of `config` is overridden accordingly, so one preset serves both.
    """
    files, cfg_json, source = _resolve(source, subfolder)
    shapes, _ = read_shapes(files)
    plan, layout = _clip_plan(shapes, source, prefix)
    ours = _shapes_after(plan, shapes)
    proj = ours.get("text_projection.weight")
    if config is None:
        config = (clip_config_from_transformers(cfg_json) if cfg_json
                  else _infer(clip_config_from_shapes, ours, source, "CLIP"))
    config = dataclasses.replace(config, projection_dim=proj[0] if proj else None)
    return _load(CLIPTextEncoder, config, files, plan, shapes, source=source, layout=layout, dtype=dtype,
                 device=device, loras=loras)


# ------------------------------------------------------------------------------------------------- Qwen3

_QWEN3_ANCHOR = "layers.0.self_attn.q_norm.weight"


def qwen3_config_from_shapes(shapes: dict[str, tuple[list[int], str]], taps: tuple[int, ...]) -> Qwen3Config:
    """Widths, depth and heads from transformers-named keys (after `model.`); RoPE theta 1e6 and eps 1e-6 leave
    no trace in the shapes and are Qwen3's."""
    vocab, hidden = shapes["embed_tokens.weight"][0]
    head_dim = shapes[_QWEN3_ANCHOR][0][0]
    return Qwen3Config(vocab_size=vocab, hidden_size=hidden,
                       intermediate_size=shapes["layers.0.mlp.gate_proj.weight"][0][0],
                       num_hidden_layers=_count(shapes, r"layers\.(\d+)\."),
                       num_attention_heads=shapes["layers.0.self_attn.q_proj.weight"][0][0] // head_dim,
                       num_key_value_heads=shapes["layers.0.self_attn.k_proj.weight"][0][0] // head_dim,
                       head_dim=head_dim, taps=taps)


def qwen3_config_from_transformers(d: dict, taps: tuple[int, ...]) -> Qwen3Config:
    theta = (d.get("rope_parameters") or {}).get("rope_theta", d.get("rope_theta", 1e6))
    return Qwen3Config(**{**_fields(Qwen3Config, d), "rope_theta": float(theta), "taps": taps})


def load_qwen3(source: str | os.PathLike, *, config: Qwen3Config | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", subfolder: str | None = None,
               taps: tuple[int, ...] = (9, 18, 27)) -> Qwen3TextEncoder:
    """FLUX.2 [klein]'s Qwen3 text encoder from a transformers folder (sharded or not; `subfolder="text_encoder"`
    in a pipeline folder) or a single file such as ComfyUI's `qwen_3_4b.safetensors`. Only the embeddings and
    the layers up to the last of `taps` are read (model/qwen3.py)."""
    files, cfg_json, source = _resolve(source, subfolder)
    shapes, _ = read_shapes(files)
    found = _find_prefix(shapes, _QWEN3_ANCHOR, source, "Qwen3 models", None)
    if found is None:
        raise WeightsError(f"{source}: not a Qwen3 text encoder (no {_QWEN3_ANCHOR}); pass the text_encoder/ "
                           "folder or qwen_3_4b.safetensors")
    bare = {k[len(found):]: v for k, v in shapes.items() if k.startswith(found)}
    if config is None:
        config = (qwen3_config_from_transformers(cfg_json, taps) if cfg_json
                  else _infer(lambda s: qwen3_config_from_shapes(s, taps), bare, source, "Qwen3"))
    used = max(config.taps)
    plan: Plan = {"model." + k: (found + k, None) for k in bare
                  if k == "embed_tokens.weight" or (k.startswith("layers.") and int(k.split(".")[1]) < used)}
    return _load(Qwen3TextEncoder, config, files, plan, shapes, source=source, layout="transformers Qwen3",
                 dtype=dtype, device=device)
