"""Tokenizers: train a WordPiece vocabulary on captions (from-scratch text towers), or load the one
that comes with a pretrained Hugging Face tower. Either way vlpt wraps it in ``Tokenizer``.

Text longer than ``context_length`` tokens is truncated (the [SEP] token is kept); batches are padded
only to their longest member, not to the full context.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

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


class Tokenizer:
    """Callable: list of texts -> {"input_ids": (B, L), "attention_mask": (B, L)}, L <= context_length."""

    def __init__(self, hf_tokenizer: PreTrainedTokenizerFast, context_length: int):
        self.hf = hf_tokenizer
        self.context_length = context_length

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
        enc = self.hf(list(texts), padding="longest", truncation=True, max_length=self.context_length,
                      return_tensors="pt", return_token_type_ids=False)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def save_pretrained(self, directory: str | Path) -> None:
        self.hf.save_pretrained(str(directory))

    @classmethod
    def from_pretrained(cls, directory: str | Path, context_length: int) -> Tokenizer:
        return cls(AutoTokenizer.from_pretrained(str(directory)), context_length)
