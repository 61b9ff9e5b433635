"""Other tools' files at the readers' edge (weights/io.py, weights/keymaps/lora.py): ComfyUI's mixed-precision
checkpoints (`comfy_quant` layer tags, `_quantization_metadata`) read as their dequantized weights for fp8 and
refused by format otherwise, GGUF refused by name, ai-toolkit DoRA and LyCORIS norm adapters refused by name,
FLUX.2 PEFT LoRAs with BFL names under `base_model.model.` read as diffusers' FLUX.2 loader reads them, and the
FLUX.2 kohya layers diffusers' converter drops, which `convert.py lora --to kohya` warns about."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_
from safetensors.torch import load_file, save_file

from model.flux2 import FLUX2_CONFIGS, Flux2, Flux2Config
from model.qwen3 import QWEN3_CONFIGS, Qwen3TextEncoder
from tools.convert import info_lines
from tools.convert import main as convert
from weights.families.flux2 import FLUX2
from weights.io import WeightsError
from weights.keymaps.lora import NotLoRAError, flux2_lora_names, kohya_name
from weights.lora import read_lora
from weights.reader import read_shapes
from weights.text import load_qwen3
from weights.transformer import load_flux2

TINY = FLUX2_CONFIGS["tiny"]
COMFY = "model.diffusion_model."  # ComfyUI's prefix for a diffusion model in one file


def tag(fmt: str) -> torch.Tensor:
    """A `comfy_quant` tensor as ComfyUI's MixedPrecisionOps.state_dict writes it: the JSON's UTF-8 bytes."""
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def comfy_mixed(sd: dict, fmt: str = "float8_e4m3fn", tags: bool = True) -> tuple[dict, dict, dict]:
    """`sd` as a ComfyUI mixed-precision file -> (tensors, the weights they stand for, header metadata): every
    other 2-D weight quantized per tensor (weight / scale in fp8, scale = absmax / fp8 max, as comfy/quant_ops.py
    quantizes), with `weight_scale`, an `input_scale` on some, and the layer's format in a `comfy_quant` tensor
    (`tags`) or only in the `_quantization_metadata` header entry; the rest left in full precision (mixed)."""
    dtype = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}[fmt]
    out, real, layers = {}, {}, {}
    matrices = [k for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2]
    for k, v in sd.items():
        out[k] = real[k] = v
        if k in matrices[::2]:
            layer = k.removesuffix(".weight")
            scale = (v.abs().amax() / torch.finfo(dtype).max).float()  # a 0-d fp32 tensor, as ComfyUI saves it
            out[k] = (v / scale).to(dtype)
            real[k] = out[k].float() * scale
            out[layer + ".weight_scale"] = scale
            if len(layers) % 3 == 0:
                out[layer + ".input_scale"] = torch.tensor(0.5)
            if tags:
                out[layer + ".comfy_quant"] = tag(fmt)
            layers[layer] = {"format": fmt}
    return out, real, {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}


def prefixed(tensors: dict, prefix: str) -> dict:
    return {prefix + k: v.contiguous() for k, v in tensors.items()}


@pytest.mark.parametrize("fmt,tags,metadata", [("float8_e4m3fn", True, False), ("float8_e4m3fn", True, True),
                                               ("float8_e4m3fn", False, True), ("float8_e5m2", True, False)],
                         ids=["comfy_quant", "comfy_quant+metadata", "metadata only", "e5m2"])
def test_comfy_mixed_precision_klein_loads_as_the_dequantized_weights(tmp_path, fmt, tags, metadata):
    sd = randomize_(Flux2(TINY), 0.3, seed=3).state_dict()
    tensors, real, meta = comfy_mixed(sd, fmt, tags)
    path = tmp_path / "flux-2-klein-tiny-fp8mixed.safetensors"
    save_file(prefixed(tensors, COMFY), path, metadata=meta if metadata else None)
    got = load_flux2(path).state_dict()  # fp32: the products exactly
    assert got.keys() == sd.keys()
    for k, v in got.items():
        assert torch.equal(v, real[k]), k
    quantized = [k for k, v in tensors.items() if v.dtype.itemsize == 1 and k.endswith(".weight")]
    assert len(quantized) > 10 and any(v.dtype == torch.float32 and v.ndim == 2 for v in tensors.values())  # mixed
    for k in quantized:  # lossy, and the scale matters
        assert not torch.equal(real[k], sd[k]) and not torch.equal(real[k], tensors[k].float()), k
    shapes, _ = read_shapes([path])  # the side keys are hidden from every reader, not just the loader
    assert not any(k.endswith((".comfy_quant", ".weight_scale", ".input_scale")) for k in shapes)


def test_comfy_mixed_precision_qwen3_loads_as_the_dequantized_weights(tmp_path):
    """As ComfyUI's `qwen_3_4b_fp8mixed.safetensors` / `qwen_3_8b_fp8mixed.safetensors` text encoders."""
    sd = randomize_(Qwen3TextEncoder(QWEN3_CONFIGS["tiny"]), 0.2, seed=1).state_dict()
    tensors, real, meta = comfy_mixed(sd)
    save_file(prefixed(tensors, ""), tmp_path / "qwen_3_tiny_fp8mixed.safetensors", metadata=meta)
    got = load_qwen3(tmp_path / "qwen_3_tiny_fp8mixed.safetensors").state_dict()
    quantized = [k for k in got if tensors[k].dtype == torch.float8_e4m3fn]
    assert got.keys() <= sd.keys() and len(quantized) > 10 and any(tensors[k].ndim == 2 for k in got.keys() - quantized)
    for k, v in got.items():
        assert torch.equal(v, real[k]), k


def nvfp4_layer(layer: str, out: int, width: int) -> dict:
    """One layer as ComfyUI's nvfp4 stores it: packed 4-bit pairs, fp8 block scales per 16, a tensor scale."""
    return {layer + ".weight": torch.zeros(out, width // 2, dtype=torch.uint8),
            layer + ".weight_scale": torch.ones(out, width // 16).to(torch.float8_e4m3fn),
            layer + ".weight_scale_2": torch.tensor(1.0)}


@pytest.mark.parametrize("fmt,tags", [("nvfp4", True), ("mxfp8", True), ("int8_tensorwise", False)])
def test_other_comfy_formats_are_refused_by_name_in_one_line(tmp_path, fmt, tags):
    sd = Flux2(TINY).state_dict()
    tensors, _, meta = comfy_mixed(sd, tags=tags)
    layer = "single_blocks.0.linear2"
    del tensors[layer + ".weight"]
    tensors |= nvfp4_layer(layer, *sd[layer + ".weight"].shape)
    layers = json.loads(meta["_quantization_metadata"])["layers"]
    if tags:
        tensors[layer + ".comfy_quant"] = tag(fmt)
    else:
        layers[layer] = {"format": fmt}
    path = tmp_path / "quantized.safetensors"
    save_file(prefixed(tensors, ""), path, metadata={"_quantization_metadata": json.dumps({"layers": layers})})
    for read in (load_flux2, lambda p: read_shapes([p]), info_lines):
        with pytest.raises(WeightsError, match=rf"layer {layer} is quantized as '{fmt}' .* use a bf16 or fp8 file") \
                as e:
            read(path)
        assert "\n" not in str(e.value)


def test_a_comfy_fp8_tag_on_a_weight_of_another_dtype_is_a_damaged_file(tmp_path):
    sd = Flux2(TINY).state_dict()
    tensors, _, _ = comfy_mixed(sd, "float8_e5m2")
    layer = next(k for k in tensors if k.endswith(".comfy_quant")).removesuffix(".comfy_quant")
    tensors[layer + ".comfy_quant"] = tag("float8_e4m3fn")
    save_file(prefixed(tensors, ""), tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match=f"layer {layer} is marked float8_e4m3fn but its weight is F8_E5M2; "
                                           "the file is damaged"):
        load_flux2(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("name", ["flux1-dev-Q4_K_S.gguf", "renamed.safetensors"])
def test_gguf_files_are_refused_by_name(tmp_path, name):
    path = tmp_path / name
    # GGUF's magic, version 3, tensor and metadata counts: what city96's files start with
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (7).to_bytes(8, "little") * 2 + bytes(64))
    for read in (load_flux2, read_lora):
        with pytest.raises(WeightsError, match="a GGUF file; scfm does not read GGUF: use a safetensors file") as e:
            read(path)
        assert "\n" not in str(e.value)


def lora_pair(stem: str, out: int, width: int, rank: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {f"{stem}.lora_A.weight": torch.randn(rank, width, generator=g),
            f"{stem}.lora_B.weight": torch.randn(out, rank, generator=g)}


@pytest.mark.parametrize("stem,extra,what", [
    ("diffusion_model.double_blocks.0.img_attn.qkv", {".magnitude": (192,)}, "a DoRA adapter"),
    ("transformer.transformer_blocks.0.attn.to_q", {".magnitude": (64,)}, "a DoRA adapter"),
    ("lycoris_transformer_blocks_0_attn_to_q", {".w_norm": (64,), ".b_norm": (64,)},
     "a LyCORIS adapter with trained norm layers"),
], ids=["ai-toolkit DoRA, BFL names", "ai-toolkit DoRA, diffusers names", "LyCORIS w_norm / b_norm"])
def test_dora_and_norm_adapters_are_refused_by_name(tmp_path, stem, extra, what):
    out = extra.get(".magnitude", (64,))[0]
    tensors = lora_pair(stem, out, 64) | {stem + k: torch.ones(shape) for k, shape in extra.items()}
    save_file(tensors, tmp_path / "adapter.safetensors")
    with pytest.raises(NotLoRAError, match=f"this is {what} .*; scfm reads plain LoRA files only") as e:
        read_lora(tmp_path / "adapter.safetensors")
    assert "\n" not in str(e.value)
    assert any(what in line for line in info_lines(tmp_path / "adapter.safetensors"))


def klein_lora(model, modules, prefix: str) -> dict:
    return {k: v for i, m in enumerate(modules)
            for k, v in lora_pair(prefix + m, *model.get_submodule(m).weight.shape, seed=i).items()}


def test_flux2_peft_lora_with_bfl_names_reads_as_under_diffusion_model(tmp_path):
    """diffusers' Flux2LoraLoaderMixin.lora_state_dict renames `base_model.model.` to `diffusion_model.` (ai-toolkit's
    BFL-named layout): the same file under either prefix gives the same deltas, in ours and in diffusers."""
    from diffusers import Flux2KleinPipeline

    model = Flux2(TINY)
    modules = ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.2", "single_blocks.1.linear1",
               "double_stream_modulation_img.lin", "final_layer.adaLN_modulation.1", "txt_in"]
    loras = {}
    for prefix in ("diffusion_model.", "base_model.model."):
        path = tmp_path / f"{prefix.replace('.', '_')}.safetensors"
        save_file(klein_lora(model, modules, prefix), path)
        loras[prefix] = (read_lora(path), Flux2KleinPipeline.lora_state_dict(str(path)))
    (ours, theirs), (peft, peft_theirs) = loras.values()
    assert peft.family == ours.family == "flux2" and peft.modules.keys() == ours.modules.keys() == set(modules)
    for m, mod in ours.modules.items():
        assert torch.equal(peft.modules[m].delta(), mod.delta()) and mod.delta().abs().max() > 0, m
    assert theirs.keys() == peft_theirs.keys() and all(torch.equal(theirs[k], peft_theirs[k]) for k in theirs)


def test_convert_warns_of_the_flux2_kohya_layers_diffusers_drops(tmp_path, capsys):
    """Every LoRA-able klein layer (the guidance embedder of dev too) in kohya names: the layers diffusers'
    _convert_kohya_flux2_lora_to_diffusers leaves unconverted are exactly the family's diffusers_kohya_drops,
    and `convert.py lora --to kohya` names them."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux2_lora_to_diffusers

    model = Flux2(Flux2Config(**{**TINY.to_dict(), "guidance_embed": True}))
    names = flux2_lora_names(TINY.depth, TINY.depth_single_blocks)
    tensors = {}
    for i, m in enumerate(sorted(names.rules)):
        pair = lora_pair(f"lora_unet_{kohya_name(m)}", *model.get_submodule(m).weight.shape, seed=i)
        tensors |= {k.replace("lora_A", "lora_down").replace("lora_B", "lora_up"): v for k, v in pair.items()}
        tensors[f"lora_unet_{kohya_name(m)}.alpha"] = torch.tensor(2.0)
    save_file(tensors, tmp_path / "kohya.safetensors")
    left = dict(tensors)
    _convert_kohya_flux2_lora_to_diffusers(left)  # pops what it converts; the rest it only logs
    dropped = {names.by_kohya[k.split(".")[0].removeprefix("lora_unet_")] for k in left}
    assert dropped == {m for m in names.rules if m.startswith(FLUX2.diffusers_kohya_drops)}
    assert {"guidance_in.in_layer", "single_stream_modulation.lin", "final_layer.adaLN_modulation.1"} <= dropped
    assert not dropped & {"final_layer.linear", "time_in.in_layer", "img_in", "txt_in"}  # what it does map

    assert convert(["lora", str(tmp_path / "kohya.safetensors"), str(tmp_path / "out.safetensors"),
                    "--to", "kohya"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {len(dropped)} " in err and "diffusers' kohya loader silently drops them" in err
    assert ", ".join(sorted(dropped)[:3]) in err
    assert {k.split(".")[0] for k in load_file(tmp_path / "out.safetensors")} >= {
        f"lora_unet_{kohya_name(m)}" for m in dropped}  # written all the same: ComfyUI and scfm read them


def test_a_converted_mixed_precision_file_drops_the_stale_layer_list(tmp_path):
    """convert.py dequantizes the transformer, so the header's list of quantized layers must not travel with it
    (ComfyUI would read those bf16 weights as fp8); layers copied as stored (an all-in-one file's other parts)
    keep their entries."""
    from weights.convert import _still_quantized
    from weights.io import QUANT_METADATA, read_header

    sd = randomize_(Flux2(TINY), 0.3, seed=3).state_dict()
    tensors, real, _ = comfy_mixed(sd)
    layers = {COMFY + k.removesuffix(".comfy_quant"): {"format": "float8_e4m3fn"} for k in tensors
              if k.endswith(".comfy_quant")}
    src = tmp_path / "fp8mixed.safetensors"
    save_file(prefixed(tensors, COMFY), src, metadata={QUANT_METADATA: json.dumps({"layers": layers})})
    assert convert(["checkpoint", str(src), str(tmp_path / "out.safetensors"), "--to", "official"]) == 0
    written, meta = read_header(tmp_path / "out.safetensors")
    assert QUANT_METADATA not in meta and not any(k.endswith(".comfy_quant") for k in written)
    assert {d for k, (_, d) in written.items() if k.endswith(".weight")} == {"BF16"}
    kept = "text_encoders.qwen3.model.layers.0.mlp.up_proj"  # an other part's layer, copied as stored
    both = {QUANT_METADATA: json.dumps({"layers": {**layers, kept: {"format": "float8_e4m3fn"}}}), "x": "y"}
    assert json.loads(_still_quantized(both, [kept + ".weight"])[QUANT_METADATA])["layers"] == {
        kept: {"format": "float8_e4m3fn"}}
    assert _still_quantized(both, []) == {"x": "y"}
