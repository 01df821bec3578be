"""Scoring a fine-tuned ``TaskModel`` on its held-out set: classification top-1, VQA accuracy per
question type, and image-text matching against swapped, hard and random false captions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlpt.data import shapes
from vlpt.data.finetune import balanced_rows, flatten_questions, signature_ids, swapped_captions
from vlpt.evaluate.matching import matching_accuracy
from vlpt.evaluate.report import EvalResult, plot_captions
from vlpt.evaluate.vqa import vqa_accuracy
from vlpt.evaluate.zero_shot import accuracy, confusion_matrix
from vlpt.models.task_model import TaskModel

EVAL_SEED = 1234  # which caption / swap each test scene gets; fixed so every model sees the same pairs


def _chunks(n: int, size: int):
    return (slice(i, min(i + size, n)) for i in range(0, n, size))


@torch.inference_mode()
def _encode_texts(model: TaskModel, texts: list[str], batch_size: int) -> dict[str, torch.Tensor]:
    """Text tokens (padded to the longest), mask and embeddings of many texts: each distinct text once (test
    questions repeat across scenes), in batches of similar length, each trimmed to its longest text where the
    tower's output allows it (``TextTower.trims_padding``)."""
    distinct = list(dict.fromkeys(texts))
    tokens = model.encoder.tokenize(distinct)
    lengths = tokens["attention_mask"].sum(1)
    order = torch.argsort(lengths, stable=True)
    full = tokens["input_ids"].shape[1]
    trims = model.encoder.text_tower.trims_padding()
    parts = []
    for s in _chunks(len(distinct), batch_size):
        rows = order[s]
        length = int(lengths[rows].max()) if trims else full
        parts.append(model.encode_texts(tokens["input_ids"][rows, :length], tokens["attention_mask"][rows, :length]))
    longest = max(p["text_tokens"].shape[1] for p in parts)  # (an image_only model keeps one token)
    for part in parts:
        for key in ("text_tokens", "text_mask"):  # all to the longest part's length: zeros, masked out
            pad = [0, 0] * (part[key].dim() - 2) + [0, longest - part[key].shape[1]]
            part[key] = torch.nn.functional.pad(part[key], pad)
    where = torch.empty_like(order)
    where[order] = torch.arange(len(order))  # distinct text i sits at row where[i] of the sorted parts
    position = {text: i for i, text in enumerate(distinct)}
    pick = where[torch.tensor([position[t] for t in texts], dtype=torch.long)]
    return {k: torch.cat([p[k] for p in parts])[pick] for k in parts[0]}


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


@dataclass
class AnsweredQuestions:
    """A VQA model's answers to the questions of some scenes (type-balanced rows, see ``balanced_rows``)."""
    questions: list[str]
    owner: np.ndarray  # (Q,) the scene (image) each question is about
    predicted: np.ndarray  # (Q,) answer indices into shapes.ANSWERS
    answers: np.ndarray  # (Q,) the truth
    types: np.ndarray  # (Q,) indices into shapes.QUESTION_TYPES


def answer_questions(model: TaskModel, images: np.ndarray, scenes: list[shapes.Scene], batch_size: int = 256,
                     wordings: Sequence[str] = ("train",)) -> list[AnsweredQuestions]:
    """The model's answers to every question of the scenes, as many of each type (the rarest type's count),
    once per wording ("train" or "heldout"); the images go through the towers once for all wordings."""
    model.eval()
    image_features = _encode_images(model, images, batch_size)
    out = []
    for wording in wordings:
        questions, owner, answers, types = flatten_questions(scenes, wording)
        rows = balanced_rows(types, oversample=False)
        questions, owner, answers, types = [questions[i] for i in rows], owner[rows], answers[rows], types[rows]
        text_features = _encode_texts(model, questions, batch_size)
        logits = pair_logits(model, image_features, text_features, torch.from_numpy(owner),
                             torch.arange(len(questions)), batch_size)
        predicted = np.array([shapes.ANSWERS.index(model.config.outputs[i]) for i in logits.argmax(-1).tolist()])
        out.append(AnsweredQuestions(questions, owner, predicted, answers, types))
    return out


def vqa_metrics(answered: AnsweredQuestions, prefix: str = "vqa_", suffix: str = "") -> dict[str, float]:
    """``<prefix><type><suffix>`` accuracies, ``<prefix>overall<suffix>`` and the question count."""
    metrics = vqa_accuracy(answered.predicted, answered.answers, answered.types, shapes.QUESTION_TYPES, prefix)
    metrics[f"{prefix}questions"] = len(answered.questions)
    return {f"{key}{suffix}": value for key, value in metrics.items()}


def vqa_examples_figure(images: np.ndarray, answered: AnsweredQuestions, path: Path, count: int = 12,
                        failures: int = 4) -> Path:
    """Position and relation questions first: test scenes with the question, the model's answer and the
    truth, framed green or red; up to ``failures`` of the ``count`` are wrong answers, when there are any."""
    spatial = np.isin(answered.types, [shapes.QUESTION_TYPES.index(t) for t in ("position", "relation")])
    right = answered.predicted == answered.answers
    wrong_rows = np.flatnonzero(~right & spatial)[:failures]
    right_rows = np.flatnonzero(right & spatial)[:count - len(wrong_rows)]
    rows = np.concatenate([right_rows, wrong_rows]).astype(int)
    texts = [(answered.questions[i], shapes.ANSWERS[answered.predicted[i]], shapes.ANSWERS[answered.answers[i]])
             for i in rows]
    return plot_captions([images[answered.owner[i]] for i in rows], texts, path, correct=right[rows].tolist(),
                         labels=("Q", "model", "truth"))


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
