"""The 16-channel VAE against diffusers' AutoencoderKL, in every layout load_vae reads (docs/models.md §4, §9 rows
10 and 11)."""

import json

import pytest
import torch
from conftest import randomize_
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import save_file

from model.flux import FLUX_CONFIGS, Flux
from model.t5 import T5_CONFIGS, T5Encoder
from model.vae import VAE_CONFIGS, AutoEncoder, VAEConfig, denormalize_latents, normalize_latents, tiled_apply
from weights.io import WeightsError
from weights.keymaps.vae import diffusers_to_ours, ours_to_diffusers
from weights.text import load_t5
from weights.transformer import transformer_state_dict
from weights.vae import load_vae

LEVELS = 3
TINY = {  # docs/models.md §9 row 10
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * LEVELS,
    "up_block_types": ("UpDecoderBlock2D",) * LEVELS, "block_out_channels": (32, 64, 64), "layers_per_block": 2,
    "latent_channels": 16, "norm_num_groups": 32, "use_quant_conv": False, "use_post_quant_conv": False,
    "scaling_factor": 0.3611, "shift_factor": 0.1159,
}
FLUX = {  # docs/models.md §4
    **TINY, "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512), "sample_size": 1024,
}


def close(ours, ref):
    # docs/models.md §1: fp32 VAE tolerance rtol 1e-4, atol 1e-4 * max|ref|
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def images(seed=1, shape=(1, 3, 32, 48)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)


@pytest.fixture(scope="module", params=[0.02, 0.2], ids=["sigma0.02", "sigma0.2"])
def reference(request, tmp_path_factory):
    """A random tiny AutoencoderKL, saved by diffusers' save_pretrained."""
    ref = randomize_(AutoencoderKL(**TINY), request.param, seed=0).eval()
    folder = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(folder)
    return ref, folder


def test_diffusers_folder_matches_autoencoderkl(reference):
    ref, folder = reference
    ours = load_vae(folder)
    assert ours.config == VAE_CONFIGS["tiny"]
    x = images()
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        close(ours.encode(x), dist.mean)
        close(ours.decode(dist.mean), ref.decode(dist.mean).sample)
        # sampling draws the same noise as diffusers for the same seed
        sample = dist.sample(generator=torch.Generator().manual_seed(7))
        close(ours.encode(x, sample=True, generator=torch.Generator().manual_seed(7)), sample)


def test_bf16_matches_autoencoderkl_in_bf16(tmp_path):
    # One scale only: bf16 convolutions take the slow reference path on CPU (seconds per pass). sigma 0.02 is the
    # regime closest to trained weights and where bf16 deviates most (docs/models.md §10: up to 0.106).
    ref = randomize_(AutoencoderKL(**TINY), 0.02, seed=0).eval()
    ref.save_pretrained(tmp_path)
    ours = load_vae(tmp_path, dtype=torch.bfloat16)
    ref = ref.to(torch.bfloat16)
    x = images().bfloat16()
    with torch.no_grad():
        mean_ref = ref.encode(x).latent_dist.mean
        mean = ours.encode(x)
        out_ref, out = ref.decode(mean_ref).sample, ours.decode(mean_ref)
    assert mean.dtype == out.dtype == torch.bfloat16
    # docs/models.md §1: bf16 against the reference in bf16, <= 0.2 max|ref| for the VAE
    assert (mean - mean_ref).abs().max() <= 0.2 * mean_ref.abs().max()
    assert (out - out_ref).abs().max() <= 0.2 * out_ref.abs().max()


def ldm_state_dict(sigma, seed=3):
    """A random tiny VAE in the BFL / LDM layout (our parameter names are the LDM names)."""
    model = randomize_(AutoEncoder(VAE_CONFIGS["tiny"]), sigma, seed)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def diffusers_from_ldm(ldm):
    """diffusers' own LDM converter as the oracle (it squeezes the 1x1-conv attention weights)."""
    ref = AutoencoderKL(**TINY).eval()
    ref.load_state_dict(convert_ldm_vae_checkpoint(dict(ldm), TINY), strict=True)
    return ref


def test_ldm_layout_matches_convert_ldm_vae_checkpoint(tmp_path):
    # sigma 0.2 (large activations) is the scale that exposes a mis-mapped or mis-ordered weight (docs/models.md §1);
    # both scales of the arithmetic itself are covered by the diffusers-folder test.
    ldm = ldm_state_dict(0.2)
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)  # stored like ae.safetensors
    save_file(ldm, tmp_path / "ae.safetensors")
    ours = load_vae(tmp_path / "ae.safetensors", config=VAE_CONFIGS["tiny"])
    ref = diffusers_from_ldm(ldm)
    x = images(seed=2)
    with torch.no_grad():
        mean_ref = ref.encode(x).latent_dist.mean
        close(ours.encode(x), mean_ref)
        close(ours.decode(mean_ref), ref.decode(mean_ref).sample)


def test_ldm_config_inferred_from_shapes(tmp_path):
    save_file(ldm_state_dict(0.02), tmp_path / "ae.safetensors")
    assert load_vae(tmp_path / "ae.safetensors").config == VAE_CONFIGS["tiny"]  # BFL files are Flux


# the scfm_config of a transformer, as convert.py merge writes it into an all-in-one file it merged LoRAs into
TRANSFORMER_META = {"scfm_config": json.dumps({"family": "flux", "config": FLUX_CONFIGS["tiny"].to_dict()})}


@pytest.mark.parametrize("metadata", [None, TRANSFORMER_META], ids=["as-saved", "lora-merged"])
def test_sai_single_file_prefix(tmp_path, metadata):
    ldm = ldm_state_dict(0.02)
    single = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    single["model.diffusion_model.x_embedder.proj.weight"] = torch.zeros(4, 16, 2, 2)  # the transformer is skipped
    save_file(single, tmp_path / "sd3.5_tiny.safetensors", metadata=metadata)
    ours = load_vae(tmp_path / "sd3.5_tiny.safetensors")
    assert ours.config.scale_factor == 1.5305 and ours.config.shift_factor == 0.0609  # SAI files are SD3.5
    for k, v in ours.state_dict().items():
        assert torch.equal(v, ldm[k]), k


@pytest.mark.parametrize("metadata", [None, TRANSFORMER_META], ids=["as-saved", "lora-merged"])
def test_comfyui_flux_all_in_one_file(tmp_path, metadata):
    """ComfyUI's all-in-one FLUX.1 checkpoints (its Flux model class: the transformer under model.diffusion_model.,
    the VAE under vae., the text encoders under text_encoders.): the VAE loads as from ae.safetensors alone, config
    (FLUX.1's latent scaling) included."""
    ldm = ldm_state_dict(0.02)
    save_file(ldm, tmp_path / "ae.safetensors")
    want = load_vae(tmp_path / "ae.safetensors")
    t5 = {k: v.contiguous() for k, v in T5Encoder(T5_CONFIGS["tiny"]).state_dict().items()}
    aio = {"model.diffusion_model." + k: v.contiguous()
           for k, v in transformer_state_dict(Flux(FLUX_CONFIGS["tiny"])).items()}
    aio |= {"vae." + k: v for k, v in ldm.items()}
    aio |= {"text_encoders.t5xxl.transformer." + k: v for k, v in t5.items()}
    save_file(aio, tmp_path / "flux1-dev-aio.safetensors", metadata=metadata)
    ours = load_vae(tmp_path / "flux1-dev-aio.safetensors")
    assert ours.config == want.config == VAE_CONFIGS["tiny"]  # FLUX.1's scale / shift, as BFL's file
    assert ours.state_dict().keys() == want.state_dict().keys()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, want.state_dict()[k]), k
    # the text encoder beside it reads from the same file
    assert all(torch.equal(v, t5[k]) for k, v in load_t5(tmp_path / "flux1-dev-aio.safetensors").state_dict().items())


def test_pipeline_folder_file_and_dtype(reference, tmp_path):
    _, folder = reference
    (tmp_path / "vae").symlink_to(folder, target_is_directory=True)
    (tmp_path / "model_index.json").write_text("{}")
    ours = load_vae(tmp_path, dtype=torch.bfloat16)
    assert next(ours.parameters()).dtype == torch.bfloat16 and not next(ours.parameters()).requires_grad
    # a diffusers file next to its config.json reads that config
    assert load_vae(folder / "diffusion_pytorch_model.safetensors").config == VAE_CONFIGS["tiny"]


def test_full_size_layout_matches_diffusers():
    """ae.safetensors and the diffusers Flux VAE (244 keys each) map onto our model key for key, shape for shape."""
    with torch.device("meta"):
        ours = AutoEncoder(VAE_CONFIGS["flux1"]).state_dict()
        ref = AutoencoderKL(**FLUX).state_dict()
    assert len(ours) == len(ref) == 244
    mapped = {}
    for k, v in ref.items():
        name, transform = diffusers_to_ours(k, 4)
        mapped[name] = tuple((transform(v) if transform else v).shape)
        back, _ = ours_to_diffusers(name, 4)
        assert back == k
    assert mapped == {k: tuple(v.shape) for k, v in ours.items()}
    assert sum(v.numel() for v in ours.values()) == 83_819_683  # docs/models.md §4


def test_presets_and_latent_normalisation():
    assert (VAE_CONFIGS["flux1"].scale_factor, VAE_CONFIGS["flux1"].shift_factor) == (0.3611, 0.1159)
    assert (VAE_CONFIGS["sd3.5"].scale_factor, VAE_CONFIGS["sd3.5"].shift_factor) == (1.5305, 0.0609)
    z = torch.randn(2, 16, 4, 4)
    config = VAE_CONFIGS["flux1"]
    torch.testing.assert_close(normalize_latents(z, config), (z - 0.1159) * 0.3611)  # diffusers' pipeline formulas
    torch.testing.assert_close(denormalize_latents(normalize_latents(z, config), config), z)
    with pytest.raises(ValueError, match="norm_groups"):
        VAEConfig(ch=48)


# ----------------------------------------------------------------------------------------------------------------
# tiling


def local_decoder():
    """A decoder-like network whose output pixel depends only on nearby inputs (two 3x3 convs around a x2
    upsample: 3 output pixels of reach), so tiling it must be exact once the blend ignores the tile borders."""
    torch.manual_seed(0)
    conv_a, conv_b = torch.nn.Conv2d(16, 8, 3, padding=1), torch.nn.Conv2d(8, 3, 3, padding=1)
    return lambda z: conv_b(torch.nn.functional.interpolate(torch.tanh(conv_a(z)), scale_factor=2.0))


def test_tiled_apply_exact_for_a_local_network():
    fn = local_decoder()
    z = torch.randn(2, 16, 37, 50)  # sizes that are not a whole number of strides
    with torch.no_grad():
        full = fn(z)
        # overlap 8 latent pixels = 16 output pixels; the outer quarter (4 pixels) is never used, reach is 3
        tiled = tiled_apply(fn, z, tile=20, overlap=8, up=2)
    torch.testing.assert_close(tiled, full, rtol=0, atol=1e-6)
    pool = lambda x: torch.nn.functional.avg_pool2d(x, 4)  # an encoder-like 4x downscale
    x = torch.randn(1, 3, 64, 96)
    torch.testing.assert_close(tiled_apply(pool, x, tile=32, overlap=16, down=4), pool(x), rtol=0, atol=1e-6)


def test_tiling_bounds_the_decoder_input_and_matches_when_one_tile_covers():
    model = randomize_(AutoEncoder(VAE_CONFIGS["tiny"]), 0.02).eval()
    z = torch.randn(1, 16, 12, 10)  # a 48 x 40 image (the tiny VAE downsamples by 4)
    seen = []
    hook = model.decoder.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    with torch.no_grad():
        untiled = model.decode(z)  # small images are untiled by default
        assert seen == [(12, 10)]
        one_tile = model.decode(z, tiled=True, tile_size=64, tile_overlap=16)
        seen.clear()
        tiled = model.decode(z, tiled=True, tile_size=24, tile_overlap=8)
    hook.remove()
    assert torch.equal(one_tile, untiled)
    # 24 px tiles = 6 latent pixels at a stride of 4: rows start at 0, 4, 6 and columns at 0, 4
    assert seen == [(6, 6)] * 6
    assert tiled.shape == untiled.shape and torch.isfinite(tiled).all()
    with torch.no_grad():
        x = images(shape=(1, 3, 48, 40))
        assert torch.equal(model.encode(x, tiled=True, tile_size=64, tile_overlap=16), model.encode(x))
        assert model.encode(x, tiled=True, tile_size=24, tile_overlap=8).shape == (1, 16, 12, 10)
    with pytest.raises(ValueError, match="multiples"):
        model.decode(z, tiled=True, tile_size=26, tile_overlap=8)


# ----------------------------------------------------------------------------------------------------------------
# errors: one line each


def one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_errors(tmp_path):
    with pytest.raises(WeightsError) as e:
        load_vae(tmp_path / "missing.safetensors")
    assert "no such file" in one_line(e)

    torch.save({"a": torch.zeros(1)}, tmp_path / "ae.ckpt")
    with pytest.raises(WeightsError) as e:
        load_vae(tmp_path / "ae.ckpt")
    assert "pickle" in one_line(e)

    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 1)}, tmp_path / "flux.safetensors")
    with pytest.raises(WeightsError) as e:
        load_vae(tmp_path / "flux.safetensors")
    assert "Flux transformer" in one_line(e)

    ldm = ldm_state_dict(0.02)
    save_file({k: v for k, v in ldm.items() if k != "decoder.up.1.block.2.conv1.weight"}, tmp_path / "a.safetensors")
    with pytest.raises(WeightsError) as e:
        load_vae(tmp_path / "a.safetensors", config=VAE_CONFIGS["tiny"])
    assert "missing" in one_line(e)

    save_file(dict(ldm, **{"decoder.extra.weight": torch.zeros(1)}), tmp_path / "b.safetensors")
    with pytest.raises(WeightsError) as e:
        load_vae(tmp_path / "b.safetensors", config=VAE_CONFIGS["tiny"])
    assert "unexpected" in one_line(e)

    save_file(ldm, tmp_path / "c.safetensors")
    with pytest.raises(WeightsError) as e:
        load_vae(tmp_path / "c.safetensors", config=VAE_CONFIGS["flux1"])
    assert "shape mismatch" in one_line(e) or "missing" in one_line(e)


def test_diffusers_errors(reference, tmp_path):
    _, folder = reference
    lone = tmp_path / "vae.safetensors"
    lone.write_bytes((folder / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(WeightsError) as e:
        load_vae(lone)  # no config.json: Flux and SD3.5 scaling cannot be told apart
    assert "with --vae" in one_line(e)
    assert load_vae(lone, config=VAE_CONFIGS["tiny"]).config == VAE_CONFIGS["tiny"]

    sdxl = tmp_path / "sdxl"
    sdxl.mkdir()
    (sdxl / "config.json").write_text(json.dumps(dict(json.loads((folder / "config.json").read_text()),
                                                      use_quant_conv=True)))
    (sdxl / "diffusion_pytorch_model.safetensors").write_bytes(lone.read_bytes())
    with pytest.raises(WeightsError) as e:
        load_vae(sdxl)
    assert "quant" in one_line(e)


def test_auto_tiling_counts_latent_pixels_whatever_the_downscale():
    """The mid-block attention grows with the latent tokens squared (and the CPU's SDPA holds its scores whole):
    FLUX's VAE (downscale 8) decodes 1536 px untiled and 2048 px in tiles, as before; the demo's (downscale 4)
    tiles from 1024 px on, where untiled it held 34 GB."""
    from model.vae import VAE_CONFIGS, AutoEncoder

    with torch.device("meta"):
        flux, small = AutoEncoder(VAE_CONFIGS["flux1"]), AutoEncoder(VAE_CONFIGS["tiny"])
    assert (flux.config.downscale, small.config.downscale) == (8, 4)
    assert not flux._use_tiles(None, 1536 * 1536) and flux._use_tiles(None, 2048 * 2048)
    assert not small._use_tiles(None, 768 * 768) and small._use_tiles(None, 1024 * 1024)
    assert not small._use_tiles(False, 4096 * 4096) and small._use_tiles(True, 64 * 64)
