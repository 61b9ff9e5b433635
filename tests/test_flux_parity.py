"""Our Flux against diffusers' FluxTransformer2DModel on the same weights (docs/models.md §9 rows 1, 2, 4, 5)."""

import pytest
import torch
from flux_fixtures import (
    assert_bf16_close,
    assert_fp32_close,
    run_diffusers,
    run_ours,
    tiny_config,
    tiny_diffusers_flux,
    tiny_inputs,
)

from model.flux import FLUX_CONFIGS, Flux, FluxConfig
from model.flux2 import FLUX2_CONFIGS, Flux2
from model.layers import image_ids, pack, text_ids, unpack
from sampling.velocity import Flux2Velocity, FluxVelocity
from weights.keymaps import Rule, to_official
from weights.keymaps.flux import flux_rules
from weights.transformer import transformer_state_dict


def ours_from(ref, guidance: bool) -> Flux:
    cfg = tiny_config(guidance)
    model = Flux(cfg)
    rules = flux_rules(cfg.depth, cfg.depth_single_blocks, guidance)
    model.load_state_dict(dict(to_official(rules, ref.state_dict().__getitem__)))
    return model.eval()


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
@pytest.mark.parametrize("sigma", [0.02, 0.2])
def test_matches_diffusers_fp32_and_bf16(guidance, sigma):
    ref = tiny_diffusers_flux(guidance, sigma)
    ours = ours_from(ref, guidance)
    inp = tiny_inputs(guidance)
    assert_fp32_close(run_ours(ours, inp), run_diffusers(ref, inp))
    # bf16 against diffusers also in bf16: both round sigma to bf16 before x1000 (docs/models.md §1)
    assert_bf16_close(run_ours(ours, inp, torch.bfloat16), run_diffusers(ref, inp, torch.bfloat16))


@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_a_bf16_model_gets_the_timestep_flux_pipeline_hands_it(family):
    """FluxPipeline (and Flux2KleinPipeline) pass the transformer (sigma * 1000).to(dtype) / 1000: in bf16 the
    velocity wrapper must hand the model that bf16 tensor, not sigma (at 0.7377 the two round to different bf16
    timesteps: 0.734375 and 0.73828125). Spied on the model's forward, for FLUX.1-dev and FLUX.2."""
    sigma = torch.tensor([0.7377, 0.25])
    want = (sigma * 1000).bfloat16() / 1000
    assert not torch.equal(want, sigma.bfloat16())  # the rounding matters at this sigma
    if family == "flux":
        model, velocity = Flux(tiny_config(True)), FluxVelocity
        x, cond = torch.randn(2, 4, 4, 6), {"txt": torch.randn(2, 5, 32), "y": torch.randn(2, 24)}
    else:
        model, velocity = Flux2(FLUX2_CONFIGS["tiny"]), Flux2Velocity
        x, cond = torch.randn(2, 8, 3, 5), {"txt": torch.randn(2, 7, 24)}
    model = model.to(torch.bfloat16).eval()
    seen = []
    model.register_forward_pre_hook(lambda _, args: seen.append(args[4]))
    with torch.no_grad():
        velocity(model)(x, sigma, cond, torch.tensor([3.5]) if family == "flux" else None)
    (t,) = seen
    assert t.dtype == torch.bfloat16 and torch.equal(t, want), t


def test_without_final_layer_swap_the_comparison_fails():
    ref = tiny_diffusers_flux(True, 0.2)
    cfg = tiny_config(True)
    rules = [Rule(r.official, r.others, "same") if r.kind == "swap" else r for r in flux_rules(2, 2, True)]
    bad = Flux(cfg)
    bad.load_state_dict(dict(to_official(rules, ref.state_dict().__getitem__)))
    inp = tiny_inputs(True)
    with pytest.raises(AssertionError):
        assert_fp32_close(run_ours(bad, inp), run_diffusers(ref, inp))


def test_batched_ids_equal_shared_ids():
    ours = ours_from(tiny_diffusers_flux(True, 0.2), True)
    inp = tiny_inputs(True)
    batched = dict(inp, img_ids=inp["img_ids"].expand(2, -1, -1), txt_ids=inp["txt_ids"].expand(2, -1, -1))
    torch.testing.assert_close(run_ours(ours, batched), run_ours(ours, inp), rtol=0, atol=0)


def test_guidance_is_required_for_dev_and_ignored_by_schnell():
    inp = tiny_inputs(True)
    with pytest.raises(ValueError, match="guidance"):
        run_ours(Flux(tiny_config(True)), dict(inp, guidance=None))
    assert not any(k.startswith("guidance_in") for k in Flux(tiny_config(False)).state_dict())


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = ours_from(tiny_diffusers_flux(True, 0.2), True).train()
    inp = tiny_inputs(True)

    def grads(ckpt: bool):
        model.zero_grad()
        model.enable_gradient_checkpointing(ckpt)
        out = model(inp["img"], inp["img_ids"], inp["txt"], inp["txt_ids"], inp["timesteps"], inp["y"], inp["guidance"])
        out.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_config_validation():
    with pytest.raises(ValueError, match="axes_dim"):
        FluxConfig(hidden_size=32, num_heads=2, axes_dim=(4, 4, 4))
    with pytest.raises(ValueError, match="divisible"):
        FluxConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="preset"):
        FluxConfig.preset("flux-pro")


# --- full size, on the meta device -------------------------------------------------------------------------------


@pytest.mark.parametrize("name,n_keys,params", [("flux-dev", 780, 11_901_408_320), ("flux-schnell", 776, 11_891_178_560)])
def test_full_size_key_set_matches_bfl_and_diffusers(name, n_keys, params):
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    cfg = FLUX_CONFIGS[name]
    with torch.device("meta"):
        ours = Flux(cfg)
        ref = FluxTransformer2DModel(guidance_embeds=cfg.guidance_embed)
    sd = ours.state_dict()
    assert len(sd) == n_keys
    assert sum(p.numel() for p in ours.parameters()) == params == sum(p.numel() for p in ref.parameters())

    # diffusers' own converter (an oracle independent of our key map) must consume every key we have ...
    checkpoint = dict(sd)
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    assert checkpoint == {}, f"keys the converter did not expect: {sorted(checkpoint)[:5]}"
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    # ... and our own table must agree with it
    assert {k: tuple(v.shape) for k, v in transformer_state_dict(ours, "diffusers").items()} == expected


# --- packing, ids, RoPE ------------------------------------------------------------------------------------------


def test_pack_unpack_and_ids():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 4, 8, 12)
    packed = pack(latents)
    assert packed.shape == (2, 24, 16)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 4, 8, 12), rtol=0, atol=0)
    torch.testing.assert_close(unpack(packed, 8, 12), latents, rtol=0, atol=0)
    ids = image_ids(8, 12)
    torch.testing.assert_close(ids, FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32))
    assert ids[7].tolist() == [0, 1, 1] and text_ids(5).abs().sum() == 0


def test_rope_table_matches_diffusers():
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    from model.rope import EmbedND

    ids = torch.cat([text_ids(5), image_ids(8, 12)])
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids)  # (L, 128), each value repeated twice
    pe = EmbedND(10000, (16, 56, 56))(ids)  # (1, 1, L, 64, 2)
    torch.testing.assert_close(pe[0, 0, ..., 0], cos[:, ::2], rtol=0, atol=1e-6)
    torch.testing.assert_close(pe[0, 0, ..., 1], sin[:, ::2], rtol=0, atol=1e-6)
