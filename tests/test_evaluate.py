"""Evaluators against hand-made inputs with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.conftest import assert_close_to_scale
from vlpt.data.shapes import CLASS_NAMES, COLOR_NAMES, SHAPES
from vlpt.evaluate import (
    COLOR_CLASS_NAMES,
    SHAPE_CLASS_NAMES,
    SHAPES_TEMPLATES,
    accuracy,
    build_zero_shot_classifier,
    confusion_matrix,
    format_prompt,
    linear_probe,
    retrieval_metrics,
    retrieval_ranks,
    text_to_image_examples,
    write_report,
    zero_shot_logits,
)

# ----------------------------------------------------------------------------- retrieval

def test_retrieval_hand_made_multiple_captions():
    # 3 images, 2 captions each: texts 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2.
    t2i = torch.tensor([0, 0, 1, 1, 2, 2])
    sim = torch.tensor([
        # image 0: its 2nd caption (text 1) is its best text -> i2t hit at 1.
        [0.1, 0.9, 0.2, 0.3, 0.0, 0.0],
        # image 1: texts 0 and 4 beat its best caption (text 3, 0.5) -> rank 2.
        [0.8, 0.0, 0.1, 0.5, 0.7, 0.0],
        # image 2: its caption ties with a wrong text -> pessimistic rank 1, not 0.
        [0.0, 0.0, 0.6, 0.0, 0.6, 0.2],
    ])
    i2t, t2i_rank = retrieval_ranks(sim, t2i)
    assert i2t.tolist() == [0, 2, 1]
    # text -> image, column by column: text 0 own 0.1 < 0.8 -> rank 1; text 1 rank 0;
    # text 2 own 0.1, beaten by 0.2 and 0.6 -> 2; text 3 -> 0; text 4 own 0.6 < 0.7 -> 1; text 5 -> 0.
    assert t2i_rank.tolist() == [1, 0, 2, 0, 1, 0]
    m = retrieval_metrics(sim, t2i, ks=(1, 2))
    assert m == pytest.approx({
        "retrieval_i2t_r1": 1 / 3, "retrieval_i2t_r2": 2 / 3,
        "retrieval_t2i_r1": 3 / 6, "retrieval_t2i_r2": 5 / 6,
    })


def test_retrieval_ties_are_not_optimistic():
    # A collapsed model (all scores equal) must not score perfectly.
    n = 20
    sim = np.zeros((n, n), np.float32)
    m = retrieval_metrics(sim, np.arange(n), ks=(1, 5, 10))
    assert m["retrieval_i2t_r1"] == 0.0 and m["retrieval_t2i_r1"] == 0.0
    assert m["retrieval_t2i_r10"] == 0.0
    # Captions of the SAME image tying with each other is fine: the top text is still correct.
    sim = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert retrieval_ranks(sim, torch.tensor([0, 0, 1]))[0].tolist() == [0, 0]


def test_retrieval_nan_counts_as_miss():
    sim = torch.tensor([[float("nan"), 0.0], [0.0, 1.0]])
    i2t, t2i = retrieval_ranks(sim, torch.tensor([0, 1]))
    assert i2t.tolist() == [1, 0] and t2i.tolist() == [1, 0]


def test_retrieval_perfect_and_keys():
    gen = torch.Generator().manual_seed(0)
    num_images, per_image = 50, 5
    t2i = torch.arange(num_images).repeat_interleave(per_image)
    sim = torch.rand(num_images, num_images * per_image, generator=gen)
    sim[t2i, torch.arange(t2i.numel())] += 2.0  # every caption beats every wrong pair
    m = retrieval_metrics(sim, t2i)
    assert sorted(m) == sorted(f"retrieval_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert all(v == 1.0 for v in m.values())


def test_retrieval_random_is_about_chance_and_fast():
    gen = torch.Generator().manual_seed(0)
    num_images, per_image = 1000, 5
    t2i = torch.arange(num_images).repeat_interleave(per_image)
    sim = torch.rand(num_images, num_images * per_image, generator=gen)
    m = retrieval_metrics(sim, t2i)
    for k in (1, 5, 10):
        assert m[f"retrieval_t2i_r{k}"] == pytest.approx(k / num_images, abs=0.006)
        # i2t: best of 5 captions among 4,995 negatives -> about 5K / 5,000 = K / 1,000 as well.
        assert m[f"retrieval_i2t_r{k}"] == pytest.approx(k / num_images, abs=0.01)


def test_retrieval_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        retrieval_metrics(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="without any caption"):
        retrieval_metrics(torch.zeros(3, 2), torch.tensor([0, 1]))


def test_text_to_image_examples():
    images = np.stack([np.full((8, 8, 3), i, np.uint8) for i in range(4)])
    sim = torch.tensor([[0.1, 0.9], [0.8, 0.1], [0.3, 0.2], [0.0, 0.5]])
    ex = text_to_image_examples(sim, torch.tensor([1, 0]), ["t0", "t1"], images, [0, 1], k=3)
    assert ex[0][0] == "t0" and [int(im[0, 0, 0]) for im in ex[0][1]] == [1, 2, 0]
    assert ex[0][2] == [True, False, False]
    # text 1 scores images [0.9, 0.1, 0.2, 0.5] -> order 0, 3, 2; its image is 0.
    assert [int(im[0, 0, 0]) for im in ex[1][1]] == [0, 3, 2] and ex[1][2] == [True, False, False]


# ----------------------------------------------------------------------------- zero-shot

def _toy_encode_text(texts: list[str]) -> torch.Tensor:
    """Deterministic bag-of-characters embedding, L2-normalised."""
    out = torch.zeros(len(texts), 32)
    for i, t in enumerate(texts):
        for j, ch in enumerate(t):
            out[i, (ord(ch) * 7 + j) % 32] += 1.0
    return F.normalize(out, dim=-1)


def test_format_prompt_articles():
    assert format_prompt("a {}", "orange star") == "an orange star"
    assert format_prompt("a picture of a {}", "red circle") == "a picture of a red circle"
    assert format_prompt("an image showing a {}", "orange shape") == "an image showing an orange shape"
    assert format_prompt("an {}", "blue square") == "a blue square"
    assert format_prompt("A {} here", "hexagon") == "A hexagon here"
    assert format_prompt("{} on a table", "orange star") == "orange star on a table"
    prompts = [format_prompt(t, n) for t in SHAPES_TEMPLATES for n in CLASS_NAMES + COLOR_CLASS_NAMES]
    assert not any(" a orange" in " " + p or " a a" in " " + p for p in prompts)


def test_class_name_lists_follow_label_order():
    assert list(SHAPE_CLASS_NAMES) == list(SHAPES)
    assert [n.split()[0] for n in COLOR_CLASS_NAMES] == list(COLOR_NAMES)


def test_zero_shot_classifier_matches_direct_computation():
    names = ["red circle", "orange star", "blue square"]
    templates = ["a {}", "a picture of a {}", "there is a {}"]
    clf = build_zero_shot_classifier(_toy_encode_text, names, templates)
    assert clf.shape == (32, 3)
    for c, name in enumerate(names):
        emb = _toy_encode_text([format_prompt(t, name) for t in templates])
        expected = emb.mean(0) / emb.mean(0).norm()
        assert_close_to_scale(clf[:, c], expected)
    # An image feature equal to a class prompt's embedding is classified as that class.
    feats = _toy_encode_text(["a picture of an orange star", "a blue square"])
    logits = zero_shot_logits(feats, clf)
    assert logits.shape == (2, 3) and logits.argmax(1).tolist() == [1, 2]


def test_accuracy_and_confusion():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.7, 0.2], [0.6, 0.3, 0.1]])
    labels = torch.tensor([0, 1, 1, 2])
    acc = accuracy(logits, labels, topk=(1, 2, 5), prefix="zs_")
    assert acc == pytest.approx({"zs_top1": 0.5, "zs_top2": 0.75, "zs_top5": 1.0})
    cm = confusion_matrix(logits.argmax(1), labels, 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 1], [1, 0, 0]]
    assert cm.sum() == 4 and cm.dtype == np.int64
    with pytest.raises(ValueError):
        confusion_matrix(np.array([3]), np.array([0]), 3)


# ----------------------------------------------------------------------------- linear probe

def test_linear_probe_separable_and_random():
    rng = np.random.default_rng(0)
    num_classes, dim = 5, 64
    centers = rng.normal(0, 3, size=(num_classes, dim))
    y_train, y_test = rng.integers(num_classes, size=1000), rng.integers(num_classes, size=500)
    x_train = centers[y_train] + rng.normal(size=(1000, dim))
    x_test = centers[y_test] + rng.normal(size=(500, dim))
    m = linear_probe(torch.from_numpy(x_train), torch.from_numpy(y_train), x_test, y_test)
    assert list(m) == ["linear_probe_top1"] and m["linear_probe_top1"] > 0.95
    # Labels unrelated to the features: test accuracy near chance (1 / 5).
    noise = linear_probe(x_train, rng.integers(num_classes, size=1000), x_test,
                         rng.integers(num_classes, size=500), C=0.01)
    assert abs(noise["linear_probe_top1"] - 1 / num_classes) < 0.08


# ----------------------------------------------------------------------------- report

def _examples():
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8) for _ in range(5)]
    return [("a red circle", imgs, [True, False, False, False, False]),
            ("an orange star above a large blue square", imgs, [False, False, True, False, False])]


def test_write_report_files_and_round_trip(tmp_path):
    run = tmp_path / "run"
    metrics = {"zero_shot_top1": 0.5, "retrieval_i2t_r1": np.float32(0.25), "loss": torch.tensor(1.5),
               "steps": 10, "bad_loss": float("nan")}
    history = [{"step": s, "loss": 3.0 / (s + 1), "lr": 1e-3 * min(1, s / 5)} for s in range(20)]
    history.append({"step": 20, "val_top1": 0.4})  # rows without loss are skipped
    rng = np.random.default_rng(0)
    confusion = rng.integers(0, 5, size=(48, 48))
    extra = tmp_path / "samples.png"
    Image.new("RGB", (8, 8)).save(extra)

    report = write_report(run, metrics, history, confusion, CLASS_NAMES, _examples(), {"samples": extra})
    assert report == run / "report.md"
    loaded = json.loads((run / "metrics.json").read_text())
    assert list(loaded) == sorted(loaded)
    assert loaded == {"zero_shot_top1": 0.5, "retrieval_i2t_r1": 0.25, "loss": 1.5, "steps": 10,
                      "bad_loss": None}
    for name in ("loss.png", "confusion.png", "retrieval.png"):
        with Image.open(run / name) as im:
            im.verify()
            assert im.format == "PNG"
        assert f"({name})" in report.read_text()
    text = report.read_text()
    assert "| zero_shot_top1 | 50.00% |" in text and "| retrieval_i2t_r1 | 25.00% |" in text
    assert "| loss | 1.5 |" in text and "| steps | 10 |" in text
    assert "(../samples.png)" in text
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_write_report_minimal(tmp_path):
    report = write_report(tmp_path, {"linear_probe_top1": 0.9}, history=[])
    assert report.exists() and not (tmp_path / "loss.png").exists()
    assert "90.00%" in report.read_text()


def test_failed_write_keeps_previous_metrics(tmp_path):
    write_report(tmp_path, {"zero_shot_top1": 0.5})
    before = (tmp_path / "metrics.json").read_text()
    with pytest.raises(TypeError):
        write_report(tmp_path, {"zero_shot_top1": 0.7, "oops": object()})
    assert (tmp_path / "metrics.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "report.md"]
