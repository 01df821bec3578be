import os

import pytest
import torch

from vlpt.config import ModelConfig, RunConfig, load_config


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, msg=None,
                          floor: float = 0.0) -> None:
    """``actual`` equals ``expected`` up to rounding: every element within ``rel`` x the largest |expected|
    (at least ``floor``), plus ``rel`` of its own value. For two float paths of one computation (another
    kernel, order or chunking): a fixed atol does not scale with the values (gradients of ~250 differ by
    3e-5 between CPU kernels, and pass or fail by machine), while rounding error grows with the size of
    what is summed. Claims of exact algebra are checked in float64 with a tiny ``rel`` instead."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    tiny = torch.finfo(expected.dtype).tiny if expected.is_floating_point() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * max(scale, floor, tiny), msg=msg)


def assert_same_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rel: float = 1e-5) -> None:
    """Two gradient sets of one model agree tensor by tensor (``assert_close_to_scale``). A gradient that is
    zero in exact arithmetic (e.g. a key bias under softmax) is pure rounding noise of the terms that cancel
    in it, so each tensor's scale is at least 1e-3 x the largest gradient of the model."""
    assert got.keys() == want.keys()
    floor = 1e-3 * max((g.detach().abs().max().item() for g in want.values() if g is not None and g.numel()),
                       default=0.0)
    for name, expected in want.items():
        assert (got[name] is None) == (expected is None), name
        if expected is not None:
            assert_close_to_scale(got[name], expected, rel, msg=lambda m, name=name: f"{name}: {m}", floor=floor)


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


TINY_CORPUS = ["a red circle", "a blue star", "a green square in the top left", "two yellow triangles"] * 4


def save_tiny_model(directory):
    """A tiny dual encoder (``tiny_model_config``) saved with ``save_pretrained`` into ``directory``: a
    model folder for tests of loading and of the CLI (a couple of seconds)."""
    from vlpt.factory import create_model

    return create_model(tiny_model_config(), corpus=TINY_CORPUS).save_pretrained(directory)
