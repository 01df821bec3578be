"""Visual question answering: questions generated with the right answers (checked against hand-made scenes'
geometry), held-out wording kept out of training, balanced question types, blind baselines that really
ignore an input, and a tiny model that learns where things are."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import assert_close_to_scale, tiny_model_config
from vlpt.data import shapes
from vlpt.data.finetune import (
    LEAD_INS,
    MEANINGFUL_WORDS,
    NOUN_VARIANTS,
    QuestionBatches,
    balanced_rows,
    flatten_questions,
    noisy_questions,
    other_noun,
    with_lead_in,
)
from vlpt.factory import create_model
from vlpt.models.fusion import FusionConfig
from vlpt.models.task_model import TaskModel, TaskModelConfig

# The grid by hand, (row, column) per cell name: the oracle below reads geometry from here, not from vlpt.
GRID = {"top left": (0, 0), "top": (0, 1), "top right": (0, 2), "left": (1, 0), "center": (1, 1),
        "right": (1, 2), "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2)}
PLACES = {"in the top left": "top left", "at the top": "top", "in the top right": "top right", "on the left": "left",
          "in the center": "center", "on the right": "right", "in the bottom left": "bottom left",
          "at the bottom": "bottom", "in the bottom right": "bottom right"}
RELATION_HOLDS = {"above": lambda a, b: a[0] < b[0], "below": lambda a, b: a[0] > b[0],
                  "to the left of": lambda a, b: a[1] < b[1], "to the right of": lambda a, b: a[1] > b[1]}


def obj(color: str, shape: str, place: str, size: str = "small") -> shapes.ShapeObject:
    row, col = GRID[place]
    return shapes.ShapeObject(shape=shape, color=color, size=size, cell=3 * row + col, dx=0.0, dy=0.0, rotation=0.0)


HAND_MADE = [
    [obj("red", "star", "top left", "large"), obj("blue", "circle", "bottom right"), obj("green", "square", "center")],
    [obj("yellow", "hexagon", "left"), obj("purple", "cross", "right", "large")],
    [obj("cyan", "triangle", "top"), obj("cyan", "star", "bottom", "large"), obj("white", "triangle", "top right")],
    [obj("orange", "square", "bottom left", "large")],
    [obj("green", "circle", "top right"), obj("green", "circle", "bottom left"), obj("red", "hexagon", "center")],
]


SLOTS = {"shape": r"\w+", "color": r"\w+", "object": r"\w+ \w+", "a": r"\w+ \w+", "b": r"\w+ \w+",
         "relation": "|".join(RELATION_HOLDS), "place": "|".join(PLACES)}


def _pattern(template: str) -> re.Pattern:
    """A template as a regex with named groups for its slots."""
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out += re.escape(template[pos:m.start()]) + f"(?P<{m.group(1)}>{SLOTS[m.group(1)]})"
        pos = m.end()
    return re.compile(out + re.escape(template[pos:]) + "$")


def parse(text: str, wording: int) -> tuple[str, dict[str, str]]:
    """(kind, slots) of a question in training (0), validation (1) or test (2) wording; fails unless one
    template reads it."""
    found = [(kind, m.groupdict()) for kind, both in shapes.QUESTION_WORDING.items() for t in both[wording]
             if (m := _pattern(t).match(text))]
    assert len(found) == 1, (text, found)
    return found[0]


def oracle(scene_objects: list[shapes.ShapeObject], kind: str, slots: dict[str, str]) -> str:
    """The right answer, from the hand-made geometry above."""
    where = {o: next(name for name, rc in GRID.items() if rc == (o.cell // 3, o.cell % 3)) for o in scene_objects}

    def named(phrase: str) -> shapes.ShapeObject:
        color, shape = phrase.split()
        matches = [o for o in scene_objects if (o.color, o.shape) == (color, shape)]
        assert len(matches) == 1, f"questions name one object: {phrase}"
        return matches[0]

    if kind == "color":
        return next(o.color for o in scene_objects if o.shape == slots["shape"])
    if kind == "shape":
        return next(o.shape for o in scene_objects if o.color == slots["color"])
    if kind == "count":
        return str(len(scene_objects))
    if kind == "count_color":
        return str(sum(o.color == slots["color"] for o in scene_objects))
    if kind == "existence":
        return "yes" if any(f"{o.color} {o.shape}" == slots["object"] for o in scene_objects) else "no"
    if kind == "size":  # several objects may share the name when they share the size too
        sizes = {o.size for o in scene_objects if f"{o.color} {o.shape}" == slots["object"]}
        assert len(sizes) == 1, slots
        return sizes.pop()
    if kind == "relation":
        a, b = GRID[where[named(slots["a"])]], GRID[where[named(slots["b"])]]
        return "yes" if RELATION_HOLDS[slots["relation"]](a, b) else "no"
    if kind == "where":
        return where[named(slots["object"])]
    if kind == "at":
        return "yes" if where[named(slots["object"])] == PLACES[slots["place"]] else "no"
    raise AssertionError(kind)


def test_questions_on_hand_made_scenes_have_the_answers_their_geometry_gives():
    kinds_seen, answers_seen = set(), set()
    for objects in HAND_MADE:
        scene = shapes.Scene(objects=objects, background=(50, 50, 50))
        for seed in range(60):
            for q in shapes.make_questions(scene, np.random.default_rng(seed)):
                kind, slots = parse(q.question, 0)
                held_kind, held_slots = parse(q.heldout, 2)
                assert (held_kind, held_slots) == (kind, slots), "both wordings ask the same question"
                assert q.answer == oracle(objects, kind, slots), (q, objects)
                assert q.type == {"count_color": "count", "where": "position", "at": "position"}.get(kind, kind)
                kinds_seen.add(kind)
                if q.type in ("position", "relation"):
                    answers_seen.add(q.answer)
    assert kinds_seen == set(shapes.QUESTION_WORDING)
    assert {"yes", "no", "top left", "bottom right", "center", "right", "bottom left"} <= answers_seen


def test_every_scene_with_a_nameable_object_gets_a_position_question_and_spatial_answers_are_balanced():
    where, at, relation = [], [], []
    for i in range(1500):
        scene = shapes.sample_scene(0, "val", i)
        position = [q for q in scene.questions if q.type == "position"]
        pairs = [(o.color, o.shape) for o in scene.objects]
        assert len(position) == (1 if any(pairs.count(p) == 1 for p in pairs) else 0), scene
        for q in scene.questions:  # (sampled scenes: the answers checked against the geometry too)
            kind, slots = parse(q.question, 0)
            assert q.answer == oracle(scene.objects, kind, slots) and q.answer in shapes.ANSWERS, q
            {"where": where, "at": at, "relation": relation}.get(kind, []).append(q.answer)
    assert set(where) == set(shapes.POSITIONS)  # every cell is an answer
    assert max(where.count(p) for p in shapes.POSITIONS) < 2.5 * min(where.count(p) for p in shapes.POSITIONS)
    for answers in (at, relation):  # yes / no questions: the majority answer is worth about half
        assert 0.42 < answers.count("yes") / len(answers) < 0.58, len(answers)


def test_held_out_wording_never_occurs_in_training():
    """Validation and test scenes ask every question again in wordings no training question uses, each
    split its own (a recipe chosen on the validation wording is not tuned to the test wording)."""
    sets = [{t for both in shapes.QUESTION_WORDING.values() for t in both[k]} for k in range(3)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    heldout = [_pattern(t) for t in sets[1] | sets[2]]
    scenes = shapes.make_scenes(shapes.ShapesConfig(split="train", size=2000, twins=True))
    train_questions, _, _, _ = flatten_questions(scenes)
    assert not [q for q in train_questions if any(p.match(q) for p in heldout)]
    for split, k in (("val", 1), ("test", 2), ("compositional", 2)):
        held_scenes = shapes.make_scenes(shapes.ShapesConfig(split=split, size=200))
        asked, _, answers, types = flatten_questions(held_scenes, "heldout")
        trained, _, same_answers, same_types = flatten_questions(held_scenes)
        assert np.array_equal(answers, same_answers) and np.array_equal(types, same_types)
        assert not set(asked) & set(train_questions)
        assert all(parse(q, k)[0] == parse(t, 0)[0] for q, t in zip(asked, trained))  # same kind of question
    with pytest.raises(ValueError, match="train, heldout"):
        flatten_questions(held_scenes, "paraphrased")


def test_noun_variants_rename_the_things_only_and_never_make_a_held_out_wording():
    """``finetune.noun_variants``: shape and count questions call the things in the picture by other nouns
    ("how many figures are there?"); no other question changes, no answer changes, and no variant of any
    training question is a validation or test wording."""
    scenes = shapes.make_scenes(shapes.ShapesConfig(split="train", size=600))
    questions, _, answers, types = flatten_questions(scenes)
    heldout = [_pattern(t) for both in shapes.QUESTION_WORDING.values() for t in (*both[1], *both[2])]
    rng = np.random.default_rng(0)
    renamed = {shapes.QUESTION_TYPES.index(t) for t in ("shape", "count")}
    variants = set()
    for question, kind in zip(questions, types):
        seen = {other_noun(question, rng) for _ in range(200)}  # 6 or 18 variants each: all, almost surely
        if kind in renamed:
            nouns = [w.strip("?.") for w in question.split() if w.strip("?.") in NOUN_VARIANTS]
            assert len(seen) == np.prod([len(NOUN_VARIANTS[n]) for n in nouns]) > 1, (question, seen)
        else:
            assert seen == {question}
        variants |= seen
    assert not [q for q in variants if any(p.match(q) for p in heldout)]
    assert {"what shape is the red one?", "how many figures are there?", "what outline is the red item?"} <= variants
    tokenizer = create_model(tiny_model_config(), corpus=questions).tokenizer
    data = shapes.ShapesDataset(shapes.ShapesConfig(split="train", size=40, image_size=32))
    plain = QuestionBatches(data.images, data.scenes, tokenizer, 16, seed=0)
    varied = QuestionBatches(data.images, data.scenes, tokenizer, 16, seed=0, noun_variants=0.5)
    for step in range(4):
        a, b = plain.batch(step), varied.batch(step)
        assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["images"], b["images"])
    assert 0 < (varied.input_ids[:, :12] != plain.input_ids[:, :12]).any(1).float().mean() < 0.5


def test_twins_drawn_per_question_ask_each_question_one_way_for_the_whole_run():
    """``finetune.question_noise_per_question``: each question comes always clean or always as its twin, about
    half each, so a frozen question tower's cache holds one text per question instead of up to two."""
    data = shapes.ShapesDataset(shapes.ShapesConfig(split="train", size=40, image_size=32))
    questions = flatten_questions(data.scenes)[0]
    tokenizer = create_model(tiny_model_config(), corpus=questions + list(LEAD_INS)).tokenizer
    fixed = QuestionBatches(data.images, data.scenes, tokenizer, 16, seed=0, noise=0.5, noise_kind="lead_in",
                            noise_per_question=True)
    drawn = QuestionBatches(data.images, data.scenes, tokenizer, 16, seed=0, noise=0.5, noise_kind="lead_in")
    asked: dict[int, set[int]] = {}
    for step in range(60):
        rows, text_rows = fixed._rows(step)
        for row, text in zip(rows.tolist(), text_rows.tolist()):
            asked.setdefault(row, set()).add(text)
    assert all(len(texts) == 1 for texts in asked.values()) and len(asked) == fixed.count
    twins = sum(next(iter(t)) >= fixed.count for t in asked.values()) / len(asked)
    assert 0.3 < twins < 0.7
    assert len(fixed.texts(60)[0]) == fixed.count < len(drawn.texts(60)[0])


def test_question_types_are_balanced_in_training_and_test():
    types = np.array([0, 0, 0, 0, 1, 2, 2])
    assert np.bincount(types[balanced_rows(types, oversample=True)]).tolist() == [4, 4, 4]
    assert np.bincount(types[balanced_rows(types, oversample=False)]).tolist() == [1, 1, 1]
    data = shapes.ShapesDataset(shapes.ShapesConfig(split="train", size=300, image_size=32))
    tokenizer = create_model(tiny_model_config(), corpus=flatten_questions(data.scenes)[0]).tokenizer
    batches = QuestionBatches(data.images, data.scenes, tokenizer, 64, seed=0)
    seen = np.bincount(np.concatenate([batches.batch(s)["types"].numpy() for s in range(30)]),
                       minlength=len(shapes.QUESTION_TYPES))
    raw = np.bincount(flatten_questions(data.scenes)[3], minlength=len(shapes.QUESTION_TYPES))
    assert raw.max() > 1.5 * raw.min()  # relation questions need two objects: rarer in the raw data ...
    assert seen.max() < 1.3 * seen.min(), seen  # ... but not in training batches
    twice = QuestionBatches(data.images, data.scenes, tokenizer, 64, seed=0, type_repeats={"relation": 2})
    seen = np.bincount(np.concatenate([twice.batch(s)["types"].numpy() for s in range(30)]),
                       minlength=len(shapes.QUESTION_TYPES))
    relation = shapes.QUESTION_TYPES.index("relation")
    others = np.delete(seen, relation)
    assert 1.6 * others.mean() < seen[relation] < 2.4 * others.mean(), seen  # the slowest type gets twice the share


def test_noisy_questions_fit_the_context_and_keep_every_content_word():
    """Nonsense words are spelled out in character pieces: a noisy twin that ran past the tokenizer's context
    would be cut short, and "is the red circle above the blue square?" would lose the square (and its answer)."""
    scenes = shapes.make_scenes(shapes.ShapesConfig(split="train", size=300))
    questions, _, _, types = flatten_questions(scenes)
    # a caption-trained vocabulary: the question words are whole tokens, nonsense words fall apart
    tokenizer = create_model(tiny_model_config(), corpus=questions).tokenizer
    noisy = noisy_questions(questions, tokenizer, np.random.default_rng(0))
    clean_lengths, noisy_lengths = tokenizer.lengths(questions), tokenizer.lengths(noisy)
    assert noisy_lengths.max() <= tokenizer.context_length < 50 and clean_lengths.max() < tokenizer.context_length
    assert np.mean(noisy_lengths > clean_lengths) > 0.9  # nearly every twin is noisy ...
    relation = types == shapes.QUESTION_TYPES.index("relation")
    assert np.mean(noisy_lengths[relation] - clean_lengths[relation]) > 5  # ... by whole spelled-out words
    content = set(shapes.COLOR_NAMES) | set(shapes.SHAPES) | {"above", "below", "left", "right"}
    for clean, twin in zip(questions, noisy):  # every word that carries the question survives, in order
        kept = [w.strip("?.") for w in clean.split() if w.strip("?.") in content]
        assert [w.strip("?.") for w in twin.split() if w.strip("?.") in content] == kept, (clean, twin)
    long = ["is the red circle above the blue square?"] * 200  # as long as noise can make it: still fits
    assert tokenizer.lengths(noisy_questions(long, tokenizer, np.random.default_rng(1))).max() \
        <= tokenizer.context_length


def test_word_twins_insert_only_real_words_that_do_not_change_the_question():
    """Kind "words": each twin is its question with an opening half the time and 1-2 whole words of the tokenizer's
    vocabulary inserted, never a word that changes what is asked (a color, a shape, a number, "not", ...)."""
    scenes = shapes.make_scenes(shapes.ShapesConfig(split="train", size=300))
    questions = flatten_questions(scenes)[0]
    tokenizer = create_model(tiny_model_config(), corpus=questions + ["parliament tolerated barbie oslo"]).tokenizer
    vocabulary = set(tokenizer.whole_words())
    assert {"parliament", "oslo"} <= vocabulary and not [w for w in vocabulary if w.startswith("#")]
    twins = noisy_questions(questions, tokenizer, np.random.default_rng(0), kind="words")
    opened = 0
    for question, twin in zip(questions, twins):
        words, added = question.split(), twin.split()
        extra = list(added)
        for w in words:  # the question's own words, in order, with an opening and 1-2 more words among them
            extra.remove(w)
        lead = next((lead.split() for lead in LEAD_INS if all(w in extra for w in lead.split())), [])
        for w in lead:
            extra.remove(w)
        opened += bool(lead)
        assert 1 <= len(extra) <= 2 and set(extra) <= vocabulary and not set(extra) & MEANINGFUL_WORDS, twin
        rest = iter(added)
        assert all(w in rest for w in words), twin  # the question's words, in order
    assert 0.4 < opened / len(questions) < 0.6
    assert {"one", "not", "red", "circle", "figure", "count", "where"} <= MEANINGFUL_WORDS


def test_noisy_twins_open_with_lead_ins_that_no_held_out_wording_uses():
    """About half the noisy training twins open with a lead-in ("so, what color is the star?"), so the model
    reads a question's kind from its core (kind "lead_in": every twin opens with one and is otherwise the question);
    the openings are the training side's own: no validation or test wording begins with one (else the held-out
    figures would not measure unseen wording)."""
    scenes = shapes.make_scenes(shapes.ShapesConfig(split="train", size=300))
    questions = flatten_questions(scenes)[0]
    tokenizer = create_model(tiny_model_config(), corpus=questions).tokenizer
    noisy = noisy_questions(questions, tokenizer, np.random.default_rng(0))
    def opened(texts: list[str]) -> float:
        return float(np.mean([any(text.startswith(lead + " ") for lead in LEAD_INS) for text in texts]))
    rng = np.random.default_rng(1)
    assert 0.45 < opened([with_lead_in(q, rng) for q in questions]) < 0.55  # half
    assert 0.25 < opened(noisy) < 0.5, opened(noisy)  # less the twins whose opening a nonsense word or swap broke
    assert not [q for q in questions if any(q.startswith(lead) for lead in LEAD_INS)]  # clean questions keep none
    lead_only = noisy_questions(questions, tokenizer, np.random.default_rng(0), kind="lead_in")
    assert opened(lead_only) == 1.0 and all(t.endswith(" " + q) for t, q in zip(lead_only, questions))
    with pytest.raises(ValueError, match="full, lead_in, words"):
        noisy_questions(questions, tokenizer, np.random.default_rng(0), kind="shout")
    def opening(text: str) -> list[str]:
        return [w.strip(",:") for w in text.split()]
    held_out = [t for wordings in shapes.QUESTION_WORDING.values() for t in (*wordings[1], *wordings[2])]
    for lead in LEAD_INS:
        words = opening(lead)
        assert not [t for t in held_out if opening(t)[:len(words)] == words], lead


def _vqa_model(inputs: str) -> TaskModel:
    torch.manual_seed(0)
    encoder = create_model(tiny_model_config(), corpus=["what color is the star?", "where is the red circle?"])
    return TaskModel(TaskModelConfig(task="vqa", fusion=FusionConfig(method="cross"), outputs=list(shapes.ANSWERS),
                                     inputs=inputs), encoder)


@pytest.mark.parametrize("inputs", ["both", "image_only"])
def test_evaluation_encodes_each_distinct_question_once_and_answers_as_the_model_does(inputs):
    """The evaluation encodes distinct questions in length-sorted batches trimmed to their longest; the answers
    are the model's own on the padded batch (an image_only model keeps one token of each question)."""
    from vlpt.evaluate.finetune import _encode_images, _encode_texts, pair_logits
    model = _vqa_model(inputs).eval()
    questions = ["what color is the star?", "where is the red circle?", "what color is the star?", "where?"]
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    text = _encode_texts(model, questions, batch_size=2)  # 3 distinct questions: two batches of lengths 2 and 1
    logits = pair_logits(model, _encode_images(model, images.numpy(), 4), text, torch.arange(4), torch.arange(4))
    tokens = model.tokenizer(questions)
    with torch.no_grad():
        direct = model(images, tokens["input_ids"], tokens["attention_mask"])
    assert_close_to_scale(logits, direct)


def test_blind_baselines_ignore_their_missing_input():
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    questions = ["what color is the star?", "where is the red circle?"]
    blind = _vqa_model("question_only").predict(images, [questions[0]] * 2)
    assert_close_to_scale(blind[0], blind[1])  # two different images, one answer distribution (up to rounding)
    deaf = _vqa_model("image_only").predict(images[:1].expand(2, -1, -1, -1), questions)
    assert_close_to_scale(deaf[0], deaf[1])  # two different questions about one image
    both = _vqa_model("both")  # ... while a model with both inputs tells them apart
    for p in (both.predict(images, [questions[0]] * 2), both.predict(images[:1].expand(2, -1, -1, -1), questions)):
        assert (p[0] - p[1]).abs().max() > 1e-3 * p.max()
    with pytest.raises(ValueError, match="question_only, image_only"):
        _vqa_model("deaf")
    with pytest.raises(ValueError, match="inputs must be 'both'"):
        TaskModel(TaskModelConfig(task="classify", outputs=["a", "b"], inputs="image_only"),
                  create_model(tiny_model_config(), corpus=["a red circle"]))


def test_a_tiny_model_learns_where_things_are():
    """From scratch, on single-object scenes and "where is ..." questions alone: 9-way, chance 11%."""
    def where_only(split: str, size: int):
        data = shapes.ShapesDataset(shapes.ShapesConfig(split=split, size=size, image_size=32, max_objects=1))
        for scene in data.scenes:
            o = scene.primary
            scene.questions = [shapes.Question(f"where is the {o.color} {o.shape}?", o.position, "position")]
        return data

    train, test = where_only("train", 512), where_only("test", 200)
    torch.manual_seed(0)
    encoder = create_model(tiny_model_config(), corpus=flatten_questions(train.scenes)[0])
    model = TaskModel(TaskModelConfig(task="vqa", fusion=FusionConfig(method="cross", cross_width=32, cross_layers=1,
                                                                      cross_heads=2),
                                      outputs=list(shapes.ANSWERS)), encoder)
    batches = QuestionBatches(train.images, train.scenes, model.tokenizer, 64, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(150):
        batch = batches.batch(step)
        loss = F.cross_entropy(model(batch["images"], batch["input_ids"], batch["attention_mask"]), batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    questions, owner, answers, _ = flatten_questions(test.scenes)
    predicted = [shapes.ANSWERS.index(a) for a, _ in model.answer(test.images[owner], questions)]
    accuracy = float(np.mean(np.array(predicted) == answers))
    assert accuracy > 0.5, f"held-out accuracy {accuracy:.3f} (chance 0.111)"


def test_frozen_towers_image_cache_gives_the_same_features():
    torch.manual_seed(0)
    encoder = create_model(tiny_model_config(), corpus=["where is the red circle?"])
    model = TaskModel(TaskModelConfig(task="vqa", fusion=FusionConfig(method="cross"), outputs=list(shapes.ANSWERS),
                                      freeze_towers=True), encoder)
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    plain = model.encode_images(images)
    model.enable_image_cache()
    first, again = model.encode_images(images), model.encode_images(images[[2, 0]])
    assert len(model.image_cache) == 3  # each image through the towers once
    for key in ("image_tokens", "image_embed"):
        assert_close_to_scale(first[key], plain[key])
        assert torch.equal(again[key], first[key][[2, 0]])
    with pytest.raises(ValueError, match="frozen towers"):
        _vqa_model("both").enable_image_cache()


def test_frozen_towers_text_cache_gives_the_same_answers_whatever_the_padding():
    """The question cache keeps each question's unpadded tokens: a question asked again in a batch padded to
    another length, with word codes and order around them, gets the same logits as through the towers."""
    torch.manual_seed(0)
    questions = ["is the red circle above the blue square?", "where is the star?", "how many shapes are there?"]
    encoder = create_model(tiny_model_config(), corpus=questions)
    model = TaskModel(TaskModelConfig(task="vqa", fusion=FusionConfig(method="cross"), outputs=list(shapes.ANSWERS),
                                      freeze_towers=True, word_codes=["above", "where"], order_around_codes=True),
                      encoder).eval()
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))

    def logits(rows: list[int]) -> torch.Tensor:
        tokens = model.tokenizer([questions[i] for i in rows])
        with torch.no_grad():
            return model(images[rows], tokens["input_ids"], tokens["attention_mask"])

    plain = logits([0, 1, 2])
    model.enable_text_cache()
    first, short = logits([0, 1, 2]), logits([2, 1])  # the second batch is padded to a shorter length
    assert len(model.text_cache) == 3  # each question through the tower once
    assert_close_to_scale(first, plain)
    assert_close_to_scale(short, first[[2, 1]])  # the fusion itself runs on another batch shape
    with pytest.raises(ValueError, match="frozen towers"):
        _vqa_model("both").enable_text_cache()


def test_prefilled_question_cache_holds_every_question_the_training_steps_ask():
    """``QuestionBatches.texts`` lists exactly the texts (clean and noisy twins) the steps ask; prefilled with
    them, the frozen question tower is not run again during those steps."""
    data = shapes.ShapesDataset(shapes.ShapesConfig(split="train", size=40, image_size=32))
    questions = flatten_questions(data.scenes)[0]
    torch.manual_seed(0)
    encoder = create_model(tiny_model_config(), corpus=questions + list(LEAD_INS))
    model = TaskModel(TaskModelConfig(task="vqa", fusion=FusionConfig(method="cross"), outputs=list(shapes.ANSWERS),
                                      freeze_towers=True), encoder).eval()
    batches = QuestionBatches(data.images, data.scenes, model.tokenizer, 16, seed=0, noise=0.5)
    input_ids, lengths = batches.texts(6)
    listed = {row[:n].numpy().tobytes() for row, n in zip(input_ids, lengths.tolist())}
    asked = set()
    for step in range(6):
        batch = batches.batch(step)
        asked |= {row[:n].numpy().tobytes() for row, n in zip(batch["input_ids"], batch["attention_mask"].sum(1))}
    assert listed == asked and len(listed) > 16
    model.enable_text_cache()
    model.prefill_text_cache(input_ids, lengths, rows_per_forward=7)
    assert len(model.text_cache) == len(listed)
    batch = batches.batch(3)
    with torch.no_grad():
        cached = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        assert len(model.text_cache) == len(listed)  # nothing new went through the tower
        model.text_cache = None
        plain = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    assert_close_to_scale(cached, plain)


def test_word_codes_go_to_the_named_whole_words_only_train_and_survive_saving(tmp_path):
    """The cross fusion's own embeddings for the words an answer turns on: only those words' tokens get one
    (frame words keep the tower's features alone), they train with frozen towers, and save -> load keeps them."""
    torch.manual_seed(0)
    corpus = ["is the red circle above the blue square?", "where is the star?", "is it below?"]
    encoder = create_model(tiny_model_config(), corpus=corpus)
    config = TaskModelConfig(task="vqa", fusion=FusionConfig(method="cross"), outputs=list(shapes.ANSWERS),
                             freeze_towers=True, word_codes=["above", "below", "red", "zqxjv"])
    model = TaskModel(config, encoder)
    vocab = encoder.tokenizer.hf.get_vocab()
    coded = {t for t, i in vocab.items() if model.code_index[i] > 0}
    assert coded == {"above", "below", "red"}  # "zqxjv" is spelled in pieces: left out
    assert model.code_index.unique().numel() == 4  # three distinct codes and "none"
    tokens = model.tokenizer(["is the red circle above the blue square?", "is the red circle below the blue square?"])
    frozen = model.encoder.text_tower.forward_features(tokens["input_ids"], tokens["attention_mask"])[0]
    added = model.encode_texts(tokens["input_ids"], tokens["attention_mask"])["text_tokens"] - frozen
    is_coded = model.code_index[tokens["input_ids"]] > 0
    assert torch.equal(added[~is_coded], torch.zeros_like(added[~is_coded]))  # frame words: the tower alone
    assert added[is_coded].abs().min() > 0
    assert (added[0] - added[1]).abs().sum() > 0  # "above" and "below" now differ by their codes
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    loss = model(images, tokens["input_ids"], tokens["attention_mask"]).logsumexp(-1).sum()
    loss.backward()
    assert model.word_code.weight.grad[1:].abs().sum() > 0 and model.word_code.weight.grad[0].abs().sum() == 0
    model.save_pretrained(tmp_path / "vqa")
    loaded = TaskModel.from_pretrained(tmp_path / "vqa")
    assert torch.equal(loaded.code_index, model.code_index)
    assert_close_to_scale(loaded.predict(images, ["is the red circle above the blue square?"] * 2),
                          model.predict(images, ["is the red circle above the blue square?"] * 2))


def test_word_order_counts_around_the_first_relation_word_and_only_there(tmp_path):
    """With order_around_codes the where readout signs each token -1 before the first coded word and +1 after,
    so an opening ("so, is the A above the B?") leaves both objects' signs alone; a question without a coded
    word reads exactly as before, and the setting survives saving."""
    torch.manual_seed(0)
    corpus = ["so, is the red circle above the blue square?", "where is the star?", "is it to the left of it?"]
    encoder = create_model(tiny_model_config(), corpus=corpus)
    config = TaskModelConfig(task="vqa", fusion=FusionConfig(method="cross"), outputs=list(shapes.ANSWERS),
                             freeze_towers=True, word_codes=["above", "left"], order_around_codes=True)
    model = TaskModel(config, encoder).eval()
    questions = ["is the red circle above the blue square?", "so, is the red circle above the blue square?",
                 "where is the star?", "is it to the left of it?"]
    tokens = model.tokenizer(questions)
    pivot = model.encode_texts(tokens["input_ids"], tokens["attention_mask"])["text_pivot"]
    vocab = encoder.tokenizer.hf.get_vocab()
    expected = [row.index(vocab["above"]) if vocab["above"] in row else row.index(vocab["left"])
                if vocab["left"] in row else -1 for row in tokens["input_ids"].tolist()]
    assert pivot.tolist() == expected and expected[2] == -1 and expected[1] > expected[0] > 0
    plain = TaskModel(TaskModelConfig(**{**vars(config), "order_around_codes": False}), encoder).eval()
    plain.load_state_dict(model.state_dict())
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fused = [m.fuse(m.encode(images, tokens["input_ids"], tokens["attention_mask"])) for m in (model, plain)]
    around, ends = fused
    assert_close_to_scale(around[2], ends[2])  # no coded word: the question's ends, as before
    assert ((around - ends).abs().amax(1) / ends.abs().amax(1))[[0, 1, 3]].min() > 1e-3  # rounding: ~1e-7
    model.save_pretrained(tmp_path / "vqa")
    loaded = TaskModel.from_pretrained(tmp_path / "vqa")
    assert loaded.config.order_around_codes
    assert_close_to_scale(loaded.predict(images, questions), model.predict(images, questions))
