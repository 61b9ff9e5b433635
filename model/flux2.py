"""The FLUX.2 transformer (klein 4B / 9B, base and distilled; dev), with BFL parameter names so
`flux-2-klein-4b.safetensors` loads as is (docs/flux2.md §1).

forward(img, img_ids, txt, txt_ids, timesteps, guidance) -> velocity (B, L, out_channels), with timesteps the noise
level sigma in [0, 1]. What differs from FLUX.1 (model/flux.py): the modulations are computed once per forward from
the time embedding and shared by every block (no per-block modulation weights, no pooled text vector), the MLPs are
SwiGLU (`mlp.0` makes [gate | up]), no Linear has a bias, RoPE has four axes (T, H, W, L) of 32 with theta 2000,
and klein has no guidance input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .config import PresetConfig
from .flux import LastLayer, SelfAttention, StreamsShape, _clip_fp16, double_stream, time_vector
from .kernels.mlp_act import mlp_activation_reference
from .layers import MLP, BlockRunner, MLPEmbedder, ModulationOut, QKNorm, WideLinear, attention
from .rope import EmbedND


@dataclass(frozen=True)
class Flux2Config(StreamsShape, PresetConfig):
    """BFL `Flux2Params` fields (FLUX.2 dev by default)."""

    in_channels: int = 128  # the VAE's 32 channels, 2x2-patchified by the pipeline
    out_channels: int = 128
    context_in_dim: int = 15360  # 3 stacked hidden states of the text encoder (dev: Mistral 3 x 5120)
    hidden_size: int = 6144
    mlp_ratio: float = 3.0
    num_heads: int = 48
    depth: int = 8  # double-stream blocks
    depth_single_blocks: int = 48
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)  # RoPE widths for the (t, h, w, l) axes; sums to the head dim
    theta: int = 2000
    guidance_embed: bool = True  # dev is guidance-distilled; klein has no guidance input


FLUX2_CONFIGS: dict[str, Flux2Config] = {
    "flux2-dev": Flux2Config(),
    # klein: Qwen3-4B / -8B hidden states 9, 18, 27 stacked (3 x 2560, 3 x 4096); base and distilled share keys
    "klein-4b": Flux2Config(context_in_dim=7680, hidden_size=3072, num_heads=24, depth=5, depth_single_blocks=20,
                            guidance_embed=False),
    "klein-9b": Flux2Config(context_in_dim=12288, hidden_size=4096, num_heads=32, depth=8, depth_single_blocks=24,
                            guidance_embed=False),
    # the parity plan's tiny model (docs/flux2.md §7): every feature, milliseconds on a CPU
    "tiny": Flux2Config(in_channels=8, out_channels=8, context_in_dim=24, hidden_size=64, num_heads=4, depth=2,
                        depth_single_blocks=2, axes_dim=(4, 4, 4, 4), guidance_embed=False),
}
Flux2Config.PRESETS = FLUX2_CONFIGS
Flux2Config.FAMILY = "FLUX.2"


def swiglu(x: Tensor) -> Tensor:
    """silu(first half) * second half of the last dimension (`mlp.0` writes [gate | up])."""
    return mlp_activation_reference(x, "swiglu")


class SwiGLU(nn.Module):
    kind = "swiglu"  # model/layers.py activate: fused with the fp8 rounding of mlp.2's input

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x)


def _mlp(d: int, hidden: int) -> MLP:
    return MLP(WideLinear(d, 2 * hidden, bias=False), SwiGLU(), nn.Linear(hidden, d, bias=False))


def _mods(mod: Tensor, sets: int) -> list[ModulationOut]:
    """(B, 3 * sets * D) from a shared modulation -> `sets` (shift, scale, gate) triples, each (B, 1, D)."""
    chunks = mod[:, None, :].chunk(3 * sets, dim=-1)
    return [ModulationOut(*chunks[3 * i:3 * i + 3]) for i in range(sets)]


class DoubleStreamBlock(nn.Module):
    """FLUX.1's double block without its own modulation: `img_mod` / `txt_mod` (B, 6D) come from the model."""

    def __init__(self, cfg: Flux2Config):
        super().__init__()
        d, mlp = cfg.hidden_size, cfg.mlp_hidden_dim
        self.img_norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(d, cfg.num_heads, qkv_bias=False, proj_bias=False)
        self.img_norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.img_mlp = _mlp(d, mlp)
        self.txt_norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(d, cfg.num_heads, qkv_bias=False, proj_bias=False)
        self.txt_norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = _mlp(d, mlp)

    def forward(self, img: Tensor, txt: Tensor, img_mod: Tensor, txt_mod: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        return double_stream(self, img, txt, _mods(img_mod, 2), _mods(txt_mod, 2), pe)


class SingleStreamBlock(nn.Module):
    """`linear1` makes q, k, v and the SwiGLU input [gate | up]; `linear2` takes [attention, MLP] back to D."""

    def __init__(self, cfg: Flux2Config):
        super().__init__()
        d = cfg.hidden_size
        self.hidden_size, self.num_heads, self.mlp_hidden_dim = d, cfg.num_heads, cfg.mlp_hidden_dim
        self.linear1 = WideLinear(d, 3 * d + 2 * self.mlp_hidden_dim, bias=False)
        self.linear2 = nn.Linear(d + self.mlp_hidden_dim, d, bias=False)
        self.norm = QKNorm(d // cfg.num_heads)
        self.pre_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)

    def forward(self, x: Tensor, mod: Tensor, pe: Tensor) -> Tensor:
        (m,) = _mods(mod, 1)
        qkv, mlp = torch.split(self.linear1(m.modulate_norm(self.pre_norm, x, self.linear1)),
                               [3 * self.hidden_size, 2 * self.mlp_hidden_dim], dim=-1)
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, pe)
        attn = attention(q.to(v.dtype), k.to(v.dtype), v)  # (B, L, D)
        return _clip_fp16(x + m.gate * self.linear2(torch.cat((attn, swiglu(mlp)), dim=2)))


class GlobalModulation(nn.Module):
    """`lin(silu(vec))`, once per forward: (B, 3 * sets * D) that every block of a kind shares."""

    def __init__(self, dim: int, sets: int):
        super().__init__()
        self.lin = nn.Linear(dim, 3 * sets * dim, bias=False)

    def forward(self, vec: Tensor) -> Tensor:
        return self.lin(F.silu(vec))


class Flux2(BlockRunner, nn.Module):
    def __init__(self, config: Flux2Config):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.in_channels, self.out_channels = config.in_channels, config.out_channels
        self.pe_embedder = EmbedND(theta=config.theta, axes_dim=config.axes_dim)
        self.img_in = nn.Linear(config.in_channels, d, bias=False)
        self.txt_in = nn.Linear(config.context_in_dim, d, bias=False)
        self.time_in = MLPEmbedder(256, d, bias=False)
        self.guidance_in = MLPEmbedder(256, d, bias=False) if config.guidance_embed else nn.Identity()
        self.double_stream_modulation_img = GlobalModulation(d, 2)
        self.double_stream_modulation_txt = GlobalModulation(d, 2)
        self.single_stream_modulation = GlobalModulation(d, 1)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(config) for _ in range(config.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(config) for _ in range(config.depth_single_blocks))
        self.final_layer = LastLayer(d, config.out_channels, bias=False)

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                guidance: Tensor | None = None) -> Tensor:
        vec = time_vector(self, img, txt, timesteps, guidance, "4.0")
        img_mod = self.double_stream_modulation_img(vec)
        txt_mod = self.double_stream_modulation_txt(vec)
        single_mod = self.single_stream_modulation(vec)

        img = self.img_in(img)
        txt = self.txt_in(txt)
        pe = self.pe_embedder.joint(txt_ids, img_ids)

        for block in self.double_blocks:
            img, txt = self._run(block, img, txt, img_mod, txt_mod, pe)
        n_txt = txt.shape[1]
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = self._run(block, x, single_mod, pe)
        return self.final_layer(x[:, n_txt:], vec)


def flux2_image_ids(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """Position ids (H * W, 4) = (0, row, col, 0) of the tokens of an (H, W) latent (already 2x2-patchified:
    one token per latent pixel), row-major."""
    ids = torch.zeros(height, width, 4, device=device)
    ids[..., 1] = torch.arange(height, device=device)[:, None]
    ids[..., 2] = torch.arange(width, device=device)[None, :]
    return ids.reshape(height * width, 4)


def flux2_text_ids(length: int, device: torch.device | str | None = None) -> Tensor:
    """Text token n sits at (0, 0, 0, n): FLUX.2's fourth axis orders the text (FLUX.1's text ids are all 0)."""
    ids = torch.zeros(length, 4, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids
