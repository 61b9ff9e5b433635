"""CLIP, T5 and Qwen3 tokenizers with the diffusers Flux / SD3 / FLUX.2 [klein] padding and truncation, on
`tokenizers` and `sentencepiece`.

What the pipelines do, and so what these return (a (B, max_length) int64 tensor):
- CLIP (L and bigG share one BPE): `<|startoftext|>` 49406, the BPE ids, `<|endoftext|>` 49407, then padding
  to 77. CLIP-L pads with `<|endoftext|>`; SD3's CLIP-bigG tokenizer pads with "!" (id 0), and since
  transformers registers the pad token as a special token, every "!" in a bigG prompt is id 0 too. Over-long
  prompts keep the first 75 tokens and end with EOS.
- T5: the sentencepiece ids, `</s>` (1), then pad (0) to the pipeline's length (Flux 512, or 256 in the
  schnell recipe; SD3 256). Over-long prompts keep the first max_length - 1 pieces and end with `</s>`.
- Qwen3 (FLUX.2 [klein]): the prompt inside the chat template `Flux2KleinPipeline` renders (one user turn, the
  generation prompt, thinking off: `QWEN3_TEMPLATE`, docs/flux2.md §2.1), its byte-level BPE ids with no BOS,
  right-padded with `<|endoftext|>` to 512 and cut at 512 (transformers' truncation: the end of the template goes
  first), with the attention mask Qwen3 reads.
- Special tokens written in a prompt (`<|endoftext|>`, `</s>`, `<extra_id_0>` ...) are single tokens, as in
  transformers. Truncation warns once per call with the number of tokens dropped from each prompt.

The vendored CLIP vocabulary (model/assets/clip_bpe, MIT, derived from OpenAI's bpe_simple_vocab_16e6) is the
default, so nothing is downloaded. T5's `spiece.model` is not redistributable here: pass the path of the one
in your model folder (the Flux / SD3 `tokenizer_2` / `tokenizer_3` folders).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

CLIP_BPE_DIR = Path(__file__).resolve().parent / "assets" / "clip_bpe"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's word split (OpenAI simple_tokenizer, as transformers writes it): the two special strings, English
# contractions, letter runs, single digits, and runs of other non-space characters; whitespace is dropped.
_CLIP_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
               r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")


def _exists(path: Path) -> bool:
    """`path.exists()`, refusing a broken link (a Hugging Face cache snapshot whose blob is gone) rather than
    calling it absent: a missing tokenizer_config.json would silently change the pad token."""
    if path.is_symlink() and not path.exists():
        raise FileNotFoundError(f"{path}: a broken link (its cache blob is missing); download the model again")
    return path.exists()


def prompt_list(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a string or a list of strings")
    return prompts


def _fit(rows: list[list[int]], max_length: int, end_id: int | None, pad_id: int, name: str,
         prompts: Sequence[str]) -> torch.Tensor:
    """Truncate each row to `max_length` (keeping its end token `end_id` last; None: a plain cut), then pad; one
    warning for the whole batch naming what was dropped, each prompt by its start (a batch's position would not
    say which caption file of a dataset it is)."""
    dropped = {i: len(r) - max_length for i, r in enumerate(rows) if len(r) > max_length}
    if dropped:
        def start(text: str) -> str:
            return repr(text if len(text) <= 40 else text[:40] + "...")
        detail = ", ".join(f"{n} of {start(prompts[i])}" for i, n in dropped.items())
        warnings.warn(f"{name}: prompts longer than {max_length} tokens were truncated; "
                      f"tokens dropped: {detail}", stacklevel=3)
    out = torch.full((len(rows), max_length), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r) > max_length:
            r = r[: max_length - 1] + [end_id] if end_id is not None else r[:max_length]
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


# -------------------------------------------------------------------------------------------------- CLIP


def _clip_bpe(vocab: Path, merges: Path) -> Tokenizer:
    model = BPE.from_file(str(vocab), str(merges), continuing_subword_prefix="", end_of_word_suffix="</w>",
                          unk_token=EOS, fuse_unk=False)
    tok = Tokenizer(model)
    # Unicode NFC, whitespace runs to one space, lowercase (CLIP's BPE is uncased); no ftfy, like
    # transformers.
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


class CLIPTokenizer:
    """`tokenizer(prompts) -> (B, max_length)` ids. Build with `CLIPTokenizer.load(...)`."""

    def __init__(self, tokenizer: Tokenizer, *, pad_token: str = EOS, max_length: int = 77):
        self.bos_id, self.eos_id = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
        self.pad_id = tokenizer.token_to_id(pad_token)
        if None in (self.bos_id, self.eos_id, self.pad_id):
            raise ValueError(f"the CLIP vocabulary lacks {BOS}, {EOS} or the pad token {pad_token!r}")
        # Specials are matched in the raw prompt before normalisation, so a literal <|endoftext|> is one
        # token. The pad token is registered too (transformers does so): for bigG's "!" that makes every "!"
        # id 0.
        specials = [AddedToken(t, special=True, normalized=False) for t in (BOS, EOS, pad_token)]
        tokenizer.add_special_tokens(specials)
        tokenizer.post_processor = processors.RobertaProcessing((EOS, self.eos_id), (BOS, self.bos_id),
                                                                trim_offsets=False, add_prefix_space=False)
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer, self.max_length, self.pad_token = tokenizer, max_length, pad_token

    @classmethod
    def load(cls, path: str | Path | None = None, *, pad_token: str | None = None,
             max_length: int = 77) -> CLIPTokenizer:
        """`path`: None (the vendored vocabulary), a `tokenizer.json`, or a folder with `tokenizer.json` or
        `vocab.json` + `merges.txt`. `pad_token`: "<|endoftext|>" for CLIP-L, "!" for SD3's bigG; by default
        the folder's tokenizer_config.json / special_tokens_map.json decide, else "<|endoftext|>"."""
        folder = CLIP_BPE_DIR if path is None else Path(path).expanduser()
        if not _exists(folder):
            raise FileNotFoundError(f"{folder}: no such tokenizer file or folder")
        if pad_token is None:
            pad_token = _pad_token_of(folder) or EOS
        if folder.is_file():
            return cls(Tokenizer.from_file(str(folder)), pad_token=pad_token, max_length=max_length)
        if _exists(folder / "tokenizer.json"):
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            return cls(tok, pad_token=pad_token, max_length=max_length)
        if _exists(folder / "vocab.json") and _exists(folder / "merges.txt"):
            tok = _clip_bpe(folder / "vocab.json", folder / "merges.txt")
            return cls(tok, pad_token=pad_token, max_length=max_length)
        raise FileNotFoundError(f"{folder}: no tokenizer.json, nor vocab.json + merges.txt")

    def __call__(self, prompts: str | Sequence[str], max_length: int | None = None) -> torch.Tensor:
        prompts = prompt_list(prompts)
        encodings = self.tokenizer.encode_batch(prompts, add_special_tokens=True)
        return _fit([e.ids for e in encodings], max_length or self.max_length, self.eos_id, self.pad_id,
                    "CLIP tokenizer", prompts)


def _pad_token_of(folder: Path) -> str | None:
    if not folder.is_dir():
        return None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if _exists(folder / name):
            pad = json.loads((folder / name).read_text()).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if pad:
                return pad
    return None


# ---------------------------------------------------------------------------------------------------- T5

# T5's special strings: <pad> 0, </s> 1, <unk> 2, and 100 sentinels past the sentencepiece vocabulary with
# <extra_id_0> the last id (transformers' convention; 32099 for the real 32,000-piece model).
_T5_SPECIAL = re.compile(r"</s>|<pad>|<unk>|<extra_id_([1-9]?\d)>")
T5_EXTRA_IDS = 100


class T5Tokenizer:
    """`tokenizer(prompts) -> (B, max_length)` ids. Build with `T5Tokenizer.load(path, max_length=...)`."""

    def __init__(self, encode: Callable[[list[str]], list[list[int]]], *, max_length: int, eos_id: int = 1,
                 pad_id: int = 0):
        self.encode, self.max_length, self.eos_id, self.pad_id = encode, max_length, eos_id, pad_id

    @classmethod
    def load(cls, path: str | Path, *, max_length: int = 512) -> T5Tokenizer:
        """`path`: a `spiece.model`, a `tokenizer.json`, or a folder with either (tokenizer.json preferred,
        being what transformers loads)."""
        path = Path(path).expanduser()
        if path.is_dir():
            found = [path / n for n in ("tokenizer.json", "spiece.model") if _exists(path / n)]
            if not found:
                raise FileNotFoundError(f"{path}: no tokenizer.json or spiece.model")
            path = found[0]
        if not _exists(path):
            raise FileNotFoundError(f"{path}: no such tokenizer file")
        if path.suffix == ".json":
            tok = Tokenizer.from_file(str(path))
            tok.no_truncation()
            tok.no_padding()
            eos, pad = tok.token_to_id("</s>"), tok.token_to_id("<pad>")
            if eos is None or pad is None:  # CLIP's or Qwen's tokenizer.json, say: it would fail at the first prompt
                raise ValueError(f"{path}: not a T5 tokenizer (no </s> or <pad> token); pass T5's tokenizer.json or "
                                 "spiece.model (a pipeline's tokenizer_2/ for FLUX.1, tokenizer_3/ for SD3)")
            # tokenizer.json's post-processor already appends </s>.
            return cls(lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=True)],
                       max_length=max_length, eos_id=eos, pad_id=pad)
        return cls(_sentencepiece_encoder(path), max_length=max_length)

    def __call__(self, prompts: str | Sequence[str], max_length: int | None = None) -> torch.Tensor:
        prompts = prompt_list(prompts)
        rows = self.encode(prompts)
        return _fit(rows, max_length or self.max_length, self.eos_id, self.pad_id, "T5 tokenizer", prompts)


def _sentencepiece_encoder(path: Path) -> Callable[[list[str]], list[list[int]]]:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    size = sp.get_piece_size()
    fixed = {"<pad>": sp.pad_id(), "</s>": sp.eos_id(), "<unk>": sp.unk_id()}

    def special_id(match: re.Match) -> int:
        if match[1] is None:
            return fixed[match[0]]
        return size + T5_EXTRA_IDS - 1 - int(match[1])

    def encode_one(text: str) -> list[int]:
        # Special strings are cut out first and the pieces between them encoded separately (each with
        # sentencepiece's leading "▁"), which is what transformers' added-token split does.
        ids, start = [], 0
        for m in _T5_SPECIAL.finditer(text):
            ids += sp.encode(text[start:m.start()]) + [special_id(m)]
            start = m.end()
        return ids + sp.encode(text[start:]) + [sp.eos_id()]

    return lambda texts: [encode_one(t) for t in texts]


# The chat template klein applies to every prompt (the negative "" too): transformers' `apply_chat_template` of
# [{"role": "user", "content": prompt}] with add_generation_prompt=True, enable_thinking=False, as the Qwen3 jinja
# template renders it (ComfyUI writes the same literal), so no template engine is needed.
QWEN3_CHAT = ("<|im_start|>", "<|im_end|>")
QWEN3_TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


class Qwen3Tokenizer:
    """`tokenizer(prompts) -> (ids, attention_mask)`, each (B, max_length) int64. Build with `Qwen3Tokenizer.load`."""

    def __init__(self, tokenizer: Tokenizer, *, max_length: int = 512, pad_token: str = EOS):
        self.pad_id = tokenizer.token_to_id(pad_token)
        if self.pad_id is None:
            raise ValueError(f"the Qwen3 vocabulary lacks the pad token {pad_token!r}")
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer, self.max_length = tokenizer, max_length

    @classmethod
    def load(cls, path: str | Path, *, max_length: int = 512) -> Qwen3Tokenizer:
        """`path`: a `tokenizer.json`, or a folder holding one (a klein pipeline's `tokenizer/`)."""
        path = Path(path).expanduser()
        file = path / "tokenizer.json" if path.is_dir() else path
        if not _exists(file) or not file.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json (the klein pipeline folder's tokenizer/ has one)")
        tok = Tokenizer.from_file(str(file))
        # CLIP's tokenizer.json has <|endoftext|> too and would encode every prompt into ids past Qwen3's embedding
        # (an IndexError, or at real sizes silent garbage): the chat template's tokens are Qwen's own
        if None in (tok.token_to_id(QWEN3_CHAT[0]), tok.token_to_id(QWEN3_CHAT[1])):
            raise ValueError(f"{file}: not a Qwen3 tokenizer (no {QWEN3_CHAT[0]} / {QWEN3_CHAT[1]} chat tokens); pass "
                             "the klein pipeline's tokenizer/ folder with --qwen-tokenizer")
        return cls(tok, max_length=max_length)

    @staticmethod
    def template(prompt: str) -> str:
        return QWEN3_TEMPLATE.format(prompt=prompt)

    def __call__(self, prompts: str | Sequence[str], max_length: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        n = max_length or self.max_length
        prompts = prompt_list(prompts)
        rows = [e.ids for e in self.tokenizer.encode_batch([self.template(p) for p in prompts],
                                                             add_special_tokens=True)]
        ids = _fit(rows, n, None, self.pad_id, "Qwen3 tokenizer", prompts)  # transformers' truncation: a plain cut
        lengths = torch.tensor([min(len(r), n) for r in rows])
        return ids, (torch.arange(n)[None, :] < lengths[:, None]).long()
