"""Tokenizers: train a WordPiece vocabulary on captions (from-scratch text towers), load the one that
comes with a pretrained Hugging Face tower, or build OpenAI CLIP's BPE (OpenCLIP's default tokenizer) from
the vocabulary file the open_clip package ships. Either way vlpt wraps it in ``Tokenizer``.

Text longer than ``context_length`` tokens is truncated (the [SEP] token is kept); batches are padded
only to their longest member, not to the full context, unless the model was trained on texts padded to
the full context (``pad_to_context``: SigLIP).
"""

from __future__ import annotations

import gzip
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, CLIPTokenizer, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(corpus: Iterable[str], vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """A lower-casing BERT-style WordPiece tokenizer whose vocabulary is learned from a caption corpus.

    The vocabulary is every character seen plus ASCII letters and digits (as a word start and as a
    ``##`` continuation, so unseen words still tokenise) plus the most frequent whole words, ties broken
    alphabetically. We count words ourselves because the ``tokenizers`` WordPiece/BPE trainers break
    frequency ties differently on every run, which would make training runs irreproducible.
    """
    raw = RawTokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(SPECIAL_TOKENS)}, unk_token="[UNK]"))
    raw.normalizer = normalizers.BertNormalizer(lowercase=True)
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in corpus:
        counts.update(word for word, _ in raw.pre_tokenizer.pre_tokenize_str(raw.normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word} | set(string.ascii_lowercase + string.digits))
    pieces = SPECIAL_TOKENS + chars + [f"##{c}" for c in chars]
    budget = max(0, vocab_size - len(pieces))
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1][:budget]
    vocab = {token: i for i, token in enumerate(pieces + words)}
    raw.model = models.WordPiece(vocab=vocab, unk_token="[UNK]")
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    raw.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )


def clip_bpe_tokenizer(context_length: int = 77) -> PreTrainedTokenizerFast:
    """OpenAI CLIP's byte-level BPE (49408 tokens, ``<|startoftext|>`` 49406, ``<|endoftext|>`` 49407), the
    default tokenizer of OpenCLIP models, as a transformers ``CLIPTokenizer`` built offline from the
    vocabulary file open_clip ships (what ``open_clip.tokenizer.SimpleTokenizer`` reads). The ids equal
    SimpleTokenizer's, except for text that its ftfy / HTML-unescape cleaning changes (curly quotes,
    ``&amp;``), which transformers' CLIP tokenizer does not clean either."""
    vocab, merges = _clip_bpe()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=context_length)


@cache
def _clip_bpe() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    try:
        from open_clip.tokenizer import bytes_to_unicode, default_bpe
    except ImportError as err:
        raise ImportError("OpenAI CLIP's tokenizer is built from the vocabulary open_clip ships: "
                          "pip install open-clip-torch (or `pip install vlpt[interop]`)") from err
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:  # as SimpleTokenizer.__init__ reads it
        merges = tuple(tuple(line.split()) for line in f.read().split("\n")[1:49152 - 256 - 2 + 1])
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def is_clip_bpe(hf_tokenizer) -> bool:
    """Whether a tokenizer has OpenAI CLIP's vocabulary (so OpenCLIP's default tokenizer can stand in for it)."""
    if len(hf_tokenizer) != 49408 or hf_tokenizer.convert_tokens_to_ids("<|endoftext|>") != 49407:
        return False
    return hf_tokenizer.get_vocab() == _clip_bpe()[0]


class Tokenizer:
    """Callable: list of texts -> {"input_ids": (B, L), "attention_mask": (B, L)}, L <= context_length
    (L == context_length with ``pad_to_context``)."""

    def __init__(self, hf_tokenizer: PreTrainedTokenizerFast, context_length: int, pad_to_context: bool = False):
        self.hf = hf_tokenizer
        self.context_length = context_length
        self.pad_to_context = pad_to_context

    def with_padding(self, pad_to_context: bool) -> Tokenizer:
        """This tokenizer padding every text to the full context (or to the batch's longest)."""
        if pad_to_context == self.pad_to_context:
            return self
        return Tokenizer(self.hf, self.context_length, pad_to_context)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def pad_token_id(self) -> int:
        return self.hf.pad_token_id

    def __call__(self, texts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise ValueError("no texts given to the tokenizer")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is {type(text).__name__}, expected str")
            if not text.strip():
                raise ValueError(f"text {i} is empty; give at least one word")
        padding = "max_length" if self.pad_to_context else "longest"
        enc = self.hf(list(texts), padding=padding, truncation=True, max_length=self.context_length,
                      return_tensors="pt", return_token_type_ids=False)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def lengths(self, texts: Sequence[str]) -> np.ndarray:
        """Each text's token count with special tokens and without truncation: more than ``context_length``
        means the tokenizer would cut the text short."""
        return np.array([len(ids) for ids in self.hf(list(texts), truncation=False)["input_ids"]], np.int64)

    def single_token_ids(self, words: Sequence[str]) -> list[int]:
        """The token id of each word that the vocabulary holds whole (one token); words spelled in pieces, or not
        at all (the unknown token), are left out."""
        pieces = self.hf(list(words), add_special_tokens=False)["input_ids"]
        return sorted({ids[0] for ids in pieces if len(ids) == 1 and ids[0] != self.hf.unk_token_id})

    def whole_words(self, min_letters: int = 3) -> list[str]:
        """The vocabulary's whole lowercase words of at least ``min_letters`` letters, sorted (word pieces such as
        BERT's "##ing" and special tokens left out; a BPE's end-of-word mark stripped)."""
        words = (token.removesuffix("</w>") for token in self.hf.get_vocab())
        return sorted({w for w in words if len(w) >= min_letters and w.isascii() and w.isalpha() and w.islower()})

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def save_pretrained(self, directory: str | Path) -> None:
        self.hf.save_pretrained(str(directory))

    @classmethod
    def from_pretrained(cls, directory: str | Path, context_length: int, pad_to_context: bool = False) -> Tokenizer:
        return cls(AutoTokenizer.from_pretrained(str(directory)), context_length, pad_to_context)
