"""Image-text matching accuracy on balanced sets of true and false pairs (pure function)."""

from __future__ import annotations

import numpy as np


def matching_accuracy(positive_probs: np.ndarray, negative_probs: np.ndarray, threshold: float = 0.5) -> float:
    """Fraction of pairs classified correctly: true pairs above ``threshold``, false pairs below, with
    as many false pairs as true ones (so "always yes" and "always no" both score 0.5)."""
    positive_probs, negative_probs = np.asarray(positive_probs), np.asarray(negative_probs)
    if len(positive_probs) != len(negative_probs):
        raise ValueError(f"balanced sets expected: {len(positive_probs)} true vs {len(negative_probs)} false pairs")
    correct = np.concatenate([positive_probs > threshold, negative_probs <= threshold])
    return float(correct.mean())
