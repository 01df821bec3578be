import json

import numpy as np
import pytest
import torch

from tests.conftest import assert_close_to_scale, tiny_model_config, tiny_run_config
from vlpt.data.pairs import PairBatches, nonsense_words
from vlpt.factory import create_model, load_model
from vlpt.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
)
from vlpt.train.run import RunExistsError, fit, run
from vlpt.train.trainer import WeightAverage, warmup_cosine


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path):
    config = tiny_run_config(steps=6)
    fit(config, tmp_path / "full")
    # Interrupted run: stopped after step 4 (the last checkpoint is at step 3, so steps 4 is redone).
    fit(config, tmp_path / "cut", stop_after=4)
    assert latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step_0000004"
    (tmp_path / "cut" / "checkpoints" / "step_0000004" / "trainer_state.pt").unlink()  # torn write
    assert latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step_0000003"
    assert not (tmp_path / "cut" / "model").exists()
    fit(config, tmp_path / "cut", resume=True)
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(cut) == list(range(1, 7))
    for step in range(1, 7):
        assert cut[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), step
    a, b = load_model(tmp_path / "full"), load_model(tmp_path / "cut")
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    assert_close_to_scale(a.encode_image(images), b.encode_image(images))


def test_checkpoints_are_complete_and_pruned(tmp_path):
    config = tiny_run_config(steps=9, **{"train.keep_checkpoints": 2})
    fit(config, tmp_path)
    names = [p.name for p in list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step_0000006", "step_0000009"]
    (tmp_path / "checkpoints" / "step_0000012").mkdir()  # an interrupted save: no trainer state
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_0000009"
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no temp folders left behind


def test_training_learns_the_shapes_world(tmp_path):
    config = tiny_run_config(steps=150, **{"train.lr": 0.002, "train.batch_size": 64, "data.train_size": 2048,
                                           "train.warmup_steps": 10, "data.twins": False})
    metrics = run(config, tmp_path / "r")
    rows = losses(tmp_path / "r")
    first, last = np.mean([rows[s] for s in range(1, 6)]), np.mean([rows[s] for s in range(141, 151)])
    assert last < 0.6 * first
    assert metrics["zeroshot_color_top1"] > 0.5  # chance is 1/8
    assert metrics["zeroshot_top1"] > 0.1  # chance is 1/48
    assert metrics["retrieval_t2i_r10"] > 0.4  # chance is 10/64
    for key in ("zeroshot_top1", "zeroshot_shape_top1", "zeroshot_compositional_top1", "retrieval_i2t_r1",
                "retrieval_i2t_r5", "retrieval_i2t_r10", "retrieval_t2i_r1", "retrieval_t2i_r5",
                "linear_probe_top1", "train_seconds", "steps"):
        assert key in metrics
    report = (tmp_path / "r" / "report.md").read_text()
    for png in ("loss.png", "confusion.png", "retrieval.png"):
        assert (tmp_path / "r" / png).stat().st_size > 1000 and png in report


def test_a_new_run_never_overwrites_an_old_one(tmp_path):
    config = tiny_run_config(steps=2)
    run(config, tmp_path / "r")
    before = (tmp_path / "r" / "metrics.json").read_text()
    with pytest.raises(RunExistsError, match="--resume"):
        run(config, tmp_path / "r")
    bad = tiny_run_config(steps=2)
    bad.train.loss = "nope"  # set in code: load_config would refuse it before any run
    with pytest.raises(ValueError, match="infonce"):
        run(bad, tmp_path / "r", overwrite=True)  # fails before completing: old run untouched
    assert (tmp_path / "r" / "metrics.json").read_text() == before
    assert load_model(tmp_path / "r") is not None


def test_batches_are_a_pure_function_of_seed_and_step():
    images = np.random.default_rng(0).integers(0, 255, (40, 8, 8, 3), dtype=np.uint8)
    captions = [[f"caption {i} a", f"a much longer caption number {i} b"] for i in range(40)]
    model = create_model(tiny_run_config().model, corpus=[c for cs in captions for c in cs])
    a = PairBatches(images, captions, model.tokenizer, batch_size=8, seed=1)
    b = PairBatches(images, captions, model.tokenizer, batch_size=8, seed=1)
    for step in (0, 3, 7, 12):
        x, y = a.batch(step), b.batch(step)
        assert all(torch.equal(x[k], y[k]) for k in x)
        assert x["input_ids"].shape[1] == int(x["attention_mask"].sum(1).max())  # trimmed to the longest
    epoch = torch.cat([a.batch(s)["index"] for s in range(5)])
    assert sorted(epoch.tolist()) == list(range(40))  # every image once per epoch


def test_warmup_cosine_schedule():
    f = warmup_cosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)


def test_time_budget_stops_training_and_saves_the_model(tmp_path):
    """train.max_seconds: the run stops at the step reached when the budget is spent, logs why, and still
    writes its final model (a budget is an end, not a crash)."""
    config = tiny_run_config(steps=50, **{"train.max_seconds": 1e-9})
    fit(config, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["stopped"] == "max_seconds" and rows[-1]["step"] < 50
    assert (tmp_path / "model").exists()
    load_model(tmp_path)


def test_weight_average_follows_its_formula():
    trained, frozen = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    frozen.requires_grad_(False)
    average = WeightAverage(torch.nn.Sequential(trained, frozen), decay=0.9)
    assert set(average.average) == {"0.weight", "0.bias"}  # trainable parameters only
    expected = trained.weight.detach().clone()
    for step in range(5):
        with torch.no_grad():
            trained.weight.add_(1.0)  # stands in for an optimizer step
        average.update(step)
        decay = min(0.9, (1 + step) / (10 + step))  # warm-up, then the set decay
        expected = decay * expected + (1 - decay) * trained.weight.detach()
    assert_close_to_scale(average.average["0.weight"], expected)  # lerp_ rounds unlike the formula
    average.copy_to_model()
    torch.testing.assert_close(trained.weight.detach(), average.average["0.weight"], rtol=0, atol=0)
    for bad in (1.0, -0.5):
        with pytest.raises(ValueError, match="ema_decay"):
            WeightAverage(trained, bad)


def test_weight_average_is_the_final_model_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    config = tiny_run_config(steps=6, **{"train.ema_decay": 0.8})
    fit(config, tmp_path / "full")
    final_checkpoint = latest_checkpoint(tmp_path / "full" / "checkpoints")
    average = load_trainer_state(final_checkpoint)["weight_average"]
    trained = load_file(str(final_checkpoint / "model.safetensors"))  # the checkpoint keeps the raw weights
    final = load_model(tmp_path / "full").state_dict()
    for name, value in average.items():
        torch.testing.assert_close(final[name], value)  # the saved model is the average
    assert any(not torch.equal(trained[name], value) for name, value in average.items())
    # Interrupted after step 4 and resumed: the average continues exactly.
    fit(config, tmp_path / "cut", stop_after=4)
    fit(config, tmp_path / "cut", resume=True)
    resumed = load_model(tmp_path / "cut").state_dict()
    for name in average:
        assert_close_to_scale(resumed[name], final[name], rel=1e-6)


def test_caption_noise_inserts_nonsense_words_and_keeps_the_caption():
    """data.caption_noise: the picked caption comes with 1-3 random letter words inserted (the words the text
    tower must learn to let pass); its own words stay, in order; a pure function of (seed, step); rate 0 is the
    plain batch."""
    from vlpt.data.pairs import nonsense_words

    rng = np.random.default_rng(0)
    for text in ("a red circle", "two shapes: a big blue box and a small green star"):
        noisy = nonsense_words(text, rng).split()
        extra = len(noisy) - len(text.split())
        assert 1 <= extra <= 3
        it = iter(noisy)
        assert all(word in it for word in text.split())  # the caption's words, in order
    images = np.zeros((16, 8, 8, 3), np.uint8)
    captions = [[f"a red circle number {i}"] for i in range(16)]
    model = create_model(tiny_run_config().model, corpus=[c for cs in captions for c in cs])
    plain = PairBatches(images, captions, model.tokenizer, batch_size=8, seed=1)
    noisy = PairBatches(images, captions, model.tokenizer, batch_size=8, seed=1, caption_noise=1.0)
    again = PairBatches(images, captions, model.tokenizer, batch_size=8, seed=1, caption_noise=1.0)
    for step in range(3):
        a, b = noisy.batch(step), again.batch(step)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert torch.equal(a["index"], plain.batch(step)["index"])
        assert (a["attention_mask"].sum(1) > plain.batch(step)["attention_mask"].sum(1)).all()  # every one longer
    zero = PairBatches(images, captions, model.tokenizer, batch_size=8, seed=1, caption_noise=0.0)
    assert all(torch.equal(zero.batch(2)[k], plain.batch(2)[k]) for k in plain.batch(2))


def test_noisy_caption_twins_are_never_cut_short():
    """A nonsense word is spelled out in character pieces, so a long caption's noisy twin could pass the text
    context and lose its last words (the second object of a scene); such twins get one nonsense word, or none.
    Twins of short captions keep their 1-3."""
    short = [f"a red circle number {i}" for i in range(8)]
    long = [f"a small red circle in the top left and a large blue star in the bottom right {i}" for i in range(8)]
    captions = [[c] for c in short + long]
    model = create_model(tiny_model_config(context_length=24), corpus=short + long)
    tokenizer = model.tokenizer
    assert (tokenizer.lengths(long) <= 24).all() and (tokenizer.lengths(long) >= 20).all()  # fits, just
    batches = PairBatches(np.zeros((16, 8, 8, 3), np.uint8), captions, tokenizer, batch_size=8, seed=1,
                          caption_noise=1.0)
    twins = batches.lengths[16:]
    assert (twins <= 24).all()
    rng = np.random.default_rng([1, 31337])  # the twins' own stream: unfitted, most long twins would be cut
    assert np.mean(tokenizer.lengths([nonsense_words(c, rng) for c in short + long])[8:] > 24) > 0.5
    clean = tokenizer(short + long)["attention_mask"].sum(1)
    assert (twins[:8] > clean[:8]).all()  # short captions all got their nonsense words
