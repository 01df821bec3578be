"""Every registered task is data-parallel through the one lifecycle: 2 real gloo processes, each built by
``vlpt.train.run.prepare`` (the code ``fit`` runs) and stepping its rank's slice, give the same loss and the same
gradients as 1 process on the global batch, for 2 steps (an SGD update in between, so step 2 runs on updated
weights). A ViT image tower keeps BatchNorm out (its batch statistics would depend on how the batch is split)."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import assert_close_to_scale, assert_same_grads, tiny_run_config
from tests.test_distributed import _free_port
from vlpt.tasks import TASKS
from vlpt.train.distributed import DistributedEnv, cleanup, init_distributed
from vlpt.train.run import prepare

WORLD_SIZE = 2
STEPS = 2
LR = 0.05
VIT = {"model.image.name": "vit_tiny_patch16_224", "model.image.pool": "timm",
       "model.image.timm_kwargs": json.dumps({"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2})}
SMALL = {"train.batch_size": 8, "data.train_size": 64, "data.twins": False, "train.checkpoint_every": 0,
         "train.eval_every": 0, "data.count_weights": "[1,1,1]"}
TASK_SETTINGS = {
    "contrastive": {},
    "caption": {"caption.model.width": 32, "caption.model.layers": 1, "caption.model.heads": 2},
    "coca": {"caption.model.width": 32, "caption.model.layers": 1, "caption.model.heads": 2},
    "generate": {"generate.model.image_size": 32, "generate.model.block_channels": "[16,32]",
                 "generate.model.attention_levels": "[false,true]", "generate.model.norm_groups": 8,
                 "generate.model.cross_attention_dim": 32, "generate.model.heads": 2,
                 "generate.model.freeze_text": False, "generate.model.train_timesteps": 50,
                 "generate.model.condition_dropout": 0.5},
    "classify": {"finetune.train_size": 64, "finetune.test_size": 16},
    "match": {"finetune.train_size": 64, "finetune.test_size": 16, "finetune.cross_width": 32,
              "finetune.cross_layers": 1, "finetune.cross_heads": 2},
    "vqa": {"finetune.train_size": 64, "finetune.test_size": 16, "finetune.fusion": "gated"},
}


def task_config(task: str):
    return tiny_run_config(steps=STEPS, **VIT, **SMALL, **TASK_SETTINGS[task], **{"train.task": task})


def steps(config, run_dir: Path, env: DistributedEnv) -> list[dict]:
    """``STEPS`` training steps of the lifecycle's objective, an SGD update after each; per step the loss
    averaged over ranks (what DDP optimises) and every parameter's gradient (DDP-averaged)."""
    training = prepare(config, run_dir, env=env)
    model, objective = training.model, training.objective
    objective.model.train()
    params = dict(model.named_parameters())
    results = []
    for step in range(STEPS):
        out = objective.training_step(training.batches.batch(step))
        out["loss"].backward()
        loss = out["loss"].detach().clone()
        if env.distributed:
            dist.all_reduce(loss)
            loss /= env.world_size
        results.append({"loss": loss, "grads": {n: p.grad.clone() for n, p in params.items() if p.grad is not None}})
        with torch.no_grad():
            for p in params.values():
                if p.grad is not None:
                    p -= LR * p.grad
                    p.grad = None
    return results


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "VLPT_CACHE": f"{out_dir}/cache"})
    torch.set_num_threads(1)  # two processes on two cores
    env = init_distributed("gloo", timeout=timedelta(seconds=120))
    try:
        for task in TASK_SETTINGS:
            results = steps(task_config(task), Path(out_dir) / task, env)
            if rank == 0:
                torch.save(results, Path(out_dir) / f"{task}.pt")
    finally:
        cleanup(env)


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("tasks-ddp")
    mp.spawn(_worker, args=(WORLD_SIZE, _free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return out_dir


def test_every_registered_task_is_covered():
    assert sorted(TASK_SETTINGS) == sorted(TASKS)


@pytest.mark.parametrize("task", list(TASK_SETTINGS))
def test_two_gloo_processes_train_like_one_on_the_global_batch(task, two_process_results, tmp_path):
    got = torch.load(two_process_results / f"{task}.pt", weights_only=True)
    want = steps(task_config(task), tmp_path / task, DistributedEnv())
    assert len(got) == len(want) == STEPS
    for step, (g, w) in enumerate(zip(got, want)):
        assert_close_to_scale(g["loss"], w["loss"], msg=f"{task} step {step + 1} loss")
        assert g["grads"], task
        # To 1e-5 absolute, and to 1e-4 of each gradient tensor's own scale (a tensor much smaller than the
        # model's largest gradient keeps the rounding of the larger terms summed into it: float32, another
        # reduction order across two processes).
        assert max((g["grads"][n] - w["grads"][n]).abs().max().item() for n in w["grads"]) <= 1e-5
        assert_same_grads(g["grads"], w["grads"], rel=1e-4)
    assert not torch.equal(got[0]["loss"], got[1]["loss"])  # step 2 really ran on updated weights / new data
