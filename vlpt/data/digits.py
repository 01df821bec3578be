"""Real handwritten digits: scikit-learn's 1,797 8x8 scans, upscaled, with template captions.

The images ship inside scikit-learn (``sklearn.datasets.load_digits``), so nothing is downloaded.
The train/test split is a stratified 80/20 split drawn with numpy from a fixed seed (not
scikit-learn's splitter, whose internals may change between versions), so it is the same on every
machine. Captions come from ``TRAIN_TEMPLATES``; ``EVAL_TEMPLATES`` is a disjoint set of prompts
kept for zero-shot evaluation, so a zero-shot score never rewards memorised caption wording.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CLASS_NAMES = DIGIT_WORDS
NUM_CLASSES = len(DIGIT_WORDS)
SPLITS = ("train", "test")
TEST_FRACTION = 0.2

# Caption templates: ``{word}`` is the digit's name ("seven"), ``{digit}`` its numeral ("7").
TRAIN_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {digit}",
    "a photo of the digit {word}",
    "a hand-written {digit}",
    "a handwritten {word}",
    "the digit {digit} written by hand",
    "a small gray scan of the number {word}",
    "someone wrote the number {word}",
)
# Zero-shot prompts: never used for training captions.
EVAL_TEMPLATES = (
    "an image of the number {word}",
    "a scan of a {word}",
    "{digit}",
    "a picture of a {digit}",
    "the numeral {word}",
)

_GRAY_MAX = 16.0  # load_digits pixel values are 0..16, 16 = full ink


def fill_template(template: str, label: int) -> str:
    """Fill a caption/prompt template for digit ``label`` (0..9)."""
    return template.format(word=DIGIT_WORDS[label], digit=str(label))


@dataclass(frozen=True)
class DigitsConfig:
    split: str = "train"  # train | test
    image_size: int = 32  # output pixels per side, upscaled from 8x8
    seed: int = 0  # fixes the train/test split and the caption choice
    num_captions: int = 3  # captions per image, distinct templates

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"unknown digits split {self.split!r}; choose from {list(SPLITS)}")
        if not 8 <= self.image_size <= 224:
            raise ValueError(f"image_size must be in 8..224, got {self.image_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 1 <= self.num_captions <= len(TRAIN_TEMPLATES):
            raise ValueError(
                f"num_captions must be in 1..{len(TRAIN_TEMPLATES)} (the number of train templates), "
                f"got {self.num_captions}"
            )


def split_indices(targets: np.ndarray, seed: int, test_fraction: float = TEST_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: for each class, a seeded shuffle puts round(test_fraction * n) in test.

    Returns sorted ``(train_idx, test_idx)`` into ``targets``.
    """
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(targets):  # classes in a fixed (sorted) order, so the stream is fixed
        idx = np.flatnonzero(targets == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def captions_for(label: int, index: int, seed: int, num_captions: int) -> list[str]:
    """``num_captions`` captions of image ``index`` (in the full set), from distinct train templates."""
    # Keyed by the image's index in the full set: an image's captions do not depend on its split.
    rng = np.random.default_rng([seed, index])
    chosen = rng.choice(len(TRAIN_TEMPLATES), size=num_captions, replace=False)
    return [fill_template(TRAIN_TEMPLATES[int(k)], label) for k in chosen]


def upscale(gray: np.ndarray, image_size: int) -> np.ndarray:
    """An 8x8 0..16 digit as an (S, S, 3) uint8 image: white ink on black, smoothly upscaled."""
    img = Image.fromarray((gray * (255.0 / _GRAY_MAX)).astype(np.float32))  # mode "F": 32-bit float
    img = img.resize((image_size, image_size), Image.BICUBIC)  # float mode: no early rounding
    out = np.clip(np.asarray(img), 0.0, 255.0).round().astype(np.uint8)  # (S, S); bicubic overshoots
    return np.repeat(out[..., None], 3, axis=2)  # (S, S, 3) gray replicated to RGB


class DigitsDataset:
    """One split of scikit-learn's handwritten digits.

    Attributes (like ``ShapesDataset``): ``images`` (N, H, W, 3) uint8, ``captions`` N lists of
    strings, ``labels`` (N,) int64 in 0..9; plus ``indices`` (N,) the rows of ``load_digits``.
    """

    def __init__(self, config: DigitsConfig | None = None):
        from sklearn.datasets import load_digits  # lazy: scikit-learn is slow to import

        self.config = config = config or DigitsConfig()
        digits = load_digits()
        targets = np.asarray(digits.target, np.int64)  # (1797,)
        train_idx, test_idx = split_indices(targets, config.seed)
        self.indices = train_idx if config.split == "train" else test_idx  # (N,)
        self.labels = targets[self.indices]  # (N,)
        self.captions = [
            captions_for(int(targets[i]), int(i), config.seed, config.num_captions) for i in self.indices
        ]
        self.images = np.stack(
            [upscale(digits.images[i], config.image_size) for i in self.indices]
        )  # (N, S, S, 3)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, list[str], int]:
        return self.images[i], self.captions[i], int(self.labels[i])
