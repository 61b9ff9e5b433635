"""LoRA files (weights/lora.py): PEFT and kohya files against diffusers, round trips, refusals, apply and
unload (docs/models.md §7, §9 rows 18-20)."""

import json

import pytest
import torch
from conftest import assert_same_bits, random_lora, randomize_
from flux_fixtures import run_ours, tiny_diffusers_flux, tiny_inputs
from safetensors.torch import save_file

from distill.lora import lora_layers, set_state_dict
from model.flux import FLUX_CONFIGS, Flux, FluxConfig
from weights import WeightsError, load_flux
from weights.io import read_header
from weights.keymaps import swap_halves, to_official
from weights.keymaps.flux import flux_rules
from weights.lora import Recommended, read_lora
from weights.lora_merge import applied_loras, apply_loras, unload_loras
from weights.lora_write import lora_state_dict, save_lora, write_lora

R, ALPHA = 2, 8.0
# diffusers modules with a PEFT LoRA: fused q/k/v (all three, and one alone), linear1 slices, both proj_out,
# the final adaLN (rows swapped), an embedder
PEFT_MODULES = [
    "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
    "transformer_blocks.1.attn.add_k_proj", "transformer_blocks.0.norm1.linear",
    "transformer_blocks.1.ff_context.net.2",
    "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out",
    *(f"single_transformer_blocks.1.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    "proj_out", "norm_out.linear", "x_embedder", "time_text_embed.guidance_embedder.linear_1",
]


@pytest.fixture(scope="module")
def ref():
    return tiny_diffusers_flux(sigma=0.2)


@pytest.fixture(scope="module")
def base_file(ref, tmp_path_factory):
    """The diffusers model's weights as a BFL checkpoint: the file our model is loaded from (and re-read)."""
    path = tmp_path_factory.mktemp("base") / "flux.safetensors"
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(dict(to_official(flux_rules(2, 2, True), sd.__getitem__)), path)
    return path


def random_peft(ref, modules=PEFT_MODULES, rank=R, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m in modules:
        out, inp = ref.get_submodule(m).weight.shape
        sd[f"{m}.lora_A.weight"] = torch.randn(rank, inp, generator=g) * 0.3
        sd[f"{m}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.3
    return sd


def diffusers_with_lora(ref, path):
    """`FluxPipeline.load_lora_weights` on the tiny transformer (no other components are needed)."""
    import copy

    from diffusers import FluxPipeline

    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=copy.deepcopy(ref))
    pipe.load_lora_weights(str(path))
    return pipe.transformer


@torch.no_grad()
def run_diffusers_scaled(model, inp, scale):
    return model(hidden_states=inp["img"], encoder_hidden_states=inp["txt"], pooled_projections=inp["y"],
                 timestep=inp["timesteps"], img_ids=inp["img_ids"], txt_ids=inp["txt_ids"],
                 guidance=inp["guidance"], joint_attention_kwargs={"scale": scale}).sample


def assert_close(ours, expected):
    # merged (ours) vs unmerged (peft) LoRA in fp32; docs/models.md §7.1 measured 4.8e-7
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6 * max(1.0, expected.abs().max().item()))


def state_dict_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----- diffusers / PEFT files against diffusers' loader (row 19) --------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_peft_file_applied_by_us_equals_diffusers(ref, base_file, tmp_path, scale):
    from diffusers import FluxPipeline

    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=random_peft(ref),
                                   transformer_lora_adapter_metadata={"r": R, "lora_alpha": ALPHA,
                                                                      "target_modules": PEFT_MODULES})
    path = tmp_path / "pytorch_lora_weights.safetensors"
    inp = tiny_inputs()
    expected = run_diffusers_scaled(diffusers_with_lora(ref, path), inp, scale)
    ours = load_flux(base_file)
    before = state_dict_copy(ours)
    base_out = run_ours(ours, inp)
    lora = read_lora(path)
    assert lora.layout == "diffusers" and len(lora.modules) == 11  # 16 diffusers modules on 11 BFL layers
    apply_loras(ours, [(lora, scale)], base=base_file)
    assert_close(run_ours(ours, inp), expected)
    assert (expected - base_out).abs().max() > 0.1  # the LoRA really moves the output
    unload_loras(ours)
    assert_same_bits(ours.state_dict(), before)


def test_peft_alpha_keys_and_our_folded_alpha_and_rank_patterns_load_the_same_in_diffusers(ref, base_file,
                                                                                           tmp_path):
    """`.alpha` keys in; out, alpha / r folded into B (alpha = r) with rank_pattern / alpha_pattern for the
    layers of another rank, the final `proj_out` among them."""
    modules = [m for m in PEFT_MODULES if m != "proj_out"]
    sd = random_peft(ref, modules) | random_peft(ref, ["single_transformer_blocks.1.proj_out", "proj_out"],
                                                 rank=3, seed=1)
    alphas = {m: ALPHA for m in modules} | {"single_transformer_blocks.1.proj_out": 5.0, "proj_out": 3.0}
    save_file({f"transformer.{k}": v for k, v in sd.items()} |
              {f"transformer.{m}.alpha": torch.tensor(a) for m, a in alphas.items()},
              tmp_path / "alphas.safetensors")
    write_lora(read_lora(tmp_path / "alphas.safetensors"), tmp_path / "ours_peft.safetensors", "diffusers")
    meta = json.loads(read_header(tmp_path / "ours_peft.safetensors")[1]["lora_adapter_metadata"])
    assert (meta["transformer.r"], meta["transformer.lora_alpha"]) == (R, R)
    # peft matches pattern keys as name suffixes: unanchored, "proj_out" (rank 3) would also claim every single
    # block's proj_out (rank 2) and diffusers would fail to load the file
    patterns = {"^proj_out": 3, r"^single_transformer_blocks\.1\.proj_out": 3}
    assert meta["transformer.rank_pattern"] == meta["transformer.alpha_pattern"] == patterns
    inp = tiny_inputs()
    # diffusers itself reads the source file wrong (its unanchored "proj_out" rank); it reads ours right, and
    # that is what we read from either file
    expected = run_diffusers_scaled(diffusers_with_lora(ref, tmp_path / "ours_peft.safetensors"), inp, 1.0)
    for path in ("alphas.safetensors", "ours_peft.safetensors"):
        ours = load_flux(base_file)
        apply_loras(ours, [tmp_path / path])
        assert_close(run_ours(ours, inp), expected)


def test_text_encoder_part_written_in_the_diffusers_layout_keeps_its_strength_in_diffusers_and_ours(ref, tmp_path):
    """A LoRA with a CLIP-L part as diffusers' save_lora_weights writes it (lora_alpha 16 at r 4; one module at
    rank 2, alpha 6 by rank / alpha patterns) through `write_lora(..., "diffusers")` and `convert.py lora --to
    diffusers`: its metadata describes the encoder as well (without, diffusers' load_lora_weights refuses the
    file and we read alpha = r), so diffusers and we apply the source's strength."""
    import copy

    from diffusers import FluxPipeline
    from test_pipeline import CLIP
    from text_fixtures import hf_clip

    from tools.convert import main as convert
    from weights.lora_text import encoder_parts

    clip, odd, g = hf_clip(CLIP, 0.1, seed=1), "encoder.layers.1.self_attn.q_proj", torch.Generator().manual_seed(3)
    te = {}
    for m in (f"encoder.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj")):
        out, inp = clip.get_submodule(m).weight.shape
        te[f"{m}.lora_A.weight"] = torch.randn(2 if m == odd else 4, inp, generator=g) * 0.3
        te[f"{m}.lora_B.weight"] = torch.randn(out, 2 if m == odd else 4, generator=g) * 0.3
    FluxPipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=random_peft(ref, PEFT_MODULES[:2]), text_encoder_lora_layers=te,
        transformer_lora_adapter_metadata={"r": R, "lora_alpha": ALPHA, "target_modules": PEFT_MODULES[:2]},
        text_encoder_lora_adapter_metadata={"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj"],
                                            "rank_pattern": {odd: 2}, "alpha_pattern": {odd: 6}},
        weight_name="source.safetensors")
    source, ours, converted = (tmp_path / f"{n}.safetensors" for n in ("source", "ours", "converted"))
    write_lora(read_lora(source), ours, "diffusers")
    assert convert(["lora", str(source), str(converted), "--to", "diffusers", "--family", "flux"]) == 0
    ids, inp = torch.tensor([[49406, 320, 1929, 4859, 49407]]), tiny_inputs()

    @torch.no_grad()
    def applied(path):
        pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=copy.deepcopy(clip), tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None, transformer=copy.deepcopy(ref))
        if path is not None:
            pipe.load_lora_weights(str(path))
        return pipe.text_encoder(ids).last_hidden_state, run_diffusers_scaled(pipe.transformer, inp, 1.0)

    plain, expected = applied(None)[0], applied(source)
    assert (expected[0] - plain).abs().max() > 0.1  # the CLIP-L part shows
    for path in (ours, converted):
        for got, want in zip(applied(path), expected):
            assert_close(got, want)

    def deltas(path):  # our reader: module -> scale * up @ down
        (part,) = encoder_parts(read_lora(path), 1.0, "flux")
        return {stem: p.scale * p.up @ p.down for stem, p in part.parts.items()}

    want = deltas(source)
    for path in (ours, converted):
        got = deltas(path)
        assert got.keys() == want.keys()
        for stem in want:
            torch.testing.assert_close(got[stem], want[stem])


# ----- kohya at real dimensions against diffusers' converter (row 18) ---------------------------------------

D = 3072
# (kohya stem, out, in, rank, block-diagonal slices or 0); every kind diffusers handles, and the keys it drops
KOHYA = [
    ("double_blocks_0_img_attn_qkv", 3 * D, D, 4, 0), ("double_blocks_0_txt_attn_qkv", 3 * D, D, 12, 3),
    ("single_blocks_0_linear1", 7 * D, D, 4, 0), ("single_blocks_1_linear1", 7 * D, D, 16, 4),
    ("double_blocks_0_img_attn_proj", D, D, 4, 0), ("double_blocks_0_img_mod_lin", 6 * D, D, 4, 0),
    ("double_blocks_0_txt_mlp_0", 4 * D, D, 4, 0), ("single_blocks_0_linear2", D, 5 * D, 4, 0),
    ("img_in", D, 64, 4, 0), ("txt_in", D, 4096, 4, 0), ("guidance_in_in_layer", D, 256, 4, 0),
    ("final_layer_linear", 64, D, 4, 0), ("final_layer_adaLN_modulation_1", 2 * D, D, 4, 0),
]
LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
# docs/models.md §2.4 written out by hand (not through our table): BFL module -> diffusers modules in row order
DIFFUSERS_OF = {
    "double_blocks.0.img_attn.qkv": [f"transformer_blocks.0.attn.to_{x}" for x in "qkv"],
    "double_blocks.0.txt_attn.qkv": [f"transformer_blocks.0.attn.add_{x}_proj" for x in "qkv"],
    **{f"single_blocks.{i}.linear1": [f"single_transformer_blocks.{i}.{m}" for m in LINEAR1] for i in (0, 1)},
    "double_blocks.0.img_attn.proj": ["transformer_blocks.0.attn.to_out.0"],
    "double_blocks.0.img_mod.lin": ["transformer_blocks.0.norm1.linear"],
    "double_blocks.0.txt_mlp.0": ["transformer_blocks.0.ff_context.net.0.proj"],
    "single_blocks.0.linear2": ["single_transformer_blocks.0.proj_out"],
}


def kohya_file(tmp_path, alpha=6.0):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for stem, out, inp, r, blocks in KOHYA:
        down, up = torch.randn(r, inp, generator=g) * 0.05, torch.randn(out, r, generator=g)
        if blocks:  # sd-scripts split_qkv: slice i's rows only use column block i
            rows = [out // 3] * 3 if blocks == 3 else [D] * 3 + [4 * D]
            mask = torch.block_diag(*[torch.ones(n, r // blocks) for n in rows])
            up = up * mask
        sd |= {f"lora_unet_{stem}.lora_down.weight": down, f"lora_unet_{stem}.lora_up.weight": up,
               f"lora_unet_{stem}.alpha": torch.tensor(alpha, dtype=torch.bfloat16)}  # bf16 0-dim, as saved
    save_file(sd, tmp_path / "kohya.safetensors")
    return tmp_path / "kohya.safetensors", sd


def test_kohya_at_real_dims_equals_diffusers_on_block_keys_and_our_math_on_the_rest(tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    path, sd = kohya_file(tmp_path)
    lora = read_lora(path)
    assert lora.layout == "kohya" and len(lora.modules) == len(KOHYA)  # every key kept, embedders included
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(sd))
    probes = torch.randn(5 * D, 6, generator=torch.Generator().manual_seed(1))

    def delta_theirs(name, x):
        return theirs[f"{name}.lora_B.weight"] @ (theirs[f"{name}.lora_A.weight"] @ x)

    def close(ours, expected):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())

    for official, others in DIFFUSERS_OF.items():
        x = probes[: lora.modules[official].in_features]
        expected = torch.cat([delta_theirs(f"transformer.{o}", x) for o in others])
        close(lora.modules[official].delta_times(x), expected)
    # the rest: diffusers emits them without the `transformer.` prefix, so its loader drops them (docs/models.md §7.3)
    unprefixed = {"x_embedder.lora_A.weight", "norm_out.linear.lora_B.weight", "proj_out.lora_A.weight"}
    assert unprefixed <= theirs.keys()
    for stem, out, inp, r, _ in KOHYA[8:]:
        official = next(m for m in lora.modules if m.replace(".", "_") == stem)
        x = probes[:inp]
        down, up = sd[f"lora_unet_{stem}.lora_down.weight"], sd[f"lora_unet_{stem}.lora_up.weight"]
        close(lora.modules[official].delta_times(x), 6.0 / r * (up @ (down @ x)))  # alpha / R, BFL row order
    # diffusers' final adaLN rows agree with ours once swapped back, apart from the alpha it forgets
    x = probes[:D]
    close(lora.modules["final_layer.adaLN_modulation.1"].delta_times(x),
          6.0 / 4 * swap_halves(delta_theirs("norm_out.linear", x)))


def test_kohya_split_qkv_alpha_trap(tmp_path):
    """Block-diagonal layers: generic loaders use alpha / (S r); sd-scripts trained at alpha / r
    (docs/models.md §7.2)."""
    path, _ = kohya_file(tmp_path)
    generic, per_slice = read_lora(path), read_lora(path, kohya_split_alpha="per_slice")
    x = torch.randn(D, 3, generator=torch.Generator().manual_seed(2))
    for stem, _, _, _, blocks in KOHYA[:4]:
        m = next(m for m in generic.modules if m.replace(".", "_") == stem)
        assert len(generic.modules[m].parts) == (blocks or 1)  # dense stays one LoRA, block-diagonal splits
        a, b = generic.modules[m].delta_times(x), per_slice.modules[m].delta_times(x)
        torch.testing.assert_close(b, a * (blocks or 1), rtol=1e-6, atol=0)


def test_comfyui_variants_read_as_kohya(tmp_path):
    """`diffusion_model.<BFL path>` with lora_A / lora_B is the same LoRA as `lora_unet_...lora_down / up`."""
    path, sd = kohya_file(tmp_path)
    names = {m.replace(".", "_"): m for m in read_lora(path).modules}
    suffixes = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}
    renamed = {}
    for key, v in sd.items():
        stem, suffix = key.removeprefix("lora_unet_").split(".", 1)
        renamed[f"diffusion_model.{names[stem]}.{suffixes[suffix]}"] = v
    save_file(renamed, tmp_path / "comfy.safetensors")
    kohya, comfy = read_lora(path), read_lora(tmp_path / "comfy.safetensors")
    assert comfy.layout == "kohya" and comfy.modules.keys() == kohya.modules.keys()
    for m, mod in kohya.modules.items():
        for a, b in zip(mod.parts, comfy.modules[m].parts):
            assert torch.equal(a.down, b.down) and torch.equal(a.up, b.up) and a.alpha == b.alpha


# ----- round trips (row 20) ---------------------------------------------------------------------------------


def trained_lora(seed=0):
    model = load_flux_tiny_random(seed)
    rec = Recommended(steps=4, schedule="scfm", shift=3.0, guidance=3.5, lora_scale=1.5,
                      max_sequence_length=512)
    return model, random_lora(model, seed, rank=R, alpha=ALPHA, recommended=rec)


def load_flux_tiny_random(seed):
    return randomize_(Flux(FLUX_CONFIGS["tiny"]), 0.2, seed).eval().requires_grad_(False)


def test_ours_schema_and_round_trips_through_kohya_and_peft(tmp_path):
    _, lora = trained_lora()
    ours, meta = lora_state_dict(lora, "ours")
    assert meta["scfm_format"] == "scfm-lora/1" and meta["scfm_family"] == "flux"
    assert [meta[f"scfm_{k}"] for k in ("rank", "alpha", "steps", "shift")] == ["2", "8.0", "4", "3.0"]
    assert len(json.loads(meta["scfm_targets"])) == len(lora.modules) == 2 * 10 + 2 * 3 + 10  # every Linear
    assert ours["single_blocks.0.linear1.lora_down"].shape == (4 * R, 32)  # per-slice: q, k, v, mlp
    assert ours["single_blocks.0.linear1.lora_up"].shape == (7 * 32, R)
    write_lora(lora, tmp_path / "ours.safetensors")
    back = read_lora(tmp_path / "ours.safetensors")
    assert back.recommended == lora.recommended and back.layout == "ours"
    for layout in ("ours", "kohya", "diffusers"):
        write_lora(back, tmp_path / f"{layout}.safetensors", layout, overwrite=True)
        again = read_lora(tmp_path / f"{layout}.safetensors")
        assert again.layout == layout and again.recommended == lora.recommended
        tensors = lora_state_dict(again, "ours")[0]
        assert tensors.keys() == ours.keys()
        for k, v in ours.items():
            if layout == "diffusers" and not k.endswith(".lora_down"):  # alpha / r = 4 folded into up, exactly
                m = k.rsplit(".", 1)[0]
                assert torch.equal(again.modules[m].delta(), lora.modules[m].delta()), k
            else:
                assert torch.equal(tensors[k], v), (layout, k)  # lossless, alpha included
    # kohya: a block-diagonal layer stores alpha * S, so a generic loader's alpha / lora_down.shape[0] is ours
    kohya = lora_state_dict(lora, "kohya")[0]
    stem = "lora_unet_double_blocks_0_img_attn_qkv"
    down, up, alpha = (kohya[f"{stem}.{k}"] for k in ("lora_down.weight", "lora_up.weight", "alpha"))
    assert down.shape == (3 * R, 32) and float(alpha) == 3 * ALPHA
    ours_delta = lora.modules["double_blocks.0.img_attn.qkv"].delta()
    torch.testing.assert_close(float(alpha) / down.shape[0] * up @ down, ours_delta, rtol=1e-6, atol=1e-7)


def test_partial_and_mixed_rank_fused_peft_loras_convert_with_the_same_delta(ref, tmp_path):
    """q alone on one fused layer, q and k of different ranks on another: zero-padded for ours and kohya."""
    sd = random_peft(ref) | random_peft(ref, ["transformer_blocks.0.attn.to_k"], rank=3, seed=1)
    sd["proj_out.alpha"] = torch.tensor(5.0)
    save_file({f"transformer.{k}": v for k, v in sd.items()}, tmp_path / "peft.safetensors")
    lora = read_lora(tmp_path / "peft.safetensors")
    assert [p is None for p in lora.modules["double_blocks.1.txt_attn.qkv"].parts] == [True, False, True]
    for layout in ("ours", "kohya", "diffusers"):
        write_lora(lora, tmp_path / f"{layout}.safetensors", layout)
        again = read_lora(tmp_path / f"{layout}.safetensors")
        assert again.modules.keys() == lora.modules.keys()
        for m, mod in lora.modules.items():
            torch.testing.assert_close(again.modules[m].delta(), mod.delta(), rtol=1e-6, atol=1e-7)


def test_save_lora_from_a_training_set_and_the_trainers_own_file(tmp_path):
    """`save_lora` as distill/train.py calls it, and the trainer's `scfm_lora`-metadata file read as ours."""
    model, lora = trained_lora()
    state = set_state_dict(model, "live")
    slices = {m: layer.slices for m, layer in lora_layers(model).items()}
    trainer_meta = {"scfm_lora": json.dumps({"rank": R, "alpha": ALPHA, "t5_length": 256, "steps": 10_000})}
    for layout in ("ours", "diffusers", "kohya"):
        path = save_lora(state, tmp_path / f"{layout}.safetensors", layout=layout, rank=R, alpha=ALPHA,
                         slices=slices, metadata=trainer_meta)
        assert read_header(path)[1]["scfm_lora"] == trainer_meta["scfm_lora"]  # kept beside ours
        assert lora_state_dict(read_lora(path), "ours")[0].keys() == lora_state_dict(lora, "ours")[0].keys()
    with pytest.raises(WeightsError, match="do not match rank 3"):
        save_lora(state, tmp_path / "bad.safetensors", alpha=ALPHA, rank=3)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "trainer.safetensors", trainer_meta)
    read = read_lora(tmp_path / "trainer.safetensors")
    assert read.layout == "ours" and read.recommended.max_sequence_length == 256
    for k, v in lora_state_dict(lora, "ours")[0].items():
        assert torch.equal(lora_state_dict(read, "ours")[0][k], v), k


def test_dense_kohya_round_trips_through_ours_unchanged(tmp_path):
    path, sd = kohya_file(tmp_path)
    write_lora(read_lora(path), tmp_path / "ours.safetensors")
    tensors = lora_state_dict(read_lora(tmp_path / "ours.safetensors"), "kohya")[0]
    assert tensors.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(tensors[k].to(v.dtype), v), k


def test_our_file_applied_equals_the_training_forward():
    """The schema means what distill/lora.py computes: merging our file equals the injected model's output."""
    model, lora = trained_lora()
    inp = tiny_inputs()
    trained = run_ours(model, inp)
    plain = load_flux_tiny_random(0)
    apply_loras(plain, [lora])
    assert_close(run_ours(plain, inp), trained)


# ----- applying several, unloading bit-exactly --------------------------------------------------------------


@pytest.mark.parametrize("use_base", [True, False])
def test_several_loras_merge_with_their_scales_and_unload_bit_exactly(ref, base_file, tmp_path, use_base):
    _, ours_lora = trained_lora(seed=3)
    write_lora(ours_lora, tmp_path / "a.safetensors", "kohya")
    save_file({f"transformer.{k}": v for k, v in random_peft(ref).items()}, tmp_path / "b.safetensors")
    model = load_flux(base_file, dtype=torch.bfloat16)
    before = state_dict_copy(model)
    a, b = read_lora(tmp_path / "a.safetensors"), read_lora(tmp_path / "b.safetensors")
    apply_loras(model, [(a, 0.7), (b, -1.3)], base=base_file if use_base else None)
    assert len(applied_loras(model)) == 2
    for m in ("double_blocks.0.img_attn.qkv", "final_layer.adaLN_modulation.1", "img_in"):
        expected = before[f"{m}.weight"].float() + 0.7 * a.modules[m].delta() + (
            -1.3 * b.modules[m].delta() if m in b.modules else 0)
        assert torch.equal(model.get_submodule(m).weight, expected.to(torch.bfloat16)), m  # one rounding
    state = model._scfm_loras
    # nothing held with base=; otherwise copies of the touched weights only
    assert len(state.originals) == (0 if use_base else len(state.touched))
    unload_loras(model)
    assert_same_bits(model.state_dict(), before)
    assert applied_loras(model) == []


def test_base_that_differs_from_the_model_is_refused_before_any_change(base_file):
    model = load_flux(base_file)
    with torch.no_grad():
        model.img_in.weight[0, 0] += 1
    before = state_dict_copy(model)
    _, lora = trained_lora()
    with pytest.raises(WeightsError, match="differs from the model's"):
        apply_loras(model, [lora], base=base_file)
    assert_same_bits(model.state_dict(), before)


# ----- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keys, message", [
    (["lora_unet_double_blocks_0_img_attn_qkv.lokr_w1", "lora_unet_img_in.lokr_w2"], "LoKr"),
    (["lora_unet_img_in.hada_w1_a", "lora_unet_img_in.hada_w1_b"], "LoHa"),
    ([f"lora_unet_img_in.{k}" for k in ("lora_down.weight", "lora_up.weight", "dora_scale")], "DoRA"),
    (["transformer.x_embedder.lora_A.weight", "transformer.x_embedder.lora_magnitude_vector"], "DoRA"),
    # a full difference is applied where it has a place (tests/test_foreign_loras.py), refused where it has none
    (["diffusion_model.double_blocks.0.img_attn.norm.query_norm.diff"], "no parameter with a place"),
    (["img_in.weight", "img_in.bias"], "no LoRA tensors"),
    # SD3's joint_blocks names are LoRA layers now (test_sd3_lora_files.py); an SD1.5 UNet's are not
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "names no Flux Linear"),
    (["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"], "needs both down"),
    (["lora_unet_img_in.lora_down.weight"], "needs both down"),
])
def test_other_files_are_refused_in_one_line(tmp_path, keys, message):
    save_file({k: torch.zeros(2, 2) for k in keys}, tmp_path / "x.safetensors")
    with pytest.raises(WeightsError, match=message) as e:
        read_lora(tmp_path / "x.safetensors")
    assert "\n" not in str(e.value)


def test_loras_that_do_not_fit_the_model_are_refused(base_file, tmp_path):
    model = load_flux(base_file)
    path, _ = kohya_file(tmp_path)
    with pytest.raises(WeightsError, match="different model size"):
        apply_loras(model, [path])
    _, lora = trained_lora()
    lora.modules["double_blocks.5.img_mod.lin"] = lora.modules["double_blocks.0.img_mod.lin"]
    with pytest.raises(WeightsError, match="double_blocks.5.img_mod.lin is not in this model"):
        apply_loras(model, [lora])
    _, lora = trained_lora()  # has guidance_in LoRAs, like every SCFM LoRA for dev
    schnell = Flux(FluxConfig(**{**model.config.to_dict(), "guidance_embed": False}))
    with pytest.raises(WeightsError, match="schnell"):
        apply_loras(schnell, [lora])
    lora.family = "sd3"
    with pytest.raises(WeightsError, match=r"a LoRA for SD3 / SD3.5; this model is Flux: pass a LoRA trained on Flux"):
        apply_loras(model, [lora])


def test_text_encoder_keys_are_kept_apart(tmp_path, ref):
    sd = {"lora_unet_img_in.lora_down.weight": torch.randn(2, 16),
          "lora_unet_img_in.lora_up.weight": torch.randn(32, 2)}
    te = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 8)}
    save_file(sd | te, tmp_path / "k.safetensors")
    lora = read_lora(tmp_path / "k.safetensors")
    assert set(lora.text_encoders) == set(te) and list(lora.modules) == ["img_in"]
    assert set(lora_state_dict(lora, "kohya")[0]) == set(sd) | set(te) | {"lora_unet_img_in.alpha"}
    with pytest.raises(WeightsError, match="text-encoder keys in the kohya layout"):
        lora_state_dict(lora, "diffusers")
    model = load_flux_tiny_random(0)
    with pytest.raises(WeightsError, match="ignore_text_encoders=True"):
        apply_loras(model, [lora])
    apply_loras(model, [lora], ignore_text_encoders=True)


def test_one_shot_apply_keeps_nothing_and_refuses_unload(tmp_path):
    import pytest as _pytest

    from model.flux import FLUX_CONFIGS, Flux
    from weights.io import WeightsError
    from weights.lora import ModuleLoRA  # noqa: F401
    from weights.lora_merge import apply_loras, unload_loras

    torch.manual_seed(0)
    model = Flux(FLUX_CONFIGS["tiny"]).eval()
    before = model.img_in.weight.clone()
    lora_path = tmp_path / "l.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_img_in.lora_down.weight": torch.randn(2, 16),
               "lora_unet_img_in.lora_up.weight": torch.randn(32, 2), "lora_unet_img_in.alpha": torch.tensor(2.0)},
              lora_path)
    apply_loras(model, [lora_path], restorable=False)
    assert model._scfm_loras.originals == {}
    assert not torch.equal(model.img_in.weight, before)
    with _pytest.raises(WeightsError, match="restorable=False"):
        unload_loras(model)


def test_a_fused_layer_with_one_slice_at_alpha_0_writes_in_every_layout(tmp_path):
    """A diffusers file may give one slice of a fused layer alpha 0 (read as no effect, as diffusers and ComfyUI
    read it) and another a real alpha: writing one alpha for the layer took the first slice's, and divided by 0."""
    from weights.lora import LoRA, LoRAPart, ModuleLoRA

    g = torch.Generator().manual_seed(0)
    part = lambda a: LoRAPart(torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), a)  # noqa: E731
    name = "double_blocks.0.img_attn.qkv"
    lora = LoRA({name: ModuleLoRA([part(0.0), part(4.0), None], (8, 8, 8))}, family="flux")
    delta = lambda p: torch.zeros(8, 8) if p is None else p.scale * p.up @ p.down  # noqa: E731
    for layout in ("ours", "kohya", "diffusers"):
        back = read_lora(write_lora(lora, tmp_path / f"{layout}.safetensors", layout), family="flux").modules[name]
        for a, b in zip(lora.modules[name].parts, back.parts):
            torch.testing.assert_close(delta(b), delta(a), rtol=0, atol=1e-6)
