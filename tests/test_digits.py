"""scikit-learn's handwritten digits as an image-text data set."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from vlpt.data.digits import (
    CLASS_NAMES,
    DIGIT_WORDS,
    EVAL_TEMPLATES,
    TRAIN_TEMPLATES,
    DigitsConfig,
    DigitsDataset,
    fill_template,
)

TOTAL = 1797


@pytest.fixture(scope="module")
def train_set() -> DigitsDataset:
    return DigitsDataset(DigitsConfig(split="train"))


@pytest.fixture(scope="module")
def test_set() -> DigitsDataset:
    return DigitsDataset(DigitsConfig(split="test"))


def test_sizes(train_set, test_set):
    assert len(train_set) + len(test_set) == TOTAL
    assert 350 <= len(test_set) <= 370  # ~20 %
    assert len(train_set.captions) == len(train_set.images) == len(train_set.labels) == len(train_set)


def test_splits_disjoint_and_cover_everything(train_set, test_set):
    a, b = set(train_set.indices.tolist()), set(test_set.indices.tolist())
    assert not a & b
    assert a | b == set(range(TOTAL))


def test_split_is_deterministic_and_seeded(test_set):
    again = DigitsDataset(DigitsConfig(split="test"))
    assert np.array_equal(again.indices, test_set.indices)
    assert np.array_equal(again.images, test_set.images)
    assert again.captions == test_set.captions
    other = DigitsDataset(DigitsConfig(split="test", seed=1))
    assert not np.array_equal(other.indices, test_set.indices)


def test_split_is_pinned(test_set):
    # The fixed split must be the same on every machine and numpy version: pin a fingerprint.
    assert len(test_set) == 359
    assert test_set.indices[:8].tolist() == [5, 9, 12, 14, 16, 17, 19, 23]
    assert hashlib.sha1(test_set.indices.astype("<i8").tobytes()).hexdigest()[:16] == "bee2bad5bd858247"


def test_labels_range_and_every_class_in_both_splits(train_set, test_set):
    for ds in (train_set, test_set):
        assert ds.labels.dtype == np.int64
        assert ds.labels.min() == 0 and ds.labels.max() == 9
        assert set(ds.labels.tolist()) == set(range(10))
    # Stratified: every class has about a fifth of its images in test_set.
    for c in range(10):
        n_test = int((test_set.labels == c).sum())
        n_all = n_test + int((train_set.labels == c).sum())
        assert abs(n_test - 0.2 * n_all) <= 1


def test_labels_match_sklearn(test_set):
    from sklearn.datasets import load_digits

    assert np.array_equal(test_set.labels, load_digits().target[test_set.indices])


def test_captions_name_the_right_digit(train_set):
    for caps, label in zip(train_set.captions[:300], train_set.labels[:300]):
        assert len(caps) == 3 and len(set(caps)) == 3
        for cap in caps:
            words = re.findall(r"[a-z]+|\d", cap)
            assert DIGIT_WORDS[label] in words or str(label) in words, cap
            wrong = {w for k, w in enumerate(DIGIT_WORDS) if k != label} | {str(k) for k in range(10) if k != label}
            assert not wrong & set(words), cap


def test_captions_come_from_train_templates(train_set):
    allowed = {fill_template(t, c) for t in TRAIN_TEMPLATES for c in range(10)}
    assert all(cap in allowed for caps in train_set.captions for cap in caps)


def test_num_captions():
    ds = DigitsDataset(DigitsConfig(split="test", num_captions=1, image_size=8))
    assert all(len(c) == 1 for c in ds.captions)


def test_images(train_set):
    image, caps, label = train_set[0]
    assert train_set.images.dtype == np.uint8
    assert train_set.images.shape == (len(train_set), 32, 32, 3)
    assert image.shape == (32, 32, 3) and isinstance(label, int) and isinstance(caps, list)
    # Gray replicated to RGB; white digit on black: dark border, bright ink somewhere.
    assert np.array_equal(train_set.images[..., 0], train_set.images[..., 1])
    assert np.array_equal(train_set.images[..., 0], train_set.images[..., 2])
    assert train_set.images.max() == 255
    assert np.median(train_set.images) < 64


def test_image_size():
    ds = DigitsDataset(DigitsConfig(split="test", image_size=48))
    assert ds.images.shape[1:] == (48, 48, 3)


def test_eval_templates_disjoint_from_train():
    assert not set(EVAL_TEMPLATES) & set(TRAIN_TEMPLATES)
    train_caps = {fill_template(t, c) for t in TRAIN_TEMPLATES for c in range(10)}
    eval_caps = {fill_template(t, c) for t in EVAL_TEMPLATES for c in range(10)}
    assert not train_caps & eval_caps
    assert CLASS_NAMES == DIGIT_WORDS and len(CLASS_NAMES) == 10


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"split": "val"}, "split"),
        ({"image_size": 4}, "image_size"),
        ({"image_size": 512}, "image_size"),
        ({"seed": -1}, "seed"),
        ({"num_captions": 0}, "num_captions"),
        ({"num_captions": len(TRAIN_TEMPLATES) + 1}, "num_captions"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsConfig(**kwargs)
