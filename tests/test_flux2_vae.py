"""FLUX.2's 32-channel VAE (model/vae.py, weights/vae.py) against diffusers' AutoencoderKLFlux2 plus the klein
pipeline's patchify and BatchNorm normalisation (docs/flux2.md §3, §7: ch 32, ch_mult (1, 2), one res block,
z 4, random running statistics, a 32 x 48 image), from a diffusers folder and from BFL's single-file layout."""

import pytest
import torch
from conftest import randomize_

from model.vae import VAE_CONFIGS, AutoEncoder, VAEConfig
from weights.vae import load_vae

TINY = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, scale_factor=1.0, shift_factor=0.0,
                 quant_conv=True, batch_norm_eps=1e-4)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random AutoencoderKLFlux2 (running statistics included) saved as a diffusers vae/ folder."""
    from diffusers import AutoencoderKLFlux2

    ref = AutoencoderKLFlux2(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    randomize_(ref, 0.05, seed=5)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        ref.bn.running_mean.copy_(torch.randn(16, generator=g))
        ref.bn.running_var.copy_(torch.rand(16, generator=g) + 0.5)
    folder = tmp_path_factory.mktemp("flux2-vae") / "vae"
    ref.eval().save_pretrained(folder)
    return ref, folder


def _pipeline_encode(ref, x):
    """What Flux2KleinPipeline does to a reference image: the posterior's mode, patchified, BN-normalised."""
    from diffusers import Flux2KleinPipeline

    z = Flux2KleinPipeline._patchify_latents(ref.encode(x).latent_dist.mode())
    std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
    return (z - ref.bn.running_mean.view(1, -1, 1, 1)) / std


def _pipeline_decode(ref, z):
    """What Flux2KleinPipeline does to the sampled latents before `vae.decode`."""
    from diffusers import Flux2KleinPipeline

    std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
    z = Flux2KleinPipeline._unpatchify_latents(z * std + ref.bn.running_mean.view(1, -1, 1, 1))
    return ref.decode(z).sample


def _check(ours: AutoEncoder, ref):
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(7)) * 2 - 1
    with torch.no_grad():
        want = _pipeline_encode(ref, x)
        got = ours.normalize_latents(ours.encode(x))
        assert got.shape == want.shape == (2, 16, 8, 12)  # 2x down (two levels), then the 2x2 patchify
        assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
        img_want, img_got = _pipeline_decode(ref, want), ours.decode(ours.denormalize_latents(want))
        assert ((img_got - img_want).abs().max() / img_want.abs().max()).item() <= 1e-5
        torch.testing.assert_close(ours.denormalize_latents(got), ours.encode(x), rtol=0, atol=1e-5)


def test_diffusers_folder_encodes_and_decodes_as_the_klein_pipeline(reference):
    ref, folder = reference
    ours = load_vae(folder)
    assert ours.config == TINY
    _check(ours, ref)


def test_bfl_single_file_is_read_with_its_statistics(reference, tmp_path):
    """BFL names (quant convs inside encoder / decoder), `bn.num_batches_tracked` included as files carry it."""
    from safetensors.torch import save_file

    ref, folder = reference
    ours = load_vae(folder)
    state = {k: v.contiguous() for k, v in ours.state_dict().items()}
    save_file(state | {"bn.num_batches_tracked": torch.tensor(7)}, tmp_path / "ae.safetensors")
    bfl = load_vae(tmp_path / "ae.safetensors")  # no config anywhere: FLUX.2 by its quant convs and statistics
    assert bfl.config == TINY and torch.equal(bfl.bn.running_var, ref.bn.running_var)
    _check(bfl, ref)


def test_conversion_round_trip_and_the_presets(reference, tmp_path):
    from weights.convert import convert_checkpoint

    ref, folder = reference
    bfl = convert_checkpoint(folder, tmp_path / "ae.safetensors", "official")
    back = convert_checkpoint(bfl, tmp_path / "vae", "diffusers")
    _check(load_vae(back), ref)
    flux2 = VAE_CONFIGS["flux2-ae"]
    assert (flux2.z_channels, flux2.downscale, flux2.batch_norm_eps) == (32, 8, 1e-4)
    with torch.device("meta"):  # 32 channels: conv_out 64 (mean | logvar), BN over 128 patchified channels
        model = AutoEncoder(flux2)
    assert model.encoder.conv_out.out_channels == 64 and model.bn.running_mean.shape == (128,)
    assert not hasattr(AutoEncoder(VAE_CONFIGS["tiny"]), "bn")  # FLUX.1 / SD3.5 keep scale and shift
