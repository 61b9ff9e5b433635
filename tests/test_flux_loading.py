"""`load_flux` from every file layout users have, the loading memory bound, and one-line errors (issue 2)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import comfy_scaled_fp8
from flux_fixtures import (
    assert_bf16_close,
    assert_fp32_close,
    run_diffusers,
    run_ours,
    tiny_diffusers_flux,
    tiny_inputs,
)
from safetensors.torch import save_file

from model.flux import FLUX_CONFIGS, FluxConfig
from weights import WeightsError, load_flux, save_transformer
from weights.families.flux import infer_flux_config
from weights.keymaps import to_official
from weights.keymaps.flux import flux_rules


@pytest.fixture(scope="module")
def ref():
    return tiny_diffusers_flux(True, 0.2)


@pytest.fixture(scope="module")
def layouts(ref, tmp_path_factory):
    """The tiny model saved in every layout of issue 2."""
    root = tmp_path_factory.mktemp("flux")
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    bfl = dict(to_official(flux_rules(2, 2, True), sd.__getitem__))
    save_file(bfl, root / "bfl.safetensors")
    save_file({"model.diffusion_model." + k: v for k, v in bfl.items()} | {"vae.decoder.conv_in.weight": torch.ones(1)},
              root / "comfy_all_in_one.safetensors")
    save_file(sd, root / "diffusers.safetensors")
    ref.save_pretrained(root / "transformer_folder")
    ref.save_pretrained(root / "sharded", max_shard_size="100KB")
    (root / "pipeline").mkdir()
    (root / "pipeline" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    ref.save_pretrained(root / "pipeline" / "transformer")
    return root


@pytest.mark.parametrize("name", ["bfl.safetensors", "comfy_all_in_one.safetensors", "diffusers.safetensors",
                                  "transformer_folder", "sharded", "pipeline"])
def test_every_layout_matches_diffusers(ref, layouts, name):
    if name == "sharded":
        assert len(list((layouts / name).glob("*.safetensors"))) > 1, "the fixture should have written shards"
    inp = tiny_inputs(True)
    ours = load_flux(layouts / name)  # config from config.json, or inferred from the keys
    assert ours.config == FLUX_CONFIGS["tiny"]
    assert_fp32_close(run_ours(ours, inp), run_diffusers(ref, inp))


def test_every_layout_gives_the_same_bits(layouts):
    """The same weights in any file give the same output to the last bit: each weight lands 64-byte aligned, where
    MKL's batch-1 products (the modulation) round the same way (safetensors' buffers sit 8 bytes off a line)."""
    inp = tiny_inputs(True)
    outs = []
    for name in ("bfl.safetensors", "comfy_all_in_one.safetensors", "diffusers.safetensors", "sharded"):
        model = load_flux(layouts / name)
        assert all(t.data_ptr() % 64 == 0 for t in model.state_dict().values()), name
        outs.append(run_ours(model, inp))
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_bf16_load_matches_diffusers_bf16(ref, layouts):
    inp = tiny_inputs(True)
    ours = load_flux(layouts / "bfl.safetensors", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert_bf16_close(run_ours(ours, inp, torch.bfloat16), run_diffusers(ref.float(), inp, torch.bfloat16))
    ref.float()


def test_fp8_file_is_upcast(ref, layouts, tmp_path):
    sd = load_flux(layouts / "bfl.safetensors").state_dict()
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in sd.items()}, tmp_path / "fp8.safetensors")
    ours = load_flux(tmp_path / "fp8.safetensors", dtype=torch.bfloat16)
    k = "double_blocks.0.img_attn.qkv.weight"
    assert ours.state_dict()[k].dtype == torch.bfloat16
    torch.testing.assert_close(ours.state_dict()[k], sd[k].to(torch.float8_e4m3fn).to(torch.bfloat16))


@pytest.mark.parametrize("per_row", [False, True], ids=["scale_weight", "weight_scale per row"])
def test_comfy_scaled_fp8_file_loads_as_the_products(layouts, tmp_path, per_row):
    sd = load_flux(layouts / "bfl.safetensors").state_dict()
    tensors, real = comfy_scaled_fp8(sd, per_row)
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in tensors.items()}, tmp_path / "s.safetensors")
    ours = load_flux(tmp_path / "s.safetensors")  # fp32: the products exactly
    assert ours.state_dict().keys() == sd.keys()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, real[k]), k
    k = "double_blocks.0.img_attn.qkv.weight"
    assert not torch.equal(real[k], tensors[k].float())  # the scale matters
    bf16 = load_flux(tmp_path / "s.safetensors", dtype=torch.bfloat16).state_dict()[k]
    assert torch.equal(bf16, real[k].bfloat16())


@pytest.mark.parametrize("name", ["bfl.safetensors", "diffusers.safetensors"])
def test_fp8_load_quantizes_as_it_reads(layouts, name):
    """fp8=True gives exactly the model loaded in bf16 and then quantized (model/fp8.py), without ever holding
    the bf16 block weights."""
    from model.fp8 import E4M3, Float8Linear, quantize_linears_

    ours = load_flux(layouts / name, dtype=torch.bfloat16, fp8=True)
    ref = load_flux(layouts / name, dtype=torch.bfloat16)
    quantize_linears_(ref)
    assert isinstance(ours.single_blocks[0].linear1, Float8Linear) and not ours.training
    got, want = ours.state_dict(), ref.state_dict()
    assert got.keys() == want.keys() and got["double_blocks.0.img_mlp.0.weight"].dtype == E4M3
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k].float(), v.float()), k


def test_our_saver_round_trips_and_records_the_config(layouts, tmp_path):
    model = load_flux(layouts / "bfl.safetensors")
    cfg = FluxConfig(**{**model.config.to_dict(), "theta": 2000})  # not inferable from the keys alone
    model.config = cfg
    for layout in ("official", "diffusers"):
        path = save_transformer(model, tmp_path / f"{layout}.safetensors", layout=layout)
        again = load_flux(path)
        assert again.config == cfg
        for k, v in model.state_dict().items():
            assert torch.equal(again.state_dict()[k], v), k
    with pytest.raises(WeightsError, match="exists"):
        save_transformer(model, tmp_path / "official.safetensors")


def test_config_inferred_from_full_size_shapes():
    from model.flux import Flux

    for name in ("flux-dev", "flux-schnell"):
        with torch.device("meta"):
            sd = Flux(FLUX_CONFIGS[name]).state_dict()
        assert infer_flux_config({k: tuple(v.shape) for k, v in sd.items()}) == FLUX_CONFIGS[name]


def test_explicit_config_wins_and_mismatch_is_one_line(layouts):
    with pytest.raises(WeightsError, match="shape mismatch|unexpected keys|missing"):
        load_flux(layouts / "bfl.safetensors", config=FluxConfig(**{**FLUX_CONFIGS["tiny"].to_dict(),
                                                                      "depth_single_blocks": 3}))
    with pytest.raises(WeightsError, match="shape mismatch"):
        load_flux(layouts / "bfl.safetensors", config=FluxConfig(**{**FLUX_CONFIGS["tiny"].to_dict(),
                                                                      "vec_in_dim": 8}))


# --- errors: one line that names the problem and the fix --------------------------------------------------------


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def test_errors(layouts, tmp_path):
    with pytest.raises(WeightsError, match="no such file") as e:
        load_flux(tmp_path / "nope.safetensors")
    one_line(e)

    torch.save({"w": torch.ones(2)}, tmp_path / "model.ckpt")
    with pytest.raises(WeightsError, match="pickled") as e:
        load_flux(tmp_path / "model.ckpt")
    one_line(e)
    (tmp_path / "renamed.safetensors").write_bytes((tmp_path / "model.ckpt").read_bytes())
    with pytest.raises(WeightsError, match="pickled"):
        load_flux(tmp_path / "renamed.safetensors")

    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file at all")
    with pytest.raises(WeightsError, match="not a safetensors"):
        load_flux(tmp_path / "junk.safetensors")

    save_file({"joint_blocks.0.x_block.attn.qkv.weight": torch.ones(3, 1)}, tmp_path / "sd3.safetensors")
    with pytest.raises(WeightsError, match="SD3") as e:
        load_flux(tmp_path / "sd3.safetensors")
    one_line(e)

    save_file({"lora_unet_img_in.lora_down.weight": torch.ones(1, 2)}, tmp_path / "lora.safetensors")
    with pytest.raises(WeightsError, match="LoRA"):
        load_flux(tmp_path / "lora.safetensors")

    bfl = load_flux(layouts / "bfl.safetensors").state_dict()
    partial = {k: v for k, v in bfl.items() if not k.startswith("single_blocks.1.norm")}
    save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(WeightsError, match=r"missing .*single_blocks\.1\.norm") as e:
        load_flux(tmp_path / "partial.safetensors", config="tiny")
    assert "BFL Flux" in one_line(e)

    save_file(bfl | {"extra.weight": torch.ones(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(WeightsError, match="unexpected keys .*extra.weight"):
        load_flux(tmp_path / "extra.safetensors", config="tiny")

    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(WeightsError, match="no .safetensors"):
        load_flux(empty)


# --- memory: about one copy of the weights, never two ------------------------------------------------------------


def test_loading_peak_memory_is_one_copy(tmp_path):
    """A 300-tensor, ~190 MB file: RssAnon must grow by about one copy (mmap pages are file-backed, not anon)."""
    cfg = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=64, context_in_dim=64, hidden_size=512,
                     num_heads=4, depth=6, depth_single_blocks=12, axes_dim=(16, 56, 56), guidance_embed=True)
    script = textwrap.dedent(f"""
        import torch, gc
        from model.flux import Flux, FluxConfig
        from weights import load_flux, save_transformer
        cfg = FluxConfig(**{cfg.to_dict()!r})
        with torch.device("meta"):
            model = Flux(cfg)
        save_transformer(model.to_empty(device="cpu"), {str(tmp_path / 'big.safetensors')!r})  # values do not matter
        del model
        gc.collect()

        def anon():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024

        before = anon()
        model = load_flux({str(tmp_path / 'big.safetensors')!r})
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        print(len(model.state_dict()), size, anon() - before)
    """)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    n_tensors, size, grown = map(int, out.stdout.split())
    assert n_tensors > 250 and size > 150e6
    assert grown < 1.4 * size, f"RssAnon grew by {grown / size:.2f} copies of the weights"
