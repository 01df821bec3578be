"""Embedding held-out data with a dual encoder, and the CLIP-score: shared by every evaluation
(zero-shot, retrieval, captioning, generation, fine-tuning)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vlpt.models.dual_encoder import DualEncoder


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


@torch.inference_mode()
def clip_score(dual_encoder: DualEncoder, images: np.ndarray | torch.Tensor, captions: Sequence[str],
               batch_size: int = 256) -> float:
    """Mean cosine similarity between each image and its caption in the dual encoder's space (the
    raw CLIP-score, without CLIPScore's 2.5 scale and clipping at 0). An empty caption scores 0."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    device = dual_encoder.logit_scale.device
    scores = []
    for start in range(0, len(captions), batch_size):
        chunk = images[start:start + batch_size]
        chunk = torch.from_numpy(np.ascontiguousarray(chunk)) if isinstance(chunk, np.ndarray) else chunk
        texts = list(captions[start:start + batch_size])
        keep = [i for i, t in enumerate(texts) if t.strip()]
        sims = torch.zeros(len(texts))
        if keep:
            image_features = dual_encoder.encode_image(chunk[keep].to(device)).float().cpu()  # (K, D)
            text_features = dual_encoder.encode_text([texts[i] for i in keep]).float().cpu()  # (K, D)
            sims[keep] = (image_features * text_features).sum(-1)
        scores.append(sims)
    return float(torch.cat(scores).mean())
