"""`load_mmdit` from every layout users have, config resolution, one-line errors (docs/models.md §9 row 8)."""

import json

import pytest
import torch
from flux_fixtures import assert_bf16_close, assert_fp32_close
from mmdit_fixtures import (
    DIFFUSERS_KWARGS,
    SD3_TINY,
    SD35_TINY,
    run_diffusers,
    run_ours,
    tiny_diffusers_mmdit,
    tiny_inputs,
)
from safetensors.torch import save_file

from model.mmdit import MMDIT_CONFIGS, MMDiT, MMDiTConfig
from weights.families.sd3 import config_from_diffusers, config_to_diffusers, infer_mmdit_config
from weights.io import WeightsError
from weights.keymaps import to_official
from weights.keymaps.mmdit import mmdit_rules
from weights.transformer import load_mmdit, save_transformer

SAI_PREFIX = "model.diffusion_model."


@pytest.fixture(scope="module")
def ref():
    return tiny_diffusers_mmdit("sd3.5", 0.2)


def sai_layout(ref, cfg: MMDiTConfig) -> dict[str, torch.Tensor]:
    """A diffusers model's weights in the SAI layout: made by our table, then checked against diffusers' own
    converter (the oracle), which must turn them back into exactly the diffusers state dict."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    rules = mmdit_rules(cfg.depth, cfg.dual_attention_layers, cfg.qk_norm is not None)
    official = dict(to_official(rules, sd.__getitem__))
    checkpoint = {SAI_PREFIX + k: v.clone() for k, v in official.items()}
    back = convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    assert checkpoint == {} and back.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(back[k], v), k
    return official


@pytest.fixture(scope="module")
def sai(ref) -> dict[str, torch.Tensor]:
    return sai_layout(ref, SD35_TINY)


@pytest.fixture(scope="module")
def layouts(ref, sai, tmp_path_factory):
    root = tmp_path_factory.mktemp("mmdit")
    save_file(sai, root / "sai_bare.safetensors")
    # an SAI all-in-one file: transformer under the prefix, plus a VAE and the three text encoders
    others = {"first_stage_model.decoder.conv_in.weight": torch.ones(4, 16, 3, 3),
              "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(8),
              "text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight": torch.ones(8)}
    save_file({SAI_PREFIX + k: v for k, v in sai.items()} | others, root / "sai_all_in_one.safetensors")
    save_file(sai | others, root / "sai_bare_all_in_one.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, root / "diffusers.safetensors")
    ref.save_pretrained(root / "transformer_folder")
    ref.save_pretrained(root / "sharded", max_shard_size="50KB")
    (root / "pipeline").mkdir()
    index = json.dumps({"_class_name": "StableDiffusion3Pipeline"})
    (root / "pipeline" / "model_index.json").write_text(index)
    ref.save_pretrained(root / "pipeline" / "transformer")
    return root


@pytest.mark.parametrize("name", ["sai_bare.safetensors", "sai_all_in_one.safetensors",
                                  "sai_bare_all_in_one.safetensors", "diffusers.safetensors",
                                  "transformer_folder", "sharded", "pipeline"])
def test_every_layout_matches_diffusers(ref, layouts, name):
    if name == "sharded":
        assert len(list((layouts / name).glob("*.safetensors"))) > 1, "the fixture should have written shards"
    ours = load_mmdit(layouts / name)  # config from config.json, or inferred from the keys
    assert ours.config == SD35_TINY
    inp = tiny_inputs(SD35_TINY)
    assert_fp32_close(run_ours(ours, inp), run_diffusers(ref, inp))
    assert_fp32_close(run_ours(ours, inp, skip_layers=[1]), run_diffusers(ref, inp, skip_layers=[1]))


def test_bf16_load_matches_diffusers_bf16(ref, layouts):
    ours = load_mmdit(layouts / "sai_all_in_one.safetensors", dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in ours.state_dict().values())
    inp = tiny_inputs(SD35_TINY)
    assert_bf16_close(run_ours(ours, inp, torch.bfloat16), run_diffusers(ref, inp, torch.bfloat16))
    ref.float()


def test_fp8_load_quantizes_as_it_reads(layouts):
    from model.fp8 import E4M3, quantize_linears_

    ours = load_mmdit(layouts / "sai_all_in_one.safetensors", dtype=torch.bfloat16, fp8=True)
    ref = load_mmdit(layouts / "sai_all_in_one.safetensors", dtype=torch.bfloat16)
    quantize_linears_(ref)
    got, want = ours.state_dict(), ref.state_dict()
    assert got.keys() == want.keys() and got["joint_blocks.0.x_block.attn.qkv.weight"].dtype == E4M3
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k].float(), v.float()), k


def test_sd3_style_loads_with_a_config(tmp_path):
    """SD3.0 files have no ln_q to give the head dim; SAI's convention (64) does not fit this toy, so the
    inference says to pass a folder with config.json, and with it the file loads."""
    ref = tiny_diffusers_mmdit("sd3", 0.2)
    save_file(sai_layout(ref, SD3_TINY), tmp_path / "sd3.safetensors")
    with pytest.raises(WeightsError, match="head dim 64; pass a folder holding the file and its diffusers config"):
        load_mmdit(tmp_path / "sd3.safetensors")
    ref.save_config(tmp_path)  # the advice: the file beside its config.json, the folder passed
    inp = tiny_inputs(SD3_TINY)
    for ours in (load_mmdit(tmp_path), load_mmdit(tmp_path / "sd3.safetensors", config=SD3_TINY)):
        assert_fp32_close(run_ours(ours, inp), run_diffusers(ref, inp))


def test_our_saver_round_trips_and_records_the_config(layouts, tmp_path):
    model = load_mmdit(layouts / "sai_bare.safetensors")
    for layout in ("official", "diffusers"):
        path = save_transformer(model, tmp_path / f"{layout}.safetensors", layout=layout)
        again = load_mmdit(path)
        assert again.config == model.config
        for k, v in model.state_dict().items():
            assert torch.equal(again.state_dict()[k], v), k
    with pytest.raises(WeightsError, match="exists"):
        save_transformer(model, tmp_path / "official.safetensors")
    with pytest.raises(ValueError, match="layout"):
        save_transformer(model, tmp_path / "x.safetensors", layout="comfy")


@pytest.mark.parametrize("name", ["sd3-medium", "sd3.5-large", "sd3.5-medium"])
def test_config_inferred_from_full_size_shapes(name):
    with torch.device("meta"):
        sd = MMDiT(MMDIT_CONFIGS[name]).state_dict()
    assert infer_mmdit_config({k: tuple(v.shape) for k, v in sd.items()}) == MMDIT_CONFIGS[name]


def test_diffusers_config_conversion():
    for variant, cfg in (("sd3", SD3_TINY), ("sd3.5", SD35_TINY)):
        assert config_from_diffusers(DIFFUSERS_KWARGS[variant]) == cfg
        assert config_from_diffusers(config_to_diffusers(cfg)) == cfg
    with pytest.raises(WeightsError, match="caption_projection_dim"):
        config_from_diffusers(dict(DIFFUSERS_KWARGS["sd3"], caption_projection_dim=64))


def test_explicit_config_wins_and_mismatch_is_one_line(layouts):
    with pytest.raises(WeightsError, match="unexpected keys") as e:
        load_mmdit(layouts / "sai_bare.safetensors", config=MMDiTConfig(**{**SD35_TINY.to_dict(),
                                                                           "dual_attention_layers": (0,)}))
    one_line(e)
    with pytest.raises(WeightsError, match="shape mismatch"):
        load_mmdit(layouts / "diffusers.safetensors", config=MMDiTConfig(**{**SD35_TINY.to_dict(),
                                                                            "pos_embed_max_size": 16}))
    assert load_mmdit(layouts / "sai_bare.safetensors", config="tiny").config == SD35_TINY


# --- errors: one line that names the problem and the fix ------------------------------------------------


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def test_errors(sai, ref, tmp_path):
    with pytest.raises(WeightsError, match="no such file") as e:
        load_mmdit(tmp_path / "nope.safetensors")
    one_line(e)

    torch.save({"w": torch.ones(2)}, tmp_path / "model.ckpt")
    with pytest.raises(WeightsError, match="pickled"):
        load_mmdit(tmp_path / "model.ckpt")

    save_file({"double_blocks.0.img_attn.qkv.weight": torch.ones(3, 1)}, tmp_path / "flux.safetensors")
    with pytest.raises(WeightsError, match="Flux .*load_flux") as e:
        load_mmdit(tmp_path / "flux.safetensors")
    one_line(e)

    save_file({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.ones(1, 2)},
              tmp_path / "lora.safetensors")
    with pytest.raises(WeightsError, match="LoRA"):
        load_mmdit(tmp_path / "lora.safetensors")

    partial = {k: v for k, v in sai.items() if not k.startswith("joint_blocks.1.x_block.attn2")}
    save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(WeightsError, match=r"missing .*joint_blocks\.1\.x_block\.attn2") as e:
        load_mmdit(tmp_path / "partial.safetensors", config="tiny")
    assert "SAI SD3 / SD3.5" in one_line(e)

    save_file(sai | {"extra.weight": torch.ones(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(WeightsError, match="unexpected keys .*extra.weight"):
        load_mmdit(tmp_path / "extra.safetensors", config="tiny")

    diffusers_sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    partial = {k: v for k, v in diffusers_sd.items() if k != "proj_out.bias"}
    save_file(partial, tmp_path / "d_partial.safetensors")
    with pytest.raises(WeightsError, match="missing keys for the diffusers SD3 / SD3.5 layout .*proj_out.bias") as e:
        load_mmdit(tmp_path / "d_partial.safetensors")
    one_line(e)

    save_file(sai | {"pos_embed": torch.zeros(1, 60, 32)}, tmp_path / "bad_table.safetensors")
    with pytest.raises(WeightsError, match="not a square grid"):
        load_mmdit(tmp_path / "bad_table.safetensors")

    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(WeightsError, match="no .safetensors"):
        load_mmdit(empty)
