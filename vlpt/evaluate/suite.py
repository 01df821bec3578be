"""The dual encoder's evaluation suite: build the held-out sets of the run's data set, embed them, and call
the pure evaluators (zero-shot, retrieval, linear probe).

Returns flat metrics plus the artefacts the report plots (confusion matrix, retrieval examples).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vlpt.config import DataConfig, EvalConfig
from vlpt.data import digits, fashion, shapes
from vlpt.data.splits import load_split
from vlpt.evaluate.linear_probe import linear_probe
from vlpt.evaluate.report import EvalResult
from vlpt.evaluate.retrieval import retrieval_metrics, text_to_image_examples
from vlpt.evaluate.scoring import embed_images, embed_texts
from vlpt.evaluate.zero_shot import (
    COLOR_CLASS_NAMES,
    SHAPE_CLASS_NAMES,
    SHAPES_TEMPLATES,
    SHAPES_TRAIN_TEMPLATES,
    accuracy,
    build_prompt_classifier,
    build_zero_shot_classifier,
    confusion_matrix,
    format_prompt,
    zero_shot_logits,
)
from vlpt.models.dual_encoder import DualEncoder


def shapes_classifier(model: DualEncoder, templates: Sequence[str] = SHAPES_TEMPLATES) -> torch.Tensor:
    """The 48-way (color, shape) zero-shot classifier (D, 48) from a prompt-template ensemble (default: the
    held-out wording)."""
    return build_zero_shot_classifier(lambda texts: embed_texts(model, texts), shapes.CLASS_NAMES, templates)


def digits_classifier(model: DualEncoder, templates: Sequence[str] = digits.EVAL_TEMPLATES) -> torch.Tensor:
    """The 10-way digits zero-shot classifier (D, 10) from prompts (default: never used as training captions)."""
    prompts = [[digits.fill_template(t, label) for t in templates] for label in range(digits.NUM_CLASSES)]
    return build_prompt_classifier(lambda texts: embed_texts(model, texts), prompts)


# Every shapes zero-shot figure is measured with the held-out wording (the headline key) and with the training
# captions' wording (the same key + _seen_templates): the gap is what the wording alone was worth.
WORDINGS = ((SHAPES_TEMPLATES, ""), (SHAPES_TRAIN_TEMPLATES, "_seen_templates"))


def position_classifiers(model: DualEncoder, templates: Sequence[str]) -> torch.Tensor:
    """(48, D, 9): for each (color, shape) class, its 9 cells as prompts ("... a red circle in the top left")."""
    encode = lambda texts: embed_texts(model, texts)
    return torch.stack([build_prompt_classifier(encode, [[format_prompt(t, f"{name} {phrase}") for t in templates]
                                                         for phrase in shapes.POSITION_PHRASES])
                        for name in shapes.CLASS_NAMES])


def position_accuracy(features: torch.Tensor, scenes: Sequence[shapes.Scene], classifiers: torch.Tensor) -> float:
    """9-way: where is each single-object scene's object, given its color and shape (chance 1/9)."""
    labels = torch.tensor([s.primary.label for s in scenes])
    cells = torch.tensor([s.primary.cell for s in scenes])
    logits = torch.einsum("nd,ndc->nc", F.normalize(features.float(), dim=-1), classifiers[labels])  # (N, 9)
    return (logits.argmax(1) == cells).float().mean().item()


def _retrieval(model: DualEncoder, images: np.ndarray, captions: Sequence[Sequence[str]], batch_size: int,
               num_examples: int = 4) -> tuple[dict[str, float], list[Any]]:
    texts = [c for caps in captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    similarity = embed_images(model, images, batch_size) @ embed_texts(model, texts).T  # (I, T)
    queries = list(range(0, len(texts), max(1, len(texts) // num_examples)))[:num_examples]
    examples = text_to_image_examples(similarity, owner, texts, images, queries, k=5)
    return retrieval_metrics(similarity, owner), examples


def evaluate_shapes(model: DualEncoder, data: DataConfig, config: EvalConfig, cache_dir=None) -> EvalResult:
    """Zero-shot on single-object scenes: 48-way (color, shape), shape, color and position (9-way) on test
    scenes, 48-way and position on held-out combinations (the compositional split: unseen (color, shape)
    pairs; the layout split: unseen (shape, cell) places); retrieval on 1-3 object scenes; a linear probe."""
    def load(split: str, size: int, single: bool) -> shapes.ShapesDataset:
        return load_split(data, split, size, single, cache_dir)

    model.eval()
    bs = config.batch_size
    encode = lambda texts: embed_texts(model, texts)
    single = load("test", config.zero_shot_size, single=True)
    comp = load("compositional", config.compositional_size, single=True)
    layout = load("layout", config.layout_size, single=True)
    features = embed_images(model, single.images, bs)
    comp_features, layout_features = embed_images(model, comp.images, bs), embed_images(model, layout.images, bs)
    labels = torch.from_numpy(single.labels)
    metrics: dict[str, float] = {}
    for templates, suffix in WORDINGS:
        classifier = shapes_classifier(model, templates)
        logits = zero_shot_logits(features, classifier)
        if not suffix:
            confusion = confusion_matrix(logits.argmax(1), labels, shapes.NUM_CLASSES)
        parts = accuracy(logits, labels, topk=(1, 5), prefix="zeroshot_")
        shape_clf = build_zero_shot_classifier(encode, SHAPE_CLASS_NAMES, templates)
        parts |= accuracy(zero_shot_logits(features, shape_clf), torch.from_numpy(single.shape_labels),
                          prefix="zeroshot_shape_")
        color_clf = build_zero_shot_classifier(encode, COLOR_CLASS_NAMES, templates)
        parts |= accuracy(zero_shot_logits(features, color_clf), torch.from_numpy(single.color_labels),
                          prefix="zeroshot_color_")
        parts |= accuracy(zero_shot_logits(comp_features, classifier), torch.from_numpy(comp.labels),
                          prefix="zeroshot_compositional_")
        parts |= accuracy(zero_shot_logits(layout_features, classifier), torch.from_numpy(layout.labels),
                          prefix="zeroshot_layout_")
        where = position_classifiers(model, templates)
        parts["zeroshot_position_top1"] = position_accuracy(features, single.scenes, where)
        parts["zeroshot_layout_position_top1"] = position_accuracy(layout_features, layout.scenes, where)
        metrics |= {f"{key}{suffix}": value for key, value in parts.items()}

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
    seen = zero_shot_logits(features, digits_classifier(model, digits.TRAIN_TEMPLATES))
    metrics |= {f"{k}_seen_templates": v for k, v in accuracy(seen, labels, prefix="zeroshot_").items()}
    confusion = confusion_matrix(logits.argmax(1), labels, digits.NUM_CLASSES)
    metrics |= linear_probe(embed_images(model, train.images, config.batch_size), train.labels, features, test.labels)
    return EvalResult(metrics, confusion, digits.CLASS_NAMES)


def fashion_classifier(model: DualEncoder, templates: Sequence[str] = fashion.EVAL_TEMPLATES) -> torch.Tensor:
    """The 10-way Fashion-MNIST zero-shot classifier (D, 10) (default prompts: never training captions)."""
    prompts = [[fashion.fill_template(t, label) for t in templates] for label in range(fashion.NUM_CLASSES)]
    return build_prompt_classifier(lambda texts: embed_texts(model, texts), prompts)


def holdout_accuracies(logits: torch.Tensor, labels: torch.Tensor, held: Sequence[int]) -> dict[str, float]:
    """Zero-shot figures for classes kept out of training: the seen classes' test images among all classes,
    the held-out classes' images among all classes and among the held-out classes alone (and its chance)."""
    held_t = torch.tensor(sorted(held))
    is_held = torch.isin(labels, held_t)
    seen_rows, held_rows = ~is_held, is_held
    among_held = logits[held_rows][:, held_t].argmax(1)  # index into held_t
    return {
        "zeroshot_seen_classes_top1": (logits[seen_rows].argmax(1) == labels[seen_rows]).float().mean().item(),
        "zeroshot_heldout_top1_among_all": (logits[held_rows].argmax(1) == labels[held_rows]).float().mean().item(),
        "zeroshot_heldout_top1_among_heldout": (held_t[among_held] == labels[held_rows]).float().mean().item(),
        "zeroshot_heldout_chance_among_heldout": 1.0 / len(held_t),
        "zeroshot_heldout_images": int(held_rows.sum()),
    }


def evaluate_fashion(model: DualEncoder, data: DataConfig, config: EvalConfig) -> EvalResult:
    """Fashion-MNIST's 10,000 test photos: 10-way zero-shot with prompts never used in training (and with the
    training wording, ``_seen_templates``), the held-out classes apart when ``data.holdout_classes`` is set, and a
    linear probe fitted on ``eval.probe_train_size`` training images of every class (the probe is a reading of the
    image features, not the model's training; held-out classes included). No retrieval: the captions come from a
    few templates, so thousands of images share each caption and recall@K would measure tie-breaking."""
    model.eval()
    test = load_split(data, "test")
    features = embed_images(model, test.images, config.batch_size)
    logits = zero_shot_logits(features, fashion_classifier(model))
    labels = torch.from_numpy(test.labels)
    metrics = accuracy(logits, labels, topk=(1, 5), prefix="zeroshot_")
    seen = zero_shot_logits(features, fashion_classifier(model, fashion.TRAIN_TEMPLATES))
    metrics |= {f"{k}_seen_templates": v for k, v in accuracy(seen, labels, prefix="zeroshot_").items()}
    if data.holdout_classes:
        metrics |= holdout_accuracies(logits, labels, fashion.check_class_names(data.holdout_classes))
    probe = fashion.FashionDataset("train", data.image_size, data.path, data.seed, 1, config.probe_train_size)
    metrics |= linear_probe(embed_images(model, probe.images, config.batch_size), probe.labels, features, test.labels)
    confusion = confusion_matrix(logits.argmax(1), labels, fashion.NUM_CLASSES)
    return EvalResult(metrics, confusion, fashion.CLASS_NAMES)


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


def held_out_prompts(class_names: Sequence[str], templates: Sequence[str], captions: Sequence[Sequence[str]]
                     ) -> tuple[list[list[str]], int]:
    """Each class's prompts without those that are word for word (case and spacing aside) a training caption,
    and how many were dropped; a class whose every prompt is a training caption keeps them all (there is no
    other wording to ask with)."""
    seen = {" ".join(c.lower().split()) for caps in captions for c in caps}
    prompts, dropped = [], 0
    for name in class_names:
        texts = [format_prompt(t, name) for t in templates]
        kept = [t for t in texts if " ".join(t.lower().split()) not in seen]
        dropped += len(texts) - len(kept)
        prompts.append(kept or texts)
    return prompts, dropped


def evaluate_user_data(model: DualEncoder, data: DataConfig, config: EvalConfig) -> EvalResult:
    """The user's own data (files / shards): image<->text retrieval recall@K over the first
    ``eval.retrieval_size`` images with all their captions; zero-shot over the first
    ``eval.zero_shot_size`` labeled images when the labels are class names (prompts ``USER_TEMPLATES``,
    less any that is word for word a training caption: ``zeroshot_prompts_dropped`` counts them); a linear
    probe (train images -> held-out images) when both are labeled.

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
        prompts, dropped = held_out_prompts(class_names, USER_TEMPLATES, train.captions)
        classifier = build_prompt_classifier(lambda texts: embed_texts(model, texts), prompts)
        metrics[f"{prefix}zeroshot_prompts_dropped"] = dropped
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
    if data.dataset == "fashion":
        return evaluate_fashion(model, data, config)
    if data.dataset in ("files", "shards"):
        return evaluate_user_data(model, data, config)
    return evaluate_shapes(model, data, config, cache_dir)  # an unknown dataset fails in load_split
