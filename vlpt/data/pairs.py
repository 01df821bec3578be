"""In-memory image-caption pairs, pre-tokenised once, served as deterministic batches.

Batch ``step`` is a pure function of (seed, step): resuming a run replays exactly the same data, and
no per-sample Python runs in the training loop (uint8 images go to the model as they are).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from vlpt.tokenization import Tokenizer


def epoch_batch(n: int, batch_size: int, seed: int, step: int, group_size: int = 1) -> torch.Tensor:
    """Indices of batch ``step`` in an epoch-wise random permutation of ``n`` items (whole groups of
    ``group_size`` consecutive items stay together); a pure function of (seed, step)."""
    per_epoch = n // batch_size
    epoch, offset = divmod(step, per_epoch)
    groups = torch.randperm(n // group_size, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    order = (groups[:, None] * group_size + torch.arange(group_size)).flatten()
    return order[offset * batch_size:(offset + 1) * batch_size]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of batch ``step`` (caption picks, augmentation), independent of all others."""
    return torch.Generator().manual_seed(seed * 1000003 + step)


def token_rows(input_ids: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows of a pre-tokenised corpus, padding trimmed to the longest of them."""
    length = int(lengths[rows].max())
    return {"input_ids": input_ids[rows, :length],  # (B, L)
            "attention_mask": (torch.arange(length)[None, :] < lengths[rows][:, None]).long()}


def nonsense_words(text: str, rng: np.random.Generator, most: int = 3) -> str:
    """``text`` with 1..``most`` random letter strings (3-8 letters) inserted between its words: words the text
    tower has never seen, as a prompt's unfamiliar wording is ("a photo of ..."). Trained on such noise, the
    tower learns to read the words it knows and let the others pass (vlpt's caption-trained WordPiece spells an
    unknown word out in character pieces, which mean pooling would otherwise weigh like the class name)."""
    words = text.split()
    for _ in range(int(rng.integers(1, most + 1))):
        word = random_word(rng)
        words.insert(int(rng.integers(0, len(words) + 1)), word)
    return " ".join(words)


def fit_to_context(texts: Sequence[str], tokenizer: Tokenizer, fallbacks: Sequence[Callable[[int], str]]) -> list[str]:
    """``texts`` with each one the tokenizer would cut short replaced by ``fallbacks[0](i)`` (i: its position),
    one still too long by the next fallback, and so on; the last fallback's text is kept as it is. A noisy twin
    cut short loses its last words, which in a scene's caption or question are the ones that matter."""
    texts = list(texts)
    todo = np.arange(len(texts))
    for fallback in fallbacks:
        if not len(todo):
            break
        todo = todo[tokenizer.lengths([texts[i] for i in todo]) > tokenizer.context_length]
        for i in todo:
            texts[i] = fallback(int(i))
    return texts


def random_word(rng: np.random.Generator) -> str:
    """A random string of 3-8 lowercase letters: a word no tokenizer vocabulary has learned."""
    return "".join(chr(ord("a") + int(c)) for c in rng.integers(0, 26, size=int(rng.integers(3, 9))))


class PairBatches:
    def __init__(self, images: np.ndarray, captions: Sequence[Sequence[str]], tokenizer: Tokenizer,
                 batch_size: int, seed: int, labels: np.ndarray | None = None, augment: bool = False,
                 group_size: int = 1, caption_noise: float = 0.0):
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} caption lists")
        if batch_size > len(images):
            raise ValueError(f"batch_size {batch_size} is larger than the data set ({len(images)} images)")
        self.images = torch.from_numpy(np.ascontiguousarray(images))  # (N, H, W, 3) uint8
        self.labels = None if labels is None else torch.as_tensor(labels)
        if batch_size % group_size:
            raise ValueError(f"batch_size {batch_size} must be a multiple of group_size {group_size}")
        self.batch_size = batch_size
        self.group_size = group_size  # consecutive images that always share a batch (minimal-edit twins)
        self.seed = seed
        self.augment = augment
        self.caption_noise = caption_noise  # odds that a picked caption comes with nonsense words inserted
        flat = [c for caps in captions for c in caps]
        self.caption_start = torch.tensor(np.cumsum([0] + [len(c) for c in captions[:-1]]))
        self.caption_count = torch.tensor([len(c) for c in captions])
        if caption_noise > 0:  # every caption's noisy twin, tokenized once, rows after the clean ones
            rng = np.random.default_rng([seed, 31337])  # fewer nonsense words where the twin would be cut short
            fallbacks = (lambda i: nonsense_words(flat[i], rng, most=1), lambda i: flat[i])
            flat += fit_to_context([nonsense_words(c, rng) for c in flat], tokenizer, fallbacks)
        tokens = tokenizer(flat)  # padded to the longest caption in the corpus
        self.input_ids = tokens["input_ids"]
        self.lengths = tokens["attention_mask"].sum(1)

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """Batch ``step``: an epoch-wise permutation of images (in groups), one random caption per image."""
        index = epoch_batch(len(self.images), self.batch_size, self.seed, step, self.group_size)
        g = step_generator(self.seed, step)
        pick = (torch.rand(len(index), generator=g) * self.caption_count[index]).long()
        rows = self.caption_start[index] + pick
        if self.caption_noise > 0:
            noisy = torch.rand(len(index), generator=g) < self.caption_noise
            rows = torch.where(noisy, rows + len(self.input_ids) // 2, rows)
        images = self.images[index]
        if self.augment:
            images = random_shift(images, g)
        batch = {"images": images, **token_rows(self.input_ids, self.lengths, rows), "index": index}
        if self.labels is not None:
            batch["labels"] = self.labels[index]
        return batch


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 3) -> torch.Tensor:
    """Shift each (B, H, W, 3) uint8 image by up to ``max_shift`` pixels, padding with zeros."""
    B, H, W, _ = images.shape
    padded = torch.nn.functional.pad(images, (0, 0, max_shift, max_shift, max_shift, max_shift))
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, B), generator=generator)
    return torch.stack([padded[b, dy[b]:dy[b] + H, dx[b]:dx[b] + W] for b in range(B)])


class RankSlice:
    """This rank's contiguous share of every global batch, so N processes together see exactly the
    batch one process would: the contrastive batch (after the all-gather) is the global batch."""

    def __init__(self, batches: PairBatches, rank: int, world_size: int):
        if batches.batch_size % world_size:
            raise ValueError(f"batch_size {batches.batch_size} must be divisible by the world size {world_size}")
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        full = self.batches.batch(step)
        k = self.batches.batch_size // self.world_size
        return {key: value[self.rank * k:(self.rank + 1) * k] for key, value in full.items()}
