"""ComfyUI's LoRA loading rule for Flux, FLUX.2 and SD3 / SD3.5, written for these tests from ComfyUI's source (no
ComfyUI import: it is not a dependency). What a LoRA file does in ComfyUI is what this module computes:

- `key_map`: comfy/lora.py `model_lora_keys_unet` (the generic `lora_unet_<path>` and `diffusion_model.<path>`
  stems of every weight; for Flux the diffusers stems under `transformer.`, `lycoris_`, `lora_transformer_`
  and bare, plus `linear1_qkv`; for SD3 `transformer.`, `base_model.model.`, `lora_transformer_`, `lycoris_`),
  with the diffusers -> official tables of comfy/utils.py `flux_to_diffusers` and `mmdit_to_diffusers`
  (q / k / v and proj_mlp as row ranges of the fused weight; `norm_out` and SD3's last context adaLN through
  `swap_scale_shift`). The LoKr aliases (`ff.linear_in`, ...) are in the FLUX.2 table only, where they are
  diffusers' own MLP names; the ControlNet embedder is left out: no LoRA we write or read names it.
- `load_lora`: comfy/lora.py `load_lora` with comfy/weight_adapter/lora.py `LoRAAdapter.load` (alpha from
  `<stem>.alpha`, the up / down spellings in ComfyUI's order) and the `.diff` / `.diff_b` / `.set_weight`
  patches; keys it does not load are what ComfyUI logs as "lora key not loaded".
- `patch`: comfy/lora.py `calculate_weight` with `LoRAAdapter.calculate_weight`: per patch, the row range,
  `(up.flatten(1) @ down.flatten(1)).reshape(range) * strength * alpha / down.shape[0]` (1 without alpha)
  through the patch's function, in fp32; comfy/model_patcher.py `add_patches` skips targets the model lacks.

Commits read: Comfy-Org/ComfyUI comfy/lora.py 17358c8f73b5, comfy/utils.py 09708eae709a,
comfy/weight_adapter/lora.py 6f98b150e065, comfy/lora_convert.py 2bffe2f4ce57 (`convert_lora` passes these
layouts through unchanged). FLUX.2's entries of `flux_to_diffusers` (after that snapshot) from a mirror that tracks
ComfyUI upstream, hiddenswitch/pip-and-uv-installable-ComfyUI comfy/utils.py aac23e5dd997 (2026-02).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def swap_scale_shift(t: Tensor) -> Tensor:
    shift, scale = t.chunk(2, dim=0)
    return torch.cat([scale, shift])


@dataclass(frozen=True)
class Target:
    key: str  # the model weight, "diffusion_model.<official path>.weight"
    rows: tuple[int, int] | None = None  # (start, length) of a fused weight's rows
    function: Callable | None = None


def _double_blocks(cfg, names: dict[str, str]) -> dict[str, Target]:
    """The double blocks' part of flux_to_diffusers: q / k / v of both streams as row ranges of their fused qkv, and
    `names` (diffusers module in the block -> official module in the block)."""
    h, out = cfg.hidden_size, {}
    for i in range(cfg.depth):
        d, o = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for j, x in enumerate("qkv"):
            out[f"{d}.attn.to_{x}"] = Target(f"{o}.img_attn.qkv", (h * j, h))
            out[f"{d}.attn.add_{x}_proj"] = Target(f"{o}.txt_attn.qkv", (h * j, h))
        out |= {f"{d}.{a}": Target(f"{o}.{b}") for a, b in names.items()}
    return out


def _flux_table(cfg) -> dict[str, Target]:
    """diffusers module -> target (comfy/utils.py flux_to_diffusers)."""
    h = cfg.hidden_size
    out = _double_blocks(cfg, {"attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin",
                               "norm1_context.linear": "txt_mod.lin", "attn.to_add_out": "txt_attn.proj",
                               "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                               "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"})
    for i in range(cfg.depth_single_blocks):
        d, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for j, x in enumerate("qkv"):
            out[f"{d}.attn.to_{x}"] = Target(f"{o}.linear1", (h * j, h))
        out[f"{d}.proj_mlp"] = Target(f"{o}.linear1", (h * 3, h * 4))
        out[f"{d}.norm.linear"] = Target(f"{o}.modulation.lin")
        out[f"{d}.proj_out"] = Target(f"{o}.linear2")
    emb = "time_text_embed"
    out |= {"proj_out": Target("final_layer.linear"), "x_embedder": Target("img_in"),
            "context_embedder": Target("txt_in"),
            f"{emb}.timestep_embedder.linear_1": Target("time_in.in_layer"),
            f"{emb}.timestep_embedder.linear_2": Target("time_in.out_layer"),
            f"{emb}.text_embedder.linear_1": Target("vector_in.in_layer"),
            f"{emb}.text_embedder.linear_2": Target("vector_in.out_layer"),
            f"{emb}.guidance_embedder.linear_1": Target("guidance_in.in_layer"),
            f"{emb}.guidance_embedder.linear_2": Target("guidance_in.out_layer"),
            "norm_out.linear": Target("final_layer.adaLN_modulation.1", None, swap_scale_shift)}
    return out


def _flux2_table(cfg) -> dict[str, Target]:
    """diffusers FLUX.2 module -> target: the entries of comfy/utils.py flux_to_diffusers that name FLUX.2's
    diffusers modules (Flux2 subclasses Flux in comfy/model_base.py, so the Flux map is the one used). Its
    LoKr aliases `ff.linear_in` / `ff.linear_out` are FLUX.2's MLP names, and it adds `to_qkv_mlp_proj` / `to_out`
    for the single blocks. It has no entry for `time_guidance_embed.*` (FLUX.1's `time_text_embed.*` only) or the
    three shared `*_modulation.linear` layers: those keys stay "not loaded"."""
    out = _double_blocks(cfg, {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
                               "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
                               "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"})
    for i in range(cfg.depth_single_blocks):
        d, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        out[f"{d}.attn.to_qkv_mlp_proj"] = Target(f"{o}.linear1")
        out[f"{d}.attn.to_out"] = Target(f"{o}.linear2")
    return out | {"proj_out": Target("final_layer.linear"), "x_embedder": Target("img_in"),
                  "context_embedder": Target("txt_in"),
                  "norm_out.linear": Target("final_layer.adaLN_modulation.1", None, swap_scale_shift)}


def _mmdit_table(cfg) -> dict[str, Target]:
    """diffusers module -> target (comfy/utils.py mmdit_to_diffusers). ComfyUI takes the q / k / v width as
    depth * 64, true of every released SD3 / SD3.5 (a test model must keep hidden_size = 64 * depth)."""
    w, out = cfg.depth * 64, {}
    for i in range(cfg.depth):
        d, o = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        for j, x in enumerate("qkv"):
            out[f"{d}.attn.to_{x}"] = Target(f"{o}.x_block.attn.qkv", (w * j, w))
            out[f"{d}.attn.add_{x}_proj"] = Target(f"{o}.context_block.attn.qkv", (w * j, w))
            out[f"{d}.attn2.to_{x}"] = Target(f"{o}.x_block.attn2.qkv", (w * j, w))
        for a, b in {"norm1_context.linear": "context_block.adaLN_modulation.1",
                     "attn.to_add_out": "context_block.attn.proj", "ff_context.net.0.proj": "context_block.mlp.fc1",
                     "ff_context.net.2": "context_block.mlp.fc2", "norm1.linear": "x_block.adaLN_modulation.1",
                     "attn.to_out.0": "x_block.attn.proj", "attn2.to_out.0": "x_block.attn2.proj",
                     "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2"}.items():
            out[f"{d}.{a}"] = Target(f"{o}.{b}")
    emb = "time_text_embed"
    last = cfg.depth - 1
    out |= {"context_embedder": Target("context_embedder"), "pos_embed.proj": Target("x_embedder.proj"),
            f"{emb}.timestep_embedder.linear_1": Target("t_embedder.mlp.0"),
            f"{emb}.timestep_embedder.linear_2": Target("t_embedder.mlp.2"),
            f"{emb}.text_embedder.linear_1": Target("y_embedder.mlp.0"),
            f"{emb}.text_embedder.linear_2": Target("y_embedder.mlp.2"),
            "proj_out": Target("final_layer.linear"),
            "norm_out.linear": Target("final_layer.adaLN_modulation.1", None, swap_scale_shift),
            f"transformer_blocks.{last}.norm1_context.linear":
                Target(f"joint_blocks.{last}.context_block.adaLN_modulation.1", None, swap_scale_shift)}
    return out


def key_map(family: str, cfg, weight_names) -> dict[str, Target]:
    """LoRA stem -> target, for a model whose official parameter names are `weight_names`."""
    out = {}
    for name in weight_names:
        full = f"diffusion_model.{name}"
        if name.endswith(".weight"):
            path = name.removesuffix(".weight")
            out[f"lora_unet_{path.replace('.', '_')}"] = Target(full)
            out[f"diffusion_model.{path}"] = Target(full)
        else:
            out[full] = Target(full)
    table = {"flux": _flux_table, "flux2": _flux2_table, "sd3": _mmdit_table}[family](cfg)
    prefixes = (("transformer.", "."), ("lycoris_", "_"), ("lora_transformer_", "_"), ("", ".")) \
        if family.startswith("flux") \
        else (("transformer.", "."), ("base_model.model.", "."), ("lora_transformer_", "_"), ("lycoris_", "_"))
    for module, t in table.items():
        target = Target(f"diffusion_model.{t.key}.weight", t.rows, t.function)
        for prefix, dot in prefixes:
            out[prefix + module.replace(".", dot)] = target
    if family.startswith("flux"):
        for name in weight_names:
            if name.endswith(".linear1.weight"):
                out[f"diffusion_model.{name.replace('.linear1.weight', '.linear1_qkv')}"] = Target(
                    f"diffusion_model.{name}", (0, cfg.hidden_size * 3))
    return out


# (up, down) suffixes in LoRAAdapter.load's order
_ADAPTER_SUFFIXES = ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
                     (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"),
                     (".lora_B", ".lora_A"), (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
                     (".lora_B.default.weight", ".lora_A.default.weight"))


@dataclass
class Patch:
    target: Target
    kind: str  # "lora" | "diff" | "set"
    tensors: tuple
    alpha: float | None = None


def load_lora(sd: dict[str, Tensor], keys: dict[str, Target]) -> tuple[list[Patch], list[str]]:
    """The patches ComfyUI makes of the LoRA state dict `sd`, and the keys it does not load."""
    patches, loaded = {}, set()
    for x, target in keys.items():
        alpha = None
        if f"{x}.alpha" in sd:
            alpha = sd[f"{x}.alpha"].item()
            loaded.add(f"{x}.alpha")
        for up, down in _ADAPTER_SUFFIXES:
            if x + up in sd:
                patches[target] = Patch(target, "lora", (sd[x + up], sd[x + down]), alpha)
                loaded |= {x + up, x + down}
                break
        if f"{x}.diff" in sd:
            patches[target] = Patch(target, "diff", (sd[f"{x}.diff"],))
            loaded.add(f"{x}.diff")
        if f"{x}.diff_b" in sd:
            bias = Target(target.key.removesuffix(".weight") + ".bias")
            patches[bias] = Patch(bias, "diff", (sd[f"{x}.diff_b"],))
            loaded.add(f"{x}.diff_b")
        if f"{x}.set_weight" in sd:
            patches[target] = Patch(target, "set", (sd[f"{x}.set_weight"],))
            loaded.add(f"{x}.set_weight")
    return list(patches.values()), sorted(set(sd) - loaded)


def patch(weights: dict[str, Tensor], patches: list[Patch], strength: float) -> tuple[dict[str, Tensor], list]:
    """The patched fp32 weights (keys as `weights`: official names) and the patches whose target the model
    lacks (add_patches leaves them out)."""
    out, skipped = {}, []
    for p in patches:
        name = p.target.key.removeprefix("diffusion_model.")
        if name not in weights:
            skipped.append(p)
            continue
        w = out.setdefault(name, weights[name].float().clone())
        view = w if p.target.rows is None else w.narrow(0, *p.target.rows)
        function = p.target.function or (lambda t: t)
        if p.kind == "lora":
            up, down = (t.float() for t in p.tensors)
            scale = 1.0 if p.alpha is None else p.alpha / down.shape[0]
            diff = (up.flatten(1) @ down.flatten(1)).reshape(view.shape)
            view += function(strength * scale * diff)
        elif p.kind == "diff":
            view += function(strength * p.tensors[0].float())
        else:
            view.copy_(p.tensors[0])
    return out, skipped


def assert_comfyui_merge_is_ours(plain, family: str, path, strength: float = 1.0) -> None:
    """The LoRA file at `path` patched into `plain`'s weights by ComfyUI's rule: every key loaded, every patch
    placed, and each patched parameter equal to our merge (`apply_loras` on a copy) within 1e-5 of its delta."""
    import copy

    from safetensors.torch import load_file

    from weights.lora import read_lora
    from weights.lora_merge import apply_loras, touched_keys

    sd = load_file(str(path))
    weights = dict(plain.state_dict())
    patches, not_loaded = load_lora(sd, key_map(family, plain.config, weights))
    assert not_loaded == [], f"{path.name}: ComfyUI would not load {not_loaded[:3]}"
    patched, skipped = patch(weights, patches, strength)
    assert skipped == [], path.name
    assert set(patched) == set(touched_keys(read_lora(path))), path.name
    ours = copy.deepcopy(plain)
    apply_loras(ours, [(path, strength)])
    merged = ours.state_dict()
    for name, want in patched.items():
        delta = (want - weights[name].float()).abs().max()
        err = (merged[name].float() - want).abs().max()
        assert err <= 1e-5 * delta, f"{path.name}: {name}: {err} vs max delta {delta}"
