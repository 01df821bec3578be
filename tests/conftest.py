import os

import pytest
import torch

from vlpt.config import ModelConfig, RunConfig, load_config


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path_factory):
    torch.set_num_threads(int(os.environ.get("VLPT_TEST_THREADS", "2")))  # 1 when sharing the CPU
    monkeypatch.setenv("VLPT_CACHE", str(tmp_path_factory.getbasetemp() / "vlpt-cache"))  # not ~/.cache


def tiny_model_config(**text) -> ModelConfig:
    """A model small enough for unit tests: resnet-tiny at 32 px and a 1-layer text tower."""
    config = ModelConfig(embed_dim=32)
    config.image.image_size = 32
    config.text.hidden_size = 32
    config.text.num_layers = 1
    config.text.intermediate_size = 64
    for k, v in text.items():
        setattr(config.text, k, v)
    return config


def tiny_run_config(steps: int = 6, **overrides) -> RunConfig:
    sets = ["model.embed_dim=32", "model.image.image_size=32", "model.text.hidden_size=32",
            "model.text.num_layers=1", "model.text.intermediate_size=64", "data.image_size=32",
            "data.train_size=256", f"train.steps={steps}", "train.batch_size=32", "train.warmup_steps=2",
            "train.log_every=1", "train.checkpoint_every=3", "train.eval_every=0", "eval.zero_shot_size=96",
            "eval.compositional_size=48", "eval.retrieval_size=64", "eval.probe_train_size=96"]
    sets += [f"{k}={v}" for k, v in overrides.items()]
    return load_config("tiny-shapes", sets)
