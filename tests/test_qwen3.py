"""FLUX.2 [klein]'s text encoder (model/qwen3.py, weights/text.py load_qwen3) against transformers' Qwen3ForCausalLM
hidden states 9 / 18 / 27, all positions of a right-padded batch (docs/flux2.md §2.2, §7: vocab 300, hidden 48,
28 layers, 4 q / 2 kv heads, head_dim 16), tied and untied, eager and SDPA attention; transformers folders (sharded)
and ComfyUI-style single files."""

import pytest
import torch
from conftest import randomize_

from model.qwen3 import QWEN3_CONFIGS, Qwen3TextEncoder
from weights.io import WeightsError
from weights.text import load_qwen3

TINY = QWEN3_CONFIGS["tiny"]


def reference(tied: bool, attention: str = "sdpa"):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=28,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6, rms_norm_eps=1e-6,
                      tie_word_embeddings=tied, attn_implementation=attention)
    ref = Qwen3ForCausalLM(cfg)
    inv_freq = ref.model.rotary_emb.inv_freq.clone()  # a buffer randomize_ would overwrite: the frequencies
    randomize_(ref, 0.2, seed=0)
    ref.model.rotary_emb.inv_freq.copy_(inv_freq)
    return ref.eval()


def batch():
    """Two prompts right-padded to 12 tokens (the second has 7), as klein pads to 512."""
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    return ids, mask


def taps(ref, ids, mask, which=(9, 18, 27)):
    with torch.no_grad():
        hidden = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    return torch.cat([hidden[t] for t in which], dim=-1)


def close(got, want):
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert got.shape == want.shape and err <= 1e-5, err


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("tied", [True, False])
def test_taps_equal_transformers_on_every_position(tied, attention):
    ref = reference(tied, attention)
    ours = Qwen3TextEncoder(TINY).eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if k in ours.state_dict()}, strict=True)
    assert len(ours.model.layers) == 27  # layers 27.. , the final norm and the LM head are never built
    ids, mask = batch()
    with torch.no_grad():
        close(ours(ids, mask), taps(ref, ids, mask))


def test_tap_0_is_the_embeddings_as_transformers_counts_hidden_states():
    from dataclasses import replace

    ref = reference(False)
    ours = Qwen3TextEncoder(replace(TINY, taps=(0, 3))).eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if k in ours.state_dict()}, strict=True)
    ids, mask = batch()
    with torch.no_grad():
        close(ours(ids, mask), taps(ref, ids, mask, (0, 3)))
    with pytest.raises(ValueError, match=r"must lie in 0..28 \(0: the embeddings\)"):
        replace(TINY, taps=(-1, 3))


def test_loading_folders_and_single_files(tmp_path):
    from safetensors.torch import save_file

    ref = reference(tied=False)
    ref.save_pretrained(tmp_path / "text_encoder", max_shard_size="100KB")  # shards and an index, as 4B has
    assert len(list((tmp_path / "text_encoder").glob("*.safetensors"))) > 1
    (tmp_path / "model_index.json").write_text("{}")
    comfy = tmp_path / "qwen_3_tiny.safetensors"  # ComfyUI's text_encoders/ file: the same keys, one file
    save_file({k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}, comfy)
    ids, mask = batch()
    want = taps(ref, ids, mask)
    for source, kw in ((tmp_path / "text_encoder", {}), (tmp_path, {"subfolder": "text_encoder"}), (comfy, {})):
        model = load_qwen3(source, **kw)
        assert model.config == TINY  # from config.json, or the shapes of a bare file
        with torch.no_grad():
            close(model(ids, mask), want)
    with pytest.raises(WeightsError, match="not a Qwen3 text encoder"):
        save_file({"encoder.final_layer_norm.weight": torch.ones(4)}, tmp_path / "t5.safetensors")
        load_qwen3(tmp_path / "t5.safetensors")


def tiny_qwen_tokenizer(folder):
    """A byte-level BPE trained on a few sentences, with Qwen's special tokens and pre-tokenizer, saved as the
    tokenizer.json a klein folder's tokenizer/ holds."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    split = Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                  r"|\s+(?!\S)|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(split, "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a red fox in the snow", "a cat on a mat", "user assistant\n\n"] * 20, trainer)
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    return tok


def test_chat_template_and_ids_as_transformers_tokenizes_them(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from model.tokenizers import Qwen3Tokenizer

    tiny_qwen_tokenizer(tmp_path / "tokenizer")
    ours = Qwen3Tokenizer.load(tmp_path / "tokenizer", max_length=40)
    # the literal of docs/flux2.md §2.1 (transformers' apply_chat_template with thinking off)
    assert ours.template("a red fox") == ("<|im_start|>user\na red fox<|im_end|>\n<|im_start|>assistant\n"
                                          "<think>\n\n</think>\n\n")
    theirs = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer" / "tokenizer.json"),
                                     pad_token="<|endoftext|>")
    prompts = ["a red fox in the snow", "", "a cat <|im_end|> on a mat " * 4]  # "": klein's negative
    with pytest.warns(UserWarning, match="truncated"):
        ids, mask = ours(prompts)
    want = theirs([ours.template(p) for p in prompts], padding="max_length", max_length=40, truncation=True,
                  return_tensors="pt")
    assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"])
    assert mask[0].sum() < 40 and ids[0, -1] == theirs.pad_token_id and mask[2].all()  # padded right; cut
    assert "<|im_start|>" in theirs.decode(ids[1]) and theirs.bos_token_id is None  # no BOS is added
