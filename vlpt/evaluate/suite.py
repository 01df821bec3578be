"""Evaluation suites: build the held-out sets of a data set, embed them, and call the pure evaluators.

Returns flat metrics plus the artefacts the report plots (confusion matrix, retrieval examples).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vlpt.config import DataConfig, EvalConfig
from vlpt.data import digits, shapes
from vlpt.evaluate.linear_probe import linear_probe
from vlpt.evaluate.retrieval import retrieval_metrics, text_to_image_examples
from vlpt.evaluate.zero_shot import (
    COLOR_CLASS_NAMES, SHAPE_CLASS_NAMES, SHAPES_TEMPLATES, accuracy, build_prompt_classifier,
    build_zero_shot_classifier, confusion_matrix, zero_shot_logits,
)
from vlpt.models.dual_encoder import DualEncoder


@dataclass
class EvalResult:
    metrics: dict[str, float]
    confusion: np.ndarray | None = None
    class_names: Sequence[str] = ()
    retrieval_examples: list[Any] = field(default_factory=list)


@torch.inference_mode()
def embed_images(model: DualEncoder, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    device = model.logit_scale.device
    out = [model.encode_image(torch.from_numpy(images[i:i + batch_size]).to(device)).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)  # (N, D)


@torch.inference_mode()
def embed_texts(model: DualEncoder, texts: Sequence[str], batch_size: int = 512) -> torch.Tensor:
    out = [model.encode_text(list(texts[i:i + batch_size])).float().cpu() for i in range(0, len(texts), batch_size)]
    return torch.cat(out)  # (N, D)


def load_split(data: DataConfig, split: str, size: int = 1000, single: bool = False, cache_dir=None):
    """A split of the run's data set: shapes scenes (1-3 objects, or single-object) or digits.
    The training-only shapes options (twins, count weights) apply to the multi-object train split."""
    if data.dataset == "shapes":
        train_only = {}
        if split == "train" and not single:
            train_only = dict(twins=data.twins, count_weights=data.count_weights)
        return shapes.ShapesDataset(shapes.ShapesConfig(
            split=split, size=size, image_size=data.image_size, min_objects=1, max_objects=1 if single else 3,
            num_captions=data.num_captions, seed=data.seed, **train_only), cache_dir=cache_dir)
    if data.dataset == "digits":
        return digits.DigitsDataset(digits.DigitsConfig(split=split, image_size=data.image_size,
                                                        num_captions=data.num_captions))
    raise ValueError(f"unknown dataset {data.dataset!r}; choose from digits, shapes")


def shapes_classifier(model: DualEncoder) -> torch.Tensor:
    """The 48-way (color, shape) zero-shot classifier (D, 48) from the prompt-template ensemble."""
    return build_zero_shot_classifier(lambda texts: embed_texts(model, texts), shapes.CLASS_NAMES, SHAPES_TEMPLATES)


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
    encode = lambda texts: embed_texts(model, texts)  # noqa: E731
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
    prompts = [[digits.fill_template(t, label) for t in digits.EVAL_TEMPLATES] for label in range(digits.NUM_CLASSES)]
    classifier = build_prompt_classifier(lambda texts: embed_texts(model, texts), prompts)
    logits = zero_shot_logits(features, classifier)
    labels = torch.from_numpy(test.labels)
    metrics = accuracy(logits, labels, prefix="zeroshot_")
    confusion = confusion_matrix(logits.argmax(1), labels, digits.NUM_CLASSES)
    metrics |= linear_probe(embed_images(model, train.images, config.batch_size), train.labels, features, test.labels)
    return EvalResult(metrics, confusion, digits.CLASS_NAMES)


def evaluate(model: DualEncoder, data: DataConfig, config: EvalConfig, cache_dir=None) -> EvalResult:
    if data.dataset == "digits":
        return evaluate_digits(model, data, config)
    return evaluate_shapes(model, data, config, cache_dir)  # an unknown dataset fails in load_split
