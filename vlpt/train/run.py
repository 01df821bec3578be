"""A training run end to end: data, tokenizer, model, trainer, final model, evaluation and report.

Run folder layout: ``config.yaml``, ``log.jsonl``, ``checkpoints/step_*/``, ``model/``,
``metrics.json``, ``report.md`` and its PNG plots.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from vlpt.config import RunConfig, load_config, save_config
from vlpt.data.pairs import PairBatches, RankSlice
from vlpt.evaluate.report import write_report
from vlpt.evaluate.suite import embed_images, evaluate, load_split, shapes_classifier
from vlpt.evaluate.zero_shot import accuracy, zero_shot_logits
from vlpt.factory import create_model, get_tokenizer, load_model
from vlpt.io import atomic_directory
from vlpt.models.dual_encoder import TOKENIZER_DIR
from vlpt.tokenization import Tokenizer
from vlpt.train.checkpoint import latest_checkpoint
from vlpt.train.distributed import cleanup, init_distributed
from vlpt.train.tasks import ContrastiveTask
from vlpt.train.trainer import Trainer, read_log, resolve_device

log = logging.getLogger(__name__)
CONFIG_FILE = "config.yaml"


class RunExistsError(FileExistsError):
    pass


def load_train_data(config: RunConfig, cache_dir=None) -> tuple[np.ndarray, list[list[str]], np.ndarray]:
    """The training set in memory: (images (N, H, W, 3) uint8, captions, labels). Not for shards,
    which are streamed (``train_batches``)."""
    if config.data.dataset == "shards":
        raise ValueError("data.dataset=shards is streamed, not loaded into memory; this objective needs "
                         "data.dataset=files (an image folder) or a built-in data set")
    ds = load_split(config.data, "train", config.data.train_size, cache_dir=cache_dir)
    return ds.images, ds.captions, ds.labels


def _shards_path(config: RunConfig) -> str:
    if not config.data.path:
        raise ValueError("data.dataset=shards needs data.path (a shard folder, file, glob or {a..b} pattern), "
                         "e.g. --set data.path=shards/")
    return config.data.path


def train_corpus(config: RunConfig, data: tuple | None) -> Iterable[str]:
    """The captions a from-scratch tokenizer learns its vocabulary from: all of an in-memory data set,
    or the first 200,000 captions of the shards."""
    if data is None:
        from vlpt.data.shards import shard_captions

        return shard_captions(_shards_path(config))
    return (c for caps in data[1] for c in caps)


def train_batches(config: RunConfig, data: tuple | None, tokenizer: Tokenizer, rank: int, world_size: int):
    """This rank's ``batch(step)`` source: in-memory pairs (each rank slices the global batch), or
    for shards a ShardReader over this rank's share of the shards (``train.batch_size`` is global)."""
    if data is None:
        from vlpt.data.shards import ShardBatches, ShardReader

        if config.train.batch_size % world_size:
            raise ValueError(f"batch_size {config.train.batch_size} must be divisible by the world size {world_size}")
        d = config.data
        reader = ShardReader(_shards_path(config), config.train.batch_size // world_size, d.image_size,
                             seed=config.train.seed, rank=rank, world_size=world_size, num_workers=d.num_workers,
                             shuffle_buffer=d.shuffle_buffer, resample=d.resample,
                             max_consecutive_failures=d.max_consecutive_failures)
        log.info("shards: %d samples in %d shards, %d steps per epoch", reader.num_samples, len(reader.paths),
                 reader.steps_per_epoch)
        return ShardBatches(reader, tokenizer)
    images, captions, labels = data
    batches = PairBatches(images, captions, tokenizer, config.train.batch_size, config.train.seed,
                          labels=labels, augment=config.data.augment, group_size=2 if config.data.twins else 1)
    return RankSlice(batches, rank, world_size) if world_size > 1 else batches


def fit_on_pairs(config: RunConfig, run_dir: Path, build, make_task, encoder_from_run: str | None,
                 resume: bool = False, cache_dir=None, stop_after: int | None = None, group_size: int = 1):
    """The training body shared by models built on a dual encoder (captioner, generator): load the pairs,
    build the model (``build(config, corpus, tokenizer)``; on resume without ``encoder_from_run`` with the
    checkpoint's vocabulary), record the towers in config.yaml, train with ``make_task(config, model)``.
    Returns (model, train_seconds, trainer); the caller saves the final model when ``trainer.finished``."""
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    images, captions, labels = load_train_data(config, cache_dir)
    checkpoint = latest_checkpoint(run_dir / "checkpoints") if resume else None
    tokenizer = None
    if checkpoint is not None and not encoder_from_run:  # the vocabulary the checkpoint was trained with
        tokenizer = Tokenizer.from_pretrained(checkpoint / TOKENIZER_DIR, config.model.text.context_length)
    model = build(config, [c for caps in captions for c in caps], tokenizer)
    config.model = model.dual_encoder.config  # config.yaml records the towers actually used (from_run, vocab)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / CONFIG_FILE)
    batches = PairBatches(images, captions, model.tokenizer, config.train.batch_size, config.train.seed,
                          labels=labels, augment=config.data.augment, group_size=group_size)
    trainer = Trainer(make_task(config, model), batches, config.train, run_dir, save_model=model)
    if resume and not trainer.resume():
        log.info("no checkpoint in %s; starting from step 0", run_dir)
    start = time.perf_counter()
    trainer.fit(stop_after)
    return model, time.perf_counter() - start, trainer


def quick_eval_fn(config: RunConfig, cache_dir=None):
    """A cheap periodic check: 48-way zero-shot on 200 single-object validation scenes (shapes only)."""
    if config.data.dataset != "shapes":
        return None
    val = load_split(config.data, "val", 200, single=True, cache_dir=cache_dir)

    def run(model, step: int) -> dict[str, float]:
        logits = zero_shot_logits(embed_images(model, val.images), shapes_classifier(model))
        return accuracy(logits, torch.from_numpy(val.labels), prefix="val_zeroshot_")
    return run


def fit(config: RunConfig, run_dir: Path, resume: bool = False, cache_dir=None,
        stop_after: int | None = None) -> tuple[object, float]:
    """Train (or resume) into ``run_dir``; returns (model, train_seconds). ``stop_after`` ends early at
    that step with a checkpoint, and without writing the final model.

    Under torchrun every process runs this; each takes its slice of the global batch, DDP averages the
    gradients, the losses gather features so the contrastive batch is global, and only rank 0 writes.
    """
    env = init_distributed()
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    if env.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / CONFIG_FILE)
    log.info("training %s on %d process(es), rank %d", config.name, env.world_size, env.rank)
    data = None if config.data.dataset == "shards" else load_train_data(config, cache_dir)  # shards: streamed
    checkpoint = latest_checkpoint(run_dir / "checkpoints") if resume else None
    if checkpoint is not None:  # the vocabulary must be the one the checkpoint was trained with
        tokenizer = Tokenizer.from_pretrained(checkpoint / TOKENIZER_DIR, config.model.text.context_length)
    else:
        tokenizer = get_tokenizer(config.model, corpus=train_corpus(config, data))
    model = create_model(config.model, tokenizer, seed=config.train.seed)
    if config.model.text.locked:
        model.enable_text_cache()  # LiT: a frozen tower's caption features are computed once
    batches = train_batches(config, data, tokenizer, env.rank, env.world_size)
    trained = model
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel

        device = env.device if config.train.device == "auto" else resolve_device(config.train.device)
        trained = DistributedDataParallel(model.to(device), device_ids=[device] if device.type == "cuda" else None)
    task = ContrastiveTask(trained, config.train.loss, rank=env.rank, world_size=env.world_size,
                           seed=config.train.seed, local_loss=config.train.local_loss,
                           siglip_exchange=config.train.siglip_exchange,
                           pairwise_negatives=config.train.pairwise_negatives, num_negatives=config.train.num_negatives)
    trainer = Trainer(task, batches, config.train, run_dir, rank=env.rank, world_size=env.world_size,
                      evaluate=quick_eval_fn(config, cache_dir) if env.rank == 0 else None, save_model=model)
    if resume and not trainer.resume():
        log.info("no checkpoint in %s; starting from step 0", run_dir)
    start = time.perf_counter()
    trainer.fit(stop_after)
    seconds = time.perf_counter() - start
    if hasattr(batches, "close"):  # shards: stop the stream's DataLoader workers
        batches.close()
    if trainer.finished and env.rank == 0:
        model.save_pretrained(run_dir / "model")
    return model, seconds


def evaluate_run(run_dir: str | Path, model=None, extra: dict | None = None, cache_dir=None) -> dict[str, float]:
    """Evaluate a run's final model on the held-out sets of its data set and write its report."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    model = model or load_model(run_dir)
    result = evaluate(model, config.data, config.eval, cache_dir)
    metrics = {**result.metrics, **(extra or {})}
    history = [row for row in read_log(run_dir / "log.jsonl") if "loss" in row]
    if "steps" not in metrics:
        metrics["steps"] = config.train.steps
    write_report(run_dir, metrics, history=history, confusion=result.confusion, class_names=result.class_names,
                 retrieval_examples=result.retrieval_examples)
    return metrics


def read_run_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a vlpt run folder (no {CONFIG_FILE})")
    return load_config(path)


def run(config: RunConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
        cache_dir=None, fit_fn=None, evaluate_fn=None) -> dict[str, float]:
    """Train then evaluate. A new run never writes over an old one: without ``overwrite`` an existing
    run folder is an error; with it, the new run is built aside and swapped in only when complete.
    Under torchrun, ranks other than 0 train alongside and write nothing.

    ``fit_fn`` / ``evaluate_fn`` (default: contrastive pre-training, ``fit`` and ``evaluate_run``) let
    other objectives (fine-tuning) share this run-folder logic."""
    fit_fn, evaluate_fn = fit_fn or fit, evaluate_fn or evaluate_run
    run_dir = Path(run_dir)
    if resume and (run_dir / CONFIG_FILE).exists():
        config = read_run_config(run_dir)
    env = init_distributed()
    if env.rank != 0:
        fit_fn(config, run_dir, resume=resume, cache_dir=cache_dir)
        cleanup(env)
        return {}
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunExistsError(f"run folder {run_dir} already exists; pass --resume to continue it, "
                                 f"--overwrite to replace it once the new run completes, or choose another --name")
        with atomic_directory(run_dir) as tmp:
            model, seconds = fit_fn(config, tmp, cache_dir=cache_dir)
            cleanup(env)
            evaluate_fn(tmp, model, {"train_seconds": seconds, "steps": config.train.steps}, cache_dir)
        return json.loads((run_dir / "metrics.json").read_text())
    model, seconds = fit_fn(config, run_dir, resume=resume, cache_dir=cache_dir)
    cleanup(env)
    return evaluate_fn(run_dir, model, {"train_seconds": seconds, "steps": config.train.steps}, cache_dir)
