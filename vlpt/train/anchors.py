"""Class anchors: the pretrained image tower's own classifier as extra image-text pairs for LiT.

A LiT model trained on a few classes learns projections that only have to tell those classes apart, so a
class named only at test time lands wherever the projections happen to send it. An ImageNet-pretrained tower
already knows 1,000 classes: each row of its classifier is a direction in the tower's pooled space, and the
class's name is a text. ``train.anchor_weight`` adds, every step, a contrastive term over a batch of such
pairs (a direction placed among the batch's features, see ``DualEncoder.forward``; the name in
``train.anchor_template``), so the projections must map the tower's whole label space onto the text tower's
meanings, not just the training classes'. No anchor names a held-out class: a class whose ImageNet
synonyms share a word with a ``data.holdout_classes`` name is dropped (``vlpt.data.fashion``'s leakage rule).
Measured in docs/real-data.md (classes never seen in training).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlpt.config import ImageTowerConfig
from vlpt.evaluate.zero_shot import format_prompt
from vlpt.tokenization import Tokenizer

# words that name no class: "pair of trousers" is about trousers
_FILLER_WORDS = frozenset({"a", "an", "the", "of", "pair", "and", "for", "with"})


def name_words(text: str) -> set[str]:
    """The words of a class name, lower case and without a plural s: "Ankle boots" -> {"ankle", "boot"}."""
    words = re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", text.lower())
    return {w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words} - _FILLER_WORDS


def imagenet_synonyms() -> list[list[str]]:
    """The 1,000 ImageNet-1k classes in timm's order, each as its synonyms ("jersey", "T-shirt", "tee shirt")."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [[s.strip() for s in info.index_to_description(i).split(",") if s.strip()] for i in range(1000)]


@dataclass
class ClassAnchors:
    directions: torch.Tensor  # (K, C) unit rows in the image tower's pooled space
    names: list[str]  # the K class names the prompts use
    input_ids: torch.Tensor  # (K, L) the prompts, tokenized
    attention_mask: torch.Tensor  # (K, L)
    dropped: list[str]  # classes left out because they name a held-out class

    def __len__(self) -> int:
        return len(self.names)

    def sample(self, count: int, generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
        """``count`` distinct anchors (all of them when there are fewer), for ``DualEncoder.forward``."""
        rows = torch.randperm(len(self), generator=generator)[:count]
        return {"directions": self.directions[rows].to(device), "input_ids": self.input_ids[rows].to(device),
                "attention_mask": self.attention_mask[rows].to(device)}


def anchor_problems(image: ImageTowerConfig | None = None, loss: str | None = None,
                    accum_mode: str | None = None) -> list[str]:
    """Why class anchors cannot train with this image tower, loss and accumulation mode ([] when they can);
    what is None is not checked (an image tower is not known yet when a model to start from brings its own)."""
    from vlpt.models.pretrained_weights import PACKAGE_WEIGHTS

    problems = []
    if loss == "pairwise":
        problems.append("train.anchor_weight works with the infonce and siglip losses, not pairwise")
    if accum_mode == "gradcache":
        problems.append("train.anchor_weight does not work with train.accum_mode=gradcache (use plain)")
    if image is None:
        return problems
    if not (image.pretrained and image.name in PACKAGE_WEIGHTS):
        problems.append(f"train.anchor_weight needs an image tower whose pretrained classifier ships in a package "
                        f"(model.image.name: {' | '.join(PACKAGE_WEIGHTS)} with pretrained: true), not "
                        f"{image.name} with pretrained: {str(image.pretrained).lower()}")
    if image.pool != "timm":
        problems.append(f"train.anchor_weight needs model.image.pool: timm (the classifier reads that pooling), "
                        f"not {image.pool}")
    if not image.locked:
        problems.append("train.anchor_weight needs a locked image tower (model.image.locked: true): the classifier "
                        "describes the pretrained features")
    return problems


def classifier_anchors(image: ImageTowerConfig, tokenizer: Tokenizer, template: str = "a photo of a {}",
                       holdout_classes: Sequence[str] = ()) -> ClassAnchors:
    """The anchors of ``image``'s pretrained ImageNet classifier, none naming a class in ``holdout_classes``."""
    from vlpt.models.pretrained_weights import package_classifier

    problems = anchor_problems(image)
    if problems:
        raise ValueError("; ".join(problems))
    rows = package_classifier(image.name).float()  # (1000, C)
    held = [name_words(h) for h in holdout_classes]
    keep, names, dropped = [], [], []
    for i, synonyms in enumerate(imagenet_synonyms()):
        words = set().union(*(name_words(s) for s in synonyms))
        if any(h & words for h in held):
            dropped.append(synonyms[0])
            continue
        keep.append(i)
        names.append(synonyms[0])
    tokens = tokenizer([format_prompt(template, n) for n in names])
    return ClassAnchors(F.normalize(rows[keep], dim=-1), names, tokens["input_ids"], tokens["attention_mask"],
                        dropped)
