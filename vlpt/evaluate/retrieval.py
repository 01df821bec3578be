"""Image-text retrieval recall@K, counted the way COCO retrieval is counted.

Inputs are a similarity matrix ``(num_images, num_texts)`` and ``text_to_image`` ``(num_texts,)``, the
index of the image each text describes (an image usually has several captions, like COCO's five).

- image -> text: a hit at K if ANY of the image's captions is among the image's top K texts.
- text -> image: a hit at K if the text's own image is among the text's top K images.

Ties are broken pessimistically: the rank of a correct item is the number of wrong items whose
score is greater than OR EQUAL to it. A collapsed model that scores everything the same therefore
gets recall ~0, not 1 (counting only strictly greater scores would call every tie a hit).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def _as_tensor(x: Tensor | np.ndarray, dtype: torch.dtype | None = None) -> Tensor:
    t = x.detach() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(dtype) if dtype is not None else t


def _positives(num_images: int, text_to_image: Tensor) -> Tensor:
    """(num_images, num_texts) bool mask: True where the text describes the image."""
    pos = torch.zeros(num_images, text_to_image.numel(), dtype=torch.bool, device=text_to_image.device)
    pos[text_to_image, torch.arange(text_to_image.numel(), device=text_to_image.device)] = True
    return pos


def retrieval_ranks(
    similarity: Tensor | np.ndarray, text_to_image: Tensor | np.ndarray
) -> tuple[Tensor, Tensor]:
    """0-based ranks of the first correct item: ``(i2t (num_images,), t2i (num_texts,))``.

    Rank 0 means top-1. i2t uses the image's best-scoring caption; ties count against the model.
    """
    sim = _as_tensor(similarity, torch.float32)  # (I, T)
    # A NaN score must never win a comparison, so it ranks below everything (a miss, not a hit).
    sim = torch.nan_to_num(sim, nan=float("-inf"))
    t2i = _as_tensor(text_to_image, torch.long).to(sim.device).flatten()  # (T,)
    if sim.ndim != 2 or sim.shape[1] != t2i.numel():
        raise ValueError(f"similarity {tuple(sim.shape)} does not match {t2i.numel()} texts")
    num_images, num_texts = sim.shape
    if num_texts and (t2i.min() < 0 or t2i.max() >= num_images):
        raise ValueError(f"text_to_image must index images 0..{num_images - 1}")
    pos = _positives(num_images, t2i)  # (I, T)
    if not bool(pos.any(dim=1).all()):
        missing = (~pos.any(dim=1)).nonzero().flatten()[:5].tolist()
        raise ValueError(f"images without any caption (first few: {missing}); i2t recall is undefined")

    # image -> text: best caption's score vs. every text that is not one of this image's captions.
    best_pos = sim.masked_fill(~pos, float("-inf")).amax(dim=1)  # (I,)
    i2t = ((sim >= best_pos[:, None]) & ~pos).sum(dim=1)  # (I,)

    # text -> image: the own image's score vs. every other image (minus 1 for the own image).
    own = sim[t2i, torch.arange(num_texts, device=sim.device)]  # (T,)
    t2i_rank = (sim >= own[None, :]).sum(dim=0) - 1  # (T,)
    return i2t, t2i_rank


def retrieval_metrics(
    similarity: Tensor | np.ndarray, text_to_image: Tensor | np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@K both ways: keys ``retrieval_i2t_r{K}`` and ``retrieval_t2i_r{K}``, floats in [0, 1]."""
    i2t, t2i = retrieval_ranks(similarity, text_to_image)
    metrics = {}
    for k in ks:
        metrics[f"retrieval_i2t_r{k}"] = (i2t < k).float().mean().item()
        metrics[f"retrieval_t2i_r{k}"] = (t2i < k).float().mean().item()
    return metrics


def text_to_image_examples(
    similarity: Tensor | np.ndarray,
    text_to_image: Tensor | np.ndarray,
    texts: Sequence[str],
    images: np.ndarray,
    query_indices: Sequence[int],
    k: int = 5,
) -> list[tuple[str, list[np.ndarray], list[bool]]]:
    """Top-``k`` images for some text queries, in the form ``write_report(retrieval_examples=...)`` takes.

    ``images`` is ``(num_images, H, W, 3)`` uint8. Each entry is (query text, k images, k is-correct flags).
    """
    sim = _as_tensor(similarity, torch.float32)  # (I, T)
    t2i = _as_tensor(text_to_image, torch.long).flatten()
    examples = []
    for q in query_indices:
        # Stable sort so equal scores keep image order, making the picture reproducible.
        order = torch.sort(sim[:, q], descending=True, stable=True).indices[:k].tolist()
        examples.append((texts[q], [images[i] for i in order], [i == int(t2i[q]) for i in order]))
    return examples
