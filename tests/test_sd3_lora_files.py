"""SD3 / SD3.5 LoRA files (weights/lora.py, lora_write.py, lora_merge.py) on the tiny SD3.5: PEFT files
against diffusers' SD3 loader (the patch-embedding conv, per-slice q / k / v, the swapped adaLN rows),
kohya / ComfyUI names against ComfyUI's key rule and arithmetic, lossless round trips, family detection, and
an SCFM set exported from distill/lora.py loading in diffusers with exactly its keys."""

import copy

import pytest
import torch
from conftest import assert_same_bits, random_lora, randomize_
from mmdit_fixtures import SD35_TINY, run_diffusers, run_ours, tiny_diffusers_mmdit, tiny_inputs
from safetensors.torch import load_file, save_file

from distill.lora import SD3_TARGETS, lora_layers, set_state_dict
from model.mmdit import MMDiT
from weights import WeightsError
from weights.io import read_header
from weights.keymaps import to_official
from weights.keymaps.mmdit import mmdit_rules
from weights.lora import LoRA, Recommended, read_lora
from weights.lora_merge import apply_loras, unload_loras
from weights.lora_write import lora_state_dict, save_lora, write_lora
from weights.transformer import load_mmdit

R, ALPHA = 2, 6.0
LAST = SD35_TINY.depth - 1  # block 2: its context stream is pre-only (2-way adaLN, swapped in diffusers)
# diffusers modules with a PEFT LoRA: the patch embedding (Conv2d), fused q / k / v (all three, and one
# alone), a dual block's attn2, both context adaLNs (block 0: 6 D rows as is; the last: 2 D rows swapped), the
# final adaLN (swapped), embedders, MLPs of both streams and the output projection
PEFT_MODULES = [
    "pos_embed.proj", "context_embedder", "time_text_embed.text_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
    *(f"transformer_blocks.0.attn.to_{x}" for x in "qkv"), "transformer_blocks.1.attn.add_k_proj",
    "transformer_blocks.1.attn2.to_v", "transformer_blocks.0.attn.to_out.0",
    "transformer_blocks.1.attn.to_add_out",
    "transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
    f"transformer_blocks.{LAST}.norm1_context.linear", "transformer_blocks.1.ff.net.0.proj",
    "transformer_blocks.0.ff_context.net.2", "norm_out.linear", "proj_out",
]
# SD3_TARGETS plus every other layer kind (context adaLN incl. the last block's, context MLP, attn2), so a
# round trip meets each naming rule
ALL_TARGETS = SD3_TARGETS + ("joint_blocks.{i}.context_block.adaLN_modulation.1",
                             "joint_blocks.{i}.context_block.mlp.fc1",
                             "joint_blocks.{i}.x_block.attn2.qkv:qkv", "joint_blocks.{i}.x_block.attn2.proj")


@pytest.fixture(scope="module")
def ref():
    return tiny_diffusers_mmdit("sd3.5", sigma=0.2)


@pytest.fixture(scope="module")
def base_file(ref, tmp_path_factory):
    """The diffusers model's weights as an SAI single file: what our model loads (and unloading re-reads)."""
    path = tmp_path_factory.mktemp("base") / "sd35.safetensors"
    rules = mmdit_rules(SD35_TINY.depth, SD35_TINY.dual_attention_layers, True)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file({"model.diffusion_model." + k: v for k, v in to_official(rules, sd.__getitem__)}, path)
    return path


def random_peft(ref, modules=PEFT_MODULES, rank=R, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m in modules:
        w = ref.get_submodule(m).weight
        conv = (1, 1) if w.ndim == 4 else ()  # peft's conv LoRA: A a conv like the base, B a 1x1 conv
        sd[f"{m}.lora_A.weight"] = torch.randn(rank, *w.shape[1:], generator=g) * 0.3
        sd[f"{m}.lora_B.weight"] = torch.randn(w.shape[0], rank, *conv, generator=g) * 0.3
    return sd


def diffusers_with_lora(ref, path):
    """`StableDiffusion3Pipeline.load_lora_weights` on the tiny transformer (no other component is needed)."""
    from diffusers import StableDiffusion3Pipeline

    parts = dict.fromkeys(("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                           "text_encoder_3", "tokenizer_3"))
    pipe = StableDiffusion3Pipeline(**parts, transformer=copy.deepcopy(ref))
    pipe.load_lora_weights(str(path))
    return pipe.transformer


def peft_keys(model) -> set[str]:
    """The LoRA tensors peft actually holds after loading, named as in a file without its prefix."""
    from peft.utils import get_peft_model_state_dict

    (adapter,) = model.peft_config  # diffusers names it default_0
    return set(get_peft_model_state_dict(model, adapter_name=adapter))


@torch.no_grad()
def run_diffusers_scaled(model, inp, scale):
    return model(hidden_states=inp["x"], encoder_hidden_states=inp["context"], pooled_projections=inp["y"],
                 timestep=inp["timesteps"], joint_attention_kwargs={"scale": scale}).sample


def assert_close(ours, expected):
    # merged (ours) vs unmerged (peft) LoRA in fp32, as test_lora_files.py (docs/models.md §7.1 measured 4.8e-7)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6 * max(1.0, expected.abs().max().item()))


def trained_set(targets=ALL_TARGETS, seed=0):
    """A tiny SD3.5 with a distill/ LoRA whose live set is random (as if trained), and that set as a LoRA."""
    model = randomize_(MMDiT(SD35_TINY), 0.2, seed).eval().requires_grad_(False)
    rec = Recommended(steps=4, schedule="scfm", shift=3.0, guidance=4.5, max_sequence_length=256,
                      training_cfg_scale=3.5)
    return model, random_lora(model, seed, rank=R, alpha=ALPHA, targets=targets, family="sd3", recommended=rec)


# ----- diffusers / PEFT files against diffusers' SD3 loader -------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_peft_file_applied_by_us_equals_diffusers(ref, base_file, tmp_path, scale):
    from diffusers import StableDiffusion3Pipeline

    StableDiffusion3Pipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=random_peft(ref),
        transformer_lora_adapter_metadata={"r": R, "lora_alpha": ALPHA, "target_modules": PEFT_MODULES})
    path = tmp_path / "pytorch_lora_weights.safetensors"
    theirs = diffusers_with_lora(ref, path)
    assert peft_keys(theirs) == {k.removeprefix("transformer.") for k in load_file(path)}  # conv included
    inp = tiny_inputs(SD35_TINY)
    expected = run_diffusers_scaled(theirs, inp, scale)
    ours = load_mmdit(base_file)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    base_out = run_ours(ours, inp)
    lora = read_lora(path)
    # 18 diffusers modules on 16 SAI layers; only SD3 has pos_embed.proj and attn2, so no hint is needed
    assert (lora.family, lora.layout, len(lora.modules)) == ("sd3", "diffusers", 16)
    add_k = lora.modules["joint_blocks.1.context_block.attn.qkv"]
    assert [p is None for p in add_k.parts] == [True, False, True]
    apply_loras(ours, [(path, scale)], base=base_file)
    assert_close(run_ours(ours, inp), expected)
    assert (expected - base_out).abs().max() > 0.1  # the LoRA really moves the output
    unload_loras(ours)
    assert_same_bits(ours.state_dict(), before)


def test_swapped_rows_are_the_last_context_adaln_and_the_final_adaln_only(ref, tmp_path):
    """diffusers' (scale, shift) halves: the SAI up rows are the PEFT B rows swapped; block 0's 6-way context
    adaLN keeps its order. Checked on the tensors, independently of any forward."""
    sd = random_peft(ref)
    save_file({f"transformer.{k}": v for k, v in sd.items()}, tmp_path / "p.safetensors")
    lora = read_lora(tmp_path / "p.safetensors")

    def up(official):
        return lora.modules[official].parts[0].up

    def swap(t):
        return torch.cat(t.chunk(2)[::-1])

    assert torch.equal(up(f"joint_blocks.{LAST}.context_block.adaLN_modulation.1"),
                       swap(sd[f"transformer_blocks.{LAST}.norm1_context.linear.lora_B.weight"]))
    assert torch.equal(up("final_layer.adaLN_modulation.1"), swap(sd["norm_out.linear.lora_B.weight"]))
    assert torch.equal(up("joint_blocks.0.context_block.adaLN_modulation.1"),
                       sd["transformer_blocks.0.norm1_context.linear.lora_B.weight"])
    assert up("x_embedder.proj").shape == (32, R, 1, 1)


# ----- an SCFM set from distill/lora.py, exported, in diffusers ---------------------------------------------


def test_scfm_set_exported_for_diffusers_loads_with_exactly_its_keys_and_the_same_output(ref, base_file,
                                                                                          tmp_path):
    ours = load_mmdit(base_file).requires_grad_(False)
    random_lora(ours, 5, rank=R, alpha=ALPHA, targets=SD3_TARGETS, family="sd3")
    slices = {m: layer.slices for m, layer in lora_layers(ours).items()}
    path = save_lora(set_state_dict(ours, "live"), tmp_path / "scfm.safetensors", layout="diffusers",
                     alpha=ALPHA, rank=R, slices=slices, family="sd3",
                     recommended=Recommended(guidance=4.5, training_cfg_scale=3.5))
    keys = set(load_file(path))
    assert "transformer.pos_embed.proj.lora_A.weight" in keys and not any(k.endswith(".alpha") for k in keys)
    meta = read_header(path)[1]
    hints = (meta["scfm_family"], meta["scfm_guidance"], meta["scfm_training_cfg_scale"])
    assert hints == ("sd3", "4.5", "3.5")
    theirs = copy.deepcopy(ref)
    # use_safetensors=True: without it diffusers 0.42.1's load_lora_adapter(path) reads the file but not its
    # lora_adapter_metadata, so alpha silently becomes r (load_lora_weights passes it on)
    theirs.load_lora_adapter(str(path), prefix="transformer", use_safetensors=True)
    # nothing missing, nothing unexpected
    assert peft_keys(theirs) == {k.removeprefix("transformer.") for k in keys}
    inp = tiny_inputs(SD35_TINY)
    assert_close(run_ours(ours, inp), run_diffusers(theirs, inp))  # the injected (training) forward


# ----- kohya / ComfyUI --------------------------------------------------------------------------------------


def comfyui_merge(model, sd: dict, strength: float) -> dict:
    """ComfyUI's rule, written from its public description (comfy/lora.py): each weight
    `diffusion_model.<path>.weight` answers to the stems `lora_unet_<path, '.' -> '_'>` and
    `diffusion_model.<path>`; the patch is strength * alpha / lora_down.shape[0] * (up.flatten(1) @
    down.flatten(1)).reshape(weight.shape), alpha = rank when absent."""
    out = {}
    for name, w in model.state_dict().items():
        if not name.endswith(".weight"):
            continue
        path = name.removesuffix(".weight")
        for stem in (f"lora_unet_{path.replace('.', '_')}", f"diffusion_model.{path}"):
            for down_key, up_key in ((".lora_down.weight", ".lora_up.weight"),
                                     (".lora_A.weight", ".lora_B.weight")):
                if stem + up_key in sd:
                    down, up = sd[stem + down_key].float(), sd[stem + up_key].float()
                    alpha = float(sd[stem + ".alpha"]) if stem + ".alpha" in sd else down.shape[0]
                    diff = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
                    out[name] = (w.float() + strength * alpha / down.shape[0] * diff).to(w.dtype)
    return out


def test_kohya_file_is_what_comfyui_merges_and_its_diffusion_model_variant_reads_the_same(tmp_path):
    model, lora = trained_set()
    write_lora(lora, tmp_path / "kohya.safetensors", "kohya")
    sd = load_file(tmp_path / "kohya.safetensors")
    assert sd["lora_unet_x_embedder_proj.lora_down.weight"].shape == (R, 16, 2, 2)
    assert sd["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"].shape == (3 * R, 32)  # per slice
    plain = randomize_(MMDiT(SD35_TINY), 0.2, 0).eval()
    expected = comfyui_merge(plain, sd, 0.7)
    assert len(expected) == len(lora.modules)  # every key answers to a weight: nothing left unloaded
    apply_loras(plain, [(lora, 0.7)])
    for name, w in expected.items():
        torch.testing.assert_close(plain.state_dict()[name], w, rtol=1e-6, atol=1e-7, msg=name)
    # ComfyUI's other spelling: dotted SAI names under diffusion_model., with lora_A / lora_B
    suffixes = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}
    names = {m.replace(".", "_"): m for m in lora.modules}
    comfy = {}
    for key, v in sd.items():
        stem, suffix = key.removeprefix("lora_unet_").split(".", 1)
        comfy[f"diffusion_model.{names[stem]}.{suffixes[suffix]}"] = v
    save_file(comfy, tmp_path / "comfy.safetensors")
    a, b = read_lora(tmp_path / "kohya.safetensors"), read_lora(tmp_path / "comfy.safetensors")
    assert a.family == b.family == "sd3" and a.layout == b.layout == "kohya"
    for m, mod in a.modules.items():
        torch.testing.assert_close(b.modules[m].delta(), mod.delta(), rtol=0, atol=0)


# ----- round trips and detection ----------------------------------------------------------------------------


def test_ours_schema_and_round_trips_through_kohya_and_peft(tmp_path):
    model, lora = trained_set()
    ours, meta = lora_state_dict(lora, "ours")
    assert meta["scfm_family"] == "sd3" and meta["scfm_training_cfg_scale"] == "3.5"
    assert ours["x_embedder.proj.lora_down"].shape == (R, 16, 2, 2)
    assert ours["x_embedder.proj.lora_up"].shape == (32, R, 1, 1)
    for first in ("ours", "kohya", "diffusers"):
        write_lora(lora, tmp_path / f"{first}.safetensors", first, overwrite=True)
        for second in ("ours", "kohya", "diffusers"):
            again = read_lora(tmp_path / f"{first}.safetensors")
            write_lora(again, tmp_path / "b.safetensors", second, overwrite=True)
            back = read_lora(tmp_path / "b.safetensors")
            assert (back.family, back.layout, back.recommended) == ("sd3", second, lora.recommended)
            tensors = lora_state_dict(back, "ours")[0]
            assert tensors.keys() == ours.keys()
            for k, v in ours.items():
                if "diffusers" in (first, second) and not k.endswith(".lora_down"):
                    # alpha / r = 3 folded into up: the deltas agree to one fp32 rounding
                    m = k.rsplit(".", 1)[0]
                    want = lora.modules[m].delta()
                    torch.testing.assert_close(back.modules[m].delta(), want, rtol=0,
                                               atol=1e-6 * want.abs().max().item())
                else:
                    assert torch.equal(tensors[k], v), (first, second, k)  # lossless, alpha included
    # our file applied equals the injected model's (training) forward
    inp = tiny_inputs(SD35_TINY)
    plain = randomize_(MMDiT(SD35_TINY), 0.2, 0).eval()
    apply_loras(plain, [tmp_path / "ours.safetensors"])
    assert_close(run_ours(plain, inp), run_ours(model, inp))


def test_a_lora_of_block_0_alone_round_trips_in_every_layout(tmp_path):
    """Names are built for one joint block more than a file names (weights/keymaps/lora.py `mmdit_depth`): a
    LoRA on block 0 only, context MLP and attention output included, must not read block 0 as the pre-only last
    block (which has neither). Written and read back in each layout: the same modules, the same deltas."""
    _, full = trained_set()
    lora = LoRA({m: v for m, v in full.modules.items() if m.startswith("joint_blocks.0.")}, family="sd3")
    assert {"joint_blocks.0.context_block.mlp.fc1", "joint_blocks.0.context_block.attn.proj",
            "joint_blocks.0.x_block.attn.qkv"} <= set(lora.modules)
    for layout in ("ours", "kohya", "diffusers"):
        write_lora(lora, tmp_path / f"{layout}.safetensors", layout)
        back = read_lora(tmp_path / f"{layout}.safetensors")
        assert (back.family, back.layout, set(back.modules)) == ("sd3", layout, set(lora.modules))
        for m, mod in lora.modules.items():
            want = mod.delta()  # diffusers: alpha / r = 3 folded into up, one fp32 rounding
            torch.testing.assert_close(back.modules[m].delta(), want, rtol=0, atol=1e-6 * want.abs().max().item(),
                                       msg=f"{layout}: {m}")


def test_family_from_metadata_names_hint_then_width(ref, tmp_path):
    # names only SD3 has, without any metadata
    for layout in ("kohya", "diffusers"):
        tensors, _ = lora_state_dict(trained_set()[1], layout)
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / f"{layout}.safetensors")
        assert read_lora(tmp_path / f"{layout}.safetensors").family == "sd3"
    # diffusers names both families use (transformer_blocks.0.attn.to_q): the hint, then the width, then Flux
    shared = {f"transformer.{k}": v for k, v in random_peft(ref, ["transformer_blocks.0.attn.to_q"]).items()}
    save_file(shared, tmp_path / "shared.safetensors")
    assert read_lora(tmp_path / "shared.safetensors").family == "flux"
    assert read_lora(tmp_path / "shared.safetensors", family="sd3").family == "sd3"
    save_file(shared, tmp_path / "stated.safetensors", {"scfm_family": "sd3"})
    assert read_lora(tmp_path / "stated.safetensors", family="flux").family == "sd3"  # the file's word wins
    wide = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 2432),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(2432, 2)}
    save_file(wide, tmp_path / "wide.safetensors")
    assert read_lora(tmp_path / "wide.safetensors").family == "sd3"  # SD3.5-large's width
    # applying a path reads it for the model's family
    model = randomize_(MMDiT(SD35_TINY), 0.2, 0).eval()
    apply_loras(model, [tmp_path / "shared.safetensors"])
    save_file(shared, tmp_path / "other.safetensors", {"scfm_family": "wan"})
    with pytest.raises(WeightsError, match="a LoRA for wan"):
        read_lora(tmp_path / "other.safetensors")


def test_loras_that_do_not_fit_are_refused(tmp_path):
    from model.flux import FLUX_CONFIGS, Flux

    _, lora = trained_set()
    with pytest.raises(WeightsError, match="a LoRA for SD3 / SD3.5; this model is Flux: pass a LoRA trained on Flux, "
                                           "or use this one with the SD3 / SD3.5 model it was made for"):
        apply_loras(Flux(FLUX_CONFIGS["tiny"]), [lora])
    no_dual = MMDiT(SD35_TINY.__class__(**{**SD35_TINY.to_dict(), "dual_attention_layers": ()}))
    with pytest.raises(WeightsError, match="x_block.adaLN_modulation.1 has shape \\[288, 32\\]"):
        apply_loras(no_dual, [lora])  # a dual block's 9-way adaLN on a plain block's 6-way one
    attn2 = LoRA({m: v for m, v in lora.modules.items() if ".attn2." in m}, family="sd3")
    with pytest.raises(WeightsError, match="SD3.5-medium LoRA"):
        apply_loras(no_dual, [attn2])
    assert all(isinstance(v, str) for v in lora.recommended.to_metadata().values())  # safetensors-ready
