"""VQA accuracy: overall and per question type, as a flat metric dict (pure function)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def vqa_accuracy(predicted: np.ndarray, answers: np.ndarray, types: np.ndarray, type_names: Sequence[str],
                 prefix: str = "vqa_") -> dict[str, float]:
    """Exact-match accuracy over all questions (``<prefix>overall``, micro-averaged) and for each
    question type (``<prefix><type>``); a type with no question in the set is reported as NaN."""
    correct = np.asarray(predicted) == np.asarray(answers)
    types = np.asarray(types)
    metrics = {f"{prefix}overall": float(correct.mean()) if len(correct) else float("nan")}
    for k, name in enumerate(type_names):
        chosen = types == k
        metrics[f"{prefix}{name}"] = float(correct[chosen].mean()) if chosen.any() else float("nan")
    return metrics
