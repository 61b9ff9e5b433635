"""CLIP BPE and T5 sentencepiece tokenizers against transformers' tokenizers (docs/models.md §9 rows 21, 22)."""

import re
import warnings

import pytest
import torch
from text_fixtures import HARD_STRINGS, hf_clip_tokenizer, ours_clip_tokenizer, train_spm

from model.tokenizers import CLIPTokenizer, T5Tokenizer


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5_tokenizer")
    train_spm(folder)
    return folder


def _hf_ids(tok, prompts, max_length):
    out = tok(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return out.input_ids


def test_vendored_vocabulary_gives_known_ids():
    # Known OpenAI CLIP ids for this caption (bos, a, photo, of, a, cat, eos), independent of transformers.
    ids = ours_clip_tokenizer()("a photo of a cat")
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids.shape == (1, 77) and (ids[0, 7:] == 49407).all()


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"], ids=["clip_l_pad_eos", "clip_g_pad_0"])
def test_clip_tokenizer_matches_transformers(pad):
    ours = ours_clip_tokenizer(pad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = ours(HARD_STRINGS)
    ref = _hf_ids(hf_clip_tokenizer(pad), HARD_STRINGS, 77)
    assert torch.equal(ids, ref)
    assert ours.pad_id == (49407 if pad != "!" else 0)
    assert (ids[1, 2:] == ours.pad_id).all()  # the empty prompt is BOS, EOS, padding


def test_clip_truncation_keeps_eos_last_and_warns_once_with_the_count():
    ours = ours_clip_tokenizer()
    long = HARD_STRINGS[-1]
    full = len(hf_clip_tokenizer("<|endoftext|>")(long).input_ids)
    assert full > 77
    with pytest.warns(UserWarning, match=rf"tokens dropped: {full - 77} of {re.escape(repr(long[:40] + '...'))}$") \
            as record:  # the prompt by its start: a batch position would not name a dataset's caption file
        ids = ours(["short", long])
    assert len(record) == 1
    assert ids[1, 0] == 49406 and ids[1, 76] == 49407 and (ids[1, 1:76] != 49407).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when nothing is dropped, even at exactly 77 tokens
        exact = ours(["a " * 75])
    assert exact[0, 76] == 49407


def test_clip_tokenizer_json_folder_round_trip(tmp_path):
    hf = hf_clip_tokenizer("!")
    hf.save_pretrained(tmp_path)  # tokenizer.json + tokenizer_config.json naming pad_token "!"
    ours = CLIPTokenizer.load(tmp_path)
    assert ours.pad_id == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(ours(HARD_STRINGS), _hf_ids(hf, HARD_STRINGS, 77))


def _hf_t5(folder):
    from transformers import T5Tokenizer as HFT5Tokenizer

    return HFT5Tokenizer.from_pretrained(str(folder))  # converts spiece.model (needs protobuf)


@pytest.mark.parametrize("source", ["spiece.model", "tokenizer.json"])
def test_t5_tokenizer_matches_transformers(spm_dir, tmp_path, source):
    hf = _hf_t5(spm_dir)
    if source == "tokenizer.json":
        hf.save_pretrained(tmp_path)
        path = tmp_path / "tokenizer.json"
    else:
        path = spm_dir / "spiece.model"
    ours = T5Tokenizer.load(path, max_length=48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = ours(HARD_STRINGS)
    assert torch.equal(ids, _hf_ids(hf, HARD_STRINGS, 48))
    assert ids[1].tolist() == [1] + [0] * 47  # the empty prompt is </s> and padding


def test_t5_tokenizer_matches_sentencepiece(spm_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "spiece.model"))
    plain = [s for s in HARD_STRINGS if "<" not in s]  # sentencepiece alone does not know the special strings
    ours = T5Tokenizer.load(spm_dir, max_length=512)
    ids = ours(plain)
    for row, text in zip(ids, plain, strict=True):
        ref = sp.encode(text) + [1]
        assert row[: len(ref)].tolist() == ref and (row[len(ref):] == 0).all()


def test_t5_truncation_keeps_eos_last_and_warns(spm_dir):
    ours = T5Tokenizer.load(spm_dir / "spiece.model", max_length=16)
    n = len(ours.encode([HARD_STRINGS[-1]])[0])
    start = re.escape(repr(HARD_STRINGS[-1][:40] + "..."))
    with pytest.warns(UserWarning, match=rf"tokens dropped: {n - 16} of {start}$"):
        ids = ours(HARD_STRINGS[-1])
    assert ids.shape == (1, 16) and ids[0, -1] == 1 and (ids[0, :-1] != 1).all()


def test_tokenizer_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError):
        CLIPTokenizer.load(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        T5Tokenizer.load(tmp_path)
    hf_clip_tokenizer("!").save_pretrained(tmp_path / "clip")  # CLIP's tokenizer.json where T5's belongs
    with pytest.raises(ValueError, match="not a T5 tokenizer \\(no </s> or <pad> token\\)"):
        T5Tokenizer.load(tmp_path / "clip" / "tokenizer.json")
    with pytest.raises(TypeError, match="list of strings"):
        ours_clip_tokenizer()(["ok", 3])
