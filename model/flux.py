"""The Flux transformer (FLUX.1-dev / schnell), with BFL parameter names so `flux1-dev.safetensors` loads as is.

forward(img, img_ids, txt, txt_ids, timesteps, y, guidance) -> velocity (B, L, out_channels), with timesteps the
noise level sigma in [0, 1]. Attention runs over [txt, img]; double blocks keep separate weights per stream,
single blocks run one stream over the joined sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from . import kernels
from .config import PresetConfig
from .layers import (
    MLP,
    BlockRunner,
    MLPEmbedder,
    Modulation,
    ModulationOut,
    QKNorm,
    WideLinear,
    attention,
    timestep_embedding,
)
from .rope import EmbedND, check_axes


class StreamsShape:
    """What the FLUX.1 and FLUX.2 configs share: their attention shape is checked, their MLP width derived."""

    def __post_init__(self):
        object.__setattr__(self, "axes_dim", tuple(self.axes_dim))
        check_axes(self.hidden_size, self.num_heads, self.axes_dim)

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


@dataclass(frozen=True)
class FluxConfig(StreamsShape, PresetConfig):
    """BFL `FluxParams` field names and meaning."""

    in_channels: int = 64  # packed latent channels: 16 VAE channels x 2 x 2
    out_channels: int = 64
    vec_in_dim: int = 768  # pooled CLIP-L width
    context_in_dim: int = 4096  # T5-XXL width
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE widths for the (t, h, w) axes; sums to the head dim
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True  # dev is guidance-distilled; schnell has no guidance input


FLUX_CONFIGS: dict[str, FluxConfig] = {
    "flux-dev": FluxConfig(),
    "flux-schnell": FluxConfig(guidance_embed=False),
    # 131,920 parameters; forward in milliseconds on a CPU. Used by the tests.
    "tiny": FluxConfig(
        in_channels=16, out_channels=16, vec_in_dim=24, context_in_dim=32, hidden_size=32, num_heads=2,
        depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6),
    ),
}
FluxConfig.PRESETS = FLUX_CONFIGS
FluxConfig.FAMILY = "Flux"


def _clip_fp16(x: Tensor) -> Tensor:
    # diffusers clips the residual streams in fp16 so an overflow saturates instead of becoming inf
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, proj_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = WideLinear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def split_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, D) -> raw q, k, v, each (B, H, L, D/H), strided views of one projection output."""
        return rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)


class DoubleStreamBlock(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        d, mlp = cfg.hidden_size, cfg.mlp_hidden_dim
        self.num_heads = cfg.num_heads
        self.img_mod = Modulation(d, double=True)
        self.img_norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(d, cfg.num_heads, cfg.qkv_bias)
        self.img_norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.img_mlp = MLP(WideLinear(d, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, d))
        self.txt_mod = Modulation(d, double=True)
        self.txt_norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(d, cfg.num_heads, cfg.qkv_bias)
        self.txt_norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = MLP(WideLinear(d, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, d))

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        return double_stream(self, img, txt, self.img_mod(vec), self.txt_mod(vec), pe)


def double_stream(block: nn.Module, img: Tensor, txt: Tensor, img_mods: tuple[ModulationOut, ModulationOut],
                  txt_mods: tuple[ModulationOut, ModulationOut], pe: Tensor) -> tuple[Tensor, Tensor]:
    """A double block's computation (FLUX.1 and FLUX.2: they differ in where the modulations come from and in
    the MLP), on the block's `{img,txt}_{norm1,attn,norm2,mlp}` modules."""
    n_txt = txt.shape[1]
    (img_mod1, img_mod2), (txt_mod1, txt_mod2) = img_mods, txt_mods
    txt_attn, img_attn = block.txt_attn, block.img_attn
    txt_q, txt_k, txt_v = txt_attn.split_qkv(txt_mod1.modulate_norm(block.txt_norm1, txt, txt_attn.qkv))
    img_q, img_k, img_v = img_attn.split_qkv(img_mod1.modulate_norm(block.img_norm1, img, img_attn.qkv))
    # Each stream's own QK-norm, then RoPE over the joint [txt, img] sequence: one fused op that writes
    # straight into the joint buffers, so the q/k concatenations cost nothing extra.
    q, k = kernels.qk_norm_rope_joint(
        txt_q, txt_k, img_q, img_k, txt_attn.norm.query_norm.scale, txt_attn.norm.key_norm.scale,
        img_attn.norm.query_norm.scale, img_attn.norm.key_norm.scale, pe, img_attn.norm.query_norm.eps,
    )  # each (B, H, T + L, D/H)
    v = torch.cat((txt_v, img_v), dim=2)
    attn = attention(q.to(v.dtype), k.to(v.dtype), v)  # (B, T + L, D)

    img = img + img_mod1.gate * img_attn.proj(attn[:, n_txt:])
    img = img + img_mod2.gate * block.img_mlp(img_mod2.modulate_norm(block.img_norm2, img, block.img_mlp[0]))
    txt = txt + txt_mod1.gate * txt_attn.proj(attn[:, :n_txt])
    txt = txt + txt_mod2.gate * block.txt_mlp(txt_mod2.modulate_norm(block.txt_norm2, txt, block.txt_mlp[0]))
    return _clip_fp16(img), _clip_fp16(txt)


class SingleStreamBlock(nn.Module):
    """One fused `linear1` makes q, k, v and the MLP input; one `linear2` takes [attention, MLP] back to D."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        d = cfg.hidden_size
        self.hidden_size = d
        self.num_heads = cfg.num_heads
        self.mlp_hidden_dim = cfg.mlp_hidden_dim
        self.linear1 = WideLinear(d, d * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(d + self.mlp_hidden_dim, d)
        self.norm = QKNorm(d // cfg.num_heads)
        self.pre_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(d, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        mod, _ = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1(mod.modulate_norm(self.pre_norm, x, self.linear1)),
                               [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, pe)
        attn = attention(q.to(v.dtype), k.to(v.dtype), v)  # (B, L, D)
        out = self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=2))
        return _clip_fp16(x + mod.gate * out)


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int, bias: bool = True):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels, bias=bias)
        # stored (shift, scale) by BFL; diffusers stores (scale, shift), which the key map swaps
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=bias))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)  # each (B, D)
        x = (1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :]
        return self.linear(x)


def time_vector(model: nn.Module, img: Tensor, txt: Tensor, timesteps: Tensor, guidance: Tensor | None,
                example: str) -> Tensor:
    """`time_in(t)`, plus `guidance_in(g)` for a guidance-distilled model (FLUX.1 and FLUX.2 alike); img and txt
    are checked to be (B, L, C). As diffusers, sigma and guidance are rounded to the activation dtype before the
    x1000 inside the embedding."""
    if img.ndim != 3 or txt.ndim != 3:
        raise ValueError(f"img and txt must be (B, L, C), got {tuple(img.shape)} and {tuple(txt.shape)}")
    vec = model.time_in(timestep_embedding(timesteps.to(img.dtype), 256))
    if model.config.guidance_embed:
        if guidance is None:
            raise ValueError(f"this {model.config.FAMILY} model has a guidance embedding (dev): pass guidance=, "
                             f"e.g. {example}")
        vec = vec + model.guidance_in(timestep_embedding(guidance.to(img.dtype), 256))
    return vec


class Flux(BlockRunner, nn.Module):
    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.pe_embedder = EmbedND(theta=config.theta, axes_dim=config.axes_dim)
        self.img_in = nn.Linear(config.in_channels, d, bias=True)
        self.time_in = MLPEmbedder(256, d)
        self.vector_in = MLPEmbedder(config.vec_in_dim, d)
        self.guidance_in = MLPEmbedder(256, d) if config.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(config.context_in_dim, d)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(config) for _ in range(config.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(config) for _ in range(config.depth_single_blocks))
        self.final_layer = LastLayer(d, config.out_channels)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
    ) -> Tensor:
        vec = time_vector(self, img, txt, timesteps, guidance, "3.5") + self.vector_in(y)

        img = self.img_in(img)
        txt = self.txt_in(txt)
        pe = self.pe_embedder.joint(txt_ids, img_ids)

        for block in self.double_blocks:
            img, txt = self._run(block, img, txt, vec, pe)
        n_txt = txt.shape[1]
        x = torch.cat((txt, img), dim=1)  # (B, T + L, D)
        for block in self.single_blocks:
            x = self._run(block, x, vec, pe)
        return self.final_layer(x[:, n_txt:], vec)
