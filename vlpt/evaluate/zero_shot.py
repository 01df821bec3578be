"""Zero-shot classification with a prompt-template ensemble, as in CLIP.

Each class becomes a text embedding: every template is filled with the class name, embedded,
the embeddings are averaged and re-normalised. An image is classified by cosine similarity to
these class embeddings.

Shapes-world conventions (class names read like the training captions; the templates around them do not):
- 48-way (color, shape): ``vlpt.data.shapes.CLASS_NAMES``, e.g. "red circle", in label order.
- shape-only: ``SHAPE_CLASS_NAMES`` = the shape words, e.g. "circle", in ``SHAPES`` order.
- color-only: ``COLOR_CLASS_NAMES`` = "<color> shape", e.g. "red shape", in ``COLOR_NAMES`` order.
Templates are written with "a {}"; ``format_prompt`` turns that into "an {}" before a vowel
("an orange star"), because the training captions use correct articles.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vlpt.data.shapes import COLOR_NAMES, SHAPES

# The wording of the training captions (vlpt.data.shapes.make_captions) around a single object: reported with
# the suffix _seen_templates, to show how much of a score is the training wording.
SHAPES_TRAIN_TEMPLATES = (
    "a {}",
    "a picture of a {}",
    "an image showing a {}",
    "there is a {}",
    "a {} on a textured background",
    "a scene with a {}",
)
# The headline figures' prompts: wording no training caption uses (tests/test_leakage.py checks it). Words the
# captions never contain ("photo", "drawing", ...) are the point: the text tower must read the class name.
SHAPES_TEMPLATES = (
    "a photo of a {}",
    "a drawing of a {}",
    "an illustration of a {}",
    "a rendering of the {}",
    "this image contains a {}",
    "a {} drawn on a noisy backdrop",
)
SHAPE_CLASS_NAMES = tuple(SHAPES)
COLOR_CLASS_NAMES = tuple(f"{c} shape" for c in COLOR_NAMES)

# "a {}" / "an {}" / "A {}" right before the placeholder; the article is chosen from the name.
_ARTICLE_BEFORE_SLOT = re.compile(r"\b([Aa])n? \{\}")


def format_prompt(template: str, name: str) -> str:
    """``template.format(name)`` with the article in front of ``{}`` fixed: "a {}" + "orange star" -> "an orange star"."""
    vowel = name[:1].lower() in "aeiou"
    fixed = _ARTICLE_BEFORE_SLOT.sub(lambda m: m.group(1) + ("n" if vowel else "") + " {}", template)
    return fixed.format(name)


def build_zero_shot_classifier(
    encode_text: Callable[[list[str]], Tensor],
    class_names: Sequence[str],
    templates: Sequence[str],
) -> Tensor:
    """Class embeddings ``(D, C)``: per class, the re-normalised mean of its normalised template embeddings."""
    if not class_names or not templates:
        raise ValueError("need at least one class name and one template")
    return build_prompt_classifier(encode_text, [[format_prompt(t, n) for t in templates] for n in class_names])


@torch.no_grad()
def build_prompt_classifier(encode_text: Callable[[list[str]], Tensor], prompts: Sequence[Sequence[str]]) -> Tensor:
    """Like ``build_zero_shot_classifier`` from ready-made prompts: ``prompts[c]`` are class c's texts."""
    if not prompts or not all(prompts):
        raise ValueError("need at least one prompt for every class")
    columns = []
    for texts in prompts:  # one call per class keeps memory bounded for many templates
        emb = encode_text(list(texts))  # (T, D)
        emb = F.normalize(emb.float(), dim=-1)  # defensive: the mean is only meaningful on unit vectors
        columns.append(F.normalize(emb.mean(dim=0), dim=-1))  # (D,)
    return torch.stack(columns, dim=1)  # (D, C)


def zero_shot_logits(image_features: Tensor, classifier: Tensor, logit_scale: float = 100.0) -> Tensor:
    """Scaled cosine similarities ``(N, C)``; 100 is CLIP's scale (argmax does not depend on it)."""
    image_features = F.normalize(image_features.float(), dim=-1)  # (N, D)
    return logit_scale * image_features @ classifier.float().to(image_features.device)  # (N, C)


def accuracy(
    logits: Tensor | np.ndarray, labels: Tensor | np.ndarray, topk: Sequence[int] = (1,), prefix: str = ""
) -> dict[str, float]:
    """Top-k accuracy as fractions: ``{f"{prefix}top{k}": ...}``. k larger than C counts as C."""
    logits = torch.as_tensor(logits)  # (N, C)
    labels = torch.as_tensor(labels, device=logits.device).long().flatten()  # (N,)
    if logits.ndim != 2 or logits.shape[0] != labels.numel():
        raise ValueError(f"logits {tuple(logits.shape)} do not match {labels.numel()} labels")
    if labels.numel() == 0:
        raise ValueError("accuracy of an empty set is undefined")
    pred = logits.topk(min(max(topk), logits.shape[1]), dim=1).indices  # (N, kmax)
    correct = pred == labels[:, None]  # (N, kmax)
    return {f"{prefix}top{k}": correct[:, :k].any(dim=1).float().mean().item() for k in topk}


def confusion_matrix(
    pred: Tensor | np.ndarray, labels: Tensor | np.ndarray, num_classes: int
) -> np.ndarray:
    """``(C, C)`` int64 counts; row = true label, column = predicted label (scikit-learn's layout)."""
    pred = np.asarray(pred.cpu() if isinstance(pred, Tensor) else pred).astype(np.int64).ravel()
    labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels).astype(np.int64).ravel()
    if pred.shape != labels.shape:
        raise ValueError(f"{pred.size} predictions for {labels.size} labels")
    for name, v in (("pred", pred), ("labels", labels)):
        if v.size and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(f"{name} must lie in 0..{num_classes - 1}")
    flat = np.bincount(labels * num_classes + pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)
