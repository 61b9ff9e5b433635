"""Load the CLIP vision tower (model/clip_vision.py) from the user's own CLIP files, for CLIP score and image features.

Accepted sources, safetensors only:
- a transformers folder (config.json + model.safetensors, or shards with an index) of a full `CLIPModel`
  (openai/clip-vit-large-patch14 and the like: the text keys are skipped) or a `CLIPVisionModelWithProjection`
  (also as `subfolder="image_encoder"` of a diffusers pipeline folder);
- a single safetensors file in those layouts, with or without a prefix in front of `vision_model.`;
- OpenCLIP's plain ViT (`visual.conv1.weight`, `visual.transformer.resblocks.*` with fused `in_proj`, `visual.proj`
  stored transposed); other OpenCLIP towers (attention pooling, timm trunks) are refused in one line.

The config comes from config.json (a full CLIPModel's `vision_config`) over what the shapes tell; without one it is
inferred from the shapes. projection_dim is always the file's `visual_projection` width: a CLIPModel's nested
configs do not reliably state it (transformers writes the text tower's default 512 there).

The text half of a full CLIPModel file is `weights.text.load_clip(source)`: it keeps `text_projection`, so its
`text_embeds` are the embeddings `clip_score` compares with (transformers' `get_text_features`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path

import torch

from model.clip_vision import CLIPVisionConfig, CLIPVisionTower

from .io import WeightsError
from .reader import read_shapes
from .text import Plan, _count, _fields, _find_prefix, _infer, _load, _resolve, _shapes_after

_ANCHOR = "vision_model.embeddings.class_embedding"
_OPENCLIP_ANCHOR = "visual.class_embedding"
_PROJECTION = "visual_projection.weight"
# A full CLIPModel's text half and logit scale, and stale position_ids buffers of old transformers saves.
_IGNORED = re.compile(r"(^|\.)(position_ids|logit_scale)$|^text_model\.|^text_projection(\.weight)?$")


def vision_config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> CLIPVisionConfig:
    """A CLIPVisionConfig from our (transformers) names. Head count and activation leave no trace in the shapes:
    heads are 64 wide up to ViT-L (B: 12, L: 16) and 16 above (OpenCLIP H, g, bigG); widths 768 and 1024 are
    taken to be OpenAI's towers (quick_gelu), others OpenCLIP's (gelu). A laion ViT-L without a config.json
    therefore needs config=."""
    width = shapes[_ANCHOR][0]
    patch = shapes["vision_model.embeddings.patch_embedding.weight"][2]
    grid = math.isqrt(shapes["vision_model.embeddings.position_embedding.weight"][0] - 1)
    return CLIPVisionConfig(
        hidden_size=width, intermediate_size=shapes["vision_model.encoder.layers.0.mlp.fc1.weight"][0],
        projection_dim=shapes[_PROJECTION][0],
        num_hidden_layers=_count(shapes, r"vision_model\.encoder\.layers\.(\d+)\."),
        num_attention_heads=max(1, width // 64) if width <= 1024 else 16,
        image_size=grid * patch, patch_size=patch, hidden_act="quick_gelu" if width in (768, 1024) else "gelu")


def _config_from_transformers(d: dict, inferred: CLIPVisionConfig, source: str) -> CLIPVisionConfig:
    d = d.get("vision_config", d)  # a full CLIPModel config nests the vision tower
    try:
        # the shapes fill what an old config.json leaves out; projection_dim is the file's (module docstring)
        return CLIPVisionConfig(**{**dataclasses.asdict(inferred), **_fields(CLIPVisionConfig, d),
                                   "projection_dim": inferred.projection_dim})
    except ValueError as e:
        raise WeightsError(f"{source}: config.json: {e}; fix or delete the config.json") from None


def _openclip_plan(shapes: dict, base: str, source: str) -> Plan:
    """OpenCLIP `visual.*` names -> ours: split the fused q/k/v rows, transpose `proj` ([width, proj] there)."""
    width = shapes[base + "class_embedding"][0][0]
    simple = {"class_embedding": "embeddings.class_embedding", "conv1.weight": "embeddings.patch_embedding.weight",
              "positional_embedding": "embeddings.position_embedding.weight"}
    simple |= {f"{a}.{p}": f"{b}.{p}" for a, b in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm"))
               for p in ("weight", "bias")}
    renames = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
               "attn.out_proj": "self_attn.out_proj"}
    plan: Plan = {}
    for key in shapes:
        if not key.startswith(base):
            continue  # the text tower, logit_scale, ...
        k = key[len(base):]
        if k in simple:
            plan["vision_model." + simple[k]] = (key, None)
        elif k == "proj":
            plan[_PROJECTION] = (key, lambda t: t.t())
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", k):
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                # rows [j*width, (j+1)*width) of the fused (3*width, ...) tensor are q, k, v in that order
                plan[f"vision_model.encoder.layers.{m[1]}.self_attn.{name}.{m[2]}"] = (
                    key, lambda t, j=j: t[j * width:(j + 1) * width])
        elif (m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", k)) and m[2] in renames:
            plan[f"vision_model.encoder.layers.{m[1]}.{renames[m[2]]}.{m[3]}"] = (key, None)
        else:
            raise WeightsError(f"{source}: an OpenCLIP vision tower with {key}, which only its non-plain ViTs have; "
                               "only transformers' CLIP layout and OpenCLIP's plain ViT are read: convert it to a "
                               "transformers CLIPModel")
    return plan


def _no_projection(source: str) -> WeightsError:
    return WeightsError(f"{source}: a CLIP vision tower without {_PROJECTION} (a CLIPVisionModel); image embeddings "
                        "need the projection: pass the full CLIPModel or a CLIPVisionModelWithProjection")


def _plan(shapes: dict, source: str, prefix: str | None) -> tuple[Plan, str]:
    found = _find_prefix(shapes, _ANCHOR, source, "CLIP vision towers", prefix)
    if found is not None:
        plan = {k[len(found):]: (k, None) for k in shapes
                if k.startswith(found) and not _IGNORED.search(k[len(found):])}
        return plan, "transformers CLIP vision"  # anything unknown keeps its name and fails the key check
    base = _find_prefix(shapes, _OPENCLIP_ANCHOR, source, "OpenCLIP vision towers", prefix)
    if base is not None:
        return _openclip_plan(shapes, base + "visual.", source), "OpenCLIP vision"
    if any(k.endswith("embeddings.class_embedding") for k in shapes):  # transformers 5 saves it without the level
        raise _no_projection(source)
    if any("text_model." in k or "token_embedding" in k for k in shapes):
        raise WeightsError(f"{source}: a text-only CLIP file (no vision_model.* or visual.* keys: the image tower is "
                           "missing); pass the full CLIPModel (e.g. openai/clip-vit-large-patch14's folder or its "
                           "model.safetensors)")
    raise WeightsError(f"{source}: not a CLIP vision tower (no {_ANCHOR} or {_OPENCLIP_ANCHOR}); pass a "
                       "transformers CLIPModel or CLIPVisionModelWithProjection")


def load_clip_vision(source: str | os.PathLike, *, config: CLIPVisionConfig | None = None,
                     dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                     subfolder: str | None = None, prefix: str | None = None) -> CLIPVisionTower:
    """The CLIP vision tower with its projection from a folder or a single safetensors file (see the module
    docstring); nothing is downloaded.

    `config`: overrides config.json / shape inference. `subfolder`: e.g. "image_encoder" in a diffusers pipeline
    folder. `prefix`: the text in front of `vision_model.` (or of OpenCLIP's `visual.`), found automatically
    unless a file holds several towers.
    """
    path = Path(source).expanduser()
    if subfolder is None and path.is_dir() and (path / "model_index.json").exists():
        raise WeightsError(f"{path}: a pipeline folder; pass subfolder= (image_encoder) or the CLIP model folder")
    files, cfg_json, source = _resolve(path, subfolder)
    shapes, _ = read_shapes(files)
    plan, layout = _plan(shapes, source, prefix)
    if _PROJECTION not in plan:
        raise _no_projection(source)
    ours = _shapes_after(plan, shapes)
    if config is None:
        inferred = _infer(vision_config_from_shapes, ours, source, "CLIP vision")
        config = _config_from_transformers(cfg_json, inferred, source) if cfg_json else inferred
    return _load(CLIPVisionTower, config, files, plan, shapes, source=source, layout=layout, dtype=dtype,
                 device=device)
