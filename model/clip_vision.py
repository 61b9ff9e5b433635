"""CLIP vision tower (ViT) with transformers' names, its image preprocessing, and CLIP score.

Parameter names are transformers' `CLIPVisionModelWithProjection` keys (`vision_model.embeddings.class_embedding`,
`vision_model.pre_layrnorm.weight` (sic), `vision_model.encoder.layers.{i}...`, `visual_projection.weight`), which
are also the vision half of a full `CLIPModel` file, so both load without a key map (weights/vision.py). The
encoder layers are the text tower's (model/clip.py) without the causal mask.

`preprocess` reproduces transformers' `CLIPImageProcessorPil` defaults step for step (PIL bicubic resize of the
shortest side, center crop, 1/255, OpenAI mean / std), so embeddings match what the checkpoint was evaluated with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .clip import CLIPEncoder, check_tower
from .config import PresetConfig

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPVisionConfig(PresetConfig):
    """Hugging Face `CLIPVisionConfig` field names (OpenAI CLIP ViT-L/14 at 224 by default)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    projection_dim: int = 768
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # OpenAI: x*sigmoid(1.702x); OpenCLIP (laion) towers: exact erf GELU

    def __post_init__(self):
        check_tower(self)
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")

    @property
    def num_positions(self) -> int:
        # transformers' rule: the stride-`patch_size` conv drops a remainder, so the grid is the floor
        return (self.image_size // self.patch_size) ** 2 + 1  # patches + CLS


CLIP_VISION_CONFIGS: dict[str, CLIPVisionConfig] = {
    "vit-l-14": CLIPVisionConfig(),  # openai/clip-vit-large-patch14
    "tiny": CLIPVisionConfig(hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
                             num_attention_heads=4, image_size=32, patch_size=8),
}
CLIPVisionConfig.PRESETS = CLIP_VISION_CONFIGS
CLIPVisionConfig.FAMILY = "CLIP vision"


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        D, p = config.hidden_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.empty(D))
        self.patch_embedding = nn.Conv2d(3, D, kernel_size=p, stride=p, bias=False)
        self.position_embedding = nn.Embedding(config.num_positions, D)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, D), row-major patches
        cls = self.class_embedding.expand(x.shape[0], 1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, 1 + h*w, D)


class CLIPVisionTransformer(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic: transformers' name
        self.encoder = CLIPEncoder(config, causal=False)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPVisionTower(nn.Module):
    """`forward(pixel_values (B, 3, S, S) from preprocess) -> image_embeds (B, projection_dim)`, transformers'
    `get_image_features`: the CLS token after post_layernorm, projected (not normalised)."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTransformer(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, pixel_values: Tensor) -> Tensor:
        S = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, S, S):
            raise ValueError(f"pixel_values must be (B, 3, {S}, {S}) (see preprocess), got "
                             f"{tuple(pixel_values.shape)}")
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixel_values))  # (B, 1 + h*w, D)
        for layer in vm.encoder.layers:
            x = layer(x)
        return self.visual_projection(vm.post_layernorm(x[:, 0]))  # (B, P)

    def preprocess(self, images: Sequence) -> Tensor:
        return preprocess(images, self.config.image_size)


# ------------------------------------------------------------------------------------------- preprocessing


def _rgb_uint8(image) -> np.ndarray:
    """(H, W, 3) uint8, transparency composited onto white, as transformers' convert_to_rgb does."""
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, image.convert("RGBA"))
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4))):
        raise ValueError(f"images must be PIL images or uint8 (H, W, 3) arrays, got {a.dtype} {a.shape}")
    if a.ndim == 2 or a.shape[2] == 1:
        return np.repeat(a.reshape(*a.shape[:2], 1), 3, axis=2)
    if a.shape[2] == 4:
        alpha = a[..., 3:4] / 255  # float64, then rounded back: transformers' array rule, not PIL's
        return np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return a


def _resize_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """Shortest side to `size` (the long side floored, transformers' get_resize_output_image_size), PIL bicubic,
    then the center `size` x `size` crop with the floor offset ((H - size) // 2)."""
    h, w = rgb.shape[:2]
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_h, new_w = (new_long, size) if w <= h else (size, new_long)
    out = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), resample=Image.Resampling.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return out[top:top + size, left:left + size]


def preprocess(images: Sequence, image_size: int = 224) -> Tensor:
    """PIL images (any mode) or uint8 (H, W[, 1 | 3 | 4]) arrays -> pixel_values (B, 3, S, S) float32, equal to
    transformers' `CLIPImageProcessorPil(size={"shortest_edge": S}, crop_size=S)` output (its defaults for a CLIP
    checkpoint)."""
    if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 3):
        images = [images]
    mean = np.array(OPENAI_CLIP_MEAN, dtype=np.float32)
    std = np.array(OPENAI_CLIP_STD, dtype=np.float32)
    batch = []
    for image in images:
        x = _resize_crop(_rgb_uint8(image), image_size)
        # transformers' order and precisions: x * (1/255) in float64, cast to float32, then (x - mean) / std
        x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
        batch.append(((x - mean) / std).transpose(2, 0, 1))  # (3, S, S)
    return torch.from_numpy(np.stack(batch))


# ---------------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def embed_images(vision: CLIPVisionTower, images: Sequence, batch_size: int = 32) -> Tensor:
    """(N, projection_dim) float32 image embeddings (not normalised), `batch_size` images per forward."""
    images, p = list(images), next(vision.parameters())
    out = [vision(vision.preprocess(images[i:i + batch_size]).to(p.device)).float()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def clip_score(image_embeds: Tensor, text_embeds: Tensor) -> list[float]:
    """CLIPScore (Hessel et al. 2021) per image: w * max(cos(image_embed, text_embed), 0) with w = 100, the
    torchmetrics convention (the paper's w = 2.5 is a rescaling of the same number).

    `image_embeds`: (N, projection_dim), `embed_images`'s. `text_embeds`: (N, projection_dim), one prompt per
    image, or (projection_dim,) / (1, projection_dim) for one prompt shared by all: the projected text embeddings
    (`CLIPTextEncoder(...).text_embeds`, transformers' `get_text_features`) of the same CLIP checkpoint.
    """
    n, P = image_embeds.shape
    text = text_embeds.detach().float()
    text = text[None] if text.ndim == 1 else text  # (N | 1, P)
    if text.ndim != 2 or text.shape[1] != P or text.shape[0] not in (1, n):
        raise ValueError(f"text_embeds of shape {tuple(text_embeds.shape)} for {n} images: pass "
                         f"({n}, {P}) or ({P},), the projected embeddings of the same CLIP checkpoint")
    cos = F.cosine_similarity(image_embeds.float(), text.to(image_embeds.device), dim=-1)  # (N,)
    return (100 * cos.clamp(min=0)).tolist()
