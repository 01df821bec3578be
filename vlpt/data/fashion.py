"""Fashion-MNIST: 70,000 real 28x28 greyscale photos of clothing in 10 classes, with template captions.

The four IDX files come with Debian's package ``dataset-fashion-mnist`` (MIT/Expat), installed by the
Makefile: ``/usr/share/datasets/fashion-mnist``. ``data.path`` points elsewhere (any folder holding the
four files, gzipped or not, as published by Zalando Research).

Splits: ``test`` is the published 10,000-image test file; the 60,000-image training file is split once,
stratified with a fixed seed, into ``val`` (5,000) and ``train`` (55,000), the same on every machine.
``data.train_size`` takes the first images of the training split in a seeded order (all classes evenly).
Captions come from ``TRAIN_TEMPLATES``; ``EVAL_TEMPLATES`` are zero-shot prompts never used as captions.
``data.holdout_classes`` removes classes from ``train`` and ``val`` entirely (images and captions): they
are named only by the evaluation prompts, which measures transfer through the text tower.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlpt.data.digits import split_indices
from vlpt.evaluate.zero_shot import format_prompt  # the article before the name: "an ankle boot"

DEFAULT_PATH = "/usr/share/datasets/fashion-mnist"
# Zalando's label order. Names are what the prompts say: "a photo of a pair of trousers".
CLASS_NAMES = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
               "ankle boot")
NUM_CLASSES = len(CLASS_NAMES)
SPLITS = ("train", "val", "test")
VAL_SIZE = 5000
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

TRAIN_TEMPLATES = (
    "a photo of a {}",
    "a {}",
    "a picture of a {}",
    "a black and white photo of a {}",
    "a product photo of a {}",
    "a small photo of a {}",
    "a {} on a dark background",
    "a grayscale image of a {}",
)
# Zero-shot prompts: never training captions (tests/test_leakage.py checks it).
EVAL_TEMPLATES = (
    "an image of a {}",
    "a low resolution photo of the {}",
    "this is a {}",
    "a cropped photo of the {}",
    "a close-up photo of a {}",
    "a catalogue picture of one {}",
)


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {folder}: install Debian's package (apt-get install "
        f"dataset-fashion-mnist, which puts the files in {DEFAULT_PATH}) or set data.path to a folder with the four "
        f"IDX files from https://github.com/zalandoresearch/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not): unsigned-byte arrays only, as Fashion-MNIST's are."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {body.size} bytes (truncated?)")
    return body.reshape(shape)


def check_class_names(names: Sequence[str]) -> list[int]:
    """Labels of class names, with a clear error for a name that is not a Fashion-MNIST class."""
    unknown = [n for n in names if n not in CLASS_NAMES]
    if unknown:
        raise ValueError(f"unknown Fashion-MNIST class(es) {', '.join(map(repr, unknown))}; the classes are "
                         f"{', '.join(CLASS_NAMES)}")
    return [CLASS_NAMES.index(n) for n in names]


def fill_template(template: str, label: int) -> str:
    return format_prompt(template, CLASS_NAMES[label])


def captions_for(label: int, index: int, seed: int, num_captions: int) -> list[str]:
    """``num_captions`` captions of image ``index`` (row of its IDX file) from distinct training templates."""
    rng = np.random.default_rng([seed, index])
    chosen = rng.choice(len(TRAIN_TEMPLATES), size=min(num_captions, len(TRAIN_TEMPLATES)), replace=False)
    return [fill_template(TRAIN_TEMPLATES[int(k)], label) for k in chosen]


def to_rgb(gray: np.ndarray, image_size: int, batch: int = 4096) -> np.ndarray:
    """(N, 28, 28) uint8 -> (N, S, S, 3) uint8, bicubic with antialiasing when the size changes."""
    if gray.shape[1] == image_size:
        return np.repeat(gray[..., None], 3, axis=3)
    out = np.empty((len(gray), image_size, image_size, 3), np.uint8)
    for start in range(0, len(gray), batch):
        x = torch.from_numpy(gray[start:start + batch]).float()[:, None]  # (B, 1, 28, 28)
        y = F.interpolate(x, size=(image_size, image_size), mode="bicubic", antialias=True, align_corners=False)
        out[start:start + batch] = y.clamp(0, 255).round().to(torch.uint8)[:, 0, :, :, None].numpy()
    return out


class FashionDataset:
    """One split of Fashion-MNIST. Like the other data sets: ``images`` (N, S, S, 3) uint8, ``captions`` N lists
    of strings, ``labels`` (N,) in 0..9, ``class_names``; plus ``indices`` (N,) the rows of the IDX file."""

    class_names = CLASS_NAMES

    def __init__(self, split: str = "train", image_size: int = 28, path: str | None = None, seed: int = 0,
                 num_captions: int = 2, size: int | None = None, holdout_classes: Sequence[str] = ()):
        if split not in SPLITS:
            raise ValueError(f"unknown Fashion-MNIST split {split!r}; choose from {', '.join(SPLITS)}")
        held = set(check_class_names(holdout_classes))
        folder = Path(path or DEFAULT_PATH)
        images_stem, labels_stem = FILES["test" if split == "test" else "train"]
        images, labels = read_idx(_idx_file(folder, images_stem)), read_idx(_idx_file(folder, labels_stem))
        labels = labels.astype(np.int64)
        rows = np.arange(len(labels))
        if split != "test":
            # one fixed split of the training file, independent of data.seed: val never changes
            train_rows, val_rows = split_indices(labels, seed=0, test_fraction=VAL_SIZE / len(labels))
            rows = train_rows if split == "train" else val_rows
            rows = rows[~np.isin(labels[rows], list(held))]
            if split == "train":
                rows = rows[np.random.default_rng(seed).permutation(len(rows))][:size]  # seeded order, then a prefix
        self.indices = rows
        self.labels = labels[rows]
        self.captions = [captions_for(int(labels[i]), int(i), seed, num_captions) for i in rows]
        self.images = to_rgb(images[rows], image_size)

    def __len__(self) -> int:
        return len(self.labels)
