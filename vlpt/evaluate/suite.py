"""The dual encoder's evaluation suite: build the held-out sets of the run's data set, embed them, and call
the pure evaluators (zero-shot, retrieval, linear probe).

Returns flat metrics plus the artefacts the report plots (confusion matrix, retrieval examples).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vlpt.config import DataConfig, EvalConfig
from vlpt.data import digits, shapes
from vlpt.data.splits import load_split
from vlpt.evaluate.linear_probe import linear_probe
from vlpt.evaluate.report import EvalResult
from vlpt.evaluate.retrieval import retrieval_metrics, text_to_image_examples
from vlpt.evaluate.scoring import embed_images, embed_texts
from vlpt.evaluate.zero_shot import (
    COLOR_CLASS_NAMES,
    SHAPE_CLASS_NAMES,
    SHAPES_TEMPLATES,
    accuracy,
    build_prompt_classifier,
    build_zero_shot_classifier,
    confusion_matrix,
    zero_shot_logits,
)
from vlpt.models.dual_encoder import DualEncoder


def shapes_classifier(model: DualEncoder) -> torch.Tensor:
    """The 48-way (color, shape) zero-shot classifier (D, 48) from the prompt-template ensemble."""
    return build_zero_shot_classifier(lambda texts: embed_texts(model, texts), shapes.CLASS_NAMES, SHAPES_TEMPLATES)


def digits_classifier(model: DualEncoder) -> torch.Tensor:
    """The 10-way digits zero-shot classifier (D, 10) from prompts never used as training captions."""
    prompts = [[digits.fill_template(t, label) for t in digits.EVAL_TEMPLATES] for label in range(digits.NUM_CLASSES)]
    return build_prompt_classifier(lambda texts: embed_texts(model, texts), prompts)


def _retrieval(model: DualEncoder, images: np.ndarray, captions: Sequence[Sequence[str]], batch_size: int,
               num_examples: int = 4) -> tuple[dict[str, float], list[Any]]:
    texts = [c for caps in captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    similarity = embed_images(model, images, batch_size) @ embed_texts(model, texts).T  # (I, T)
    queries = list(range(0, len(texts), max(1, len(texts) // num_examples)))[:num_examples]
    examples = text_to_image_examples(similarity, owner, texts, images, queries, k=5)
    return retrieval_metrics(similarity, owner), examples


def evaluate_shapes(model: DualEncoder, data: DataConfig, config: EvalConfig, cache_dir=None) -> EvalResult:
    """Zero-shot (48-way, shape, color, compositional), retrieval on 1-3 object scenes, linear probe."""
    def load(split: str, size: int, single: bool) -> shapes.ShapesDataset:
        return load_split(data, split, size, single, cache_dir)

    model.eval()
    bs = config.batch_size
    encode = lambda texts: embed_texts(model, texts)
    single = load("test", config.zero_shot_size, single=True)
    features = embed_images(model, single.images, bs)
    classifier = shapes_classifier(model)
    logits = zero_shot_logits(features, classifier)
    labels = torch.from_numpy(single.labels)
    metrics = accuracy(logits, labels, topk=(1, 5), prefix="zeroshot_")
    confusion = confusion_matrix(logits.argmax(1), labels, shapes.NUM_CLASSES)
    shape_clf = build_zero_shot_classifier(encode, SHAPE_CLASS_NAMES, SHAPES_TEMPLATES)
    metrics |= accuracy(zero_shot_logits(features, shape_clf), torch.from_numpy(single.shape_labels),
                        prefix="zeroshot_shape_")
    color_clf = build_zero_shot_classifier(encode, COLOR_CLASS_NAMES, SHAPES_TEMPLATES)
    metrics |= accuracy(zero_shot_logits(features, color_clf), torch.from_numpy(single.color_labels),
                        prefix="zeroshot_color_")

    comp = load("compositional", config.compositional_size, single=True)
    comp_logits = zero_shot_logits(embed_images(model, comp.images, bs), classifier)
    metrics |= accuracy(comp_logits, torch.from_numpy(comp.labels), prefix="zeroshot_compositional_")

    scenes = load("test", config.retrieval_size, single=False)
    retrieval, examples = _retrieval(model, scenes.images, scenes.captions, bs)
    metrics |= retrieval

    probe_train = load("train", config.probe_train_size, single=True)
    metrics |= linear_probe(embed_images(model, probe_train.images, bs), probe_train.labels, features, single.labels)
    return EvalResult(metrics, confusion, shapes.CLASS_NAMES, examples)


def evaluate_digits(model: DualEncoder, data: DataConfig, config: EvalConfig) -> EvalResult:
    """Zero-shot with prompts never used in training, and a linear probe, on the real digits.

    No retrieval: digit captions come from a few templates, so many images share identical captions
    and recall@K would measure tie-breaking, not the model."""
    model.eval()
    train, test = load_split(data, "train"), load_split(data, "test")
    features = embed_images(model, test.images, config.batch_size)
    logits = zero_shot_logits(features, digits_classifier(model))
    labels = torch.from_numpy(test.labels)
    metrics = accuracy(logits, labels, prefix="zeroshot_")
    confusion = confusion_matrix(logits.argmax(1), labels, digits.NUM_CLASSES)
    metrics |= linear_probe(embed_images(model, train.images, config.batch_size), train.labels, features, test.labels)
    return EvalResult(metrics, confusion, digits.CLASS_NAMES)


# Zero-shot prompts for the user's class names: generic, since their captions' wording is unknown.
USER_TEMPLATES = ("{}", "a {}", "a photo of a {}", "a picture of a {}", "an image of a {}")


def _common_labels(train, test) -> tuple[np.ndarray, np.ndarray] | None:
    """Train and test labels on one class numbering (by name when the labels are names), or None."""
    if train.class_names is None and test.class_names is None:
        return train.labels, test.labels
    if train.class_names is None or test.class_names is None:
        return None  # numbers on one side, names on the other: nothing to compare
    names = sorted(set(train.class_names) | set(test.class_names))
    def renumber(ds):
        table = np.array([names.index(n) for n in ds.class_names], np.int64)
        return np.where(ds.labels >= 0, table[np.maximum(ds.labels, 0)], -1)
    return renumber(train), renumber(test)


def evaluate_user_data(model: DualEncoder, data: DataConfig, config: EvalConfig) -> EvalResult:
    """The user's own data (files / shards): image<->text retrieval recall@K over the first
    ``eval.retrieval_size`` images with all their captions; zero-shot over the first
    ``eval.zero_shot_size`` labeled images when the labels are class names (prompts
    ``USER_TEMPLATES``); a linear probe (train images -> held-out images) when both are labeled.

    With ``data.eval_path`` set these are held-out figures. Without it the only images are the
    training images: retrieval and zero-shot are then measured on them and every key starts with
    ``train_`` (how well the model fits its data, not how it generalises); no linear probe is fitted.
    Retrieval counts a caption shared by several images as right for one of them only."""
    model.eval()
    bs = config.batch_size
    held_out = bool(data.eval_path)
    train = load_split(data, "train", max(config.retrieval_size, config.zero_shot_size, config.probe_train_size))
    test = load_split(data, "test") if held_out else train
    prefix = "" if held_out else "train_"
    n = min(len(test.images), config.retrieval_size)
    retrieval, examples = _retrieval(model, test.images[:n], test.captions[:n], bs)
    metrics = {f"{prefix}{k}": v for k, v in retrieval.items()}
    metrics[f"{prefix}retrieval_images"] = n
    confusion, class_names = None, ()
    labeled = np.flatnonzero(test.labels >= 0)[:config.zero_shot_size]
    if test.class_names and len(labeled):
        class_names = test.class_names
        classifier = build_zero_shot_classifier(lambda texts: embed_texts(model, texts), class_names, USER_TEMPLATES)
        logits = zero_shot_logits(embed_images(model, test.images[labeled], bs), classifier)
        labels = torch.from_numpy(test.labels[labeled])
        metrics |= accuracy(logits, labels, topk=(1, 5), prefix=f"{prefix}zeroshot_")
        confusion = confusion_matrix(logits.argmax(1), labels, len(class_names))
    common = _common_labels(train, test) if held_out else None
    if common is not None:
        train_labels, test_labels = common
        fit_rows = np.flatnonzero(train_labels >= 0)[:config.probe_train_size]
        test_rows = np.flatnonzero(test_labels >= 0)
        if len(np.unique(train_labels[fit_rows])) >= 2 and len(test_rows):
            metrics |= linear_probe(embed_images(model, train.images[fit_rows], bs), train_labels[fit_rows],
                                    embed_images(model, test.images[test_rows], bs), test_labels[test_rows])
    return EvalResult(metrics, confusion, class_names, examples)


def evaluate(model: DualEncoder, data: DataConfig, config: EvalConfig, cache_dir=None) -> EvalResult:
    if data.dataset == "digits":
        return evaluate_digits(model, data, config)
    if data.dataset in ("files", "shards"):
        return evaluate_user_data(model, data, config)
    return evaluate_shapes(model, data, config, cache_dir)  # an unknown dataset fails in load_split
