"""tools/convert.py, continued from test_convert.py: merging into all-in-one files keeps their VAE and text
encoders; FLUX.2 [klein] LoRAs (musubi-tuner, ai-toolkit and diffusers names) are FLUX.2's for info, lora and
merge, by the base or by the released sizes their shapes fit, with --family where those leave it open; the
disk's errors are one line; --ignore-te-lora; PEFT save_pretrained folders; a damaged model_index.json."""

import errno
import json
import os

import pytest
import torch
from conftest import randomize_
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.flux import FLUX_CONFIGS, Flux
from model.flux2 import FLUX2_CONFIGS, Flux2
from tools.convert import main
from weights import load_flux
from weights.families import detect_family
from weights.io import WeightsError
from weights.keymaps.flux2 import flux2_rules
from weights.keymaps.lora import TEXT_ENCODER_PREFIXES
from weights.lora import LoRA, LoRAPart, ModuleLoRA, read_lora
from weights.lora_merge import apply_loras
from weights.lora_write import write_lora
from weights.transformer import load_flux2, save_transformer, transformer_state_dict

KLEIN = FLUX2_CONFIGS["tiny"]
H, M = KLEIN.hidden_size, KLEIN.mlp_hidden_dim  # 64, 192


def bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        assert torch.equal(bits(v), bits(sb[k])), k


def assert_same_deltas(a: LoRA, b: LoRA):
    assert a.modules.keys() == b.modules.keys()
    for m, mod in a.modules.items():
        torch.testing.assert_close(b.modules[m].delta("cpu"), mod.delta("cpu"), rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def flux_base(tmp_path_factory):
    model = randomize_(Flux(FLUX_CONFIGS["tiny"]), 0.2, seed=4)
    return save_transformer(model, tmp_path_factory.mktemp("flux") / "flux-tiny.safetensors")


@pytest.fixture(scope="module")
def klein_base(tmp_path_factory):
    model = randomize_(Flux2(KLEIN), 0.2, seed=5)
    return save_transformer(model, tmp_path_factory.mktemp("klein") / "flux-2-klein-tiny.safetensors")


def flux_lora(modules, seed=0, rank=2, alpha=4.0):
    """A FLUX.1 tiny LoRA: official module -> (out, in), one dense part each."""
    g = torch.Generator().manual_seed(seed)
    return LoRA({m: ModuleLoRA([LoRAPart(torch.randn(rank, i, generator=g) * 0.3, torch.randn(o, rank, generator=g)
                                         * 0.3, alpha)], (o,)) for m, (o, i) in modules.items()}, source="random")


# ----- merge into an all-in-one checkpoint ------------------------------------------------------------------


def test_merge_into_an_all_in_one_file_keeps_its_vae_and_text_encoders_bit_for_bit(flux_base, tmp_path, capsys):
    """A ComfyUI-style checkpoint: the transformer under model.diffusion_model., a VAE, a CLIP in bf16 and a
    scaled-fp8 T5 (its scale and marker keys beside it): every key outside the transformer comes out as stored
    (also under --dtype, which casts the transformer only), the transformer as applying the LoRA at run time."""
    g = torch.Generator().manual_seed(1)
    aio = tmp_path / "aio.safetensors"
    sd = {"model.diffusion_model." + k: v.contiguous() for k, v in
          transformer_state_dict(load_flux(flux_base)).items()}
    others = {"first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3, generator=g),
              "first_stage_model.decoder.conv_out.bias": torch.randn(3, generator=g),
              "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight":
                  torch.randn(32, generator=g).bfloat16(),
              "text_encoders.clip_l.logit_scale": torch.tensor(4.6),
              "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight":
                  torch.randn(16, 16, generator=g).to(torch.float8_e4m3fn),
              "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.scale_weight":
                  torch.tensor(0.25),
              "text_encoders.t5xxl.transformer.scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
              "text_encoders.t5xxl.position_ids": torch.arange(7)}
    config = json.dumps({"family": "flux", "config": FLUX_CONFIGS["tiny"].to_dict()})
    save_file(sd | others, aio, metadata={"scfm_config": config, "modelspec.title": "my all-in-one"})
    lora = flux_lora({"double_blocks.0.img_attn.qkv": (96, 32), "single_blocks.1.linear2": (32, 160)})
    write_lora(lora, tmp_path / "l.safetensors", "kohya")

    for dtype in (None, "bf16"):
        out = tmp_path / f"merged-{dtype}.safetensors"
        extra = ("--dtype", dtype) if dtype else ()
        code, _, err = run(capsys, "merge", "--base", aio, "--lora", tmp_path / "l.safetensors", "--out", out, *extra)
        assert code == 0, err
        merged = load_file(out)
        assert merged.keys() == (sd | others).keys()  # nothing dropped, nothing added
        for k, t in others.items():
            assert merged[k].dtype == t.dtype and torch.equal(bits(merged[k]), bits(t)), k
        with safe_open(str(out), "pt") as f:
            assert f.metadata()["modelspec.title"] == "my all-in-one"  # the file's own metadata travels too
        expected = load_flux(aio, dtype=torch.bfloat16 if dtype else torch.float32)
        apply_loras(expected, [(read_lora(tmp_path / "l.safetensors"), 1.0)])
        assert_same_state(load_flux(out, dtype=torch.bfloat16 if dtype else torch.float32), expected)
        assert all(merged[k].dtype == (torch.bfloat16 if dtype else torch.float32) for k in sd)
    assert any(not torch.equal(merged[k].float(), sd[k].bfloat16().float()) for k in sd)  # the LoRA moved it
    code, _, err = run(capsys, "checkpoint", aio, tmp_path / "d", "--to", "diffusers")  # transformer only: said
    assert code == 0 and "holds 8 tensors outside the transformer" in err and "first_stage_model" in err, err


@pytest.mark.parametrize("per_row", [False, True], ids=["scale_weight", "weight_scale"])
def test_merge_into_a_scaled_fp8_base_writes_bf16_not_fp32(flux_base, tmp_path, capsys, per_row):
    """A ComfyUI scaled-fp8 base (dequantized as it is read) merged without --dtype: the transformer's weights come
    out in bf16, as loading the base in bf16 and applying the LoRA gives, and the line says so; --dtype fp32
    keeps every bit of the dequantized values. Before, "keep" wrote fp32: four times the fp8 file."""
    from conftest import comfy_scaled_fp8

    plain = {k: v.contiguous() for k, v in transformer_state_dict(load_flux(flux_base)).items()}
    tensors, _ = comfy_scaled_fp8(plain, per_row=per_row)
    base = tmp_path / "fp8.safetensors"
    save_file(tensors, base, metadata={"scfm_config": json.dumps({"family": "flux",
                                                                  "config": FLUX_CONFIGS["tiny"].to_dict()})})
    lora = flux_lora({"double_blocks.0.img_attn.qkv": (96, 32), "single_blocks.1.linear2": (32, 160)})
    write_lora(lora, tmp_path / "l.safetensors", "kohya")
    for dtype, want in ((None, torch.bfloat16), ("fp32", torch.float32)):
        out = tmp_path / f"merged-{dtype}.safetensors"
        extra = ("--dtype", dtype) if dtype else ()
        code, _, err = run(capsys, "merge", "--base", base, "--lora", tmp_path / "l.safetensors", "--out", out, *extra)
        assert code == 0, err
        assert ("stores its transformer's weights in fp8; they are written in bf16" in err) == (dtype is None)
        merged = load_file(out)
        assert {t.dtype for k, t in merged.items() if k.endswith(".weight")} == {want}
        assert not any(k.endswith(("scale_weight", "weight_scale", "scaled_fp8")) for k in merged)
        expected = load_flux(base, dtype=want)
        apply_loras(expected, [(read_lora(tmp_path / "l.safetensors"), 1.0)])
        assert_same_state(load_flux(out, dtype=want), expected)


# ----- FLUX.2 [klein] LoRAs ---------------------------------------------------------------------------------

DIFFUSERS_NAMES = {r.official: r.others for r in flux2_rules(8, 24, False, modules=True)}


def klein_file(path, shapes: dict[str, tuple[int, int]], tool: str, rank=2, seed=0):
    """A klein LoRA as `tool` writes it (docs/flux2.md §5): musubi-tuner (kohya lora_unet_ names with
    alpha), ai-toolkit (diffusion_model.<BFL module> lora_A / lora_B, no alpha) or diffusers / PEFT (the fused
    qkv as to_q / to_k / to_v, each with its own A)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for module, (out, inp) in shapes.items():
        def pair(rows):
            return torch.randn(rank, inp, generator=g) * 0.2, torch.randn(rows, rank, generator=g) * 0.2

        if tool == "diffusers":
            others = DIFFUSERS_NAMES[module]
            for other in others:
                a, b = pair(out // len(others))
                sd |= {f"transformer.{other}.lora_A.weight": a, f"transformer.{other}.lora_B.weight": b}
        elif tool == "ai-toolkit":
            a, b = pair(out)
            sd |= {f"diffusion_model.{module}.lora_A.weight": a, f"diffusion_model.{module}.lora_B.weight": b}
        else:
            a, b = pair(out)
            stem = "lora_unet_" + module.replace(".", "_")
            sd |= {f"{stem}.lora_down.weight": a, f"{stem}.lora_up.weight": b, f"{stem}.alpha": torch.tensor(1.0)}
    save_file(sd, path)
    return path


TINY_FULL = {"double_blocks.0.img_attn.qkv": (3 * H, H), "double_blocks.1.txt_attn.proj": (H, H),
             "double_blocks.0.img_mlp.0": (2 * M, H), "double_blocks.1.txt_mlp.2": (H, M),
             "single_blocks.1.linear1": (3 * H + 2 * M, H), "single_blocks.0.linear2": (H, H + M)}
TINY_ATTENTION = {"double_blocks.0.img_attn.qkv": (3 * H, H), "double_blocks.1.txt_attn.proj": (H, H)}


@pytest.mark.parametrize("tool", ["musubi", "ai-toolkit", "diffusers"])
@pytest.mark.parametrize("shapes", [TINY_FULL, TINY_ATTENTION], ids=["blocks", "attention"])
def test_klein_loras_are_flux2_for_info_lora_and_merge(klein_base, tool, shapes, tmp_path, capsys):
    """No scfm_family in these files, and most of their names are FLUX.1's too: info and lora tell FLUX.2 by the
    released (here: the tiny preset's) shapes, merge by its klein base; the diffusers file convert.py writes holds
    FLUX.2's names and the same deltas, and the merged checkpoint equals applying the LoRA at run time."""
    src = klein_file(tmp_path / f"{tool}.safetensors", shapes, tool)
    want = read_lora(src, family="flux2")  # what the model decides (weights/lora.py)
    assert want.family == "flux2" and want.modules.keys() == shapes.keys()

    code, out, err = run(capsys, "info", src)
    assert code == 0 and "family: LoRA for flux2" in out and "fits: flux2" in out, out + err

    code, _, err = run(capsys, "lora", src, tmp_path / "peft.safetensors", "--to", "diffusers")
    assert code == 0 and err == "", err
    written = load_file(tmp_path / "peft.safetensors")
    names = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in written}
    assert names == {o for m in shapes for o in DIFFUSERS_NAMES[m]}  # FLUX.2's diffusers modules, not FLUX.1's
    back = read_lora(tmp_path / "peft.safetensors")
    assert back.family == "flux2"  # its scfm_family, so every reader after us knows
    assert_same_deltas(want, back)

    code, _, err = run(capsys, "merge", "--base", klein_base, "--lora", src, "--out", tmp_path / "m.safetensors")
    assert code == 0, err
    expected = load_flux2(klein_base)
    apply_loras(expected, [(want, 1.0)])
    assert_same_state(load_flux2(tmp_path / "m.safetensors"), expected)


def test_the_diffusers_file_of_a_musubi_klein_lora_matches_diffusers_own_converter(tmp_path, capsys):
    """The oracle for `lora --to diffusers` on a klein LoRA: diffusers' kohya FLUX.2 converter gives the same keys
    and, per module, the same B @ A (alpha / r folded in on both sides)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux2_lora_to_diffusers

    src = klein_file(tmp_path / "musubi.safetensors", TINY_FULL, "musubi")
    assert run(capsys, "lora", src, tmp_path / "peft.safetensors", "--to", "diffusers")[0] == 0
    ours = load_file(tmp_path / "peft.safetensors")
    theirs = _convert_kohya_flux2_lora_to_diffusers(load_file(src))
    assert ours.keys() == theirs.keys()
    for k in (k for k in ours if k.endswith("lora_A.weight")):
        b = k.replace("lora_A", "lora_B")
        torch.testing.assert_close(ours[b] @ ours[k], theirs[b] @ theirs[k], rtol=1e-6, atol=1e-7)


def test_released_sizes_tell_klein_from_flux1_and_family_decides_the_rest(tmp_path, capsys):
    """Real widths at rank 1 (small files): klein 9B attention (4096 wide) is FLUX.2's; a klein 9B single block
    (linear2 in 16384) already for read_lora alone; FLUX.1 attention in double block 10 (klein has 5 / 8) stays
    FLUX.1's; klein 4B attention (3072 wide, block 0) fits FLUX.1 dev as well: lora refuses in one line naming
    --family, info says both, --family flux2 chooses; --family against the names is refused."""
    h4, h9 = 3072, 4096
    klein9 = klein_file(tmp_path / "k9.safetensors", {"double_blocks.7.img_attn.qkv": (3 * h9, h9),
                                                      "double_blocks.7.img_attn.proj": (h9, h9)}, "diffusers", rank=1)
    code, out, err = run(capsys, "info", klein9)
    assert code == 0 and "family: LoRA for flux2 (by its shapes: klein-9b)" in out, out + err
    assert run(capsys, "lora", klein9, tmp_path / "k9o.safetensors", "--to", "kohya")[0] == 0
    assert read_lora(tmp_path / "k9o.safetensors").family == "flux2"

    single9 = klein_file(tmp_path / "s9.safetensors", {"single_blocks.3.linear2": (h9, 4 * h9)}, "musubi", rank=1)
    assert read_lora(single9).family == "flux2"  # the width tiebreak: no FLUX.1 layer is 16384 wide

    flux1 = klein_file(tmp_path / "f1.safetensors", {"double_blocks.10.img_attn.qkv": (3 * h4, h4)}, "musubi",
                       rank=1)
    code, out, err = run(capsys, "lora", flux1, tmp_path / "f1o.safetensors", "--to", "diffusers")
    assert code == 0 and err == "", err
    assert read_lora(tmp_path / "f1o.safetensors").family == "flux"

    klein4 = klein_file(tmp_path / "k4.safetensors", {"double_blocks.0.img_attn.qkv": (3 * h4, h4),
                                                      "double_blocks.4.txt_attn.proj": (h4, h4)}, "ai-toolkit", rank=1)
    code, _, err = run(capsys, "lora", klein4, tmp_path / "k4o.safetensors", "--to", "diffusers")
    assert code == 2 and err.count("\n") == 1 and "--family flux or --family flux2" in err, err
    assert "FLUX.1 (flux-dev, flux-schnell)" in err and "FLUX.2 (klein-4b)" in err
    assert not (tmp_path / "k4o.safetensors").exists()
    code, out, _ = run(capsys, "info", klein4)
    assert code == 0 and "family: LoRA for flux or flux2" in out and "--family" in out, out
    assert run(capsys, "lora", klein4, tmp_path / "k4o.safetensors", "--to", "diffusers", "--family", "flux2")[0] == 0
    assert read_lora(tmp_path / "k4o.safetensors").family == "flux2"
    assert "family: LoRA for flux2" in run(capsys, "info", klein4, "--family", "flux2")[1]

    flux_only = tmp_path / "mod.safetensors"  # img_mod: a FLUX.1 layer FLUX.2 does not have
    save_file({"lora_unet_double_blocks_0_img_mod_lin.lora_down.weight": torch.zeros(1, h4),
               "lora_unet_double_blocks_0_img_mod_lin.lora_up.weight": torch.zeros(6 * h4, 1)}, flux_only)
    code, _, err = run(capsys, "lora", flux_only, tmp_path / "x.safetensors", "--to", "ours", "--family", "flux2")
    assert code == 2 and err.count("\n") == 1 and "names are no flux2 model's (they read as flux)" in err, err


# ----- the disk's errors ------------------------------------------------------------------------------------


def test_os_errors_are_one_line_with_exit_code_2(tmp_path, capsys, monkeypatch):
    src = tmp_path / "l.safetensors"
    write_lora(flux_lora({"double_blocks.0.img_attn.proj": (32, 32)}), src, "ours")
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir").mkdir()
    cases = [(("lora", src, tmp_path / "afile" / "x.safetensors", "--to", "kohya"), "afile"),
             # refused before the disk's EISDIR, naming the fix (tests/test_user_errors_weights.py)
             (("lora", src, tmp_path / "adir", "--to", "kohya", "--overwrite"), "adir: an existing folder, and a LoRA "
              f"is one file, not a folder; name a .safetensors file (e.g. {tmp_path / 'adir' / 'l.safetensors'})")]
    for argv, words in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and words in err, err

    def full(lora, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("tools.convert.write_lora", full)
    out = tmp_path / "out.safetensors"
    code, _, err = run(capsys, "lora", src, out, "--to", "kohya")
    assert code == 2 and err == f"error: {out}: {os.strerror(errno.ENOSPC)}; free disk space or write OUT to " \
                                "another disk\n", err


# ----- text-encoder keys, PEFT folders ----------------------------------------------------------------------


def test_text_encoder_keys_are_left_out_with_ignore_te_lora(flux_base, tmp_path, capsys):
    g = torch.Generator().manual_seed(2)
    te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    src = tmp_path / "kohya_te.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(2, 32, generator=g),
               "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(32, 2, generator=g),
               "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(2.0),
               f"{te}.lora_down.weight": torch.randn(2, 32, generator=g),
               f"{te}.lora_up.weight": torch.randn(32, 2, generator=g), f"{te}.alpha": torch.tensor(2.0)}, src)
    full = read_lora(src)
    for layout in ("diffusers", "ours"):
        out = tmp_path / f"{layout}.safetensors"
        code, _, err = run(capsys, "lora", src, out, "--to", layout)
        assert code == 2 and err.count("\n") == 1 and "--ignore-te-lora" in err and not out.exists(), err
        code, _, err = run(capsys, "lora", src, out, "--to", layout, "--ignore-te-lora")
        assert code == 0 and "--ignore-te-lora: the text-encoder part of kohya_te.safetensors (3 keys)" in err, err
        assert not any(k.startswith(TEXT_ENCODER_PREFIXES) for k in load_file(out))
        assert_same_deltas(full, read_lora(out))
    assert run(capsys, "lora", src, tmp_path / "k.safetensors", "--to", "kohya")[0] == 0  # its own layout keeps them
    assert sum(k.startswith("lora_te1_") for k in load_file(tmp_path / "k.safetensors")) == 3

    merged = tmp_path / "m.safetensors"
    code, _, err = run(capsys, "merge", "--base", flux_base, "--lora", src, "--out", merged)
    assert code == 2 and err.count("\n") == 1 and "--ignore-te-lora" in err and not merged.exists(), err
    code, _, err = run(capsys, "merge", "--base", flux_base, "--lora", f"{src}:0.5", "--out", merged,
                       "--ignore-te-lora")
    assert code == 0 and "is not merged" in err, err
    expected = load_flux(flux_base)
    apply_loras(expected, [(src, 0.5)], ignore_text_encoders=True)
    assert_same_state(load_flux(merged), expected)


def test_lora_converts_a_peft_save_pretrained_folder(tmp_path, capsys):
    """adapter_model.safetensors (base_model.model. names) with adapter_config.json's lora_alpha = 2 r: the folder
    converts as read_lora and info read it, alpha included."""
    lora = flux_lora({"double_blocks.0.img_attn.proj": (32, 32), "single_blocks.0.linear2": (32, 160)}, alpha=2.0)
    write_lora(lora, tmp_path / "d.safetensors", "diffusers")
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file({k.replace("transformer.", "base_model.model.", 1): v for k, v in
               load_file(tmp_path / "d.safetensors").items()}, folder / "adapter_model.safetensors",
              metadata={"modelspec.title": "peft run"})
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    code, out, err = run(capsys, "lora", folder, tmp_path / "o.safetensors", "--to", "ours")
    assert code == 0, err
    back = read_lora(tmp_path / "o.safetensors")
    assert_same_deltas(read_lora(folder), back)
    for m, mod in lora.modules.items():  # lora_alpha / r = 2 on top of the file's weights
        torch.testing.assert_close(back.modules[m].delta("cpu"), 2 * mod.delta("cpu"), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("text, why", [("{\"_class_name\": \"Flux", "unreadable"), ("[1, 2]", "not a JSON object")])
def test_a_damaged_model_index_is_one_line(tmp_path, text, why):
    (tmp_path / "model_index.json").write_text(text)
    with pytest.raises(WeightsError, match=f"model_index.json: {why}.*re-download the model or repair"):
        detect_family(tmp_path)
