"""FLUX.2 (model/flux2.py, weights/families/flux2.py): the transformer against diffusers' Flux2Transformer2DModel,
klein-like (no guidance input) and dev-like, through our key map and through diffusers' own BFL converter;
loading BFL single files (with ComfyUI's prefix) and diffusers folders; the one-line errors between FLUX.1 and
FLUX.2 files (docs/flux2.md §7: the tiny parity config)."""

import pytest
import torch
from conftest import randomize_

from model.flux import FLUX_CONFIGS, Flux
from model.flux2 import FLUX2_CONFIGS, Flux2, Flux2Config, flux2_image_ids, flux2_text_ids
from weights.families import detect_family
from weights.families.flux2 import FLUX2, config_to_diffusers
from weights.io import WeightsError
from weights.keymaps import to_official
from weights.transformer import load_flux, load_flux2, save_transformer, transformer_state_dict

TINY = FLUX2_CONFIGS["tiny"]


def diffusers_model(guidance: bool):
    from diffusers import Flux2Transformer2DModel

    cfg = {k: v for k, v in config_to_diffusers(Flux2Config(**{**TINY.to_dict(), "guidance_embed": guidance})).items()
           if not k.startswith("_")}
    return randomize_(Flux2Transformer2DModel(**cfg), 0.3, seed=1).eval()


def inputs(guidance: bool):
    """B = 2 at different times; 7 text tokens; a 3 x 5 image plus 4 reference tokens at T = 10
    (docs/flux2.md §1.3)."""
    g = torch.Generator().manual_seed(0)
    img_ids = torch.cat([flux2_image_ids(3, 5), torch.tensor([[10.0, i, j, 0] for i in (0, 1) for j in (0, 1)])])
    return dict(img=torch.randn(2, 19, 8, generator=g), img_ids=img_ids, txt=torch.randn(2, 7, 24, generator=g),
                txt_ids=flux2_text_ids(7), timesteps=torch.tensor([0.3, 0.85]),
                guidance=torch.tensor([4.0, 2.5]) if guidance else None)


@pytest.mark.parametrize("guidance", [False, True], ids=["klein", "dev"])
def test_transformer_equals_diffusers(guidance):
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    ref = diffusers_model(guidance)
    theirs = ref.state_dict()
    cfg = Flux2Config(**{**TINY.to_dict(), "guidance_embed": guidance})
    ours = Flux2(cfg).eval()
    ours.load_state_dict(dict(to_official(FLUX2.rules(cfg), theirs.__getitem__)), strict=True)
    # our map and diffusers' own BFL converter agree key for key, tensor for tensor
    converted = convert_flux2_transformer_checkpoint_to_diffusers(dict(ours.state_dict()))
    assert converted.keys() == theirs.keys() and all(torch.equal(converted[k], theirs[k]) for k in theirs)
    assert all(torch.equal(v, theirs[k]) for k, v in transformer_state_dict(ours, "diffusers").items())

    x = inputs(guidance)
    with torch.no_grad():
        want = ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], timestep=x["timesteps"],
                   img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"], return_dict=False)[0]
        got = ours(**x)
    assert got.shape == want.shape == (2, 19, 8)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= 1e-5, err


def test_bf16_is_close_to_the_fp32_oracle():
    """Our model cast to bf16 (as users run it) against diffusers in fp32 on the same weights: no farther than
    diffusers' own bf16 run is (the random weights are small, as trained ones are; at larger random weights both
    bf16 runs drift far from fp32 together, through the sinusoidal time embedding of t * 1000)."""
    from diffusers import Flux2Transformer2DModel

    cfg = {k: v for k, v in config_to_diffusers(TINY).items() if not k.startswith("_")}
    ref = randomize_(Flux2Transformer2DModel(**cfg), 0.05, seed=1).eval()
    ours = Flux2(TINY).eval()
    ours.load_state_dict(dict(to_official(FLUX2.rules(TINY), ref.state_dict().__getitem__)), strict=True)
    x = inputs(False)

    def diffusers_run(model, dtype):
        return model(hidden_states=x["img"].to(dtype), encoder_hidden_states=x["txt"].to(dtype),
                     timestep=x["timesteps"], img_ids=x["img_ids"], txt_ids=x["txt_ids"], return_dict=False)[0].float()

    with torch.no_grad():
        want = diffusers_run(ref, torch.float32)
        theirs = diffusers_run(ref.bfloat16(), torch.bfloat16)
        got = ours.bfloat16()(**{k: v.bfloat16() if k in ("img", "txt") else v for k, v in x.items()})
    assert got.dtype == torch.bfloat16
    ours_err, their_err = (((x - want).abs().max() / want.abs().max()).item() for x in (got.float(), theirs))
    assert ours_err <= max(1.25 * their_err, 1e-2) and ours_err <= 4e-2, (ours_err, their_err)


def test_presets_have_the_published_sizes():
    with torch.device("meta"):
        counts = {n: sum(p.numel() for p in Flux2(FLUX2_CONFIGS[n]).parameters()) for n in FLUX2_CONFIGS}
    # docs/flux2.md §0, counted on meta models there
    assert round(counts["klein-4b"] / 1e9, 3) == 3.876 and round(counts["klein-9b"] / 1e9, 3) == 9.079
    assert round(counts["flux2-dev"] / 1e9, 2) == 32.22


def test_gradient_checkpointing_gives_the_same_gradients():
    model = randomize_(Flux2(TINY), 0.3, seed=2)
    x = inputs(False)
    grads = []
    for checkpointed in (False, True):
        model.zero_grad()
        model.enable_gradient_checkpointing(checkpointed)
        model(**x).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=0, atol=1e-7) for n in grads[0])


def test_loading_bfl_comfyui_and_diffusers_files(tmp_path):
    from safetensors.torch import save_file

    from weights.convert import convert_checkpoint
    from weights.convert_plan import detect

    model = randomize_(Flux2(TINY), 0.3, seed=3).eval()
    want = model.state_dict()
    comfy = tmp_path / "flux-2-klein-tiny.safetensors"  # ComfyUI's prefix, no config in the file: inferred
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in want.items()}, comfy)
    folder = tmp_path / "transformer"
    diffusers_model(False).save_pretrained(folder)  # a diffusers transformer folder (config.json + weights)
    for path in (comfy, folder, save_transformer(model, tmp_path / "ours.safetensors", layout="diffusers")):
        assert detect_family(path) is FLUX2 and detect(path).family == "flux2"
        loaded = load_flux2(path)
        assert type(loaded) is Flux2 and loaded.config == TINY
    assert all(torch.equal(load_flux2(comfy).state_dict()[k], v) for k, v in want.items())
    from tools.convert import info_lines

    assert "family: FLUX.2 width 64, no guidance input" in "\n".join(info_lines(str(comfy)))
    out = convert_checkpoint(comfy, tmp_path / "converted", "diffusers")
    back = load_flux2(convert_checkpoint(out, tmp_path / "back.safetensors", "official"))
    assert all(torch.equal(back.state_dict()[k], v) for k, v in want.items())


def test_flux1_and_flux2_files_name_each_other(tmp_path):
    flux2 = save_transformer(Flux2(TINY), tmp_path / "flux2.safetensors")
    flux1 = save_transformer(Flux(FLUX_CONFIGS["tiny"]), tmp_path / "flux1.safetensors")
    with pytest.raises(WeightsError, match=r"this is a FLUX.2 transformer, not a Flux transformer; pass that file "
                                           r"itself as --model \(in Python: weights.load_flux2\)"):
        load_flux(flux2)
    with pytest.raises(WeightsError, match=r"this is a Flux transformer \(BFL layout\), not a FLUX.2 transformer; "
                                           r"pass that file itself as --model \(in Python: weights.load_flux\)"):
        load_flux2(flux1)
    assert detect_family(flux1).name == "flux" and detect_family(flux2) is FLUX2


def test_generate_and_train_name_what_flux2_needs_in_one_line(tmp_path, capsys):
    from distill.train import main as train
    from sampling.generate import main as generate

    path = save_transformer(Flux2(TINY), tmp_path / "flux2.safetensors")
    assert generate(["--model", str(path), "--prompt", "a", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("their weights look alike; pass --variant base or --variant distilled"), err
    klein = save_transformer(Flux2(TINY), tmp_path / "flux-2-klein-base-tiny.safetensors")
    assert generate(["--model", str(klein), "--prompt", "a", "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.splitlines() == ["FLUX.2 [klein] base (from the file name)",
                                                    "error: no vae given: pass --vae (or a diffusers pipeline folder)"]
    dev_config = Flux2Config(**{**TINY.to_dict(), "guidance_embed": True})
    dev = save_transformer(Flux2(dev_config), tmp_path / "dev.safetensors")
    assert generate(["--model", str(dev), "--variant", "base", "--prompt", "a", "--out", str(tmp_path / "x.png")]) == 2
    assert "FLUX.2 [dev], whose text encoder (Mistral Small 3.2) scfm does not have" in capsys.readouterr().err
    assert generate(["--model", str(path), "--prompt", "a", "--clip-g", "g.safetensors", "--out",
                     str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.startswith("error: --clip-g: SD3 / SD3.5 options, but ")
    assert train(["--model", str(path), "--targets", "flux2", "--output", str(tmp_path / "run"), "--cache",
                  str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("pass --vae, --qwen, --qwen-tokenizer to build it"), err


def test_klein_variant_from_flag_folder_and_file_name(tmp_path):
    from sampling.flux2 import klein_variant

    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text('{"is_distilled": true}')
    assert klein_variant(tmp_path / "pipe", None) == (True, "model_index.json")
    assert klein_variant(tmp_path / "pipe", "base") == (False, "--variant")
    assert klein_variant(tmp_path / "flux-2-klein-4b.safetensors", None) == (True, "the file name")
    assert klein_variant(tmp_path / "flux-2-klein-base-9b.safetensors", None) == (False, "the file name")
    with pytest.raises(WeightsError, match="pass --variant base or --variant distilled"):
        klein_variant(tmp_path / "model.safetensors", None)


def test_fp8_storage_and_block_swap_work_as_for_flux1():
    """The blocks' Linears (no biases here) store e4m3 and equal the model on their dequantized weights; a block
    swap gives the whole model's bits."""
    import copy

    from model.block_swap import BlockSwap
    from model.fp8 import Float8Linear, dequantize, quantize_linears_

    x = inputs(False)
    model = randomize_(Flux2(TINY), 0.3, seed=4).eval()
    quantized = copy.deepcopy(model)
    quantize_linears_(quantized)
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, Float8Linear)}
    assert layers and all(n.startswith(("double_blocks.", "single_blocks.")) for n in layers)
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in layers.items():
            dense.get_submodule(name).weight.copy_(dequantize(m.weight, m.weight_scale, torch.float32))
        out = quantized(**x)
        torch.testing.assert_close(out, dense(**x), rtol=1e-5, atol=1e-6)
        whole = model(**x)
        BlockSwap(model, 2, "cpu")
        assert torch.equal(model(**x), whole)


@pytest.mark.parametrize("cfg_scale", [0.0, 3.0], ids=["plain", "cfg-baked"])
def test_scfm_trains_a_flux2_lora_and_exports_it(tmp_path, cfg_scale):
    """A few SCFM steps on a tiny FLUX.2 (a cache of 4-channel latents and 32-wide text, as the tests' fake encoders
    make: its context and channel widths follow them), the FLUX.2 target table, and the exported file read back and
    merged (docs/flux2.md §5: BFL module names)."""
    from test_data import IMAGES as images
    from test_data import KEY, POOL, FakeText, FakeVAE, write_images
    from test_trainer import config

    from distill.data import build_cache, plan_cache
    from distill.lora import lora_layers
    from distill.lora_export import export_lora
    from distill.trainer import Trainer
    from weights.lora import read_lora
    from weights.lora_merge import apply_loras

    model_cfg = Flux2Config(in_channels=4, out_channels=4, context_in_dim=32, hidden_size=64, num_heads=4, depth=1,
                            depth_single_blocks=1, axes_dim=(4, 4, 4, 4), guidance_embed=False)
    model = randomize_(Flux2(model_cfg), 0.1, seed=8)
    cfg = config(tmp_path, targets="flux2", steps=3, checkpoint_every=0, sample_every=3, sample_size=128,
                 sample_steps=2, export_formats=("ours", "kohya", "diffusers"), cfg_scale=cfg_scale,
                 dynamic_shift_prob=0.0)
    write_images(tmp_path / "data", images)
    # klein's CFG negative is the empty prompt, embedded once into the cache (as the run setup does for a CFG family)
    plan = plan_cache(tmp_path / "data", KEY, 512, ("a sample",), shard_size=4, negative_prompt="")
    cache = build_cache(tmp_path / "cache", plan, FakeText, lambda: FakeVAE(POOL), batch_size=2, progress=False)
    trainer = Trainer(cfg, model, cache, device="cpu")
    assert (trainer.negative is not None) == bool(cfg_scale)  # every call c + w (c - u) against ""
    trainer.run()
    layers = lora_layers(trainer.model)
    assert "single_blocks.0.linear1" in layers and layers["double_blocks.0.img_attn.qkv"].slices == (64, 64, 64)
    assert any(t.abs().sum() > 0 for layer in layers.values() for t in layer.lora_up.values())
    assert (trainer.out / "samples" / "step-000003.safetensors").exists()  # sampled on the 1x1-token grid
    files = export_lora(trainer.model, cfg)
    lora = read_lora(next(f for f in files if "kohya" in f.name))
    assert lora.family == "flux2" and "double_stream_modulation_img.lin" in lora.modules
    assert lora.recommended.guidance == (cfg_scale + 1 if cfg_scale else None)  # sampled as trained: g = w + 1
    peft = read_lora(next(f for f in files if f.name == f"scfm-lora-{cfg.export_set}.safetensors"))  # diffusers names
    assert peft.layout == "diffusers" and peft.modules.keys() == lora.modules.keys()
    for name, mod in lora.modules.items():
        torch.testing.assert_close(peft.modules[name].delta("cpu"), mod.delta("cpu"), rtol=1e-5, atol=1e-7)
    base = Flux2(model_cfg)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    apply_loras(base, [(lora, 1.0)])
    assert any(not torch.equal(before[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize("tool", ["ai-toolkit", "musubi"])
def test_other_tools_loras_read_as_diffusers_converts_them(tmp_path, tool):
    """FLUX.2 LoRAs as ai-toolkit writes them (`diffusion_model.<BFL module>.lora_A / lora_B`, no alpha: scale 1) and
    as musubi-tuner does (`lora_unet_<BFL module, _>` lora_down / lora_up / alpha), docs/flux2.md §5, read for a
    FLUX.2 model: every layer's delta W equals what diffusers' own converters give (the fused qkv in thirds there)."""
    from diffusers.loaders import lora_conversion_utils as convert
    from safetensors.torch import save_file

    from weights.keymaps.flux2 import flux2_rules
    from weights.lora import read_lora

    g = torch.Generator().manual_seed(9)
    h, m, r = TINY.hidden_size, TINY.mlp_hidden_dim, 4
    shapes = {"double_blocks.0.img_attn.qkv": (3 * h, h), "double_blocks.1.txt_attn.proj": (h, h),
              "double_blocks.0.img_mlp.0": (2 * m, h), "double_blocks.0.txt_mlp.2": (h, m),
              "single_blocks.1.linear1": (3 * h + 2 * m, h), "single_blocks.0.linear2": (h, h + m)}
    sd = {}
    for module, (out, inp) in shapes.items():
        down, up = torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)
        if tool == "ai-toolkit":
            sd |= {f"diffusion_model.{module}.lora_A.weight": down, f"diffusion_model.{module}.lora_B.weight": up}
        else:
            stem = "lora_unet_" + module.replace(".", "_")
            sd |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(2.0)}
    save_file(sd, tmp_path / "lora.safetensors")
    ours = read_lora(tmp_path / "lora.safetensors", family="flux2")  # the names fit FLUX.1 too: the model decides
    assert ours.family == "flux2" and ours.modules.keys() == shapes.keys()

    fn = (convert._convert_non_diffusers_flux2_lora_to_diffusers if tool == "ai-toolkit"
          else convert._convert_kohya_flux2_lora_to_diffusers)
    theirs = {k.removeprefix("transformer."): v for k, v in fn(dict(sd)).items()}
    delta = {k.removesuffix(".lora_A.weight"): theirs[k.replace("lora_A", "lora_B")] @ v
             for k, v in theirs.items() if k.endswith("lora_A.weight")}
    for rule in flux2_rules(2, 2, False, modules=True):
        if rule.official in shapes:
            want = torch.cat([delta[o] for o in rule.others])  # a fused qkv: diffusers' three parts stacked
            torch.testing.assert_close(ours.modules[rule.official].delta("cpu"), want, rtol=1e-6, atol=1e-5)
