"""Adding a task is one TaskSpec and one register_task call, made here in the test file alone (no edit to
vlpt): the toy task counts the objects of a shapes scene with a tiny CNN, and `vlpt train --set
train.task=toy-count` trains it, evaluates it, resumes it exactly and reports it like every built-in task."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import tiny_run_config
from vlpt import TaskSpec, register_task
from vlpt.cli import main
from vlpt.config import save_config
from vlpt.data.pairs import epoch_batch
from vlpt.data.splits import load_split
from vlpt.evaluate.report import EvalResult
from vlpt.models.dual_encoder import SavesPretrained, load_weights, read_model_config, write_model_files
from vlpt.tasks import TASKS, data_parallel, rank_slice
from vlpt.train.run import fit


class ObjectCounter(SavesPretrained, nn.Module):
    """uint8 images (B, H, W, 3) -> logits over 1, 2 or 3 objects."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.width = width
        self.net = nn.Sequential(nn.Conv2d(3, width, 3, stride=2), nn.ReLU(), nn.Conv2d(width, width, 3, stride=2),
                                 nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.permute(0, 3, 1, 2).float() / 255)

    def write_files(self, directory: Path) -> None:
        write_model_files(directory, {"model_type": "toy-counter", "width": self.width}, self, None)

    @classmethod
    def from_pretrained(cls, directory: Path) -> ObjectCounter:
        return load_weights(cls(read_model_config(directory)["width"]), directory)


class CountBatches:
    def __init__(self, images: np.ndarray, counts: np.ndarray, batch_size: int, seed: int):
        self.images, self.counts = torch.from_numpy(images), torch.from_numpy(counts)
        self.batch_size, self.seed = batch_size, seed

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        index = epoch_batch(len(self.images), self.batch_size, self.seed, step)
        return {"images": self.images[index], "labels": self.counts[index]}


class CountObjective:
    def __init__(self, model: ObjectCounter):
        self.model = model

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        loss = F.cross_entropy(self.model(batch["images"]), batch["labels"])
        return {"loss": loss}


def object_counts(scenes) -> np.ndarray:
    return np.array([len(s.objects) - 1 for s in scenes], np.int64)  # 1..3 objects -> class 0..2


class CountObjects(TaskSpec):
    name = "toy-count"
    description = "count the objects of a shapes scene"
    datasets = ("shapes",)

    def load_data(self, config, cache_dir):
        return load_split(config.data, "train", config.data.train_size, cache_dir=cache_dir)

    def build_model(self, config, data, tokenizer):
        torch.manual_seed(config.train.seed)
        return ObjectCounter()

    def dual_encoder(self, model):
        return None  # no towers: the run's model section stays as configured

    def batches(self, config, data, model, env):
        return rank_slice(CountBatches(data.images, object_counts(data.scenes), config.train.batch_size,
                                       config.train.seed), env)

    def objective(self, config, model, env, device):
        return data_parallel(CountObjective(model), env, device)

    def load_model(self, run_dir):
        return ObjectCounter.from_pretrained(run_dir / "model")

    def evaluate(self, model, config, run_dir, cache_dir):
        test = load_split(config.data, "test", 64, cache_dir=cache_dir)
        with torch.inference_mode():
            predicted = model.eval()(torch.from_numpy(test.images)).argmax(1).numpy()
        return EvalResult({"count_accuracy": float((predicted == object_counts(test.scenes)).mean())})


@pytest.fixture()
def toy_task():
    task = register_task(CountObjects())
    yield task
    del TASKS[task.name]  # the registry is the process's: leave it as it was


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_a_task_added_in_a_test_file_trains_evaluates_resumes_and_reports(toy_task, tmp_path):
    config = tiny_run_config(steps=4, **{"train.task": "toy-count", "train.checkpoint_every": 2,
                                         "data.train_size": 64})
    save_config(config, tmp_path / "toy.yaml")
    args = ["train", "--config", str(tmp_path / "toy.yaml"), "--runs-dir", str(tmp_path)]
    assert main(args + ["--name", "straight"]) == 0
    metrics = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert 0 <= metrics["count_accuracy"] <= 1 and metrics["steps"] == 4
    assert "- task: toy-count (count the objects of a shapes scene)" in (tmp_path / "straight" / "report.md").read_text()
    assert (tmp_path / "straight" / "model" / "README.md").exists()
    assert main(["eval", str(tmp_path / "straight")]) == 0

    fit(config, tmp_path / "cut", stop_after=2)  # an interrupted run, then `vlpt train --resume`
    assert main(["train", "--name", "cut", "--runs-dir", str(tmp_path), "--resume"]) == 0
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "straight"), rel=1e-6)


def test_registering_a_name_twice_needs_replace(toy_task):
    with pytest.raises(ValueError, match="already registered"):
        register_task(CountObjects())
    assert register_task(CountObjects(), replace=True).name == "toy-count"
