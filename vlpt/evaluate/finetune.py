"""Scoring a fine-tuned ``TaskModel`` on its held-out set: classification top-1, VQA accuracy per
question type, and image-text matching against swapped, hard and random false captions."""

from __future__ import annotations

import numpy as np
import torch

from vlpt.data import shapes
from vlpt.data.finetune import flatten_questions, signature_ids, swapped_captions
from vlpt.evaluate.matching import matching_accuracy
from vlpt.evaluate.report import EvalResult
from vlpt.evaluate.vqa import vqa_accuracy
from vlpt.evaluate.zero_shot import accuracy, confusion_matrix
from vlpt.models.task_model import TaskModel

EVAL_SEED = 1234  # which caption / swap each test scene gets; fixed so every model sees the same pairs


def _chunks(n: int, size: int):
    return (slice(i, min(i + size, n)) for i in range(0, n, size))


@torch.inference_mode()
def _encode_texts(model: TaskModel, texts: list[str], batch_size: int) -> dict[str, torch.Tensor]:
    """Text tokens (padded to one length), mask and embeddings of many texts, in batches."""
    tokens = model.encoder.tokenize(texts)
    parts = [model.encode_texts(tokens["input_ids"][s], tokens["attention_mask"][s])
             for s in _chunks(len(texts), batch_size)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@torch.inference_mode()
def _encode_images(model: TaskModel, images: np.ndarray, batch_size: int) -> dict[str, torch.Tensor]:
    parts = [model.encode_images(torch.from_numpy(images[s])) for s in _chunks(len(images), batch_size)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@torch.inference_mode()
def pair_logits(model: TaskModel, image_features: dict[str, torch.Tensor], text_features: dict[str, torch.Tensor],
                image_index: torch.Tensor, text_index: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Head logits for the pairs (image_index[k], text_index[k]), towers already run once per input."""
    features = {**image_features, **text_features}
    out = [model.head(model.fuse(features, image_index[s], text_index[s])) for s in _chunks(len(image_index), batch_size)]
    return torch.cat(out)


def evaluate_classifier(model: TaskModel, images: np.ndarray, labels: np.ndarray, batch_size: int = 256
                        ) -> EvalResult:
    """Top-1 / top-5 of a classify model on labeled images, with its confusion matrix."""
    model.eval()
    features = _encode_images(model, images, batch_size)
    with torch.inference_mode():
        logits = model.head(features["image_embed"])
    labels = torch.from_numpy(labels)
    metrics = accuracy(logits, labels, topk=(1, 5), prefix="classify_")
    return EvalResult(metrics, confusion_matrix(logits.argmax(1), labels, len(model.config.outputs)),
                      model.config.outputs)


def evaluate_vqa(model: TaskModel, images: np.ndarray, scenes: list[shapes.Scene], batch_size: int = 256
                 ) -> dict[str, float]:
    """Accuracy over every question of every scene, overall and per question type."""
    model.eval()
    questions, owner, answers, types = flatten_questions(scenes)
    image_features = _encode_images(model, images, batch_size)
    text_features = _encode_texts(model, questions, batch_size)
    logits = pair_logits(model, image_features, text_features, torch.from_numpy(owner),
                         torch.arange(len(questions)), batch_size)
    predicted = np.array([shapes.ANSWERS.index(model.config.outputs[i]) for i in logits.argmax(-1).tolist()])
    metrics = vqa_accuracy(predicted, answers, types, shapes.QUESTION_TYPES)
    metrics["vqa_questions"] = len(questions)
    return metrics


def evaluate_matching(model: TaskModel, images: np.ndarray, scenes: list[shapes.Scene], batch_size: int = 256
                      ) -> dict[str, float]:
    """Each scene's true caption against three balanced sets of false ones: an attribute swap of the
    scene (``match_accuracy_swapped``), the most similar caption of another scene by the model's own
    contrastive embeddings (``_hard``), and a random other scene's caption (``_random``). Other
    scenes' captions only count as false when their (color, shape) multiset differs."""
    model.eval()
    n = len(scenes)
    rng = np.random.default_rng(EVAL_SEED)
    true = [s.captions[int(rng.integers(len(s.captions)))] for s in scenes]
    swapped = [caps[0] for caps in swapped_captions(scenes, EVAL_SEED, per_scene=1)]
    image_features = _encode_images(model, images, batch_size)
    text_features = _encode_texts(model, true + swapped, batch_size)
    signatures = torch.from_numpy(signature_ids(scenes))
    other = signatures[:, None] != signatures[None, :]  # (N, N) captions of j are false for image i
    similarity = (image_features["image_embed"] @ text_features["text_embed"][:n].T).masked_fill(~other, float("-inf"))
    hard = similarity.argmax(1)
    random_scores = torch.from_numpy(rng.random((n, n))).masked_fill(~other, -1.0)
    random = random_scores.argmax(1)
    rows = torch.arange(n)
    index_i = torch.cat([rows, rows, rows, rows])
    index_t = torch.cat([rows, rows + n, hard, random])
    probs = pair_logits(model, image_features, text_features, index_i, index_t, batch_size).sigmoid().numpy()
    positive, swap, hard_p, random_p = probs[:n], probs[n:2 * n], probs[2 * n:3 * n], probs[3 * n:]
    return {
        "match_accuracy_swapped": matching_accuracy(positive, swap),
        "match_accuracy_hard": matching_accuracy(positive, hard_p),
        "match_accuracy_random": matching_accuracy(positive, random_p),
        "match_true_recall": float((positive > 0.5).mean()),
    }
