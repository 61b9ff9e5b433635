"""diffusers `AutoencoderKL` names <-> our (BFL / LDM) VAE names, as a declarative table.

Each row is (ours, diffusers, transform-to-ours, transform-to-diffusers). `{side}` is encoder or decoder, `{l}` an
encoder level, `{j}` a resnet index and `{u}` a diffusers decoder up-block: diffusers numbers up blocks in the order
they run (lowest resolution first) while LDM numbers them by resolution level, so `{u} = levels - 1 - {l}`.
Rows match a key's prefix; the rest of the key (`weight`, `bias`) is kept.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import Tensor


def conv_1x1(t: Tensor) -> Tensor:
    """diffusers stores the mid-block attention projections as Linear [C, C]; LDM as 1x1 conv [C, C, 1, 1]."""
    return t[:, :, None, None] if t.ndim == 2 else t


def linear(t: Tensor) -> Tensor:
    return t[:, :, 0, 0] if t.ndim == 4 else t


Transform = Callable[[Tensor], Tensor] | None

# (ours, diffusers, to ours, to diffusers). Order matters only in that the first matching row wins.
VAE_DIFFUSERS: tuple[tuple[str, str, Transform, Transform], ...] = (
    ("encoder.down.{l}.block.{j}.nin_shortcut.", "encoder.down_blocks.{l}.resnets.{j}.conv_shortcut.", None, None),
    ("encoder.down.{l}.block.{j}.", "encoder.down_blocks.{l}.resnets.{j}.", None, None),
    ("encoder.down.{l}.downsample.conv.", "encoder.down_blocks.{l}.downsamplers.0.conv.", None, None),
    ("decoder.up.{l}.block.{j}.nin_shortcut.", "decoder.up_blocks.{u}.resnets.{j}.conv_shortcut.", None, None),
    ("decoder.up.{l}.block.{j}.", "decoder.up_blocks.{u}.resnets.{j}.", None, None),
    ("decoder.up.{l}.upsample.conv.", "decoder.up_blocks.{u}.upsamplers.0.conv.", None, None),
    ("{side}.mid.block_1.", "{side}.mid_block.resnets.0.", None, None),
    ("{side}.mid.block_2.", "{side}.mid_block.resnets.1.", None, None),
    ("{side}.mid.attn_1.norm.", "{side}.mid_block.attentions.0.group_norm.", None, None),
    ("{side}.mid.attn_1.q.", "{side}.mid_block.attentions.0.to_q.", conv_1x1, linear),
    ("{side}.mid.attn_1.k.", "{side}.mid_block.attentions.0.to_k.", conv_1x1, linear),
    ("{side}.mid.attn_1.v.", "{side}.mid_block.attentions.0.to_v.", conv_1x1, linear),
    ("{side}.mid.attn_1.proj_out.", "{side}.mid_block.attentions.0.to_out.0.", conv_1x1, linear),
    ("{side}.norm_out.", "{side}.conv_norm_out.", None, None),
    ("{side}.conv_in.", "{side}.conv_in.", None, None),
    ("{side}.conv_out.", "{side}.conv_out.", None, None),
    # FLUX.2 (AutoencoderKLFlux2): the quant convs sit at the top level in diffusers, inside the encoder / decoder
    # in BFL's file; the latent statistics are `bn.*` in both
    ("encoder.quant_conv.", "quant_conv.", None, None),
    ("decoder.post_quant_conv.", "post_quant_conv.", None, None),
    ("bn.", "bn.", None, None),
)

# Files saved by diffusers before 0.14 name the attention projections like this; diffusers still reads them.
VAE_DIFFUSERS_LEGACY: tuple[tuple[str, str, Transform, Transform], ...] = (
    ("{side}.mid.attn_1.q.", "{side}.mid_block.attentions.0.query.", conv_1x1, linear),
    ("{side}.mid.attn_1.k.", "{side}.mid_block.attentions.0.key.", conv_1x1, linear),
    ("{side}.mid.attn_1.v.", "{side}.mid_block.attentions.0.value.", conv_1x1, linear),
    ("{side}.mid.attn_1.proj_out.", "{side}.mid_block.attentions.0.proj_attn.", conv_1x1, linear),
)

_FIELD = {"side": r"(?P<side>encoder|decoder)", "l": r"(?P<l>\d+)", "j": r"(?P<j>\d+)", "u": r"(?P<u>\d+)"}


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    body = "".join(re.escape(p) if i % 2 == 0 else _FIELD[p] for i, p in enumerate(parts))
    return re.compile("^" + body)


_FROM_DIFFUSERS = [(_pattern(d), o, t) for o, d, t, _ in VAE_DIFFUSERS + VAE_DIFFUSERS_LEGACY]
_TO_DIFFUSERS = [(_pattern(o), d, t) for o, d, _, t in VAE_DIFFUSERS]


def _rename(key: str, rows, levels: int, source_has_u: bool) -> tuple[str, Transform] | None:
    for pattern, target, transform in rows:
        m = pattern.match(key)
        if m is None:
            continue
        fields = m.groupdict()
        # diffusers up-block u is LDM level levels-1-u, and the relation is its own inverse.
        if source_has_u and "u" in fields:
            fields["l"] = str(levels - 1 - int(fields["u"]))
        elif "l" in fields:
            fields["u"] = str(levels - 1 - int(fields["l"]))
        return target.format(**fields) + key[m.end():], transform
    return None


def diffusers_to_ours(key: str, levels: int) -> tuple[str, Transform] | None:
    """A diffusers AutoencoderKL key -> (our key, transform of the tensor), or None for a key we do not know."""
    return _rename(key, _FROM_DIFFUSERS, levels, source_has_u=True)


def ours_to_diffusers(key: str, levels: int) -> tuple[str, Transform] | None:
    """Our key -> (the diffusers AutoencoderKL key, transform of the tensor), or None."""
    return _rename(key, _TO_DIFFUSERS, levels, source_has_u=False)
