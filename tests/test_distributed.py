"""Two real gloo processes (DDP on CPU, loopback only) against one process on the global batch.

Each rank holds half of a global batch of 8; the losses all-gather features with gradients and DDP
averages parameter gradients. The loss averaged over ranks and every parameter's gradient must
equal those of a single process on all 8 pairs. All cases run in one spawn, to keep start-up
(importing torch, building the model) to once per rank.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from tests.conftest import tiny_model_config
from vlpt.factory import create_model, get_tokenizer
from vlpt.losses import infonce_loss, siglip_loss
from vlpt.train.distributed import (
    DistributedEnv,
    barrier,
    cleanup,
    init_distributed,
    is_main,
)
from vlpt.train.gradcache import gradcache_step

WORLD_SIZE = 2
GLOBAL_BATCH = 8
CORPUS = [f"a {size} {color} {shape}" for size in ("small", "large")
          for color in ("red", "green", "blue", "yellow") for shape in ("circle", "square", "star")]
# case -> (loss, local_loss, GradCache micro-batches per rank or 0 for a plain step)
CASES = {
    "infonce": ("infonce", False, 0),
    "infonce_local": ("infonce", True, 0),
    "siglip": ("siglip", False, 0),
    "infonce_gradcache": ("infonce", False, 2),
    "siglip_gradcache": ("siglip", False, 2),
}


def _model(loss: str, tokenizer) -> nn.Module:
    config = tiny_model_config()
    if loss == "siglip":
        config.init_logit_bias = -10.0
    # Eval mode: BatchNorm uses running statistics, so features don't depend on how the batch is split.
    return create_model(config, tokenizer=tokenizer, seed=0).eval()


def _global_batch(tokenizer) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (GLOBAL_BATCH, 32, 32, 3), generator=g, dtype=torch.uint8)  # (B, H, W, 3)
    captions = [CORPUS[int(i)] for i in torch.randint(len(CORPUS), (GLOBAL_BATCH,), generator=g)]
    tokens = tokenizer(captions)
    return {"images": images, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def _loss_fn(loss: str, local_loss: bool, rank: int, world_size: int):
    if loss == "infonce":
        return lambda img, txt, scale, bias: infonce_loss(img, txt, scale, rank=rank, world_size=world_size,
                                                          local_loss=local_loss)
    return lambda img, txt, scale, bias: siglip_loss(img, txt, scale, bias, rank=rank, world_size=world_size)


def _step(model: nn.Module, batch: dict[str, Tensor], loss_fn, micro_batches: int) -> Tensor:
    if micro_batches:
        return gradcache_step(model, batch, micro_batches, loss_fn)
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
    loss.backward()
    return loss.detach()


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank: join through torchrun-style environment variables, run every case under DDP."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)  # two processes on two cores
    env = init_distributed("gloo", timeout=timedelta(seconds=60))
    try:
        tokenizer = get_tokenizer(tiny_model_config(), CORPUS)
        batch = _global_batch(tokenizer)
        local = {k: v.chunk(world_size)[env.rank] for k, v in batch.items()}  # this rank's 4 pairs
        for case, (loss, local_loss, micro_batches) in CASES.items():
            model = DistributedDataParallel(_model(loss, tokenizer))
            value = _step(model, local, _loss_fn(loss, local_loss, env.rank, env.world_size), micro_batches)
            # What DDP optimises is the mean over ranks of each rank's loss.
            dist.all_reduce(value)
            value /= env.world_size
            if is_main(env):
                grads = {n: p.grad for n, p in model.module.named_parameters() if p.grad is not None}
                torch.save({"loss": value, "grads": grads, "env": [env.rank, env.world_size, env.backend]},
                           Path(out_dir) / f"{case}.pt")
        barrier(env)
    finally:
        cleanup(env)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(WORLD_SIZE, _free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return out_dir


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_gloo_ranks_match_one_process(case, distributed_results):
    loss, local_loss, _ = CASES[case]
    got = torch.load(distributed_results / f"{case}.pt", weights_only=True)
    assert got["env"] == [0, WORLD_SIZE, "gloo"]

    tokenizer = get_tokenizer(tiny_model_config(), CORPUS)
    model = _model(loss, tokenizer)
    want_loss = _step(model, _global_batch(tokenizer), _loss_fn(loss, local_loss, 0, 1), micro_batches=0)

    torch.testing.assert_close(got["loss"], want_loss, atol=1e-5, rtol=0)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(got["grads"]) == sorted(names)  # every parameter got a gradient in both runs
    for name, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][name], p.grad, atol=1e-5, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_single_process_without_torchrun_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    env = init_distributed()
    assert env == DistributedEnv(rank=0, local_rank=0, world_size=1, backend=None)
    assert not dist.is_initialized() and is_main(env) and not env.distributed
    barrier(env)  # no-ops without a process group
    cleanup(env)


def test_incomplete_torchrun_env_is_an_error(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        init_distributed()
    assert not dist.is_initialized()
