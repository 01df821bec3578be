"""Caption evaluation: BLEU-4 and CIDEr-D from the COCO caption metrics, exact attribute scores in the
shapes world and digit naming on real digits (the CLIP-score is ``vlpt.evaluate.scoring.clip_score``).

BLEU and CIDEr-D come from ``pycocoevalcap`` (the maintained Python 3 port of the official
coco-caption code): its ``Bleu(4)`` and ``Cider`` scorers; ``Cider`` there is CIDEr-D (clipped
n-gram counts, Gaussian length penalty with sigma 6, scores x10). The official pipeline first runs
Stanford's PTB tokenizer, which needs Java; we tokenize with ``simple_tokenize`` instead: lowercase,
every character other than a-z and 0-9 becomes a space (so punctuation disappears and "hand-written"
becomes "hand written"), split on whitespace. Candidates and references get the same treatment.
CIDEr-D's document frequencies come from the references of the images scored together, so compare
scores only over the same image set (and never score a single image: its IDF is zero).

Pure functions over strings; nothing here touches a model.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from vlpt.data.digits import DIGIT_WORDS
from vlpt.data.shapes import COLOR_NAMES, SHAPE_SYNONYMS, Scene

_WORD = re.compile(r"[a-z0-9]+")


def simple_tokenize(text: str) -> str:
    """Lowercase, drop punctuation (any non-alphanumeric character separates words), single spaces."""
    return " ".join(_WORD.findall(text.lower()))


def caption_scores(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4 and CIDEr-D of one candidate per image against that image's references."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("no captions to score")
    for i, refs in enumerate(references):
        if not refs:
            raise ValueError(f"image {i} has no reference captions")
    res = {i: [simple_tokenize(c)] for i, c in enumerate(candidates)}
    gts = {i: [simple_tokenize(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu1": float(bleu[0]), "bleu2": float(bleu[1]), "bleu3": float(bleu[2]), "bleu4": float(bleu[3]),
            "cider": float(cider)}


# ----------------------------------------------------------------------------- shapes world attributes

# Surface word(s) -> canonical shape, from the shapes world's own synonym table ("disk", "box", "plus sign").
_SHAPE_WORDS = {tuple(word.split()): shape for shape, words in SHAPE_SYNONYMS.items() for word in words}
_COLORS = frozenset(COLOR_NAMES)


@dataclass
class ParsedCaption:
    objects: Counter = field(default_factory=Counter)  # (color, shape) -> times mentioned
    stray: list[str] = field(default_factory=list)  # a color without a shape after it, or a shape without a color

    def matches(self, truth: Sequence[tuple[str, str]]) -> bool:
        """Names every object's color and shape, as often as it occurs, and nothing else."""
        return not self.stray and self.objects == Counter(truth)


def _shape_at(words: list[str], i: int) -> tuple[str | None, int]:
    """The shape named at words[i] (one or two words), and how many words it takes."""
    for n in (2, 1):
        shape = _SHAPE_WORDS.get(tuple(words[i:i + n]))
        if shape is not None and i + n <= len(words):
            return shape, n
    return None, 0


def parse_shapes_caption(text: str) -> ParsedCaption:
    """The objects a shapes-world caption names, order-independent.

    Captions describe an object as ``[size] color shape`` ("a big red disk"); every color word must be
    followed by a shape word (synonyms included) and every shape word preceded by a color. Anything
    else (a lone "red", a "circle" with no color) is recorded as a stray mention, which fails the scene.
    """
    words = simple_tokenize(text).split()
    parsed = ParsedCaption()
    i = 0
    while i < len(words):
        word = words[i]
        if word in _COLORS:
            shape, n = _shape_at(words, i + 1)
            if shape is None:
                parsed.stray.append(word)
                i += 1
            else:
                parsed.objects[(word, shape)] += 1
                i += 1 + n
            continue
        shape, n = _shape_at(words, i)
        if shape is not None:
            parsed.stray.append(" ".join(words[i:i + n]))
            i += n
            continue
        i += 1
    return parsed


def attribute_accuracy(candidates: Sequence[str], scenes: Sequence[Scene]) -> dict[str, float]:
    """Fraction of scenes whose caption names every object's color and shape and no other object:
    overall (``attr_acc``) and by number of objects (``attr_acc_1obj`` .. ``attr_acc_3obj``), plus the
    per-object recall and precision of (color, shape) mentions (``attr_recall``, ``attr_precision``)."""
    if len(candidates) != len(scenes):
        raise ValueError(f"{len(candidates)} captions but {len(scenes)} scenes")
    correct: dict[int, list[bool]] = {}
    hits = named = present = 0
    for text, scene in zip(candidates, scenes):
        truth = [(o.color, o.shape) for o in scene.objects]
        parsed = parse_shapes_caption(text)
        correct.setdefault(len(truth), []).append(parsed.matches(truth))
        hits += sum((parsed.objects & Counter(truth)).values())
        named += sum(parsed.objects.values()) + len(parsed.stray)
        present += len(truth)
    everything = [c for values in correct.values() for c in values]
    metrics = {"attr_acc": float(np.mean(everything)) if everything else float("nan"),
               "attr_recall": hits / max(present, 1), "attr_precision": hits / max(named, 1)}
    for n in sorted(correct):
        metrics[f"attr_acc_{n}obj"] = float(np.mean(correct[n]))
    return metrics


# ----------------------------------------------------------------------------- digits

_DIGIT_NAMES = {**{w: i for i, w in enumerate(DIGIT_WORDS)}, **{str(i): i for i in range(10)}}


def digits_named(text: str) -> set[int]:
    """The digits a caption names, as words ("seven") or numerals ("7")."""
    return {_DIGIT_NAMES[w] for w in simple_tokenize(text).split() if w in _DIGIT_NAMES}


def digit_caption_accuracy(candidates: Sequence[str], labels: Sequence[int]) -> float:
    """Fraction of captions that name the right digit and no other digit."""
    if len(candidates) != len(labels):
        raise ValueError(f"{len(candidates)} captions but {len(labels)} labels")
    return float(np.mean([digits_named(text) == {int(label)} for text, label in zip(candidates, labels)]))
