"""Captioning: decoding strategies on toy language models with known answers, the COCO metrics against
hand-computed values, the shapes-world attribute parser, a tiny captioner that overfits four images,
save/load, bad input, and a caption/coca run end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import assert_close_to_scale, tiny_model_config, tiny_run_config
from vlpt.cli import cmd_caption
from vlpt.config import CaptionerConfig
from vlpt.data.shapes import Scene, ShapeObject, ShapesConfig, ShapesDataset
from vlpt.evaluate.captioning import (
    attribute_accuracy,
    caption_scores,
    digit_caption_accuracy,
    parse_shapes_caption,
    simple_tokenize,
)
from vlpt.factory import create_model
from vlpt.io import ImageLoadError
from vlpt.models.captioner import Captioner, load_captioner
from vlpt.models.decoding import DecodingConfig, beam_search, greedy_search, sample
from vlpt.tasks import get_task
from vlpt.tasks.caption import CaptionTask, CocaTask
from vlpt.train.run import run as run_caption
from vlpt.train.trainer import Trainer

BOS, EOS, PAD = 2, 3, 0  # the WordPiece tokenizer's [CLS], [SEP], [PAD] ids


# ----------------------------------------------------------------------------- toy language models

def markov_lm(vocab: int = 12, seed: int = 0, scale: float = 3.0, calls: list | None = None):
    """next-token logits depend on the last token and on the image (row): a random bigram model."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(vocab, vocab, generator=g) * scale  # (V, V)
    per_image = torch.randn(64, vocab, generator=g) * scale  # (rows, V)

    def logits_fn(ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(len(rows))
        logits = table[ids[:, -1]] + per_image[rows]  # (R, V)
        logits[:, EOS] += ids.shape[1] - 6.0  # ever more likely to stop: captions end at different lengths
        return logits
    return logits_fn


def stop_after_lm(lengths: list[int], vocab: int = 10):
    """Image r emits token 5 until it has generated lengths[r] tokens, then [SEP] (all near-certain)."""
    def logits_fn(ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        logits = torch.full((len(rows), vocab), -20.0)
        generated = ids.shape[1] - 1
        for i, r in enumerate(rows.tolist()):
            logits[i, EOS if generated >= lengths[r] else 5] = 20.0
        return logits
    return logits_fn


def args(batch_size: int, max_length: int = 12) -> dict:
    return {"batch_size": batch_size, "bos": BOS, "eos": EOS, "pad": PAD, "max_length": max_length}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_beam_one_equals_greedy(seed, length_penalty):
    lm = markov_lm(seed=seed)
    greedy = greedy_search(lm, **args(16))
    beam = beam_search(lm, beam=1, length_penalty=length_penalty, **args(16))
    assert torch.equal(beam, greedy)
    assert (greedy == EOS).any()  # the toy model does stop sometimes, so finishing is exercised too


def test_decoding_stops_at_end_of_sequence_and_pads_after():
    lengths = [0, 2, 5]
    calls: list[int] = []
    lm = stop_after_lm(lengths)

    def counted(ids, rows):
        calls.append(len(rows))
        return lm(ids, rows)

    expected = torch.tensor([[EOS, PAD, PAD, PAD, PAD, PAD],
                             [5, 5, EOS, PAD, PAD, PAD],
                             [5, 5, 5, 5, 5, EOS]])
    assert torch.equal(greedy_search(counted, **args(3)), expected)  # stops once all have ended, not at 12
    assert calls == [3, 2, 2, 1, 1, 1]  # finished captions are not run through the model again
    assert torch.equal(beam_search(lm, beam=3, **args(3)), expected)
    assert torch.equal(sample(lm, generator=torch.Generator().manual_seed(0), **args(3)), expected)
    capped = greedy_search(lm, **args(3, max_length=3))
    assert capped.shape == (3, 3) and capped[2].tolist() == [5, 5, 5]  # max_length cuts the long one


def test_beam_search_finds_the_caption_greedy_misses():
    # From [CLS]: token 5 (p=.55) or 6 (p=.45). After 5 every continuation is unlikely; after 6, [SEP] is sure.
    def lm(ids, rows):
        last = ids[:, -1]
        probs = torch.full((len(rows), 10), 1e-6)
        probs[last == BOS, 5], probs[last == BOS, 6] = 0.55, 0.45
        probs[last == 5] = 0.1
        probs[last == 6, EOS] = 1.0
        return probs.log()
    assert greedy_search(lm, **args(1, 4))[0, 0] == 5
    assert beam_search(lm, beam=2, length_penalty=0.0, **args(1, 4)).tolist() == [[6, EOS]]


def test_sampling_is_deterministic_given_a_seed():
    lm = markov_lm(scale=1.0)

    def draw(seed: int, **options) -> torch.Tensor:
        return sample(lm, generator=torch.Generator().manual_seed(seed), **options, **args(32))
    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))
    assert torch.equal(draw(3, top_k=1), greedy_search(lm, **args(32)))  # top-1 sampling is greedy
    assert torch.equal(draw(3, top_p=1e-6), greedy_search(lm, **args(32)))  # so is a vanishing nucleus


@pytest.mark.parametrize("options, message", [
    ({"strategy": "beam", "beam": 0}, "beam width must be an integer >= 1"),
    ({"beam": -2}, "beam width must be an integer >= 1"),
    ({"max_length": 0}, "max_length must be an integer >= 1"),
    ({"strategy": "nucleus"}, "unknown decoding strategy 'nucleus'"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"top_p": 0.0}, "top_p must be in"),
])
def test_bad_decoding_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        DecodingConfig(**options)


# ----------------------------------------------------------------------------- metrics

def test_bleu_and_cider_match_the_library_formulas():
    # Identical candidate and references: BLEU-4 = 1. CIDEr-D of a perfect caption is 10 (mean cosine 1
    # over n = 1..4, times 10) when the images' n-grams are distinct, so every IDF is log(2).
    same = caption_scores(["a red circle on the left", "two blue boxes are here"],
                          [["a red circle on the left"], ["two blue boxes are here"]])
    assert same["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert same["cider"] == pytest.approx(10.0, abs=1e-9)
    # One word changed out of six, same length (brevity penalty 1): precisions 5/6, 4/5, 3/4, 2/3.
    one_off = caption_scores(["a red circle on the left"], [["a red circle on the right"]])
    assert one_off["bleu4"] == pytest.approx((5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25, rel=1e-6)
    assert one_off["bleu1"] == pytest.approx(5 / 6, rel=1e-6)
    # Half the reference length: brevity penalty exp(1 - 6/3); BLEU-2 = BP * sqrt(1 * 1).
    short = caption_scores(["a red circle"], [["a red circle on the right"]])
    assert short["bleu2"] == pytest.approx(math.exp(1 - 6 / 3), rel=1e-6)
    # The brevity penalty uses the reference closest in length (3 words here: no penalty), and n-gram
    # counts are clipped by their maximum count in any one reference ("a" is in the first).
    closest = caption_scores(["a red circle"], [["a red circle on the right", "the red circle"]])
    assert closest["bleu1"] == pytest.approx(1.0, rel=1e-6)
    # CIDEr-D's IDF comes from the scored set: over one image every IDF is log(1/1) = 0.
    assert one_off["cider"] == 0.0


def test_simple_tokenizer_drops_case_and_punctuation():
    assert simple_tokenize("Three shapes: a Big red-disk, and a cross.") == "three shapes a big red disk and a cross"
    assert caption_scores(["A RED circle, on the LEFT!"], [["a red circle on the left"]])["bleu4"] == pytest.approx(1.0)


def _scene(*objects: tuple[str, str]) -> Scene:
    return Scene([ShapeObject(shape, color, "small", cell, 0.0, 0.0, 0.0) for cell, (color, shape) in
                  enumerate(objects)], background=(0, 0, 0))


def test_attribute_parser_on_hand_made_captions():
    parse = parse_shapes_caption
    truth = [("red", "circle"), ("green", "cross"), ("blue", "square")]
    assert parse("a big red disk above a small green plus sign and a blue box in the center").matches(truth)
    assert parse("three shapes: a blue square, a red circle and a green cross").matches(truth)  # any order
    assert not parse("a red circle and a green cross").matches(truth)  # a missing object
    assert not parse("a red circle, a green cross, a blue square and a white star").matches(truth)  # an extra one
    assert not parse("a red circle, a green cross and a blue circle").matches(truth)  # a wrong shape
    assert not parse("a red circle, a green cross and a blue").matches(truth)  # a color without a shape
    assert not parse("a red circle, a cross and a blue square").matches(truth)  # a shape without a color
    assert parse("a red circle and a red disk").objects == {("red", "circle"): 2}  # duplicates count
    assert not parse("a red circle").matches([("red", "circle"), ("red", "circle")])
    assert parse("a little cyan hexagon in the bottom right").matches([("cyan", "hexagon")])


def test_attribute_accuracy_splits_by_object_count():
    scenes = [_scene(("red", "circle")), _scene(("blue", "star")), _scene(("red", "circle"), ("white", "cross")),
              _scene(("red", "circle"), ("white", "cross"), ("yellow", "triangle"))]
    captions = ["a red disk", "a blue square", "a white plus sign to the right of a red circle",
                "a red circle, a white cross and a yellow star"]
    metrics = attribute_accuracy(captions, scenes)
    assert metrics["attr_acc_1obj"] == 0.5
    assert metrics["attr_acc_2obj"] == 1.0
    assert metrics["attr_acc_3obj"] == 0.0
    assert metrics["attr_acc"] == 0.5
    assert metrics["attr_recall"] == pytest.approx(5 / 7)  # 5 of the 7 objects named right
    assert metrics["attr_precision"] == pytest.approx(5 / 7)


def test_digit_caption_accuracy():
    captions = ["the number 7", "a handwritten digit seven", "a hand-written 1 or seven", "a handwritten digit",
                "someone wrote the number three"]
    assert digit_caption_accuracy(captions, [7, 7, 7, 7, 8]) == pytest.approx(2 / 5)


# ----------------------------------------------------------------------------- the model

def tiny_captioner(corpus: list[str], seed: int = 0, width: int = 64, layers: int = 2) -> Captioner:
    dual = create_model(tiny_model_config(), corpus=corpus, seed=seed)
    torch.manual_seed(seed)
    return Captioner(CaptionerConfig(width=width, layers=layers, heads=4), dual)


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """A tiny captioner trained (with the real Trainer and CaptionTask) on four scenes, one caption each."""
    torch.set_num_threads(2)
    data = ShapesDataset(ShapesConfig(split="train", size=4, image_size=32, seed=3))
    targets = [caps[0] for caps in data.captions]
    model = tiny_captioner([c for caps in data.captions for c in caps])
    tokens = model.tokenizer(targets)
    batch = {"images": torch.from_numpy(data.images), **tokens}

    class Repeat:
        def batch(self, step: int) -> dict[str, torch.Tensor]:
            return batch

    from vlpt.config import TrainConfig

    config = TrainConfig(steps=60, batch_size=4, lr=5e-3, warmup_steps=10, weight_decay=0.0, log_every=50,
                         checkpoint_every=0, device="cpu")
    Trainer(CaptionTask(model), Repeat(), config, tmp_path_factory.mktemp("overfit")).fit()
    return model, data, targets


def test_a_tiny_captioner_overfits_four_images(overfit):
    model, data, targets = overfit
    assert model.generate_caption(data.images) == targets
    assert model.generate_caption(data.images, strategy="beam", beam=3) == targets


def test_save_and_load_give_identical_captions(overfit, tmp_path):
    model, data, _ = overfit
    model.save_pretrained(tmp_path / "captioner")
    loaded = load_captioner(tmp_path / "captioner")
    for options in ({"strategy": "greedy"}, {"strategy": "beam", "beam": 2},
                    {"strategy": "sample", "top_p": 0.9, "temperature": 1.5, "seed": 4}):
        assert loaded.generate_caption(data.images, **options) == model.generate_caption(data.images, **options)
    images = torch.from_numpy(data.images)
    assert_close_to_scale(loaded.dual_encoder.encode_image(images), model.dual_encoder.encode_image(images))


def test_generate_caption_from_files_and_bad_input(overfit, tmp_path):
    model, data, targets = overfit
    from PIL import Image

    paths = []
    for i, image in enumerate(data.images[:2]):
        paths.append(tmp_path / f"scene{i}.png")
        Image.fromarray(image).save(paths[-1])
    assert model.generate_caption(paths) == targets[:2]  # PNG round trip + the tower's transform
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(ImageLoadError, match="broken.png"):
        model.generate_caption([paths[0], broken])
    with pytest.raises(ValueError, match="beam width must be an integer >= 1"):
        model.generate_caption(data.images, strategy="beam", beam=0)
    with pytest.raises(ValueError, match="max_length must be between 1 and 32"):
        model.generate_caption(data.images, max_length=99)
    with pytest.raises(ValueError, match="unknown decoding option"):
        model.generate_caption(data.images, beam_width=2)
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ImageLoadError, match="missing.png"):
        cmd_caption([paths[0], tmp_path / "missing.png"], tmp_path / "m")
    with pytest.raises(ValueError, match="beam width"):
        cmd_caption([paths[0]], tmp_path / "does-not-matter", beam=0)  # rejected before anything is loaded
    assert cmd_caption(paths, tmp_path / "m", beam=3)[1]["caption"] == targets[1]


def test_frozen_and_coca_gradients():
    corpus = ["a red circle", "a blue square and a green star", "two shapes: a small cyan box"]
    model = tiny_captioner(corpus)
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    batch = {"images": images, **model.tokenizer(corpus)}
    out = CocaTask(model, contrastive_weight=1.0, caption_weight=2.0).training_step(batch)
    assert out["loss"].item() == pytest.approx(out["contrastive_loss"].item() + 2 * out["caption_loss"].item(),
                                               rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.dual_encoder.image_tower.parameters())
    assert all(p.grad is not None for p in model.dual_encoder.text_tower.parameters())
    model.zero_grad(set_to_none=True)
    model.dual_encoder.lock_towers(image=True, text=True)
    model.train()
    assert model.frozen and not model.dual_encoder.image_tower.training  # BatchNorm statistics stay put
    CaptionTask(model).training_step(batch)["loss"].backward()
    assert all(p.grad is None for p in model.dual_encoder.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())


# ----------------------------------------------------------------------------- runs

def test_coca_run_then_a_decoder_on_the_frozen_dual_encoder(tmp_path):
    small = {"caption.model.width": 32, "caption.model.layers": 1, "caption.eval_size": 12,
             "caption.compositional_size": 6, "caption.grid_images": 4, "data.train_size": 64,
             "train.checkpoint_every": 0}
    metrics = run_caption(tiny_run_config(steps=3, **{"train.task": "coca", **small}), tmp_path / "coca")
    for key in ("bleu4_greedy", "bleu4_beam", "cider_greedy", "cider_beam", "attr_acc_1obj_beam",
                "attr_acc_3obj_greedy", "attr_acc_beam_compositional", "train_seconds"):
        assert key in metrics
    assert not any(k.startswith("clip_score") for k in metrics)  # no independent scorer: no CLIP-score
    assert json.loads((tmp_path / "coca" / "metrics.json").read_text())["bleu4_beam"] == metrics["bleu4_beam"]
    assert (tmp_path / "coca" / "captions.png").stat().st_size > 0
    assert "captions.png" in (tmp_path / "coca" / "report.md").read_text()

    frozen = tiny_run_config(steps=2, **{"train.task": "caption", "caption.from_run": str(tmp_path / "coca"),
                                         "caption.freeze_towers": True, "caption.scorer": str(tmp_path / "coca"),
                                         **small})
    scored = run_caption(frozen, tmp_path / "frozen")
    assert {"clip_score_beam", "clip_score_greedy", "clip_score_reference"} <= set(scored)
    before, after = load_captioner(tmp_path / "coca"), load_captioner(tmp_path / "frozen")
    for name, tensor in before.dual_encoder.state_dict().items():
        torch.testing.assert_close(after.dual_encoder.state_dict()[name], tensor, msg=name)
    assert not torch.equal(before.decoder.token_embed.weight, after.decoder.token_embed.weight)  # a new decoder
    with pytest.raises(ValueError, match="freeze_towers needs caption.from_run"):
        run_caption(tiny_run_config(**{"train.task": "caption", "caption.freeze_towers": True}), tmp_path / "x")


def test_task_dispatch_and_shipped_caption_configs():
    from vlpt.config import load_config

    assert get_task(load_config("caption-shapes").train.task).name == "coca"
    assert get_task(load_config("caption-digits").train.task).name in ("caption", "coca")
    assert get_task(load_config("tiny-shapes").train.task).name == "contrastive"
    with pytest.raises(ValueError, match="unknown train.task 'captions'; choose from contrastive, caption, coca"):
        get_task(load_config("tiny-shapes", ["train.task=captions"]).train.task)


def test_a_stopped_coca_run_resumes_exactly(tmp_path):
    from vlpt.train.run import fit as train_captioner

    config = tiny_run_config(steps=4, **{"train.task": "coca", "caption.model.width": 32, "caption.model.layers": 1,
                                         "data.train_size": 64, "train.checkpoint_every": 2})

    def losses(run_dir):
        rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    train_captioner(config, tmp_path / "full")
    train_captioner(config, tmp_path / "cut", stop_after=2)
    assert not (tmp_path / "cut" / "model").exists()
    train_captioner(config, tmp_path / "cut", resume=True)
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(cut) == [1, 2, 3, 4]
    for step in full:
        assert cut[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), step


def test_cli_train_caption_eval_and_caption_images(tmp_path, capsys):
    from PIL import Image

    from vlpt.cli import main
    from vlpt.config import save_config

    config = tiny_run_config(steps=2, **{"train.task": "caption", "caption.model.width": 32, "caption.model.layers": 1,
                                         "caption.eval_size": 8, "caption.grid_images": 4, "data.train_size": 64,
                                         "train.checkpoint_every": 0})
    save_config(config, tmp_path / "cap.yaml")
    runs = tmp_path / "runs"
    assert main(["train", "--config", str(tmp_path / "cap.yaml"), "--name", "cap", "--runs-dir", str(runs)]) == 0
    assert "bleu4_beam" in json.loads((runs / "cap" / "metrics.json").read_text())
    assert main(["eval", str(runs / "cap")]) == 0
    image = tmp_path / "scene.png"
    Image.fromarray(ShapesDataset(ShapesConfig(split="test", size=1, image_size=32)).images[0]).save(image)
    capsys.readouterr()
    assert main(["caption", str(image), "--model", str(runs / "cap"), "--beam", "2"]) == 0
    assert "scene.png" in capsys.readouterr().out
    assert main(["caption", str(image), "--model", str(runs / "cap"), "--beam", "0"]) == 2
    assert "beam width" in capsys.readouterr().err
