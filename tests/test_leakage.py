"""Leakage: evaluation wording and held-out combinations never reach training. The training side is generated
with the same code and seeds the shipped configs use (scenes, captions, questions, minimal-edit twins)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from vlpt.config import list_configs, load_config
from vlpt.data import digits, fashion, shapes
from vlpt.evaluate.suite import WORDINGS
from vlpt.evaluate.zero_shot import COLOR_CLASS_NAMES, SHAPE_CLASS_NAMES, SHAPES_TEMPLATES, format_prompt


def shapes_training_configs() -> list[shapes.ShapesConfig]:
    """The training split of every shipped config on the shapes world (contrastive / caption / generate), and
    the fine-tuning sets (1-3 objects, no twins, equal counts; single objects for classify)."""
    found = set()
    for name in list_configs():
        config = load_config(name)
        d = config.data
        if d.dataset != "shapes":
            continue
        found.add(shapes.ShapesConfig(split="train", size=d.train_size, num_captions=d.num_captions, seed=d.seed,
                                      twins=d.twins, count_weights=d.count_weights,
                                      caption_openers=d.caption_openers))  # pixels play no part
        ft = config.finetune
        found.add(shapes.ShapesConfig(split="train", size=ft.train_size, num_captions=d.num_captions, seed=d.seed))
        found.add(shapes.ShapesConfig(split="train", size=ft.train_size, num_captions=d.num_captions, seed=d.seed,
                                      max_objects=1))
    return sorted(found, key=repr)


@pytest.fixture(scope="module")
def training_scenes() -> list[shapes.Scene]:
    return [s for config in shapes_training_configs() for s in shapes.make_scenes(config)]


def normalised(text: str) -> str:
    return " ".join(text.lower().split())


def leaks(prompts, captions) -> list[str]:
    """The prompts that are word for word a training caption (case and spacing aside)."""
    seen = {normalised(c) for c in captions}
    return sorted({p for p in prompts if normalised(p) in seen})


def shapes_eval_prompts(templates) -> list[str]:
    names = [*shapes.CLASS_NAMES, *SHAPE_CLASS_NAMES, *COLOR_CLASS_NAMES]
    names += [f"{c} {phrase}" for c in shapes.CLASS_NAMES for phrase in shapes.POSITION_PHRASES]  # position prompts
    return [format_prompt(t, n) for t in templates for n in names]


def test_the_check_covers_the_shipped_configs():
    configs = shapes_training_configs()
    assert any(c.twins for c in configs) and any(c.size == 20000 for c in configs)


def test_no_evaluation_prompt_is_a_training_caption(training_scenes):
    captions = [c for s in training_scenes for c in s.captions]
    assert leaks(shapes_eval_prompts(SHAPES_TEMPLATES), captions) == []
    # The check has teeth: the training wording (reported as _seen_templates) does collide, and one training
    # template slipped into the evaluation set is caught.
    assert {suffix: templates for templates, suffix in WORDINGS}[""] == SHAPES_TEMPLATES
    assert leaks(shapes_eval_prompts(("a picture of a {}",)), captions)
    assert leaks(shapes_eval_prompts((*SHAPES_TEMPLATES, "a {}")), captions)


def test_no_digits_evaluation_prompt_is_a_training_caption():
    train = digits.DigitsDataset(digits.DigitsConfig(split="train", image_size=8))
    captions = [c for caps in train.captions for c in caps]
    prompts = [digits.fill_template(t, d) for t in digits.EVAL_TEMPLATES for d in range(digits.NUM_CLASSES)]
    assert leaks(prompts, captions) == []
    assert leaks([digits.fill_template(digits.TRAIN_TEMPLATES[0], 7)], captions)


def test_no_fashion_evaluation_prompt_is_a_training_caption():
    train = fashion.FashionDataset("train", image_size=8, num_captions=len(fashion.TRAIN_TEMPLATES))
    captions = [c for caps in train.captions for c in caps]
    prompts = [fashion.fill_template(t, c) for t in fashion.EVAL_TEMPLATES for c in range(fashion.NUM_CLASSES)]
    assert leaks(prompts, captions) == []
    assert leaks([fashion.fill_template(fashion.TRAIN_TEMPLATES[0], 5)], captions)  # the check has teeth


@pytest.mark.parametrize("held", [("sandal", "bag"), ("pullover", "ankle boot")])
def test_held_out_fashion_classes_never_reach_training(held):
    for split in ("train", "val"):
        data = fashion.FashionDataset(split, image_size=8, num_captions=len(fashion.TRAIN_TEMPLATES),
                                      holdout_classes=held)
        labels = set(fashion.check_class_names(held))
        assert not labels & set(data.labels.tolist())
        named = [c for caps in data.captions for c in caps if any(re.search(rf"\b{n}\b", c) for n in held)]
        assert named == []
    everything = fashion.FashionDataset("train", image_size=8, num_captions=1)  # the same code without holding out
    assert any(held[0] in caps[0] for caps in everything.captions)


# Every way a caption or question can name a held-out pair or place, as one pattern -> what it names.
HELD_OUT_PHRASES = {f"{color} {word}": f"{color} {shape}" for color, shape in shapes.COMPOSITIONAL_PAIRS
                    for word in shapes.SHAPE_SYNONYMS[shape]}
HELD_OUT_PHRASES |= {f"{word} {shapes.POSITION_PHRASES[cell]}": f"{shape} {shapes.POSITIONS[cell]}"
                     for shape, cell in shapes.LAYOUT_PAIRS for word in shapes.SHAPE_SYNONYMS[shape]}
HELD_OUT = re.compile(r"\b(" + "|".join(map(re.escape, HELD_OUT_PHRASES)) + r")\b")


def held_out_mentions(text: str) -> list[str]:
    """Held-out (color, shape) pairs and (shape, cell) places that ``text`` names."""
    return [HELD_OUT_PHRASES[m] for m in HELD_OUT.findall(text)]


def test_held_out_combinations_never_reach_training(training_scenes):
    compositional, layout = set(shapes.COMPOSITIONAL_PAIRS), set(shapes.LAYOUT_PAIRS)
    for scene in training_scenes:
        assert not any((o.color, o.shape) in compositional or (o.shape, o.cell) in layout for o in scene.objects)
        for text in scene.captions + [q.question for q in scene.questions]:
            assert held_out_mentions(text) == [], text
    # ... while the held-out splits show them, and the check reads them:
    assert held_out_mentions("a large red circle on the left") == ["red circle"]
    assert held_out_mentions("a small box in the top left") == ["square top left"]
    comp = shapes.make_scenes(shapes.ShapesConfig(split="compositional", size=40, max_objects=1))
    lay = shapes.make_scenes(shapes.ShapesConfig(split="layout", size=40, max_objects=1))
    assert all((s.primary.color, s.primary.shape) in compositional for s in comp)
    assert all((s.primary.shape, s.primary.cell) in layout and (s.primary.color, s.primary.shape) not in compositional
               for s in lay)
    assert {(s.primary.shape, s.primary.cell) for s in lay} == layout  # every held-out place is tested


def test_training_questions_never_name_a_held_out_pair():
    """VQA's existence questions ask about absent pairs too; never a compositional one."""
    config = shapes.ShapesConfig(split="train", size=3000)
    questions = [q.question for s in shapes.make_scenes(config) for q in s.questions]
    assert any(q.startswith("is there a") for q in questions)
    assert [q for q in questions if held_out_mentions(q)] == []
    assert dataclasses.replace(config, split="test") != config


def test_generation_prompts_never_occur_in_the_generators_training_captions(training_scenes):
    """The generator learns from the data's captions; its validation, test and compositional prompts are worded
    with held-out templates (and validation and test share none)."""
    from vlpt.tasks.generate import SHAPES_PROMPT_TEMPLATES, digits_prompts, shapes_prompts

    captions = [c for s in training_scenes for c in s.captions]
    config = load_config("generate-shapes")
    gen, d = config.generate, config.data
    prompts = {}
    for name, split, size in (("val", "val", gen.val_size), ("test", "test", gen.eval_size),
                              ("compositional", "compositional", gen.compositional_size)):
        scenes = shapes.make_scenes(shapes.ShapesConfig(split=split, size=size, max_objects=1, seed=d.seed))
        prompts[name] = shapes_prompts(scenes, "val" if name == "val" else "test")
    assert all(leaks(p, captions) == [] for p in prompts.values())
    assert not set(prompts["val"]) & set(prompts["test"] + prompts["compositional"])
    assert d.caption_openers  # position captions come in several training frames, never an evaluation one
    openings = [t.format("").strip() for ts in SHAPES_PROMPT_TEMPLATES.values() for t in ts]
    assert [c for c in captions if c.startswith(tuple(openings))] == []
    train = digits.DigitsDataset(digits.DigitsConfig(split="train", image_size=8))
    digit_captions = [c for caps in train.captions for c in caps]
    digit_prompts = {split: digits_prompts([i % 10 for i in range(20)], split) for split in ("val", "test")}
    assert all(leaks(p, digit_captions) == [] for p in digit_prompts.values())
    assert not set(digit_prompts["val"]) & set(digit_prompts["test"])
    # the old prompts ("a large red circle in the top left") were training captions word for word
    assert leaks(["a large red square in the center"], captions)
