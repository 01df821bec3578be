"""The splits of a run's data set, by ``data.dataset``: the one place that maps a ``DataConfig`` onto the
data modules (shapes, digits, the user's files or shards)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from vlpt.config import DataConfig
from vlpt.data import digits, fashion, files, shapes, shards

DATASETS = ("shapes", "digits", "fashion", "files", "shards")
# Shapes options that shape only the multi-object training split; fine-tuning and held-out splits leave them out.
SHAPES_TRAINING_OPTIONS = ("twins", "count_weights", "caption_openers")
# DataConfig fields that only some data sets read (the others read every field).
DATASET_OPTIONS = {
    "path": ("files", "shards", "fashion"), "eval_path": ("files", "shards"), "train_size": ("shapes", "fashion"),
    "num_captions": ("shapes", "digits", "fashion"), "seed": ("shapes", "digits", "fashion"),
    "holdout_classes": ("fashion",), "augment": ("digits", "files"),
    "twins": ("shapes",), "count_weights": ("shapes",), "caption_openers": ("shapes",),
    "num_workers": ("shards",), "shuffle_buffer": ("shards",),
    "resample": ("shards",), "max_consecutive_failures": ("shards",),
}


class Pairs(NamedTuple):
    """An in-memory training set: images (N, H, W, 3) uint8, captions (N lists), labels (N,)."""
    images: np.ndarray
    captions: list[list[str]]
    labels: np.ndarray

    def corpus(self) -> Iterator[str]:
        """Every caption: what a from-scratch tokenizer learns its vocabulary from."""
        return (c for caps in self.captions for c in caps)


def dataset_options_not_applying(data: DataConfig) -> list[str]:
    """``data`` options set away from their defaults that ``data.dataset`` does not read."""
    defaults = DataConfig()
    return [f"data.{name}={getattr(data, name)!r} does not apply to data.dataset={data.dataset} (only "
            f"{', '.join(datasets)})" for name, datasets in DATASET_OPTIONS.items()
            if data.dataset not in datasets and getattr(data, name) != getattr(defaults, name)]


def without_training_options(data: DataConfig) -> DataConfig:
    """``data`` with ``SHAPES_TRAINING_OPTIONS`` at their defaults: i.i.d. scenes (no twins, equal object counts,
    plain captions), as fine-tuning trains and tests on."""
    defaults = DataConfig()
    return dataclasses.replace(data, **{name: getattr(defaults, name) for name in SHAPES_TRAINING_OPTIONS})


def applies(data: DataConfig, option: str) -> bool:
    """Whether ``data.dataset`` reads ``data.<option>`` (see ``DATASET_OPTIONS``)."""
    return data.dataset in DATASET_OPTIONS.get(option, DATASETS)


def load_split(data: DataConfig, split: str, size: int = 1000, single: bool = False, cache_dir=None):
    """A split of the run's data set: shapes scenes (1-3 objects, or single-object), digits, Fashion-MNIST
    (``size`` applies to its train split only; val and test are whole), or the user's own data (``files`` / ``shards``, see ``load_user_split``).
    The training-only shapes options (twins, count weights) apply to the multi-object train split."""
    if data.dataset in ("files", "shards"):
        return load_user_split(data, split, size)
    if data.dataset == "shapes":
        train_only = {}
        if split == "train" and not single:
            train_only = {name: getattr(data, name) for name in SHAPES_TRAINING_OPTIONS}
        return shapes.ShapesDataset(shapes.ShapesConfig(
            split=split, size=size, image_size=data.image_size, min_objects=1, max_objects=1 if single else 3,
            num_captions=data.num_captions, seed=data.seed, **train_only), cache_dir=cache_dir)
    if data.dataset == "digits":
        return digits.DigitsDataset(digits.DigitsConfig(split=split, image_size=data.image_size,
                                                        num_captions=data.num_captions, seed=data.seed))
    if data.dataset == "fashion":
        return fashion.FashionDataset(split, data.image_size, data.path, data.seed, data.num_captions,
                                      size if split == "train" else None, data.holdout_classes)
    raise ValueError(f"unknown dataset {data.dataset!r}; choose from {', '.join(DATASETS)}")


def load_user_split(data: DataConfig, split: str, size: int = 1000):
    """The user's own data. ``train`` is ``data.path``: for files every image of the folder (``size``
    does not apply), for shards the first ``size`` readable samples in shard order. ``test`` / ``val``
    is the image folder ``data.eval_path`` (every image); without one there is no held-out split and
    asking for it is an error (``evaluate_user_data`` then evaluates on the training data, saying so)."""
    if split == "train":
        if not data.path:
            raise ValueError(f"data.dataset={data.dataset} needs data.path (an image folder"
                             f"{'' if data.dataset == 'files' else ' or shards'}), e.g. --set data.path=DIR")
        if data.dataset == "files":
            return files.FilesDataset(data.path, image_size=data.image_size)
        return shards.read_samples(data.path, size, data.image_size, data.max_consecutive_failures)
    if split in ("test", "val"):
        if not data.eval_path:
            raise ValueError(f"data.dataset={data.dataset} has no held-out {split} split; set data.eval_path "
                             f"to an image folder with a captions file")
        return files.FilesDataset(data.eval_path, image_size=data.image_size)
    raise ValueError(f"unknown split {split!r} for data.dataset={data.dataset}; choose from train, test, val")


def load_pairs(data: DataConfig, cache_dir=None) -> Pairs:
    """The training set in memory. Shards are streamed instead (``vlpt.data.shards.ShardBatches``): an
    objective that needs the pairs in memory refuses them."""
    if data.dataset == "shards":
        raise ValueError("data.dataset=shards is streamed, not loaded into memory; this task needs "
                         "data.dataset=files (an image folder) or a built-in data set")
    ds = load_split(data, "train", data.train_size, cache_dir=cache_dir)
    return Pairs(ds.images, ds.captions, ds.labels)
