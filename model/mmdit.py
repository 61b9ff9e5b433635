"""The SD3 / SD3.5 MMDiT with SAI parameter names, so `sd3.5_large.safetensors` loads with no key map.

forward(x, timesteps, y, context, skip_layers) -> velocity (B, C, H, W), with timesteps on the 0-1000
scale (sigma * 1000) as SAI and diffusers take them. Each joint block has two streams with their own
weights (x: image patches, context: text tokens) that meet in one attention over [x, context]. There is
no RoPE: positions come from an absolute 2-D table added once at the patch embedding. The numerics (dtype
casts, rounding points) follow diffusers' `SD3Transformer2DModel`, so bf16 agrees with diffusers in bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from . import kernels
from .config import PresetConfig
from .layers import BlockRunner, WideLinear, activate, attention, modulate_norm, timestep_embedding


@dataclass(frozen=True)
class MMDiTConfig(PresetConfig):
    """Field names follow SAI's `MMDiTX` arguments where they exist."""

    in_channels: int = 16  # VAE latent channels
    out_channels: int = 16
    patch_size: int = 2
    hidden_size: int = 2432  # SAI: 64 * depth for every released model
    num_heads: int = 38
    depth: int = 38  # joint blocks; the last one's context stream only feeds attention
    mlp_ratio: float = 4.0
    adm_in_channels: int = 2048  # pooled CLIP-L (768) || CLIP-G (1280)
    context_in_dim: int = 4096  # T5-XXL width (CLIP hidden states are zero-padded to it)
    pos_embed_max_size: int = 192  # the position table covers a max x max patch grid, centre-cropped
    qk_norm: str | None = "rms"  # "rms" (SD3.5) or None (SD3.0)
    dual_attention_layers: tuple[int, ...] = ()  # blocks whose x stream adds image-only attention (`attn2`)

    def __post_init__(self):
        object.__setattr__(self, "dual_attention_layers", tuple(sorted(self.dual_attention_layers)))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.qk_norm not in (None, "rms"):
            raise ValueError(f"qk_norm must be 'rms' or None, got {self.qk_norm!r}")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"dual_attention_layers {bad} are outside the {self.depth} blocks")
        if self.pos_embed_max_size < 1 or self.patch_size < 1:
            raise ValueError("pos_embed_max_size and patch_size must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads



MMDIT_CONFIGS: dict[str, MMDiTConfig] = {
    "sd3-medium": MMDiTConfig(hidden_size=1536, num_heads=24, depth=24, qk_norm=None),
    "sd3.5-large": MMDiTConfig(),  # also sd3.5-large-turbo
    "sd3.5-medium": MMDiTConfig(hidden_size=1536, num_heads=24, depth=24, pos_embed_max_size=384,
                                dual_attention_layers=tuple(range(13))),
    # SD3.5-medium's features at toy width: QK-norm, two dual blocks, a pre-only last block. For the tests.
    "tiny": MMDiTConfig(hidden_size=32, num_heads=2, depth=3, adm_in_channels=24, context_in_dim=32,
                        pos_embed_max_size=8, dual_attention_layers=(0, 1)),
}
MMDiTConfig.PRESETS = MMDIT_CONFIGS
MMDiTConfig.FAMILY = "MMDiT"


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """SAI's 2-D sin-cos table (grid*grid, dim), patches row-major: [sin, cos] of the column in the first
    half, of the row in the second. Only an init: checkpoints carry a trained table, which the model uses."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    angles = torch.outer(torch.arange(grid, dtype=torch.float64), omega)  # (grid, dim/4)
    # one axis' table in fp64 as SAI computes it, then broadcast (the full table is 226M values in medium)
    axis = torch.cat([angles.sin(), angles.cos()], dim=1).float()  # (grid, dim/2)
    cols = axis.repeat(grid, 1)  # (grid*grid, dim/2), the column index varies fastest
    rows = axis.repeat_interleave(grid, dim=0)
    return torch.cat([cols, rows], dim=1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    # diffusers' operation order (norm * (1 + scale) + shift): the same rounding in bf16
    return x * (1 + scale) + shift


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return rearrange(self.proj(x), "B D h w -> B (h w) D")


class Embedder(nn.Module):
    """SAI's TimestepEmbedder / VectorEmbedder: `mlp` = Linear, SiLU, Linear."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class HeadNorm(nn.Module):
    """The learned weight of one q/k RMSNorm (`ln_q`, `ln_k`). q and k are normalised together in
    `kernels.qk_norm` with diffusers' casting: fp32 variance, rounded to the weight dtype if that is half."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


class SelfAttention(nn.Module):
    """qkv projection (with optional QK-norm) and output projection; `pre_only` streams have no `proj`."""

    def __init__(self, dim: int, num_heads: int, qk_norm: str | None, pre_only: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = WideLinear(dim, 3 * dim, bias=True)
        self.proj = None if pre_only else nn.Linear(dim, dim)
        self.ln_q = HeadNorm(dim // num_heads) if qk_norm else None
        self.ln_k = HeadNorm(dim // num_heads) if qk_norm else None

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, D) -> q, k, v each (B, H, L, D/H); SAI and diffusers both order qkv rows (3, H, D/H)."""
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        if self.ln_q is not None:
            q, k = kernels.qk_norm(q, k, self.ln_q.weight, self.ln_k.weight, self.ln_q.eps)
        # an fp32 norm weight in a half model would promote q, k; SDPA wants one dtype
        return q.to(v.dtype), k.to(v.dtype), v

    def forward(self, x: Tensor) -> Tensor:
        """Plain self-attention over x alone (the dual blocks' `attn2`)."""
        return self.proj(attention(*self.qkv_heads(x)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = WideLinear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(activate(self.act, self.fc1(x), self.fc2))


class DismantledBlock(nn.Module):
    """One stream of a joint block (SAI's name): adaLN-Zero modulation, its attention weights, its MLP.

    Modulation chunks, in SAI's and diffusers' order: shift/scale/gate for attention and for the MLP, then
    (dual blocks) shift/scale/gate for `attn2`. A `pre_only` stream (the last block's context) has only
    (shift, scale).
    """

    def __init__(self, cfg: MMDiTConfig, pre_only: bool = False, dual: bool = False):
        super().__init__()
        d = cfg.hidden_size
        self.pre_only, self.dual = pre_only, dual
        self.n_mods = 2 if pre_only else 9 if dual else 6
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(d, cfg.num_heads, cfg.qk_norm, pre_only=pre_only)
        self.attn2 = SelfAttention(d, cfg.num_heads, cfg.qk_norm) if dual else None
        if not pre_only:
            self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, self.n_mods * d))

    def pre_attention(self, x: Tensor, c: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], tuple]:
        """-> (q, k, v) for the joint attention, and what `post_attention` needs."""
        mods = self.adaLN_modulation(c)[:, None, :].chunk(self.n_mods, dim=-1)  # each (B, 1, D)
        if not self.dual:
            return self.attn.qkv_heads(modulate_norm(self.norm1, x, mods[0], mods[1], self.attn.qkv)), (mods, None)
        xn = self.norm1(x)
        qkv = self.attn.qkv_heads(modulate(xn, mods[0], mods[1]))
        # attn2 reads the same normalised x, with its own shift and scale
        return qkv, (mods, modulate(xn, mods[6], mods[7]))

    def post_attention(self, x: Tensor, attn: Tensor, state: tuple) -> Tensor:
        mods, x2 = state
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        x = x + gate_msa * self.attn.proj(attn)
        if self.dual:
            x = x + mods[8] * self.attn2(x2)
        return x + gate_mlp * self.mlp(modulate_norm(self.norm2, x, shift_mlp, scale_mlp, self.mlp.fc1))


class JointBlock(nn.Module):
    def __init__(self, cfg: MMDiTConfig, index: int):
        super().__init__()
        last = index == cfg.depth - 1
        self.context_block = DismantledBlock(cfg, pre_only=last)
        self.x_block = DismantledBlock(cfg, dual=index in cfg.dual_attention_layers)

    def forward(self, context: Tensor, x: Tensor, c: Tensor) -> tuple[Tensor | None, Tensor]:
        n_x = x.shape[1]
        ctx_qkv, ctx_state = self.context_block.pre_attention(context, c)
        x_qkv, x_state = self.x_block.pre_attention(x, c)
        # q, k, v each (B, H, L + T, D/H) in diffusers' order [x, context]. SAI puts context first; with no
        # position term inside attention both are the same function, and diffusers' order keeps bf16 rounding
        # in the softmax sums alike.
        q, k, v = (torch.cat((xs, cs), dim=2) for xs, cs in zip(x_qkv, ctx_qkv, strict=True))
        attn = attention(q, k, v)  # (B, L + T, D)
        x = self.x_block.post_attention(x, attn[:, :n_x], x_state)
        if self.context_block.pre_only:
            return None, x  # the last block's context output would feed nothing
        return self.context_block.post_attention(context, attn[:, n_x:], ctx_state), x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        # stored (shift, scale) by SAI; diffusers stores (scale, shift), which the key map swaps
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None, :].chunk(2, dim=-1)  # each (B, 1, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MMDiT(BlockRunner, nn.Module):
    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = config
        d, p = config.hidden_size, config.patch_size
        self.x_embedder = PatchEmbed(p, config.in_channels, d)
        # persistent: loaded from the checkpoint. The trained table is not the sin-cos formula (and diffusers'
        # init formula differs from SAI's), so it is never recomputed.
        table = sincos_pos_embed_2d(d, config.pos_embed_max_size)[None]  # (1, max*max, D)
        self.register_buffer("pos_embed", table, persistent=True)
        self.t_embedder = Embedder(256, d)
        self.y_embedder = Embedder(config.adm_in_channels, d)
        self.context_embedder = nn.Linear(config.context_in_dim, d)
        self.joint_blocks = nn.ModuleList(JointBlock(config, i) for i in range(config.depth))
        self.final_layer = FinalLayer(d, p, config.out_channels)

    def cropped_pos_embed(self, h: int, w: int) -> Tensor:
        """The centre h x w window (in patches) of the max x max table -> (1, h*w, D)."""
        m = self.config.pos_embed_max_size
        if h > m or w > m:
            side = m * self.config.patch_size
            raise ValueError(f"a {h}x{w} patch grid exceeds pos_embed_max_size {m} (latents up to {side})")
        top, left = (m - h) // 2, (m - w) // 2
        table = self.pos_embed.reshape(1, m, m, -1)  # (1, max, max, D), row-major
        return table[:, top : top + h, left : left + w].reshape(1, h * w, -1)

    def forward(
        self, x: Tensor, timesteps: Tensor, y: Tensor, context: Tensor, skip_layers: list[int] | None = None
    ) -> Tensor:
        """x (B, C, H, W) latents, timesteps (B,) = sigma * 1000, y (B, adm) pooled, context (B, T, 4096).

        `skip_layers`: blocks left out entirely (skip-layer guidance runs a second pass with e.g. [7, 8, 9]).
        """
        p = self.config.patch_size
        if x.ndim != 4 or x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"x must be (B, C, H, W) with H and W divisible by {p}, got {tuple(x.shape)}")
        h, w = x.shape[-2] // p, x.shape[-1] // p
        tokens = self.x_embedder(x)  # (B, h*w, D)
        tokens = (tokens + self.cropped_pos_embed(h, w)).to(tokens.dtype)
        # the sinusoid is computed from fp32 timesteps and only then rounded to the activation dtype, as in
        # diffusers and SAI (unlike Flux, the timestep itself is not rounded)
        t_freq = timestep_embedding(timesteps.float(), 256, time_factor=1.0).to(y.dtype)
        c = self.t_embedder(t_freq) + self.y_embedder(y)  # (B, D)
        context = self.context_embedder(context)  # (B, T, D)

        skip = set(skip_layers or ())
        for i, block in enumerate(self.joint_blocks):
            if i not in skip:
                context, tokens = self._run(block, context, tokens, c)
        out = self.final_layer(tokens, c)  # (B, h*w, p*p*C), channels ordered (p, q, C) as SAI and diffusers
        return rearrange(out, "B (h w) (p q C) -> B C (h p) (w q)", h=h, p=p, q=p)
