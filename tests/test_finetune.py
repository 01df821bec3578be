"""Fine-tuning with fusion and task heads: data for the tasks, hard-negative mining, the CLI path
pre-train -> finetune -> ask / match, save/load, learning on a tiny task, and bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import tiny_model_config, tiny_run_config
from vlpt.cli import main
from vlpt.config import apply_overrides, save_config
from vlpt.data import shapes
from vlpt.data.finetune import (
    MatchBatches,
    QuestionBatches,
    signature_ids,
    swapped_captions,
)
from vlpt.evaluate.matching import matching_accuracy
from vlpt.evaluate.vqa import vqa_accuracy
from vlpt.factory import create_model, load_model, load_task_model
from vlpt.models.fusion import FusionConfig
from vlpt.models.task_model import TaskModel, TaskModelConfig
from vlpt.tasks.finetune import mine_hard_negatives
from vlpt.train.run import evaluate_run as evaluate_finetune_run
from vlpt.train.run import fit as fit_finetune

CORPUS = [f"a {c} {s}" for c in shapes.COLOR_NAMES for s in shapes.SHAPES] + ["what color is the star?"]


def _scenes(n: int, split: str = "test") -> list[shapes.Scene]:
    return [shapes.sample_scene(0, split, i) for i in range(n)]


def test_swapped_captions_are_false_and_keep_the_layout():
    rng = np.random.default_rng(0)
    for scene in _scenes(200):
        swapped = shapes.swap_attributes(scene, rng, num_captions=2)
        assert shapes.pair_signature(swapped) != shapes.pair_signature(scene)  # the captions are false
        assert [o.cell for o in swapped.objects] == [o.cell for o in scene.objects]
        assert [o.size for o in swapped.objects] == [o.size for o in scene.objects]
        assert len(swapped.captions) == 2
        held_out = set(shapes.COMPOSITIONAL_PAIRS)
        assert not any((o.color, o.shape) in held_out for o in swapped.objects)


def test_color_swaps_between_objects_happen():
    """Binding swaps ("a blue circle and a red square" for a red circle and a blue square) keep the
    bag of words; they are the negatives that only real image-text interaction can reject."""
    rng = np.random.default_rng(1)
    bindings = 0
    for scene in _scenes(200):
        swapped = shapes.swap_attributes(scene, rng)
        same_words = sorted(o.color for o in swapped.objects) == sorted(o.color for o in scene.objects) and \
            sorted(o.shape for o in swapped.objects) == sorted(o.shape for o in scene.objects)
        bindings += same_words
    assert bindings > 15  # about 15% of scenes (30 of 200 expected, sd 5; 0.149 measured over 3,000)


def test_hard_negatives_skip_captions_that_are_secretly_true():
    image = torch.eye(4)
    text = torch.eye(4)
    text[1] = image[0]  # caption 1 is the best match for image 0, but scene 1 has image 0's signature
    text[2] = 0.9 * image[0] + 0.1 * image[2]
    signatures = torch.tensor([5, 5, 6, 7])
    hard_text, hard_image, valid = mine_hard_negatives(image, text, signatures)
    assert hard_text[0] == 2  # not 0 (itself) nor 1 (same signature)
    assert bool(valid.all())
    _, _, valid = mine_hard_negatives(image, text, torch.tensor([1, 1, 1, 1]))
    assert not bool(valid.any())


def test_task_batches_are_deterministic_and_aligned():
    data = shapes.ShapesDataset(shapes.ShapesConfig(split="train", size=40, image_size=32))
    tokenizer = create_model(tiny_model_config(), corpus=CORPUS + [c for s in data.scenes for c in s.captions]).tokenizer
    qa = QuestionBatches(data.images, data.scenes, tokenizer, 16, seed=3)
    a, b = qa.batch(5), qa.batch(5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["images"].shape == (16, 32, 32, 3) and a["input_ids"].shape[0] == 16
    assert set(a["labels"].tolist()) <= set(range(len(shapes.ANSWERS)))
    match = MatchBatches(data.images, data.scenes, tokenizer, 8, seed=3)
    m = match.batch(0)
    assert m["input_ids"].shape == m["false_input_ids"].shape  # one padding length for both
    assert m["signatures"].shape == (8,)
    swaps = swapped_captions(data.scenes[:3], seed=0, per_scene=2)
    assert len(swaps) == 3 and all(len(s) == 2 for s in swaps)
    assert signature_ids(data.scenes).shape == (40,)


def test_vqa_and_matching_metrics():
    metrics = vqa_accuracy(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4]), np.array([0, 0, 1, 2]),
                           ("color", "shape", "count", "existence"))
    assert metrics["vqa_overall"] == 0.75 and metrics["vqa_color"] == 1.0 and metrics["vqa_shape"] == 0.0
    assert np.isnan(metrics["vqa_existence"])  # no question of that type: no made-up figure
    assert matching_accuracy([0.9, 0.4], [0.1, 0.6]) == 0.5
    assert matching_accuracy([1.0, 1.0], [1.0, 1.0]) == 0.5  # "always yes" is chance
    with pytest.raises(ValueError, match="balanced"):
        matching_accuracy([0.9], [0.1, 0.2])


@pytest.mark.parametrize("task", ["classify", "match", "vqa"])
def test_save_load_gives_identical_predictions(tmp_path, task):
    encoder = create_model(tiny_model_config(), corpus=CORPUS)
    outputs = {"classify": ["a", "b", "c"], "match": [], "vqa": list(shapes.ANSWERS)}[task]
    model = TaskModel(TaskModelConfig(task=task, fusion=FusionConfig(method="cross"), outputs=outputs), encoder)
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    texts = ["what color is the star?", "a red circle"]
    before = model.predict(images, texts)
    model.save_pretrained(tmp_path / "m")
    after = load_task_model(tmp_path / "m").predict(images, texts)
    assert torch.equal(before, after)


def test_unknown_task_or_fusion_lists_the_choices():
    encoder = create_model(tiny_model_config(), corpus=CORPUS)
    with pytest.raises(ValueError, match="classify, match, vqa"):
        TaskModel(TaskModelConfig(task="caption", outputs=["a", "b"]), encoder)
    with pytest.raises(ValueError, match="concat, sum, gated, cross"):
        TaskModel(TaskModelConfig(task="vqa", fusion=FusionConfig(method="film"), outputs=["a", "b"]), encoder)


def test_classification_fine_tune_learns_real_digits(tmp_path):
    """A tiny model fine-tuned from scratch on sklearn's real digits: well above 10% chance."""
    config = tiny_run_config(steps=60)
    config = apply_overrides(config, ["data.dataset=digits", "data.augment=false", "finetune.task=classify",
                                      "train.lr=0.003", "train.batch_size=64", "train.checkpoint_every=0"])
    model, _ = fit_finetune(config, tmp_path / "run")
    metrics = evaluate_finetune_run(tmp_path / "run", model)
    assert metrics["classify_top1"] > 0.6, metrics


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    save_config(tiny_run_config(steps=3), root / "tiny.yaml")
    assert main(["train", "--config", str(root / "tiny.yaml"), "--name", "pre", "--runs-dir", str(root / "runs")]) == 0
    tiny_ft = apply_overrides(tiny_run_config(steps=4), ["finetune.train_size=64", "finetune.test_size=32",
                                                         "train.batch_size=16", "train.checkpoint_every=2"])
    save_config(tiny_ft, root / "ft.yaml")
    assert main(["finetune", "--task", "vqa", "--from", str(root / "runs" / "pre"), "--config", str(root / "ft.yaml"),
                 "--runs-dir", str(root / "runs"), "--name", "vqa"]) == 0
    image = root / "scene.png"
    Image.fromarray(shapes.ShapesDataset(shapes.ShapesConfig(split="test", size=1, image_size=32)).images[0]).save(image)
    return root


@pytest.mark.parametrize("task,fusion", [("vqa", "cross"), ("match", "gated"), ("classify", None)])
def test_cli_finetune_from_a_pretrained_run(pretrained, task, fusion, capsys):
    root = pretrained
    argv = ["finetune", "--task", task, "--from", str(root / "runs" / "pre"), "--config", str(root / "ft.yaml"),
            "--runs-dir", str(root / "runs"), "--name", f"ft-{task}"]
    argv += ["--fusion", fusion] if fusion else ["--freeze-towers"]
    assert main(argv) == 0
    run_dir = root / "runs" / f"ft-{task}"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    key = {"vqa": "vqa_overall", "match": "match_accuracy_swapped", "classify": "classify_top1"}[task]
    assert 0.0 <= metrics[key] <= 1.0 and metrics["steps"] == 4
    assert (run_dir / "report.md").exists() and (run_dir / "checkpoints").exists()
    assert main(["eval", str(run_dir)]) == 0
    assert json.loads((run_dir / "metrics.json").read_text())[key] == pytest.approx(metrics[key])
    capsys.readouterr()
    if task == "vqa":
        # "zebra" and "crimson" never occur in training text: the subword tokenizer still reads them.
        assert main(["ask", str(root / "scene.png"), "is there a crimson zebra?", "--model", str(run_dir)]) == 0
        answer = capsys.readouterr().out.split()[0]
        assert answer in shapes.ANSWERS
    if task == "match":
        assert main(["match", str(root / "scene.png"), "a red circle above a blue square", "--model", str(run_dir)]) == 0
        assert "(p=" in capsys.readouterr().out
    if task == "classify":
        frozen = load_task_model(run_dir)  # --freeze-towers: the encoder must come out unchanged
        original = load_model(root / "runs" / "pre")
        for (name, p), q in zip(original.state_dict().items(), frozen.encoder.state_dict().values()):
            assert torch.equal(p, q), name


def test_finetune_bad_input(pretrained, capsys):
    root = pretrained
    corrupt = root / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG broken")
    model_args = ["--model", str(root / "runs" / "vqa")]
    cases = [
        (["finetune", "--task", "vqa", "--from", str(root / "nope")], "nope"),
        (["ask", str(corrupt), "what color is the star?", *model_args], "corrupt.png"),
        (["ask", str(root / "missing.png"), "what?", *model_args], "missing.png"),
        (["match", str(root / "scene.png"), "a red circle", *model_args], "task=match"),
        (["finetune", "--task", "vqa", "--from", str(root / "runs" / "pre"), "--config", str(root / "ft.yaml"),
          "--set", "data.dataset=digits", "--runs-dir", str(root / "runs"), "--name", "x"], "shapes world"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        assert needle in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):  # argparse lists the choices
        main(["finetune", "--task", "segment"])
    err = capsys.readouterr().err
    assert "invalid choice" in err and all(name in err for name in ("classify", "match", "vqa"))


def test_zero_shot_head_init_predicts_like_zero_shot(pretrained):
    """A linear head started from the class-prompt embeddings predicts exactly what zero-shot does."""
    from vlpt.evaluate.scoring import embed_images
    from vlpt.evaluate.suite import shapes_classifier
    from vlpt.evaluate.zero_shot import zero_shot_logits
    from vlpt.tasks.finetune import build_task_model, load_task_data

    config = apply_overrides(tiny_run_config(), ["finetune.task=classify", "finetune.train_size=32",
                                                 "finetune.test_size=64"])
    config.finetune.from_run = str(pretrained / "runs" / "pre")
    data = load_task_data(config)
    model = build_task_model(config, data).eval()
    with torch.inference_mode():
        head = model(torch.from_numpy(data.test.images)).argmax(1)
    zero_shot = zero_shot_logits(embed_images(model.encoder, data.test.images), shapes_classifier(model.encoder))
    assert torch.equal(head, zero_shot.argmax(1))
    config.finetune.init_head = "random"
    assert not torch.equal(build_task_model(config, data).head.net.weight, model.head.net.weight)
