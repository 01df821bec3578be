"""Tokenizers: train a WordPiece vocabulary on captions (from-scratch text towers), or load the one
that comes with a pretrained Hugging Face tower. Either way vlpt wraps it in ``Tokenizer``.

Text longer than ``context_length`` tokens is truncated (the [SEP] token is kept); batches are padded
only to their longest member, not to the full context.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(corpus: Iterable[str], vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """Train a lower-casing BERT-style WordPiece tokenizer on a caption corpus."""
    raw = RawTokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.normalizer = normalizers.BertNormalizer(lowercase=True)
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=1)
    raw.train_from_iterator(corpus, trainer=trainer)
    cls_id, sep_id = raw.token_to_id("[CLS]"), raw.token_to_id("[SEP]")
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
    def from_pretrained(cls, directory: str | Path, context_length: int) -> "Tokenizer":
        return cls(AutoTokenizer.from_pretrained(str(directory)), context_length)
