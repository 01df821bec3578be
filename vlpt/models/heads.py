"""Task heads on top of a fused (or single-modality) vector: classification, image-text matching, VQA."""

from __future__ import annotations

import torch
from torch import nn


def mlp(in_dim: int, out_dim: int, hidden: int | None, norm: bool = False) -> nn.Module:
    """Linear when hidden is None, else Linear -> [LayerNorm] -> GELU -> Linear."""
    if hidden is None:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden) if norm else nn.Identity(),
                         nn.GELU(), nn.Linear(hidden, out_dim))


class ClassifierHead(nn.Module):
    """Class logits (B, num_classes): a linear probe, or an MLP with one hidden GELU layer."""

    def __init__(self, in_dim: int, num_classes: int, hidden: int | None = None):
        super().__init__()
        self.net = mlp(in_dim, num_classes, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, num_classes)


class MatchingHead(nn.Module):
    """Image-text matching: one logit per pair (B,), > 0 for "this caption describes this image".
    ALBEF's ITM head has two outputs under a softmax; one logit under a sigmoid is the same model.
    An MLP by default (hidden 2 * in_dim): on concat / sum / gated fusion a linear head could not
    compare the image with the text at all (w·[e_I, e_T] has no interaction term)."""

    def __init__(self, in_dim: int, hidden: int | None = -1):
        super().__init__()
        hidden = 2 * in_dim if hidden == -1 else hidden
        self.net = mlp(in_dim, 1, hidden, norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)  # (B,)


class VQAHead(nn.Module):
    """Answer logits (B, num_answers) over a closed answer vocabulary, as ViLT's VQA classifier:
    Linear -> LayerNorm -> GELU -> Linear, hidden width 2 * in_dim unless given."""

    def __init__(self, in_dim: int, num_answers: int, hidden: int | None = None):
        super().__init__()
        self.net = mlp(in_dim, num_answers, hidden or 2 * in_dim, norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, num_answers)
