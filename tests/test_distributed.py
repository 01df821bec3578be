"""Two real gloo processes (DDP on CPU, loopback only) against one process on the global batch.

Each rank holds half of a global batch of 8; the losses all-gather features with gradients (or, for
SigLIP's neighbour exchange, pass text chunks round the ring) and DDP averages parameter gradients;
the pairwise loss draws its negatives (random or hard) from the global batch.
The loss averaged over ranks and every parameter's gradient must equal those of a single process on
all 8 pairs. All cases run in one spawn, to keep start-up (importing torch, building the model) to
once per rank. With two ranks a rank's left and right neighbours are the same process, so the ring's
direction is checked separately on three ranks (features only, no model, float64), and so is the
pairwise loss's choice of negatives across three ranks' rows.
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
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from tests.conftest import assert_close_to_scale, assert_same_grads, tiny_model_config
from vlpt.factory import create_model, get_tokenizer
from vlpt.losses import infonce_loss, pairwise_loss, siglip_loss, siglip_neighbour_loss
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
# case -> (loss, local_loss, siglip_exchange, GradCache micro-batches per rank or 0 for a plain step)
CASES = {
    "infonce": ("infonce", False, "gather", 0),
    "infonce_local": ("infonce", True, "gather", 0),
    "siglip": ("siglip", False, "gather", 0),
    "siglip_neighbour": ("siglip", False, "neighbour", 0),
    "infonce_gradcache": ("infonce", False, "gather", 2),
    "siglip_gradcache": ("siglip", False, "gather", 2),
    "siglip_neighbour_gradcache": ("siglip", False, "neighbour", 2),
    "pairwise_random": ("pairwise", False, "gather", 0),
    "pairwise_hard": ("pairwise", False, "gather", 0),
    "pairwise_random_gradcache": ("pairwise", False, "gather", 2),
}
# pairwise case -> (pairwise_negatives, num_negatives); 3 of the other 7 pairs of the global batch. (Hard
# negatives: the 3rd and 4th most similar differ by >= 2e-4 in cosine here, far above float32 rounding, so
# one process and two ranks pick the same ones.)
PAIRWISE = {"pairwise_random": ("random", 3), "pairwise_hard": ("hard", 3), "pairwise_random_gradcache": ("random", 3)}
PAIRWISE_SEED = 5


def _model(loss: str, tokenizer) -> nn.Module:
    config = tiny_model_config()
    if loss in ("siglip", "pairwise"):
        config.init_logit_bias = -10.0
    # Eval mode: BatchNorm uses running statistics, so features don't depend on how the batch is split.
    return create_model(config, tokenizer=tokenizer, seed=0).eval()


def _global_batch(tokenizer) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (GLOBAL_BATCH, 32, 32, 3), generator=g, dtype=torch.uint8)  # (B, H, W, 3)
    captions = [CORPUS[int(i)] for i in torch.randint(len(CORPUS), (GLOBAL_BATCH,), generator=g)]
    tokens = tokenizer(captions)
    return {"images": images, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def _loss_fn(loss: str, local_loss: bool, exchange: str, rank: int, world_size: int,
             pairwise: tuple[str, int] | None = None):
    if loss == "pairwise":  # every rank, and the one process, start from the same generator state
        negatives, k = pairwise
        generator = torch.Generator().manual_seed(PAIRWISE_SEED)
        return lambda img, txt, scale, bias: pairwise_loss(img, txt, scale, bias, num_negatives=k, negatives=negatives,
                                                           generator=generator, rank=rank, world_size=world_size)
    if loss == "infonce":
        return lambda img, txt, scale, bias: infonce_loss(img, txt, scale, rank=rank, world_size=world_size,
                                                          local_loss=local_loss)
    siglip = siglip_neighbour_loss if exchange == "neighbour" else siglip_loss
    return lambda img, txt, scale, bias: siglip(img, txt, scale, bias, rank=rank, world_size=world_size)


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
        for case, (loss, local_loss, exchange, micro_batches) in CASES.items():
            model = DistributedDataParallel(_model(loss, tokenizer))
            loss_fn = _loss_fn(loss, local_loss, exchange, env.rank, env.world_size, PAIRWISE.get(case))
            value = _step(model, local, loss_fn, micro_batches)
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
    loss = CASES[case][0]
    got = torch.load(distributed_results / f"{case}.pt", weights_only=True)
    assert got["env"] == [0, WORLD_SIZE, "gloo"]

    # The reference is the plain loss (all-gather variant, no local_loss) in one process.
    tokenizer = get_tokenizer(tiny_model_config(), CORPUS)
    model = _model(loss, tokenizer)
    loss_fn = _loss_fn(loss, False, "gather", 0, 1, PAIRWISE.get(case))
    want_loss = _step(model, _global_batch(tokenizer), loss_fn, micro_batches=0)

    assert_close_to_scale(got["loss"], want_loss)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(got["grads"]) == sorted(names)  # every parameter got a gradient in both runs
    assert_same_grads(got["grads"], {name: p.grad for name, p in model.named_parameters()})


# ----------------------------------------------------------------------------- SigLIP ring on three ranks

RING_WORLD_SIZE = 3
RING_BATCH = 4  # per rank
RING_SCALE, RING_BIAS = 7.0, -3.0
RING_NEGATIVES = 5  # pairwise: of the 11 others in the global batch of 12, most of them on other ranks


def _ring_features() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    n = RING_WORLD_SIZE * RING_BATCH
    img = F.normalize(torch.randn(n, 16, generator=g, dtype=torch.float64), dim=-1)  # (N, D)
    txt = F.normalize(torch.randn(n, 16, generator=g, dtype=torch.float64), dim=-1)  # (N, D)
    return img, txt


def _siglip_with_grads(loss_fn, img: Tensor, txt: Tensor, **dist_args) -> list[Tensor]:  # (SigLIP or pairwise)
    """[loss, d/d img, d/d txt, d/d scale, d/d bias] of ``loss_fn`` on leaf copies of the inputs."""
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scale = torch.tensor(RING_SCALE, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(RING_BIAS, dtype=torch.float64, requires_grad=True)
    loss = loss_fn(img, txt, scale, bias, **dist_args)
    loss.backward()
    return [loss.detach(), img.grad, txt.grad, scale.grad, bias.grad]


def _ring_pairwise(negatives: str):
    """The pairwise loss with RING_NEGATIVES negatives, a fresh generator (same seed everywhere) per call."""
    def loss_fn(img, txt, scale, bias, rank=0, world_size=1):
        return pairwise_loss(img, txt, scale, bias, num_negatives=RING_NEGATIVES, negatives=negatives,
                             generator=torch.Generator().manual_seed(PAIRWISE_SEED), rank=rank, world_size=world_size)
    return loss_fn


RING_LOSSES = {"gather": siglip_loss, "neighbour": siglip_neighbour_loss,
               "pairwise_random": _ring_pairwise("random"), "pairwise_hard": _ring_pairwise("hard")}


def _ring_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank of three: SigLIP (either exchange) and pairwise on its slice of the global features."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        img, txt = _ring_features()
        for name, loss_fn in RING_LOSSES.items():
            parts = _siglip_with_grads(loss_fn, img.chunk(world_size)[rank], txt.chunk(world_size)[rank],
                                       rank=rank, world_size=world_size)
            gathered = []
            for part in parts:
                out = [torch.empty_like(part) for _ in range(world_size)]
                dist.all_gather(out, part)
                gathered.append(out)
            if rank == 0:
                loss, img_grad, txt_grad, scale_grad, bias_grad = gathered
                # What DDP would optimise: means over ranks (features: rank r's rows of the global batch).
                torch.save({"loss": torch.stack(loss).mean(), "img": torch.cat(img_grad) / world_size,
                            "txt": torch.cat(txt_grad) / world_size, "scale": torch.stack(scale_grad).mean(),
                            "bias": torch.stack(bias_grad).mean()}, Path(out_dir) / f"{name}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ring_results(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("ring")
    mp.spawn(_ring_worker, args=(RING_WORLD_SIZE, _free_port(), str(out_dir)), nprocs=RING_WORLD_SIZE, join=True)
    return out_dir


@pytest.mark.parametrize("exchange", ["gather", "neighbour"])
def test_siglip_on_three_ranks_matches_one_process(exchange, ring_results):
    got = torch.load(ring_results / f"{exchange}.pt", weights_only=True)
    img, txt = _ring_features()
    loss, img_grad, txt_grad, scale_grad, bias_grad = _siglip_with_grads(siglip_loss, img, txt)
    want = {"loss": loss, "img": img_grad, "txt": txt_grad, "scale": scale_grad, "bias": bias_grad}
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-10, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("negatives", ["random", "hard"])
def test_pairwise_on_three_ranks_matches_one_process(negatives, ring_results):
    """Each rank's rows of the global choice of negatives, the loss and every gradient equal one process's
    on all 12 pairs, to float64 rounding."""
    name = f"pairwise_{negatives}"
    got = torch.load(ring_results / f"{name}.pt", weights_only=True)
    img, txt = _ring_features()
    loss, img_grad, txt_grad, scale_grad, bias_grad = _siglip_with_grads(RING_LOSSES[name], img, txt)
    want = {"loss": loss, "img": img_grad, "txt": txt_grad, "scale": scale_grad, "bias": bias_grad}
    for key, value in want.items():
        assert_close_to_scale(got[key], value, rel=1e-10, msg=lambda m, key=key: f"{key}: {m}")


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
