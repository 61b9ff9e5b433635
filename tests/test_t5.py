"""T5 v1.1 encoder against transformers' T5EncoderModel (docs/models.md §9 row 12)."""

import dataclasses

import pytest
import torch
from conftest import randomize_
from safetensors.torch import load_file, save_file
from text_fixtures import assert_close_rel, hf_t5, ours_t5_from, t5_state

from model.t5 import T5_CONFIGS, T5Encoder, relative_position_bucket
from weights.lora_text import split_loras
from weights.text import load_t5

TINY = T5_CONFIGS["tiny"]
SEQ = 64  # >= 48: distances 8..63 fall in the logarithmic buckets, so their edges are exercised


def _ids(batch: int = 2, length: int = SEQ, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY.vocab_size, (batch, length), generator=g)
    ids[0, 40:] = 0  # padding (id 0) after a </s>, as the pipelines' tokenizers produce
    ids[0, 39] = 1
    return ids


def test_relative_position_bucket_matches_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = torch.arange(-700, 700)[None, :]
    for buckets, distance in ((32, 128), (16, 64), (64, 256)):
        ref = T5Attention._relative_position_bucket(relative, True, buckets, distance)
        torch.testing.assert_close(relative_position_bucket(relative, buckets, distance), ref, rtol=0, atol=0)


@pytest.mark.parametrize("sigma", [0.02, 0.2])
@pytest.mark.parametrize("masked", [False, True])
def test_t5_matches_transformers_fp32(sigma, masked):
    hf = hf_t5(TINY, sigma)
    ours = ours_t5_from(hf, TINY)
    ids = _ids()
    mask = (torch.arange(SEQ)[None] < torch.tensor([[40], [SEQ]])).long() if masked else None
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        out = ours(ids, mask)
    assert out.shape == (2, SEQ, TINY.d_model)
    assert_close_rel(out, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_t5_matches_transformers_low_precision(dtype):
    # sigma 0.02 only: at 0.2 the unscaled T5 attention is so peaked that a bf16 run is chaotic, transformers'
    # own bf16 output is 27% (of max) away from its fp64 output, and no pair of bf16 runs can be compared. At
    # 0.02 (trained-network scale) transformers bf16 vs fp64 is 0.9%, as is ours.
    hf = hf_t5(TINY, 0.02)
    ours = ours_t5_from(hf, TINY).to(dtype)
    hf = hf.to(dtype)
    ids = _ids()
    with torch.no_grad():
        ref = hf(input_ids=ids).last_hidden_state
        out = ours(ids)
    assert out.dtype == dtype
    assert_close_rel(out, ref, dtype)


def test_t5_fp16_overflow_is_clamped_like_transformers():
    # A model cast whole to fp16 (`.half()`, `wo` included) against transformers' `.half()`: both run all in fp16.
    # Blow up the feed-forward so the residual stream overflows fp16: without the clamp the output is NaN/inf.
    hf = hf_t5(TINY, 0.2)
    with torch.no_grad():
        hf.encoder.block[1].layer[1].DenseReluDense.wo.weight.mul_(30000.0)
    ours = ours_t5_from(hf, TINY).half()
    hf = hf.half()
    ids = _ids()
    with torch.no_grad():
        ref = hf(input_ids=ids).last_hidden_state
        x = ours.shared(ids)
        bias = ours.encoder.block[0].layer[0].SelfAttention.position_bias(SEQ, ids.device).half()
        unclamped = ours.encoder.block[0](x, bias)
        block = ours.encoder.block[1]
        unclamped = unclamped + block.layer[1](block.layer[0](unclamped, bias))
        out = ours(ids)
    assert not torch.isfinite(unclamped).all(), "the test input does not overflow fp16; the clamp is untested"
    assert torch.isfinite(out).all()
    assert_close_rel(out, ref, torch.float16)


def _boosted_t5(sigma: float, boost: float):
    # boost > 1 blows up block 1's feed-forward output past the fp16 range (the known fp16 T5-XXL failure)
    hf = hf_t5(TINY, sigma)
    with torch.no_grad():
        hf.encoder.block[1].layer[1].DenseReluDense.wo.weight.mul_(boost)
    return hf


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("sigma", "boost"), [(0.02, 1.0), (0.2, 30000.0)], ids=["trained-scale", "fp16-overflow"])
def test_t5_fp16_load_matches_transformers_from_pretrained(tmp_path, sigma, boost, masked):
    """load_t5(dtype=float16) against T5EncoderModel.from_pretrained(dtype=float16), how diffusers' Flux / SD3
    pipelines load T5: transformers keeps every `wo` in fp32 there (`_keep_in_fp32_modules`), so its residual
    stream runs in fp32 and an overflowing feed-forward stays finite and accurate instead of being clamped."""
    from transformers import T5EncoderModel

    hf = _boosted_t5(sigma, boost)
    hf.save_pretrained(tmp_path)
    ref_model = T5EncoderModel.from_pretrained(tmp_path, dtype=torch.float16).eval()
    assert ref_model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    ours = load_t5(tmp_path, dtype=torch.float16)
    for name, p in ours.named_parameters():
        assert p.dtype == (torch.float32 if name.endswith(".DenseReluDense.wo.weight") else torch.float16), name
    ids = _ids()
    mask = (torch.arange(SEQ)[None] < torch.tensor([[40], [SEQ]])).long() if masked else None
    with torch.no_grad():
        ref = ref_model(input_ids=ids, attention_mask=mask).last_hidden_state
        out = ours(ids, mask)
        all_fp16 = ours_t5_from(hf, TINY).half()(ids, mask)
    assert out.dtype == ref.dtype == torch.float16
    assert_close_rel(out, ref, torch.float16)
    if boost > 1:  # the case discriminates: an all-fp16 run (clamped) is far from the reference
        assert (all_fp16.float() - ref.float()).abs().max() > 0.3 * ref.float().abs().max()


def test_t5_bf16_load_keeps_wo_in_bf16(tmp_path):
    # transformers keeps `wo` in fp32 for fp16 only (bf16 has fp32's range), and so does load_t5
    from transformers import T5EncoderModel

    hf_t5(TINY, 0.02).save_pretrained(tmp_path)
    ref_model = T5EncoderModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in ref_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_t5(tmp_path, dtype=torch.bfloat16).parameters()} == {torch.bfloat16}


def test_t5_fp16_load_reads_wo_straight_to_fp32_and_merges_its_lora_there(tmp_path):
    # the fp32 `wo` of an fp16 load is the fp32 load's, bit for bit, with and without a LoRA on it: cast once from
    # the file dtype and merged in fp32, never rounded through fp16 on the way
    hf = hf_t5(TINY, 0.1)
    save_file(t5_state(hf), tmp_path / "t5.safetensors")
    g = torch.Generator().manual_seed(5)
    lora = {}
    for stem, (o, i) in (("lora_te3_encoder_block_1_layer_1_DenseReluDense_wo", (64, 128)),
                         ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", (64, 64))):
        lora |= {f"{stem}.lora_down.weight": torch.randn(2, i, generator=g) * 0.3,
                 f"{stem}.lora_up.weight": torch.randn(o, 2, generator=g) * 0.3, f"{stem}.alpha": torch.tensor(2.0)}
    save_file(lora, tmp_path / "lora.safetensors")
    parts = split_loras([(str(tmp_path / "lora.safetensors"), 0.7)], "flux", encoders=("t5",)).text_for("t5")
    assert parts
    for loras in ((), parts):
        fp32 = load_t5(tmp_path / "t5.safetensors", loras=loras).state_dict()
        fp16 = load_t5(tmp_path / "t5.safetensors", dtype=torch.float16, loras=loras).state_dict()
        wo = [k for k in fp16 if k.endswith(".DenseReluDense.wo.weight")]
        assert len(wo) == TINY.num_layers and all(torch.equal(fp16[k], fp32[k]) for k in wo)
        assert all(fp16[k].dtype == torch.float16 for k in fp16.keys() - set(wo))
    assert not torch.equal(fp32[wo[1]], hf.encoder.block[1].layer[1].DenseReluDense.wo.weight)  # the LoRA is in


def test_t5_loads_the_encoder_of_an_encoder_decoder_checkpoint(tmp_path):
    """google/t5-v1_1-xxl as published is a T5ForConditionalGeneration: decoder.*, lm_head.weight and both
    embed_tokens beside the encoder. load_t5 reads the encoder and leaves the rest unread, from the folder
    (config.json) and from the lone file (shapes), exactly as from a file holding the encoder alone."""
    from transformers import T5ForConditionalGeneration

    cfg = hf_t5(TINY, 0.02).config
    cfg.is_encoder_decoder, cfg.tie_word_embeddings = True, False  # t5-v1_1's config: an untied lm_head
    full = randomize_(T5ForConditionalGeneration(cfg), 0.02, seed=1).eval()
    with torch.no_grad():  # the published file's encoder.embed_tokens is `shared` (tied); randomize_ split them
        full.encoder.embed_tokens.weight.copy_(full.shared.weight)
    full.save_pretrained(tmp_path / "full")
    stored = load_file(tmp_path / "full" / "model.safetensors")
    assert any(k.startswith("decoder.") for k in stored) and "lm_head.weight" in stored
    encoder_only = {k: v for k, v in stored.items() if not k.startswith(("decoder.", "lm_head."))}
    save_file(encoder_only, tmp_path / "encoder.safetensors")
    want = load_t5(tmp_path / "encoder.safetensors").state_dict()
    for source in (tmp_path / "full", tmp_path / "full" / "model.safetensors"):
        got = load_t5(source).state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), source
    ids = _ids()
    with torch.no_grad():
        assert_close_rel(load_t5(tmp_path / "full")(ids), full.encoder(input_ids=ids).last_hidden_state,
                         torch.float32)


def test_t5_position_bias_only_in_block_0_and_param_count():
    names = [n for n, _ in T5Encoder(TINY).named_parameters()]
    assert [n for n in names if "relative_attention_bias" in n] == [
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    with torch.device("meta"):
        xxl = T5Encoder(T5_CONFIGS["t5-v1.1-xxl"])
    # transformers' T5EncoderModel for google/t5-v1_1-xxl (docs/models.md §5.1)
    assert sum(p.numel() for p in xxl.parameters()) == 4_762_310_656


def test_t5_full_size_keys_match_transformers():
    from transformers import T5Config as HFT5Config
    from transformers import T5EncoderModel

    cfg = T5_CONFIGS["t5-v1.1-xxl"]
    hf_cfg = HFT5Config(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)},
                        feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    with torch.device("meta"):
        hf = T5EncoderModel(hf_cfg)
        ours = T5Encoder(cfg)
    ref = {k: tuple(v.shape) for k, v in hf.state_dict().items() if k != "encoder.embed_tokens.weight"}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == ref


def test_t5_rejects_bad_input():
    model = T5Encoder(TINY)
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible by 4"):
        dataclasses.replace(TINY, relative_attention_num_buckets=30)
