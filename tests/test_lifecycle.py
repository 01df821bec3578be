"""The one run lifecycle (vlpt.train.run): resume semantics, the reported steps, options that do not apply,
an interrupted --overwrite run, loading any saved kind by vlpt.load, the same report and model card for
every task."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from tests.conftest import tiny_model_config, tiny_run_config
from vlpt import load
from vlpt.cli import main
from vlpt.config import CaptionerConfig, GeneratorConfig, load_config, save_config
from vlpt.factory import create_model
from vlpt.io import ModelLoadError
from vlpt.models.captioner import Captioner
from vlpt.models.dual_encoder import DualEncoder
from vlpt.models.fusion import FusionConfig
from vlpt.models.generator import TextToImageGenerator
from vlpt.models.task_model import TaskModel, TaskModelConfig
from vlpt.train.run import aside_dir, fit, run


def log_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in log_rows(run_dir) if "loss" in r}


@pytest.fixture()
def runs(tmp_path):
    save_config(tiny_run_config(steps=4, **{"train.checkpoint_every": 2}), tmp_path / "tiny.yaml")
    assert main(["train", "--config", str(tmp_path / "tiny.yaml"), "--name", "r", "--runs-dir", str(tmp_path)]) == 0
    return tmp_path


def test_resume_extends_a_finished_run_and_records_the_change(runs):
    before = losses(runs / "r")
    assert main(["train", "--name", "r", "--runs-dir", str(runs), "--resume", "--set", "train.steps=6"]) == 0
    after = losses(runs / "r")
    assert sorted(after) == [1, 2, 3, 4, 5, 6] and all(after[s] == before[s] for s in before)
    changed = [r for r in log_rows(runs / "r") if "resumed_with" in r]
    assert changed == [{"step": 4, "resumed_with": {"train.steps": [4, 6]}}]
    assert load_config(runs / "r" / "config.yaml").train.steps == 6
    assert json.loads((runs / "r" / "metrics.json").read_text())["steps"] == 6


def test_resume_refuses_changes_that_cannot_apply_mid_run(runs, capsys):
    metrics = (runs / "r" / "metrics.json").read_text()
    argv = ["train", "--name", "r", "--runs-dir", str(runs), "--resume"]
    assert main(argv + ["--set", "train.lr=0.1", "--set", "model.embed_dim=64", "--set", "train.steps=9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.embed_dim (32 -> 64)" in err and "train.lr (0.003 -> 0.1)" in err
    assert "train.steps" not in err.split("Resumable keys")[0]  # a resumable change is not what is refused
    other = tiny_run_config(steps=4, **{"train.checkpoint_every": 2, "train.batch_size": 16})
    save_config(other, runs / "other.yaml")
    assert main(argv + ["--config", str(runs / "other.yaml")]) == 2
    assert "train.batch_size (32 -> 16)" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 2
    assert "choose one" in capsys.readouterr().err
    assert (runs / "r" / "metrics.json").read_text() == metrics  # nothing was touched
    assert main(argv + ["--config", str(runs / "r" / "config.yaml")]) == 0  # the run's own config is fine


def test_reported_steps_are_the_steps_trained(tmp_path):
    metrics = run(tiny_run_config(steps=50, **{"train.max_seconds": 1e-9}), tmp_path / "r")
    trained = max(r["step"] for r in log_rows(tmp_path / "r"))
    assert trained < 50 and metrics["steps"] == trained


def test_options_that_do_not_apply_are_named(tmp_path, caplog):
    config = tiny_run_config(steps=1, **{"data.dataset": "digits", "data.twins": True, "caption.beam": 5,
                                         "train.checkpoint_every": 0, "train.eval_every": 1})
    with caplog.at_level(logging.WARNING):
        fit(config, tmp_path / "r")
    text = caplog.text
    assert "data.twins=True does not apply to data.dataset=digits" in text
    assert "caption.beam=5 does not apply to train.task=contrastive" in text
    assert "train.eval_every=1: the contrastive task has no periodic check on data.dataset=digits" in text


def test_train_with_the_finetune_config_fine_tunes(tmp_path):
    overrides = ["--set", "train.steps=2", "--set", "train.batch_size=16", "--set", "finetune.train_size=32",
                 "--set", "finetune.test_size=16", "--set", "model.image.image_size=32", "--set", "data.image_size=32",
                 "--set", "model.text.hidden_size=32", "--set", "model.text.num_layers=1"]
    assert main(["train", "--config", "finetune", "--name", "ft", "--runs-dir", str(tmp_path), *overrides]) == 0
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert "classify_top1" in metrics and metrics["steps"] == 2
    assert isinstance(load(tmp_path / "ft"), TaskModel)


def test_an_interrupted_overwrite_run_resumes_aside_and_replaces_the_old_run(runs):
    config = tiny_run_config(steps=4, **{"train.checkpoint_every": 2, "train.lr": 0.004})
    fit(config, aside_dir(runs / "r"), stop_after=2)  # the state a preempted `--overwrite` run leaves
    old = (runs / "r" / "metrics.json").read_text()
    save_config(config, runs / "new.yaml")
    assert main(["train", "--name", "r", "--runs-dir", str(runs), "--resume"]) == 0
    assert not aside_dir(runs / "r").exists() and (runs / "r" / "metrics.json").read_text() != old
    assert load_config(runs / "r" / "config.yaml").train.lr == 0.004
    straight = tiny_run_config(steps=4, **{"train.checkpoint_every": 2, "train.lr": 0.004})
    fit(straight, runs / "straight")
    assert losses(runs / "r") == pytest.approx(losses(runs / "straight"), rel=1e-6)


def test_every_task_reports_the_same_way_with_a_model_card(runs):
    report = (runs / "r" / "report.md").read_text()
    assert "- task: contrastive" in report and "## Metrics" in report and "## Training loss" in report
    metrics = json.loads((runs / "r" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["train_seconds"] > 0
    card = (runs / "r" / "model" / "README.md").read_text()
    assert "vlpt contrastive model" in card and "zeroshot_top1" in card and 'vlpt.load("model")' in card


def test_load_returns_the_saved_kind(tmp_path):
    dual = create_model(tiny_model_config(), corpus=["a red circle", "a blue square", "what color is it?"])
    kinds = {
        "dual": dual,
        "captioner": Captioner(CaptionerConfig(width=32, layers=1, heads=2), dual),
        "task": TaskModel(TaskModelConfig(task="vqa", fusion=FusionConfig(method="gated"), outputs=["yes", "no"]), dual),
        "generator": TextToImageGenerator(GeneratorConfig(block_channels=(16, 32), attention_levels=(False, True),
                                                          norm_groups=8, cross_attention_dim=32, heads=2), dual),
    }
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    for name, model in kinds.items():
        model.save_pretrained(tmp_path / name)
        loaded = load(tmp_path / name)
        assert type(loaded) is type(model), name
        encoder = loaded if isinstance(loaded, DualEncoder) else getattr(loaded, "dual_encoder", None) or loaded.encoder
        torch.testing.assert_close(encoder.encode_image(images), dual.eval().encode_image(images))
    (tmp_path / "dual" / "config.json").write_text(json.dumps({"model_type": "vlpt-segmenter"}))
    with pytest.raises(ModelLoadError, match="unknown kind of model .*'vlpt-segmenter'"):
        load(tmp_path / "dual")
    with pytest.raises(FileNotFoundError, match="no vlpt model"):
        load(tmp_path / "nothing")


def test_tensorboard_gets_the_logged_rows_and_a_log_file_gets_lines_not_redraws(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_run_config(steps=3, **{"train.report_to": "[jsonl, tensorboard]", "train.checkpoint_every": 0})
    with caplog.at_level(logging.INFO, logger="vlpt.train.trainer"):
        fit(config, tmp_path / "r")  # pytest's stderr is not a terminal: no progress bar
    events = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    events.Reload()
    scalars = {e.step: e.value for e in events.Scalars("loss")}
    assert scalars == pytest.approx(losses(tmp_path / "r"), rel=1e-6)  # float32 in the event file
    assert "grad_norm" in events.Tags()["scalars"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
