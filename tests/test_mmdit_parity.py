"""Our MMDiT against diffusers' SD3Transformer2DModel on the same weights (docs/models.md §9 rows 6, 7, 9)."""

import pytest
import torch
from flux_fixtures import assert_bf16_close, assert_fp32_close
from mmdit_fixtures import (
    SD35_TINY,
    VARIANTS,
    ours_from,
    run_diffusers,
    run_ours,
    tiny_diffusers_mmdit,
    tiny_inputs,
)

from model.mmdit import MMDIT_CONFIGS, MMDiT, MMDiTConfig, sincos_pos_embed_2d
from weights.keymaps import Rule
from weights.keymaps.mmdit import mmdit_rules
from weights.transformer import transformer_state_dict


@pytest.mark.parametrize("variant,skip_layers", [("sd3", None), ("sd3.5", None), ("sd3.5", [1])],
                         ids=["sd3", "sd3.5", "sd3.5-skip1"])
@pytest.mark.parametrize("sigma", [0.02, 0.2])
def test_matches_diffusers_fp32_and_bf16(variant, skip_layers, sigma):
    ref = tiny_diffusers_mmdit(variant, sigma)
    cfg = VARIANTS[variant]
    ours = ours_from(ref, cfg)
    inp = tiny_inputs(cfg)
    expected = run_diffusers(ref, inp, skip_layers=skip_layers)
    assert_fp32_close(run_ours(ours, inp, skip_layers=skip_layers), expected)
    # bf16 against diffusers also in bf16 (docs/models.md §1); both take fp32 timesteps, as the pipeline does
    assert_bf16_close(run_ours(ours, inp, torch.bfloat16, skip_layers),
                      run_diffusers(ref, inp, torch.bfloat16, skip_layers))
    if skip_layers:  # the skip must be visible at the fp32 tolerance, or this case would prove nothing
        with pytest.raises(AssertionError):
            assert_fp32_close(run_diffusers(ref.float(), inp), expected)


@pytest.mark.parametrize("swap", ["final_layer", "last_context_block"])
def test_without_a_swap_the_comparison_fails(swap):
    """Negative control: reading either (shift, scale) pair in diffusers' order must break parity."""
    ref = tiny_diffusers_mmdit("sd3.5", 0.2)
    key = "final_layer." if swap == "final_layer" else "joint_blocks.2.context_block."
    rules = [Rule(r.official, r.others, "same") if r.kind == "swap" and r.official.startswith(key) else r
             for r in mmdit_rules(3, (0, 1), True)]
    assert sum(r.kind == "swap" for r in rules) == 2, "exactly one swapped tensor pair should be disabled"
    bad = ours_from(ref, SD35_TINY, rules)
    inp = tiny_inputs(SD35_TINY)
    with pytest.raises(AssertionError):
        assert_fp32_close(run_ours(bad, inp), run_diffusers(ref, inp))


def test_pos_embed_crop_matches_diffusers():
    ref = tiny_diffusers_mmdit("sd3.5", 0.2)
    ours = ours_from(ref, SD35_TINY)
    for h, w in [(8, 8), (4, 6), (5, 3), (1, 8), (7, 2)]:  # in patches; odd margins round the window up-left
        expected = ref.pos_embed.cropped_pos_embed(2 * h, 2 * w)  # diffusers takes latent pixels
        torch.testing.assert_close(ours.cropped_pos_embed(h, w), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        ours(torch.zeros(1, 16, 18, 4), torch.zeros(1), torch.zeros(1, 24), torch.zeros(1, 5, 32))
    with pytest.raises(ValueError, match="divisible"):
        ours(torch.zeros(1, 16, 7, 4), torch.zeros(1), torch.zeros(1, 24), torch.zeros(1, 5, 32))


def test_square_latent_uses_the_whole_table():
    ref = tiny_diffusers_mmdit("sd3.5", 0.2)
    inp = tiny_inputs(SD35_TINY, latent=(16, 16))
    assert_fp32_close(run_ours(ours_from(ref, SD35_TINY), inp), run_diffusers(ref, inp))


def test_init_table_is_the_sai_sincos_formula():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    # diffusers' formula divides positions by grid / base_size; with base_size = grid it is SAI's plain grid
    expected = get_2d_sincos_pos_embed(32, 8, base_size=8, output_type="pt").float()
    torch.testing.assert_close(sincos_pos_embed_2d(32, 8), expected, rtol=0, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = ours_from(tiny_diffusers_mmdit("sd3.5", 0.2), SD35_TINY).train()
    inp = tiny_inputs(SD35_TINY)

    def grads(ckpt: bool):
        model.zero_grad()
        model.enable_gradient_checkpointing(ckpt)
        out = model(inp["x"], inp["timesteps"], inp["y"], inp["context"], skip_layers=[1])
        out.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and not any(n.startswith("joint_blocks.1.") for n in plain)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        MMDiTConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="dual_attention_layers"):
        MMDiTConfig(depth=3, dual_attention_layers=(3,))
    with pytest.raises(ValueError, match="qk_norm"):
        MMDiTConfig(qk_norm="ln")
    with pytest.raises(ValueError, match="preset"):
        MMDiTConfig.preset("sd4")
    cfg = MMDiTConfig.preset("sd3.5-medium")
    assert MMDiTConfig.from_dict(cfg.to_dict()) == cfg and cfg.head_dim == 64


# --- full size, on the meta device (row 9) ----------------------------------------------------------------


@pytest.mark.parametrize("name,n_sai,n_diffusers,params", [
    ("sd3.5-large", 923, 1227, 8_056_627_520),
    ("sd3.5-medium", 665, 909, 2_243_171_520),
    ("sd3-medium", None, None, None),
])
def test_full_size_key_set_matches_sai_and_diffusers(name, n_sai, n_diffusers, params):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from weights.families.sd3 import config_to_diffusers

    cfg = MMDIT_CONFIGS[name]
    kwargs = config_to_diffusers(cfg)
    kwargs.pop("_class_name")
    with torch.device("meta"):
        ours = MMDiT(cfg)
        ref = SD3Transformer2DModel(**kwargs)
    sd = ours.state_dict()
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    if n_sai is not None:
        assert (len(sd), len(expected)) == (n_sai, n_diffusers)
        assert sum(p.numel() for p in ours.parameters()) == params
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert sd["pos_embed"].shape == (1, cfg.pos_embed_max_size ** 2, cfg.hidden_size)

    # diffusers' own converter (independent of our table) must consume every SAI key we have ...
    checkpoint = dict(sd)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    assert checkpoint == {}, f"keys the converter did not expect: {sorted(checkpoint)[:5]}"
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    # ... and our table must agree with it
    assert {k: tuple(v.shape) for k, v in transformer_state_dict(ours, "diffusers").items()} == expected
