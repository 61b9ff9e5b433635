"""Prompt encoders: a list of prompts -> the text inputs of the Flux and SD3 / SD3.5 transformers.

Both reproduce diffusers' `FluxPipeline.encode_prompt` / `StableDiffusion3Pipeline.encode_prompt` (one image
per prompt): fixed-length padding, no attention masks (pad tokens take part in T5's attention, so the T5
length is part of the conditioning: use the length the model was trained or distilled with), and the same
hidden states. Negative prompts are just prompts: SD3's default negative is `encode_sd3([""] * B, ...)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .clip import CLIPTextEncoder
from .t5 import T5Encoder
from .tokenizers import CLIPTokenizer, T5Tokenizer, prompt_list


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def encode_flux(
    prompts: str | Sequence[str],
    *,
    clip: CLIPTextEncoder,
    clip_tokenizer: CLIPTokenizer,
    t5: T5Encoder,
    t5_tokenizer: T5Tokenizer,
    max_length: int = 512,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (txt (B, max_length, 4096), txt_ids (max_length, 3) zeros, y (B, 768)).

    `y` is CLIP-L's pooled output (EOS position, not projected); `txt` is T5's last hidden state. `max_length`
    is the T5 length: diffusers' default 512; BFL uses 512 for dev and 256 for schnell.
    """
    prompts = prompt_list(prompts)
    clip_ids = clip_tokenizer(prompts)  # (B, 77)
    y = clip(clip_ids.to(_device(clip))).pooled_output  # (B, 768)
    t5_ids = t5_tokenizer(prompts, max_length=max_length)  # (B, T)
    txt = t5(t5_ids.to(_device(t5)))  # (B, T, 4096)
    # Text tokens sit at position 0 on every RoPE axis; diffusers makes them in the CLIP dtype.
    txt_ids = torch.zeros(txt.shape[1], 3, device=txt.device, dtype=y.dtype)
    return txt, txt_ids, y.to(txt.device)


@torch.no_grad()
def encode_sd3(
    prompts: str | Sequence[str],
    *,
    clip_l: CLIPTextEncoder,
    clip_l_tokenizer: CLIPTokenizer,
    clip_g: CLIPTextEncoder,
    clip_g_tokenizer: CLIPTokenizer,
    t5: T5Encoder | None,
    t5_tokenizer: T5Tokenizer | None,
    max_length: int = 256,
    joint_dim: int = 4096,
) -> tuple[Tensor, Tensor]:
    """-> (context (B, 77 + max_length, joint_dim), pooled (B, 768 + 1280)).

    CLIP-L and bigG penultimate hidden states (no final LayerNorm) are joined on channels, zero-padded to T5's
    width and put before T5's sequence; pooled is the two projected EOS embeddings. Without T5 (`t5=None`) its
    part is zeros of (B, max_length, joint_dim), as in diffusers.
    """
    prompts = prompt_list(prompts)
    out_l = clip_l(clip_l_tokenizer(prompts).to(_device(clip_l)))
    out_g = clip_g(clip_g_tokenizer(prompts).to(_device(clip_g)))
    if out_l.text_embeds is None or out_g.text_embeds is None:
        raise ValueError("SD3 needs both CLIP text projections (text_projection.weight); one has none")
    if t5 is not None:
        if t5_tokenizer is None:
            raise ValueError("t5 was given without t5_tokenizer")
        t5_out = t5(t5_tokenizer(prompts, max_length=max_length).to(_device(t5)))  # (B, T, 4096)
    else:
        t5_out = torch.zeros(len(prompts), max_length, joint_dim, device=out_l.last_hidden_state.device,
                             dtype=out_l.last_hidden_state.dtype)
    device = t5_out.device
    # diffusers casts bigG's states to CLIP-L's dtype before joining them.
    dtype = out_l.penultimate_hidden_state.dtype
    clip_states = torch.cat([out_l.penultimate_hidden_state.to(device),
                             out_g.penultimate_hidden_state.to(device, dtype)], dim=-1)  # (B, 77, 768 + 1280)
    if clip_states.shape[-1] > t5_out.shape[-1]:
        raise ValueError(f"CLIP widths ({clip_states.shape[-1]}) exceed the T5 width ({t5_out.shape[-1]})")
    clip_states = F.pad(clip_states, (0, t5_out.shape[-1] - clip_states.shape[-1]))  # (B, 77, 4096)
    context = torch.cat([clip_states, t5_out], dim=1)  # (B, 77 + T, 4096)
    pooled = torch.cat([out_l.text_embeds.to(device), out_g.text_embeds.to(device)], dim=-1)  # (B, 2048)
    return context, pooled
