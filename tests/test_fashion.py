"""Fashion-MNIST (Debian's dataset-fashion-mnist, installed by the Makefile): reading the IDX files, the fixed
splits, held-out classes, their zero-shot figures, and a tiny model that learns the real photos."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from vlpt import cli
from vlpt.config import ConfigError, load_config
from vlpt.data import fashion
from vlpt.evaluate.suite import holdout_accuracies
from vlpt.train.run import run

INSTALLED = Path(fashion.DEFAULT_PATH) / "train-images-idx3-ubyte.gz"


@pytest.fixture(scope="module", autouse=True)
def fashion_installed():
    assert INSTALLED.is_file(), ("Fashion-MNIST is missing: `make test` installs it (apt-get install "
                                 "dataset-fashion-mnist); run that as root, or see vlpt/data/fashion.py")


def test_splits_are_fixed_stratified_and_disjoint():
    train, val, test = (fashion.FashionDataset(s, image_size=8) for s in fashion.SPLITS)
    assert (len(train), len(val), len(test)) == (55000, 5000, 10000)
    assert np.bincount(val.labels).tolist() == [500] * 10 and np.bincount(test.labels).tolist() == [1000] * 10
    assert not set(train.indices) & set(val.indices)  # both come from the training file
    again = fashion.FashionDataset("val", image_size=8, seed=3)  # val does not move with the data seed
    assert np.array_equal(again.indices, val.indices)
    assert train.images.shape == (55000, 8, 8, 3) and train.images.dtype == np.uint8
    # the published pixels, greyscale replicated to RGB at the native size
    raw = fashion.read_idx(INSTALLED)
    native = fashion.FashionDataset("test", image_size=28)
    assert np.array_equal(native.images[..., 0], fashion.read_idx(INSTALLED.with_name("t10k-images-idx3-ubyte.gz")))
    assert raw.shape == (60000, 28, 28)


def test_train_size_takes_a_seeded_prefix_of_every_class():
    a = fashion.FashionDataset("train", image_size=8, size=2000, seed=1)
    b = fashion.FashionDataset("train", image_size=8, size=2000, seed=1)
    c = fashion.FashionDataset("train", image_size=8, size=2000, seed=2)
    assert np.array_equal(a.indices, b.indices) and not np.array_equal(a.indices, c.indices)
    assert np.bincount(a.labels, minlength=10).min() > 150  # a shuffled prefix: every class, about evenly
    assert all(len(caps) == 2 and caps[0] != caps[1] for caps in a.captions)


def test_held_out_classes_leave_training_and_validation_only():
    held = ("sandal", "bag")
    train = fashion.FashionDataset("train", image_size=8, holdout_classes=held)
    test = fashion.FashionDataset("test", image_size=8, holdout_classes=held)
    assert set(train.labels.tolist()) == set(range(10)) - {5, 8} and len(train) == 55000 - 2 * 5500
    assert len(test) == 10000  # the test set keeps them: that is where they are measured


def test_holdout_figures_from_hand_made_logits():
    labels = torch.tensor([0, 1, 5, 5, 8, 8])
    logits = torch.full((6, 10), -1.0)
    logits[0, 0] = logits[1, 2] = 1.0  # seen: one right, one wrong
    logits[2, 5] = 1.0  # sandal right among all
    logits[3, 0], logits[3, 8] = 1.0, 0.5  # sandal: wrong among all, wrong among the held-out (bag > sandal)
    logits[4, 3], logits[4, 8] = 1.0, 0.2  # bag: wrong among all, right among held-out
    logits[5, 8] = 1.0  # bag right
    figures = holdout_accuracies(logits, labels, [5, 8])
    assert figures["zeroshot_seen_classes_top1"] == 0.5
    assert figures["zeroshot_heldout_top1_among_all"] == 0.5
    assert figures["zeroshot_heldout_top1_among_heldout"] == 0.75
    assert figures["zeroshot_heldout_chance_among_heldout"] == 0.5 and figures["zeroshot_heldout_images"] == 4


def test_bad_files_and_names_are_clear_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion.FashionDataset("test", path=str(tmp_path))
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + bytes(100))
    with pytest.raises(ValueError, match="truncated"):
        fashion.read_idx(tmp_path / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(ConfigError, match="holdout_classes"):
        load_config("fashion-scratch", ["data.holdout_classes=[sandal, sandals]"])
    status = cli.main(["train", "--config", "fashion-scratch", "--runs-dir", str(tmp_path), "--set",
                       f"data.path={tmp_path / 'none'}", "--set", "train.steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "dataset-fashion-mnist" in err[0], err


def test_a_tiny_model_learns_fashion_zero_shot_with_held_out_wording(tmp_path):
    config = load_config("fashion-scratch", [
        "data.train_size=4096", "train.steps=120", "train.batch_size=64", "train.warmup_steps=10",
        "train.checkpoint_every=0", "eval.probe_train_size=1000", "model.embed_dim=64",
        "data.holdout_classes=[sandal, bag]"])
    metrics = run(config, tmp_path / "run")
    # 10 classes: chance is 10%; held-out wording (EVAL_TEMPLATES) on the 10,000 test photos
    assert metrics["zeroshot_seen_classes_top1"] > 0.5, metrics
    assert metrics["linear_probe_top1"] > 0.6, metrics
    assert metrics["zeroshot_heldout_images"] == 2000 and 0 <= metrics["zeroshot_heldout_top1_among_heldout"] <= 1
