"""Batches for the fine-tuning tasks (classify, vqa, match), pre-tokenised once and, like
``PairBatches``, a pure function of (seed, step) so a resumed run replays the same data."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch

from vlpt.data import shapes
from vlpt.data.pairs import (
    epoch_batch,
    fit_to_context,
    nonsense_words,
    random_shift,
    random_word,
    step_generator,
    token_rows,
)
from vlpt.tokenization import Tokenizer


def _check_size(batch_size: int, n: int, what: str) -> None:
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} is larger than the data set ({n} {what})")


class ClassifyBatches:
    """Images and their class labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, augment: bool = False):
        _check_size(batch_size, len(images), "images")
        self.images = torch.from_numpy(np.ascontiguousarray(images))  # (N, H, W, 3) uint8
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.batch_size, self.seed, self.augment = batch_size, seed, augment

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        index = epoch_batch(len(self.images), self.batch_size, self.seed, step)
        images = self.images[index]
        if self.augment:
            images = random_shift(images, step_generator(self.seed, step))
        return {"images": images, "labels": self.labels[index]}


WORDINGS = ("train", "heldout")  # Question.question, Question.heldout


def flatten_questions(scenes: Sequence[shapes.Scene], wording: str = "train"
                      ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Every question of every scene: (questions, owning scene, answer index, question-type index);
    ``wording`` "heldout" gives each question in its held-out wording (test sets only)."""
    if wording not in WORDINGS:
        raise ValueError(f"unknown question wording {wording!r}; choose from {', '.join(WORDINGS)}")
    questions, owner, answers, types = [], [], [], []
    for i, scene in enumerate(scenes):
        for q in scene.questions:
            questions.append(q.question if wording == "train" else q.heldout)
            owner.append(i)
            answers.append(shapes.ANSWERS.index(q.answer))
            types.append(shapes.QUESTION_TYPES.index(q.type))
    return questions, np.array(owner, np.int64), np.array(answers, np.int64), np.array(types, np.int64)


# Words that carry a question's content (what it asks about); the rest is its frame ("what", "is", "the", ...).
CONTENT_WORDS = frozenset(
    [*shapes.COLOR_NAMES, *shapes.SHAPES, *shapes.SIZES, *shapes.ANSWERS]
    + [w for phrase in (*shapes.RELATIONS, *shapes.POSITION_PHRASES) for w in phrase.split()]
    + ["color", "shape", "shapes", "size", "many", "where", "there"])

# The relation words ("above", "below", "left", "right") get trainable codes in the cross fusion
# (TaskModelConfig.word_codes): a contrastively trained text tower blurs "above" and "below" ("A above B" and
# "B below A" caption the same scene). Only these: coding the words that name objects and places too, or frame
# words, let the model read a question's kind from words it had seen, and held-out wording broke (docs/results.md).
CODED_WORDS = frozenset(w for phrase in shapes.RELATIONS for w in phrase.split() if w not in ("to", "the", "of"))


def other_frame_word(question: str, rng: np.random.Generator) -> str:
    """``question`` with one frame word (not in CONTENT_WORDS) replaced by a random letter string, half the
    time: trained on such questions, a model reads a question by its content, whatever the wording around it."""
    words = question.split()
    frame = [i for i, w in enumerate(words) if w.strip("?.") not in CONTENT_WORDS]
    if frame and rng.random() < 0.5:
        i = frame[int(rng.integers(len(frame)))]
        words[i] = random_word(rng)
    return " ".join(words)


# Openings a user may put before a question. Half of the noisy training twins start with one, so a question's kind
# is read from its core, not from its first words (trained without them, "in this image, what colour is the star?"
# got a place for an answer). Some address the reader ("you"), which the training questions otherwise do only in
# "do you see a ...?": without them "would you say the A is above the B?" was answered "no" far more often than
# "would the A be above the B?", and relation in held-out wording lost 10-15 points (docs/results.md, z26).
# None of them opens a validation or test wording (shapes.QUESTION_WORDING).
LEAD_INS = ("so,", "now,", "please,", "quick question:", "in short,", "at a glance,", "on this one,",
            "for this scene,", "one more:", "to be sure,", "just checking:", "if you can,", "you tell me:",
            "do you know:", "can you answer:")


def with_lead_in(question: str, rng: np.random.Generator) -> str:
    """``question`` after a random opening from LEAD_INS, half the time."""
    return f"{LEAD_INS[int(rng.integers(len(LEAD_INS)))]} {question}" if rng.random() < 0.5 else question


# Nouns a user may call the things in a picture, and their shape, by. The training templates say only "shapes" /
# "object(s)" and "shape", and a general-English question tower reads a noun it was never trained on by its
# everyday sense: "what sort of figure is the red one?" got a count for an answer ("figure", "one" are numbers
# too), "how many figures appear in total?" got "0", "which outline does the red figure have?" a count or a place
# (docs/results.md, VQA). Taken from the validation wordings' nouns; "one" only for a single thing named by its
# color ("the red one").
NOUN_VARIANTS = {"object": ("object", "item", "thing", "figure", "piece", "one"),
                 "objects": ("shapes", "objects", "items", "things", "figures", "pieces"),
                 "shapes": ("shapes", "objects", "items", "things", "figures", "pieces"),
                 "shape": ("shape", "form", "outline")}
_NOUN = re.compile(r"\b(" + "|".join(NOUN_VARIANTS) + r")\b")


def other_noun(question: str, rng: np.random.Generator) -> str:
    """``question`` with each generic noun for the things in the picture or their shape (NOUN_VARIANTS' keys:
    "how many shapes", "what shape is the red object") replaced by a random variant; questions without one come
    back unchanged."""
    return _NOUN.sub(lambda m: shapes.pick(rng, NOUN_VARIANTS[m.group(1)]), question)


# Words a random filler must not be: they change what a question asks or what its answer is.
MEANINGFUL_WORDS = CONTENT_WORDS | {w for names in shapes.SHAPE_SYNONYMS.values() for n in names for w in n.split()} | {
    w for nouns in NOUN_VARIANTS.values() for w in nouns} | frozenset(
    "no not none nor never nothing nobody neither without zero one two three four five six seven eight nine ten "
    "first second third once twice single double both all any every each many few several "
    # what kind of question it is, and where things are
    "what which where when who whom whose why how is are was were does did can could would should will shall may "
    "might must has have had count number total tally amount colour hue shade big little tiny huge location "
    "position place spot cell part area region top bottom middle center centre upper lower".split())


def filler_words(tokenizer: Tokenizer) -> list[str]:
    """The tokenizer's whole words (``Tokenizer.whole_words``) that do not change a question's meaning."""
    return [w for w in tokenizer.whole_words() if w not in MEANINGFUL_WORDS]


def english_words(question: str, vocabulary: Sequence[str], rng: np.random.Generator, most: int = 2) -> str:
    """``question`` with 1..``most`` words of ``vocabulary`` inserted at random places between its words."""
    words = question.split()
    for _ in range(int(rng.integers(1, most + 1))):
        words.insert(int(rng.integers(0, len(words) + 1)), shapes.pick(rng, vocabulary))
    return " ".join(words)


def balanced_rows(types: np.ndarray, oversample: bool) -> np.ndarray:
    """Row indices with every question type present equally often: each type's rows repeated up to the
    largest type's count (``oversample``, for training) or cut to the first rows of the smallest (test)."""
    groups = [np.flatnonzero(types == t) for t in np.unique(types)]
    size = max(map(len, groups)) if oversample else min(map(len, groups))
    return np.sort(np.concatenate([np.resize(g, size) for g in groups]))


def noisy_questions(questions: Sequence[str], tokenizer: Tokenizer, rng: np.random.Generator, kind: str = "full"
                    ) -> list[str]:
    """Each question's noisy twin. ``full``: an opening half the time (``with_lead_in``), one frame word replaced
    half the time (``other_frame_word``) and 1-3 nonsense words inserted (``nonsense_words``), with fewer nonsense
    words where the twin would not fit the tokenizer's context (a nonsense word is spelled out in up to 8
    character pieces; cut short, "is the red circle above the blue square?" loses the square and its answer
    becomes a guess). ``words``: an opening half the time and 1-2 real words of the tokenizer's vocabulary
    inserted (``filler_words``): a pretrained question tower knows every word, and a frame word it was never trained
    on ("drawn", "seen") can otherwise swing the answer. ``lead_in``: an opening from LEAD_INS only (a pretrained
    question tower reads unseen words already; the openings still teach that "can you ..." need not ask yes or no).
    Falls back to the clean question where the twin does not fit."""
    if kind == "words":
        vocabulary = filler_words(tokenizer)
        twins = [english_words(with_lead_in(q, rng), vocabulary, rng) for q in questions]
        return fit_to_context(twins, tokenizer, (lambda i: questions[i],))
    if kind == "lead_in":
        opened = [f"{LEAD_INS[int(rng.integers(len(LEAD_INS)))]} {q}" for q in questions]
        return fit_to_context(opened, tokenizer, (lambda i: questions[i],))
    if kind != "full":
        raise ValueError(f"unknown question noise kind {kind!r}; choose from full, lead_in, words")
    framed = [other_frame_word(with_lead_in(q, rng), rng) for q in questions]
    fallbacks = (lambda i: nonsense_words(framed[i], rng, most=1), lambda i: framed[i], lambda i: questions[i])
    return fit_to_context([nonsense_words(q, rng) for q in framed], tokenizer, fallbacks)


class QuestionBatches:
    """(image, question) pairs with the answer's index in ``shapes.ANSWERS``; question types are balanced
    (rarer types repeated; ``type_repeats`` {type: k} gives a type k times its share) and an epoch visits every
    balanced row once. With ``noun_variants`` > 0 that fraction of the questions name the things in the picture by
    another noun (``other_noun``). With ``noise`` > 0 that fraction of the questions come as their noisy twins
    (drawn each time a question comes, or once per question for the run with ``noise_per_question``)
    (``noisy_questions``: an opening, nonsense words inserted, a frame word replaced), so the model learns to
    answer from the words that matter and wording it has never seen passes."""

    def __init__(self, images: np.ndarray, scenes: Sequence[shapes.Scene], tokenizer: Tokenizer,
                 batch_size: int, seed: int, noise: float = 0.0, type_repeats: dict[str, int] | None = None,
                 noise_kind: str = "full", noun_variants: float = 0.0, noise_per_question: bool = False):
        questions, owner, answers, types = flatten_questions(scenes)
        if noun_variants > 0:  # some questions call the things by another noun (other_noun), fixed for the run
            rng = np.random.default_rng([seed, 4343])
            questions = [other_noun(q, rng) if rng.random() < noun_variants else q for q in questions]
        rows = balanced_rows(types, oversample=True)
        for kind, repeats in (type_repeats or {}).items():
            extra = rows[types[rows] == shapes.QUESTION_TYPES.index(kind)]
            rows = np.concatenate([rows, *[extra] * (repeats - 1)])
        rows = torch.from_numpy(np.sort(rows))
        _check_size(batch_size, len(rows), "questions")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.owner, self.answers, self.types = (torch.from_numpy(a) for a in (owner, answers, types))
        self.rows, self.count, self.noise = rows, len(questions), noise
        self.fixed_twins: torch.Tensor | None = None  # per question: always its twin (noise_per_question)
        if noise > 0:  # every question's noisy twin, tokenized once, rows after the clean ones
            rng = np.random.default_rng([seed, 4242])
            questions = questions + noisy_questions(questions, tokenizer, rng, noise_kind)
            if noise_per_question:
                self.fixed_twins = torch.from_numpy(np.random.default_rng([seed, 4444]).random(self.count) < noise)
        tokens = tokenizer(questions)
        self.input_ids, self.lengths = tokens["input_ids"], tokens["attention_mask"].sum(1)
        self.batch_size, self.seed = batch_size, seed

    def _rows(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``step``'s question rows and the rows of the texts asked (a noisy twin's: after the clean ones)."""
        rows = self.rows[epoch_batch(len(self.rows), self.batch_size, self.seed, step)]
        text_rows = rows
        if self.fixed_twins is not None:
            text_rows = torch.where(self.fixed_twins[rows], rows + self.count, rows)
        elif self.noise > 0:
            noisy = torch.rand(len(rows), generator=step_generator(self.seed, step)) < self.noise
            text_rows = torch.where(noisy, rows + self.count, rows)
        return rows, text_rows

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        rows, text_rows = self._rows(step)
        return {"images": self.images[self.owner[rows]], **token_rows(self.input_ids, self.lengths, text_rows),
                "labels": self.answers[rows], "types": self.types[rows]}

    def texts(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The distinct texts batches 0 .. ``steps`` - 1 ask, as (input_ids (U, L), lengths (U,)): what a
        frozen question tower's cache can compute ahead (``TaskModel.prefill_text_cache``)."""
        used = torch.unique(torch.cat([self._rows(step)[1] for step in range(steps)]))
        return self.input_ids[used], self.lengths[used]


def swapped_captions(scenes: Sequence[shapes.Scene], seed: int, per_scene: int = 4) -> list[list[str]]:
    """``per_scene`` attribute-swapped (false) captions for every scene, each from its own swap."""
    out = []
    for i, scene in enumerate(scenes):
        rng = np.random.default_rng([seed, i, 7])
        out.append([shapes.swap_attributes(scene, rng).captions[0] for _ in range(per_scene)])
    return out


def signature_ids(scenes: Sequence[shapes.Scene]) -> np.ndarray:
    """An integer per distinct (color, shape) multiset: a caption of scene j is false for scene i
    whenever their ids differ, so in-batch negatives can skip the ones that are secretly true."""
    ids: dict[tuple, int] = {}
    return np.array([ids.setdefault(shapes.pair_signature(s), len(ids)) for s in scenes], np.int64)


class MatchBatches:
    """Scenes with one true caption and one attribute-swapped false caption each.

    ``input_ids`` are the B true captions, ``false_input_ids`` the B swapped ones (same length).
    Hard negatives (the most similar wrong caption in the batch) are mined by the task from the
    model's own similarities, among captions whose scene ``signature`` differs.
    """

    def __init__(self, images: np.ndarray, scenes: Sequence[shapes.Scene], tokenizer: Tokenizer,
                 batch_size: int, seed: int, swaps_per_scene: int = 4):
        _check_size(batch_size, len(scenes), "scenes")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.signatures = torch.from_numpy(signature_ids(scenes))
        true = [s.captions for s in scenes]
        false = swapped_captions(scenes, seed, swaps_per_scene)
        self.num_true = torch.tensor([len(c) for c in true])
        self.num_false = swaps_per_scene
        flat = [c for caps in true for c in caps] + [c for caps in false for c in caps]
        self.true_start = torch.tensor(np.cumsum([0] + [len(c) for c in true[:-1]]))
        self.false_start = sum(len(c) for c in true) + torch.arange(len(scenes)) * swaps_per_scene
        tokens = tokenizer(flat)
        self.input_ids, self.lengths = tokens["input_ids"], tokens["attention_mask"].sum(1)
        self.batch_size, self.seed = batch_size, seed

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        index = epoch_batch(len(self.images), self.batch_size, self.seed, step)
        g = step_generator(self.seed, step)
        true_rows = self.true_start[index] + (torch.rand(len(index), generator=g) * self.num_true[index]).long()
        false_rows = self.false_start[index] + torch.randint(self.num_false, (len(index),), generator=g)
        tokens = token_rows(self.input_ids, self.lengths, torch.cat([true_rows, false_rows]))  # one length
        b = len(index)
        return {"images": self.images[index],
                "input_ids": tokens["input_ids"][:b], "attention_mask": tokens["attention_mask"][:b],
                "false_input_ids": tokens["input_ids"][b:], "false_attention_mask": tokens["attention_mask"][b:],
                "signatures": self.signatures[index]}
