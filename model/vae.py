"""The AutoEncoder of FLUX.1 and SD3.5 (16 channels) and of FLUX.2 (32 channels), with BFL / LDM parameter names.

The parameter names are the keys of BFL `ae.safetensors` (and of SD3.5's `first_stage_model.*`), so those files load
with no key map; diffusers `AutoencoderKL` files go through `weights/keymaps/vae.py`. The attention q/k/v/proj_out
are 1x1 convolutions because that is how the LDM files store them.

`encode` returns unscaled latents and `decode` takes unscaled latents; `normalize_latents` / `denormalize_latents`
give what the transformer sees: FLUX.1 / SD3.5 scale and shift them; FLUX.2 patchifies them 2x2 (32 -> 128 channels,
half the side) and normalises with its BatchNorm running statistics, eps 1e-4 (docs/flux2.md §3).
Large images are encoded and decoded in overlapping tiles blended with linear ramps, so a 2048x2048 decode needs
the memory of one tile, not of the whole image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3  # RGB in [-1, 1]
    out_channels: int = 3
    ch: int = 128  # width of the first level; level l has ch * ch_mult[l] channels
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # one entry per level; every level but the last halves H and W
    num_res_blocks: int = 2  # resnets per encoder level (the decoder has one more per level)
    z_channels: int = 16  # latent channels; the encoder emits 2 * z (mean and log-variance)
    norm_groups: int = 32  # GroupNorm groups everywhere (eps 1e-6)
    scale_factor: float = 0.3611  # normalised latent = (z - shift) * scale
    shift_factor: float = 0.1159
    quant_conv: bool = False  # FLUX.2: 1x1 convs after the encoder (2z -> 2z) and before the decoder (z -> z)
    # FLUX.2: the latent normalisation is BatchNorm running statistics (`bn`) over 2x2-patchified latents, with
    # this eps (None: scale / shift)
    batch_norm_eps: float | None = None

    def __post_init__(self):
        widths = [self.ch * m for m in self.ch_mult]
        if any(w % self.norm_groups for w in widths):
            raise ValueError(f"VAEConfig: every level width {widths} must be divisible by norm_groups={self.norm_groups}")
        if not self.ch_mult or self.num_res_blocks < 1 or self.z_channels < 1:
            raise ValueError("VAEConfig: ch_mult must be non-empty, num_res_blocks and z_channels positive")
        if self.scale_factor <= 0:
            raise ValueError(f"VAEConfig: scale_factor must be positive, got {self.scale_factor}")

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel along one side (8 for the real models)."""
        return 2 ** (len(self.ch_mult) - 1)


VAE_CONFIGS: dict[str, VAEConfig] = {
    "flux1": VAEConfig(),  # FLUX.1's autoencoder (BFL's ae.safetensors)
    # Same network as FLUX.1's; only the latent statistics differ.
    "sd3.5": VAEConfig(scale_factor=1.5305, shift_factor=0.0609),
    # diffusers AutoencoderKL(block_out_channels=(32, 64, 64), layers_per_block=2, latent_channels=16): the tests' twin.
    "tiny": VAEConfig(ch=32, ch_mult=(1, 2, 2)),
    # FLUX.2's autoencoder (BFL ae.safetensors of FLUX.2, the klein repos' vae/): the same body, 32 channels
    "flux2-ae": VAEConfig(z_channels=32, scale_factor=1.0, shift_factor=0.0, quant_conv=True, batch_norm_eps=1e-4),
}

# Images with more latent pixels than this are tiled when `tiled=None`: it keeps every standard Flux / SD3.5
# resolution (up to ~2 MP at downscale 8) exact and untiled, while a 2048x2048 decode goes through tiles. Counted
# in latent pixels, the mid-block attention's tokens: its score matrix (tokens^2) is what grows fastest, and on the
# CPU torch's SDPA holds it whole (the demo VAE, downscale 4, held 34 GB at 1024 px untiled).
AUTO_TILE_LATENT = (1536 // 8) ** 2
TILE_SIZE = 512  # image pixels per tile side
TILE_OVERLAP = 128  # image pixels shared by neighbouring tiles; the seams are blended across this width


# ----------------------------------------------------------------------------------------------------------------
# building blocks


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions (only at the lowest resolution, in the mid block)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head of width C; SDPA picks a memory-efficient kernel, so the
        # (H*W)^2 score matrix is never materialised for large latents.
        q, k, v = (t.reshape(B, 1, C, H * W).transpose(-1, -2) for t in (self.q(h), self.k(h), self.v(h)))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Asymmetric padding (right and bottom only) is what the checkpoints were trained with.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        c, groups = config, config.norm_groups
        widths = [c.ch * m for m in c.ch_mult]
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        width = c.ch
        for level, out in enumerate(widths):
            stage = nn.Module()
            stage.block = nn.ModuleList(
                ResnetBlock(width if j == 0 else out, out, groups) for j in range(c.num_res_blocks)
            )
            if level < len(widths) - 1:
                stage.downsample = Downsample(out)
            self.down.append(stage)
            width = out
        self.mid = MidBlock(width, groups)
        self.norm_out = _norm(width, groups)
        self.conv_out = nn.Conv2d(width, 2 * c.z_channels, 3, padding=1)
        if c.quant_conv:
            self.quant_conv = nn.Conv2d(2 * c.z_channels, 2 * c.z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        h = self.conv_out(F.silu(self.norm_out(h)))  # (B, 2z, H/8, W/8): mean and log-variance
        return self.quant_conv(h) if hasattr(self, "quant_conv") else h


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        c, groups = config, config.norm_groups
        widths = [c.ch * m for m in c.ch_mult]
        width = widths[-1]
        if c.quant_conv:
            self.post_quant_conv = nn.Conv2d(c.z_channels, c.z_channels, 1)
        self.conv_in = nn.Conv2d(c.z_channels, width, 3, padding=1)
        self.mid = MidBlock(width, groups)
        # up[l] is level l (same resolution as encoder.down[l]); it runs from the last level to the first.
        stages: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            out = widths[level]
            stage = nn.Module()
            stage.block = nn.ModuleList(
                ResnetBlock(width if j == 0 else out, out, groups) for j in range(c.num_res_blocks + 1)
            )
            if level > 0:
                stage.upsample = Upsample(out)
            stages.insert(0, stage)
            width = out
        self.up = nn.ModuleList(stages)
        self.norm_out = _norm(width, groups)
        self.conv_out = nn.Conv2d(width, c.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        if hasattr(self, "post_quant_conv"):
            z = self.post_quant_conv(z)
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------------------------
# tiling


def _starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins covering [0, size): a regular stride, with the last tile pushed back to end exactly at `size`."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(length: int, overlap: int, fade_start: bool, fade_end: bool, device: torch.device) -> Tensor:
    """Blend weight along one axis of a tile, for the sides that share `overlap` pixels with another tile.

    Over the shared band the weight is 0 for the outer quarter, rises linearly over the middle half and is 1 for
    the inner quarter: the pixels next to a tile border (where zero padding and the missing context hurt most)
    never contribute, while the neighbour, for which the same pixels are a quarter band deep, has weight 1 there.
    """
    w = torch.ones(length, device=device)
    if overlap > 0:
        d = torch.arange(overlap, device=device, dtype=torch.float32) + 0.5  # distance from the tile border
        rise = ((d - overlap / 4) / (overlap / 2)).clamp(0, 1)
        if fade_start:
            w[:overlap] = torch.minimum(w[:overlap], rise)
        if fade_end:
            w[-overlap:] = torch.minimum(w[-overlap:], rise.flip(0))
    return w


def tiled_apply(fn: Callable[[Tensor], Tensor], x: Tensor, *, tile: int, overlap: int, up: int = 1, down: int = 1
                ) -> Tensor:
    """Apply `fn` to overlapping `tile`-sized crops of x (B, C, H, W) and blend the results.

    `fn` maps an (h, w) crop to an (h * up / down, w * up / down) output (decode: up=8; encode: down=8). Outputs are
    accumulated in fp32 with ramp weights and divided by the total weight (a partition of unity), so a `fn` whose
    output pixels see at most a quarter of the overlap around them gives exactly the untiled result. The VAE is not
    such a function: GroupNorm statistics and the mid-block attention span the whole input, so each tile sees its
    own statistics and the result is an approximation (seam-free, since the weights are continuous), never exact.
    Peak memory is one tile's activations plus the fp32 output.
    """
    B, _, H, W = x.shape
    if tile % down or overlap % down or H % down or W % down:
        raise ValueError(f"tiled_apply: tile {tile}, overlap {overlap} and input {H}x{W} must be multiples of {down}")
    if not 0 <= 2 * overlap <= tile:
        raise ValueError(f"tiled_apply: overlap must be in [0, tile / 2], got overlap={overlap}, tile={tile}")
    rows, cols = _starts(H, tile, tile - overlap), _starts(W, tile, tile - overlap)
    out = weight = None
    o = overlap * up // down  # overlap in output pixels
    for top in rows:
        for left in cols:
            crop = x[:, :, top : top + tile, left : left + tile]
            y = fn(crop).float()  # (B, C_out, h * up / down, w * up / down)
            if out is None:
                out = x.new_zeros((B, y.shape[1], H * up // down, W * up // down), dtype=torch.float32)
                weight = x.new_zeros((1, 1, H * up // down, W * up // down), dtype=torch.float32)
            h, w = y.shape[-2:]
            wy = _ramp(h, o, top > 0, top + tile < H, y.device)
            wx = _ramp(w, o, left > 0, left + tile < W, y.device)
            mask = wy[:, None] * wx[None, :]  # (h, w)
            t, l = top * up // down, left * up // down
            out[:, :, t : t + h, l : l + w] += y * mask
            weight[:, :, t : t + h, l : l + w] += mask
    return out / weight


# ----------------------------------------------------------------------------------------------------------------
# the autoencoder


class AutoEncoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.batch_norm_eps is not None:
            self.bn = LatentStatistics(4 * config.z_channels)

    def _use_tiles(self, tiled: bool | None, pixels: int) -> bool:
        return pixels // self.config.downscale ** 2 > AUTO_TILE_LATENT if tiled is None else tiled

    def moments(self, images: Tensor, *, tiled: bool | None = None, tile_size: int = TILE_SIZE,
                tile_overlap: int = TILE_OVERLAP) -> tuple[Tensor, Tensor]:
        """Mean and log-variance (each (B, z, H/8, W/8)) of the latent distribution of images in [-1, 1]."""
        if self._use_tiles(tiled, images.shape[-2] * images.shape[-1]):
            h = tiled_apply(self.encoder, images, tile=tile_size, overlap=tile_overlap, down=self.config.downscale)
            h = h.to(images.dtype)
        else:
            h = self.encoder(images)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # the clamp keeps exp() finite, as in the reference

    def encode(self, images: Tensor, sample: bool = False, generator: torch.Generator | None = None, *,
               tiled: bool | None = None, tile_size: int = TILE_SIZE, tile_overlap: int = TILE_OVERLAP) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> unscaled latents (B, z, H/8, W/8): the mean, or a sample if `sample`."""
        mean, logvar = self.moments(images, tiled=tiled, tile_size=tile_size, tile_overlap=tile_overlap)
        if not sample:
            return mean
        # Noise drawn on the generator's device with the latents' shape and dtype, as diffusers draws it, so a
        # seed gives the same sample in both.
        device = generator.device if generator is not None else mean.device
        eps = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
        return mean + torch.exp(0.5 * logvar) * eps

    def decode(self, latents: Tensor, *, tiled: bool | None = None, tile_size: int = TILE_SIZE,
               tile_overlap: int = TILE_OVERLAP) -> Tensor:
        """Unscaled latents (B, z, h, w) -> images (B, 3, 8h, 8w), nominally in [-1, 1] (not clamped)."""
        f = self.config.downscale
        if self._use_tiles(tiled, latents.shape[-2] * latents.shape[-1] * f * f):
            if tile_size % f or tile_overlap % f:
                raise ValueError(f"decode: tile_size and tile_overlap must be multiples of {f}")
            out = tiled_apply(self.decoder, latents, tile=tile_size // f, overlap=tile_overlap // f, up=f)
            return out.to(latents.dtype)
        return self.decoder(latents)

    def normalize_latents(self, z: Tensor) -> Tensor:
        """Unscaled VAE latents -> the normalised latents the transformer is trained on (FLUX.2: 2x2-patchified,
        (B, 4z, h/2, w/2))."""
        if self.config.batch_norm_eps is None:
            return normalize_latents(z, self.config)
        mean, std = self.bn.mean_std(self.config.batch_norm_eps, z)
        return (patchify(z) - mean) / std

    def denormalize_latents(self, z: Tensor) -> Tensor:
        """Transformer latents -> unscaled latents for `decode`."""
        if self.config.batch_norm_eps is None:
            return denormalize_latents(z, self.config)
        mean, std = self.bn.mean_std(self.config.batch_norm_eps, z)
        return unpatchify(z * std + mean)


class LatentStatistics(nn.Module):
    """FLUX.2's latent statistics: a BatchNorm2d's running mean and variance (no affine, always in eval), stored as
    `bn.running_mean` / `bn.running_var` as both BFL and diffusers files hold them."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def mean_std(self, eps: float, like: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, sqrt(var + eps)), each (1, C, 1, 1) in `like`'s dtype and device, computed as diffusers does."""
        std = torch.sqrt(self.running_var.view(1, -1, 1, 1) + eps)
        return (self.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype), std.to(like.device, like.dtype))


def patchify(z: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2), channel c*4 + pi*2 + pj: the (c ph pw) order of FLUX.1's token packing."""
    return rearrange(z, "B C (H ph) (W pw) -> B (C ph pw) H W", ph=2, pw=2)


def unpatchify(z: Tensor) -> Tensor:
    return rearrange(z, "B (C ph pw) H W -> B C (H ph) (W pw)", ph=2, pw=2)


def normalize_latents(z: Tensor, config: VAEConfig) -> Tensor:
    return (z - config.shift_factor) * config.scale_factor


def denormalize_latents(z: Tensor, config: VAEConfig) -> Tensor:
    return z / config.scale_factor + config.shift_factor


def images_to_vae(images: Tensor) -> Tensor:
    """Images in [0, 1] -> the VAE's [-1, 1] input."""
    return images * 2.0 - 1.0


def vae_to_images(x: Tensor) -> Tensor:
    """Decoder output -> images in [0, 1] (clamped)."""
    return (x / 2 + 0.5).clamp(0, 1)
