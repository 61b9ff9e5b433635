"""LoRAs as other tools write them, read at their true strength (weights/lora.py), for tiny FLUX.1 and SD3.5:
ComfyUI's Extract and Save LoRA (`diffusion_model.` names, `.diff_b` for every bias, `.diff` for 1-D weights;
`full_diff`), SimpleTuner's LyCORIS (`lycoris_`) and OneTrainer's (`lora_transformer_`) flattened diffusers
names, each against ComfyUI's rule (comfyui_lora.py); rsLoRA and PEFT save_pretrained folders (rank / alpha
patterns) against PEFT's own forward and diffusers' loader; DoRA refused by name; `convert.py info` on each."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from comfyui_lora import assert_comfyui_merge_is_ours
from conftest import randomize_
from flux_fixtures import run_diffusers, run_ours, save_as_bfl, tiny_diffusers_flux, tiny_inputs
from mmdit_fixtures import SD35_TINY
from safetensors.torch import save_file
from test_lora_everywhere import SD3_COMFY_TINY, SD3_DIFFUSERS_KWARGS

from model.flux import FLUX_CONFIGS, Flux
from model.mmdit import MMDiT
from tools.convert import info_lines
from tools.convert import main as convert
from weights import WeightsError, load_flux
from weights.lora import read_lora
from weights.lora_merge import apply_loras
from weights.lora_write import write_lora

R = 4


def comfyui_extract(model, full_diff: bool = False, seed: int = 0) -> dict:
    """A file as ComfyUI's Extract and Save LoRA writes it from a model difference (comfy_extras/
    nodes_lora_extract.py calc_lora_model): fp16, `diffusion_model.<path>` names, no alpha; with the default
    bias_diff=True every bias as `.diff_b` and every 1-D weight as `.diff`; `full_diff` every weight as `.diff`.
    Random factors stand in for its SVD (a conv's up is (out, r, 1, 1), its down (r, in, kh, kw))."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, w in model.state_dict().items():
        stem = "diffusion_model." + k.rsplit(".", 1)[0]
        if k.endswith(".weight") and w.ndim >= 2 and not full_diff:
            out[f"{stem}.lora_up.weight"] = torch.randn(w.shape[0], R, *([1] * (w.ndim - 2)), generator=g) * 0.1
            out[f"{stem}.lora_down.weight"] = torch.randn(R, *w.shape[1:], generator=g) * 0.1
        elif k.endswith(".weight"):
            out[f"{stem}.diff"] = torch.randn(w.shape, generator=g) * 0.01
        elif k.endswith(".bias"):
            out[f"{stem}.diff_b"] = torch.randn(w.shape, generator=g) * 0.01
    return {k: v.half() for k, v in out.items()}


def flat_diffusers(ref, prefix: str, seed: int = 0, alpha: float = 3.0) -> dict:
    """Every Linear (and SD3's patch-embedding conv) of the diffusers model `ref` with a LoRA under its name with
    '.' -> '_', lora_down / lora_up / alpha: SimpleTuner's LyCORIS (`lycoris_`) and OneTrainer
    (`lora_transformer_`) files."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in ref.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        stem = prefix + name.replace(".", "_")
        w = module.weight
        out[f"{stem}.lora_down.weight"] = torch.randn(R, *w.shape[1:], generator=g) * 0.2
        out[f"{stem}.lora_up.weight"] = torch.randn(w.shape[0], R, *([1] * (w.ndim - 2)), generator=g) * 0.2
        out[f"{stem}.alpha"] = torch.tensor(alpha)
    return out


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("full_diff", [False, True])
def test_comfyui_extracted_loras_apply_their_bias_and_weight_differences(tmp_path, family, full_diff):
    plain = randomize_(Flux(FLUX_CONFIGS["tiny"]) if family == "flux" else MMDiT(SD35_TINY), 0.2, 0).eval()
    sd = comfyui_extract(plain, full_diff)
    assert any(k.endswith(".diff_b") for k in sd)
    assert family == "flux" or full_diff or any(k.endswith("ln_q.diff") for k in sd)  # SD3.5's norm weights
    path = tmp_path / "ComfyUI_extracted_lora_00001_.safetensors"
    save_file(sd, path)
    lora = read_lora(path)
    assert lora.flavour.startswith("ComfyUI") and len(lora.diffs) > 0
    assert_comfyui_merge_is_ours(plain, family, path, strength=0.7)
    # written back in the one layout that holds full differences, the same parameters change the same way
    write_lora(lora, tmp_path / "kohya.safetensors", "kohya")
    assert_comfyui_merge_is_ours(plain, family, tmp_path / "kohya.safetensors", strength=0.7)
    with pytest.raises(WeightsError, match="only the kohya / ComfyUI layout holds"):
        write_lora(lora, tmp_path / "peft.safetensors", "diffusers")
    assert any("full differences" in line for line in info_lines(path))


def test_full_differences_merge_while_reading_and_into_a_converted_checkpoint(tmp_path):
    plain = randomize_(Flux(FLUX_CONFIGS["tiny"]), 0.2, 0).eval()
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, tmp_path / "base.safetensors")
    save_file(comfyui_extract(plain), tmp_path / "extracted.safetensors")
    after = copy.deepcopy(plain)
    apply_loras(after, [(tmp_path / "extracted.safetensors", 0.5)])
    read = load_flux(tmp_path / "base.safetensors", loras=[(tmp_path / "extracted.safetensors", 0.5)])
    assert convert(["merge", "--base", str(tmp_path / "base.safetensors"), "--lora",
                    f"{tmp_path / 'extracted.safetensors'}:0.5", "--out", str(tmp_path / "merged.safetensors")]) == 0
    merged = load_flux(tmp_path / "merged.safetensors")
    for name, want in after.state_dict().items():
        assert torch.equal(read.state_dict()[name], want), name
        assert torch.equal(merged.state_dict()[name], want), name
    assert not torch.equal(after.double_blocks[0].img_attn.qkv.bias, plain.double_blocks[0].img_attn.qkv.bias)


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("prefix, tool", [("lycoris_", "SimpleTuner LyCORIS"), ("lora_transformer_", "OneTrainer")])
def test_flattened_diffusers_names_of_simpletuner_and_onetrainer(tmp_path, family, prefix, tool):
    from diffusers import SD3Transformer2DModel

    if family == "flux":
        ref, plain = tiny_diffusers_flux(), randomize_(Flux(FLUX_CONFIGS["tiny"]), 0.2, 0).eval()
    else:  # ComfyUI's SD3 q / k / v ranges need hidden_size = 64 * depth (comfyui_lora.py)
        ref, plain = SD3Transformer2DModel(**SD3_DIFFUSERS_KWARGS), randomize_(MMDiT(SD3_COMFY_TINY), 0.05, 0).eval()
    save_file(flat_diffusers(ref, prefix), tmp_path / "lora.safetensors")
    lora = read_lora(tmp_path / "lora.safetensors")
    assert (lora.family, lora.layout) == (family, "diffusers") and lora.flavour.startswith(tool)
    assert_comfyui_merge_is_ours(plain, family, tmp_path / "lora.safetensors", strength=0.8)
    assert any(tool in line for line in info_lines(tmp_path / "lora.safetensors"))


def test_a_zero_kohya_alpha_applies_nothing_as_diffusers_and_comfyui_do_and_one_line_says_so(tmp_path):
    """sd-scripts never saves an alpha of 0 (its loader would read it as the rank, full strength); diffusers'
    converter (scale alpha / rank) and ComfyUI (alpha / rank whenever the key exists) apply nothing, and so do we,
    transformer and text-encoder parts alike. The oracle: `_convert_kohya_flux_lora_to_diffusers`'s output."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from weights.lora_text import encoder_parts

    plain = randomize_(Flux(FLUX_CONFIGS["tiny"]), 0.2, 0).eval()
    g = torch.Generator().manual_seed(0)
    alphas = {"double_blocks.0.img_attn.qkv": 2.0, "double_blocks.0.img_attn.proj": 0.0,
              "double_blocks.0.txt_mlp.0": 0.0}
    sd = {}
    for module, alpha in alphas.items():
        out, inp = plain.get_submodule(module).weight.shape
        stem = "lora_unet_" + module.replace(".", "_")
        sd |= {f"{stem}.lora_down.weight": torch.randn(R, inp, generator=g), f"{stem}.alpha": torch.tensor(alpha),
               f"{stem}.lora_up.weight": torch.randn(out, R, generator=g)}
    te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    clip = {f"{te}.lora_down.weight": torch.randn(2, 8, generator=g), f"{te}.lora_up.weight": torch.randn(8, 2),
            f"{te}.alpha": torch.tensor(0.0)}
    save_file(sd, tmp_path / "unet.safetensors")
    save_file(sd | clip, tmp_path / "kohya.safetensors")
    with pytest.warns(UserWarning) as caught:
        lora = read_lora(tmp_path / "kohya.safetensors")
    assert [str(w.message) for w in caught] == [
        f"{tmp_path / 'kohya.safetensors'}: {te}.alpha (and 2 more .alpha keys) is 0: applied with no effect, as "
        "diffusers and ComfyUI apply it; sd-scripts would apply it at full strength (alpha = rank)"]
    # diffusers' converter folds alpha / rank into the factors: its file, read as diffusers writes (no alpha),
    # has each layer's delta as diffusers applies it
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(sd | clip))
    path = tmp_path / "theirs.safetensors"
    save_file({k: v.clone() for k, v in theirs.items() if k.startswith("transformer.")}, path)  # clone: shared A
    diffusers = read_lora(path)
    for module, alpha in alphas.items():
        want = diffusers.modules[module].delta()
        torch.testing.assert_close(lora.modules[module].delta(), want)
        assert bool(want.any()) == (alpha != 0), module
    assert not any(v.any() for k, v in theirs.items() if k.startswith("text_encoder."))
    ((stem, part),) = encoder_parts(lora, 1.0, "flux")[0].parts.items()
    assert part.scale == 0
    with pytest.warns(UserWarning, match="is 0: applied with no effect"):
        assert_comfyui_merge_is_ours(plain, "flux", tmp_path / "unet.safetensors")


# ----- PEFT: rsLoRA, save_pretrained folders, DoRA ----------------------------------------------------------

TARGETS = ["to_q", "to_k", "to_v", "add_k_proj", "proj_mlp", "proj_out", "norm.linear", "x_embedder"]


@pytest.fixture(scope="module")
def flux_base(tmp_path_factory):
    ref = tiny_diffusers_flux(sigma=0.2)
    return ref, save_as_bfl(ref, tmp_path_factory.mktemp("base") / "flux.safetensors")


def _peft_model(ref, **config):
    """The diffusers model with PEFT LoRA layers (B random so that every delta shows), as peft builds them."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(ref), LoraConfig(target_modules=TARGETS, **config))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _close(ours, theirs) -> None:
    err = (ours - theirs).abs().max()
    assert err <= 1e-5 * theirs.abs().max(), f"{err} vs max |output| {theirs.abs().max()}"


@pytest.mark.parametrize("rslora", [True, False])
def test_peft_save_pretrained_folder_with_patterns_equals_peft(flux_base, tmp_path, rslora):
    ref, base = flux_base
    patterns = {"rank_pattern": {"single_transformer_blocks.1.proj_mlp": 2},
                "alpha_pattern": {"transformer_blocks.0.attn.to_k": 7.0}}
    model = _peft_model(ref, r=R, lora_alpha=6.0, use_rslora=rslora, **patterns)
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["use_rslora"] is rslora
    inp = tiny_inputs()
    theirs = run_diffusers(model.base_model.model, inp)
    ours = load_flux(base)
    apply_loras(ours, [tmp_path / "adapter"])  # the folder; its adapter_model.safetensors alone reads the same
    _close(run_ours(ours, inp), theirs)
    assert read_lora(tmp_path / "adapter" / "adapter_model.safetensors").flavour == read_lora(
        tmp_path / "adapter").flavour
    assert any("adapter_config.json" in line for line in info_lines(tmp_path / "adapter"))
    # written in the layouts with one alpha per layer: to_k's alpha 7 beside q / v's 6 and proj_mlp's rank 2
    # beside linear1's q / k / v rank 4 (slices of one fused layer at different alpha / r) keep PEFT's forward
    for layout in ("ours", "kohya"):
        write_lora(read_lora(tmp_path / "adapter"), tmp_path / f"{layout}.safetensors", layout)
        again = load_flux(base)
        apply_loras(again, [tmp_path / f"{layout}.safetensors"])
        _close(run_ours(again, inp), theirs)


def test_rslora_in_diffusers_metadata_equals_diffusers(flux_base, tmp_path):
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    ref, base = flux_base
    model = _peft_model(ref, r=R, lora_alpha=6.0, use_rslora=True)
    layers = get_peft_model_state_dict(model)
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers={k.removeprefix("base_model.model."): v
                                                                      for k, v in layers.items()},
                                   transformer_lora_adapter_metadata={"r": R, "lora_alpha": 6.0,
                                                                      "use_rslora": True, "target_modules": TARGETS})
    path = tmp_path / "pytorch_lora_weights.safetensors"
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=copy.deepcopy(ref))
    pipe.load_lora_weights(str(path))
    inp = tiny_inputs()
    ours = load_flux(base)
    apply_loras(ours, [path])
    _close(run_ours(ours, inp), run_diffusers(pipe.transformer, inp))
    _close(run_ours(ours, inp), run_diffusers(model.base_model.model, inp))  # and PEFT's own forward
    assert "rsLoRA" in read_lora(path).flavour


def test_diffusers_metadata_without_lora_alpha_takes_peft_default_alpha_as_diffusers_does(flux_base, tmp_path):
    """`lora_adapter_metadata` giving r but no lora_alpha: diffusers builds peft's LoraConfig from it, so alpha
    is LoraConfig's default (8; read from peft here), not r. Our parts carry that alpha and the applied model
    equals diffusers' load_lora_weights."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ref, base = flux_base
    default = LoraConfig().lora_alpha
    assert default != R  # else the two readings agree
    layers = get_peft_model_state_dict(_peft_model(ref, r=R, lora_alpha=6.0))
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers={k.removeprefix("base_model.model."): v
                                                                      for k, v in layers.items()},
                                   transformer_lora_adapter_metadata={"r": R, "target_modules": TARGETS})
    path = tmp_path / "pytorch_lora_weights.safetensors"
    parts = [p for mod in read_lora(path).modules.values() for p in mod.parts if p is not None]
    assert parts and all(p.alpha == default for p in parts)
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=copy.deepcopy(ref))
    pipe.load_lora_weights(str(path))
    ours = load_flux(base)
    apply_loras(ours, [path])
    inp = tiny_inputs()
    _close(run_ours(ours, inp), run_diffusers(pipe.transformer, inp))


def test_dora_is_refused_by_name_and_info_says_why(flux_base, tmp_path):
    ref, _ = flux_base
    _peft_model(ref, r=R, lora_alpha=6.0, use_dora=True).save_pretrained(tmp_path / "dora")
    with pytest.raises(WeightsError, match="DoRA") as e:
        read_lora(tmp_path / "dora")
    assert "\n" not in str(e.value)
    lines = info_lines(tmp_path / "dora" / "adapter_model.safetensors")
    assert lines[1] == "layout: not a plain LoRA" and "DoRA" in lines[2]


def test_a_text_encoder_only_lora_reads_with_no_transformer_layers(tmp_path):
    """sd-scripts can train CLIP-L alone: such a file is a LoRA whose transformer part is empty."""
    g = torch.Generator().manual_seed(0)
    stem = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    sd = {f"{stem}.lora_down.weight": torch.randn(2, 8, generator=g),
          f"{stem}.lora_up.weight": torch.randn(8, 2, generator=g), f"{stem}.alpha": torch.tensor(1.0)}
    save_file(sd, tmp_path / "te.safetensors")
    lora = read_lora(tmp_path / "te.safetensors")
    assert (lora.modules, set(lora.text_encoders)) == ({}, set(sd))
    write_lora(lora, tmp_path / "again.safetensors", "kohya")
    assert set(read_lora(tmp_path / "again.safetensors").text_encoders) == set(sd)
    assert any(line.startswith("text encoders: 3 keys (CLIP-L: 3)") for line in info_lines(tmp_path / "te.safetensors"))
