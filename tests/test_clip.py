"""CLIP text transformer against transformers' CLIPTextModel and CLIPTextModelWithProjection (docs/models.md
§9 row 13)."""

import dataclasses

import pytest
import torch
from text_fixtures import assert_close_rel, hf_clip, ours_clip_from, run_hf_clip

from model.clip import CLIP_CONFIGS, CLIPTextEncoder, eos_positions

TINY = CLIP_CONFIGS["tiny"]
# The current rule (first position equal to eos 500) with quick_gelu and no projection, as Flux's CLIP-L; and
# the legacy rule (eos_token_id == 2: argmax of the ids) with gelu and a projection, as an old-config bigG.
# EOS 500 is not the largest id, so the two rules pick different positions and a swapped rule fails the test.
CURRENT = dataclasses.replace(TINY, eos_token_id=500, hidden_act="quick_gelu", projection_dim=None)
LEGACY = dataclasses.replace(TINY, eos_token_id=2, hidden_act="gelu", projection_dim=32)
BOS = 998


def _ids(eos: int, pad: int, seed: int = 5) -> torch.Tensor:
    """(3, 77): BOS, words, EOS, padding; prompt lengths 10, 40 and 76 (no padding left)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((3, 77), pad)
    for row, n in enumerate((10, 40, 76)):
        ids[row, 0] = BOS
        ids[row, 1:n] = torch.randint(3, 990, (n - 1,), generator=g)
        ids[row, 1:n][ids[row, 1:n] == eos] = 7
        ids[row, n] = eos
    ids[0, 3] = 999  # the largest id, before EOS: the legacy argmax rule pools here, the current one not
    return ids


def test_eos_rules_pick_different_positions_on_the_test_ids():
    ids = _ids(eos=500, pad=500)
    assert eos_positions(ids, 500).tolist() == [10, 40, 76]
    assert eos_positions(ids, 2).tolist() == [3, 0, 0]  # argmax: 999 at 3; BOS 998 is the largest elsewhere


@pytest.mark.parametrize("sigma", [0.02, 0.2])
@pytest.mark.parametrize("config", [CURRENT, LEGACY], ids=["current_eos", "legacy_eos"])
def test_clip_matches_transformers_fp32(config, sigma):
    hf = hf_clip(config, sigma, bos=BOS)
    ours = ours_clip_from(hf, config)
    ids = _ids(eos=500, pad=500 if config is CURRENT else 0)
    ref = run_hf_clip(hf, ids)
    with torch.no_grad():
        out = ours(ids)
    for name, value in ref.items():
        if value is None:
            assert getattr(out, name) is None
        else:
            assert_close_rel(getattr(out, name), value, torch.float32)
    assert (out.text_embeds is None) == (config.projection_dim is None)


@pytest.mark.parametrize("config", [CURRENT, LEGACY], ids=["current_eos", "legacy_eos"])
def test_clip_matches_transformers_bf16(config):
    hf = hf_clip(config, 0.02, bos=BOS)
    ours = ours_clip_from(hf, config).to(torch.bfloat16)
    ids = _ids(eos=500, pad=0)
    ref = run_hf_clip(hf.to(torch.bfloat16), ids)
    with torch.no_grad():
        out = ours(ids)
    for name, value in ref.items():
        if value is not None:
            assert getattr(out, name).dtype == torch.bfloat16
            assert_close_rel(getattr(out, name), value, torch.bfloat16)


def test_clip_full_size_parameter_counts():
    # transformers' CLIPTextModelWithProjection: CLIP-L 123,650,304, bigG 694,659,840; CLIP-L without
    # projection (Flux's CLIPTextModel) 123,060,480 (docs/models.md §5.2, §5.3).
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in CLIPTextEncoder(CLIP_CONFIGS[name]).parameters())
                  for name in ("clip-l", "clip-bigg")}
        bare = CLIPTextEncoder(dataclasses.replace(CLIP_CONFIGS["clip-l"], projection_dim=None))
    assert counts == {"clip-l": 123_650_304, "clip-bigg": 694_659_840}
    assert sum(p.numel() for p in bare.parameters()) == 123_060_480


def test_clip_rejects_bad_input():
    model = CLIPTextEncoder(TINY)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        model(torch.zeros(77, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden_act"):
        dataclasses.replace(TINY, hidden_act="relu")
    with pytest.raises(ValueError, match="divisible"):
        dataclasses.replace(TINY, num_attention_heads=5)
