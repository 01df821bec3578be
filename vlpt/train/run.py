"""The one run lifecycle, for every task: create or resume the run folder, build the task's model, data and
objective, fit with the shared Trainer, save the model, evaluate, write ``metrics.json`` + ``report.md`` and
the model card. The task (``train.task``, from ``vlpt.tasks``) supplies only what differs.

Run folder layout: ``config.yaml``, ``log.jsonl``, ``checkpoints/step_*/``, ``model/`` (+ a ``README.md``
model card), ``metrics.json``, ``report.md`` and its PNG figures.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlpt.config import ConfigError, RunConfig, from_dict, load_config, save_config, to_dict, validate_config
from vlpt.data.splits import dataset_options_not_applying
from vlpt.evaluate.report import write_model_card, write_report
from vlpt.models.dual_encoder import TOKENIZER_DIR
from vlpt.tasks import MODEL_DIR, TaskSpec, get_task, task_names
from vlpt.tokenization import Tokenizer
from vlpt.train.checkpoint import latest_checkpoint
from vlpt.train.distributed import DistributedEnv, barrier, cleanup, init_distributed
from vlpt.train.trainer import Trainer, read_log, resolve_device

log = logging.getLogger(__name__)
CONFIG_FILE = "config.yaml"
# Keys a resumed run may change: they do not alter what has been trained so far.
RESUMABLE_KEYS = ("train.steps", "train.eval_every", "train.log_every", "train.checkpoint_every",
                  "train.keep_checkpoints", "train.max_seconds", "train.threads")
# Sections only some tasks read (TaskSpec.sections); the others' non-default values are reported as unused.
TASK_SECTIONS = ("caption", "generate", "finetune")


class RunExistsError(FileExistsError):
    pass


# ----------------------------------------------------------------------------- config checks

def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in ("timm_kwargs", "hf_config"):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def options_not_applying(config: RunConfig, task: TaskSpec) -> list[str]:
    """Options set away from their defaults that the run's task or data set does not read."""
    defaults = _flat(to_dict(RunConfig()))
    values = _flat(to_dict(config))
    notes = [f"{key}={values[key]!r} does not apply to train.task={task.name} (other tasks read the "
             f"{key.split('.')[0]} section)" for key in values
             if key.split(".")[0] in TASK_SECTIONS and key.split(".")[0] not in task.sections
             and values[key] != defaults[key]]
    return notes + dataset_options_not_applying(config.data) + task.unused_options(config)


def check_run(config: RunConfig, env: DistributedEnv) -> TaskSpec:
    """The run's task, after checking everything that can be checked before any data is loaded: every value,
    ``train.task`` among the registered tasks, the paths it reads, the task's own rules and the process
    layout, all reported together in one ConfigError. Options that do not apply are logged."""
    try:
        validate_config(config, task_names(), check_paths=True)
        problems = []
    except ConfigError as err:
        if config.train.task not in task_names():
            raise
        problems = list(err.problems)
    task = get_task(config.train.task)
    problems += [p for p in task.check(config, env) if p not in problems]
    if "tensorboard" in config.train.report_to and importlib.util.find_spec("tensorboard") is None:
        problems.append("train.report_to includes tensorboard, which needs the tensorboard package: "
                        "pip install 'vlpt[tensorboard]'")
    if config.train.batch_size % env.world_size:
        problems.append(f"train.batch_size={config.train.batch_size} must be divisible by the number of "
                        f"processes ({env.world_size}): every rank takes an equal slice of the global batch")
    if problems:
        raise ConfigError(f"config {config.name!r} cannot run as train.task={task.name}: " + "; ".join(problems),
                          problems)
    for note in options_not_applying(config, task):
        log.warning("%s; ignored", note)
    return task


def merge_for_resume(saved: RunConfig, given: RunConfig) -> tuple[RunConfig, dict[str, tuple[Any, Any]]]:
    """The saved run's config with the changes ``given`` makes to ``RESUMABLE_KEYS``; any other difference is
    refused (the run would continue as something it did not start as). Returns (config, {key: (old, new)})."""
    old, new = _flat(to_dict(saved)), _flat(to_dict(given))
    filled = {"model.text.vocab_size", "model.text.hf_config"}  # written by the run itself
    builds_on = saved.caption.from_run or saved.generate.from_run or saved.finetune.from_run or \
        saved.model.init_from  # the towers of another model, recorded by the run
    changed = {k: (old[k], new[k]) for k in old if old[k] != new.get(k) and k not in filled
               and not (builds_on and k.startswith("model."))}  # a base run's towers are recorded by the run
    refused = sorted(k for k in changed if k not in RESUMABLE_KEYS)
    if refused:
        raise ConfigError("a resumed run keeps its config; these differ from the run's config.yaml and cannot "
                          "change mid-run: " + ", ".join(f"{k} ({changed[k][0]!r} -> {changed[k][1]!r})"
                                                         for k in refused)
                          + f". Resumable keys: {', '.join(RESUMABLE_KEYS)}; start a new run (--name) otherwise")
    data = to_dict(saved)
    for key, (_, value) in changed.items():
        section, name = key.split(".")
        data[section][name] = value
    return from_dict(RunConfig, data), changed


# ----------------------------------------------------------------------------- fit

@dataclass
class Training:
    """Everything ``fit`` runs, built by ``prepare`` (tests run steps of it directly)."""
    task: TaskSpec
    model: nn.Module  # the model saved at the end (unwrapped)
    objective: Any  # the trainer's training_step (data-parallel under torchrun)
    batches: Any
    trainer: Trainer
    env: DistributedEnv


def prepare(config: RunConfig, run_dir: Path, resume: bool = False, cache_dir=None,
            env: DistributedEnv | None = None) -> Training:
    """Check the config, load the task's data, build its model (with the resumed checkpoint's vocabulary),
    record the towers actually used in ``config.yaml`` (rank 0), and set up batches, objective and trainer.
    On resume the trainer is positioned at the latest complete checkpoint."""
    env = env or init_distributed()
    task = check_run(config, env)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    log.info("training %s (%s) on %d process(es), rank %d", config.name, task.name, env.world_size, env.rank)
    data = task.load_data(config, cache_dir)
    checkpoint = latest_checkpoint(run_dir / "checkpoints") if resume else None
    tokenizer = None
    if checkpoint is not None and (checkpoint / TOKENIZER_DIR).exists():  # the vocabulary it was trained with
        tokenizer = Tokenizer.from_pretrained(checkpoint / TOKENIZER_DIR, config.model.text.context_length)
    model = task.build_model(config, data, tokenizer)
    towers = task.dual_encoder(model)
    if towers is not None:
        config.model = towers.config  # config.yaml records the towers used (base run, vocabulary)
    if env.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / CONFIG_FILE)
    device = env.device if config.train.device == "auto" else resolve_device(config.train.device)
    batches = task.batches(config, data, model, env)
    objective = task.objective(config, model, env, device)
    quick_eval = task.quick_eval(config, cache_dir) if env.rank == 0 and config.train.eval_every else None
    if env.rank == 0 and config.train.eval_every and quick_eval is None:
        log.warning("train.eval_every=%d: the %s task has no periodic check on data.dataset=%s; ignored",
                    config.train.eval_every, task.name, config.data.dataset)
    trainer = Trainer(objective, batches, config.train, run_dir, evaluate=quick_eval, rank=env.rank,
                      world_size=env.world_size, save_model=model)
    if resume and not trainer.resume():
        log.info("no checkpoint in %s; starting from step 0", run_dir)
    return Training(task, model, objective, batches, trainer, env)


def fit(config: RunConfig, run_dir: str | Path, resume: bool = False, cache_dir=None,
        stop_after: int | None = None, changes: dict[str, tuple[Any, Any]] | None = None
        ) -> tuple[nn.Module, float]:
    """Train (or resume) ``config``'s task into ``run_dir``; returns (model, train_seconds). ``stop_after``
    ends early at that step with a checkpoint, and without writing the final model. ``changes``: config
    keys a resume changed (recorded in the log).

    Under torchrun every process runs this; each takes its slice of the global batch, DDP averages the
    gradients (the contrastive losses gather features so the contrastive batch is global), and only rank 0
    writes."""
    run_dir = Path(run_dir)
    training = prepare(config, run_dir, resume, cache_dir)
    trainer = training.trainer
    if changes:
        trainer._log({"step": trainer.step, "resumed_with": {k: list(v) for k, v in changes.items()}})
    start = time.perf_counter()
    try:
        trainer.fit(stop_after)
    finally:
        if hasattr(training.batches, "close"):  # shards: stop the stream's DataLoader workers
            training.batches.close()
    seconds = time.perf_counter() - start
    if trainer.finished and training.env.rank == 0:
        training.task.save_model(training.model, run_dir)
    return training.model, seconds


# ----------------------------------------------------------------------------- evaluate

def read_run_config(run_dir: str | Path) -> RunConfig:
    """A run folder's config. Runs saved before ``train.task`` named fine-tuning runs keep their kind: a
    fine-tuned task model's folder says which task it was trained for."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a vlpt run folder (no {CONFIG_FILE})")
    config = load_config(path)
    model_config = Path(run_dir) / MODEL_DIR / "config.json"
    if config.train.task == "contrastive" and model_config.exists():
        saved = json.loads(model_config.read_text())
        if saved.get("model_type") == "vlpt-task":
            config.train.task = saved["task"]
    return config


def steps_trained(run_dir: Path, config: RunConfig) -> int:
    """The last step logged: fewer than configured when a time budget stopped the run."""
    steps = [row["step"] for row in read_log(run_dir / "log.jsonl") if "step" in row]
    return max(steps, default=config.train.steps)


def evaluate_run(run_dir: str | Path, model: nn.Module | None = None, extra: dict | None = None,
                 cache_dir=None) -> dict[str, float]:
    """Evaluate a run's final model with its task's evaluation; write metrics.json, report.md and the model
    card. The same structure for every task: the task's metrics, ``steps`` (trained) and what ``extra`` adds
    (``run`` adds this session's ``train_seconds``)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    task = get_task(config.train.task)
    model = model if model is not None else task.load_model(run_dir)
    result = task.evaluate(model, config, run_dir, cache_dir)
    metrics = {**result.metrics, "steps": steps_trained(run_dir, config), **(extra or {})}
    history = [row for row in read_log(run_dir / "log.jsonl") if "loss" in row]
    facts = {"task": f"{task.name} ({task.description})", "model": type(model).__name__,
             "data": data_description(config), "steps": f"{metrics['steps']} of batch {config.train.batch_size}",
             "config": CONFIG_FILE}
    write_report(run_dir, metrics, history, result.confusion, result.class_names, result.retrieval_examples,
                 result.images, summary=facts)
    if (run_dir / MODEL_DIR).exists():
        write_model_card(run_dir / MODEL_DIR, f"vlpt {task.name} model: {config.name}",
                         {**facts, "config": f"../{CONFIG_FILE}",
                          "architecture": architecture_description(config) if task.dual_encoder(model) is not None
                          else type(model).__name__}, metrics)
    return metrics


def evaluate_model(model: nn.Module, config: RunConfig, out_dir: str | Path | None = None, cache_dir=None,
                   source: str = "") -> dict[str, float]:
    """Evaluate any model (a saved or imported dual encoder, ...) with ``config``'s task on its data and eval
    sections, outside a run; with ``out_dir`` write metrics.json and report.md there."""
    task = get_task(config.train.task)
    validate_config(config, task_names(), check_paths=True)
    if task.dual_encoder(model) is not None:
        config.model = task.dual_encoder(model).config
    with tempfile.TemporaryDirectory() as scratch:  # figures a task writes, when there is no out_dir
        result = task.evaluate(model, config, Path(out_dir or scratch), cache_dir)
    if out_dir is not None:
        facts = {"task": f"{task.name} ({task.description})", "model": f"{type(model).__name__} {source}".strip(),
                 "data": data_description(config)}
        write_report(out_dir, result.metrics, None, result.confusion, result.class_names, result.retrieval_examples,
                     result.images, summary=facts)
    return result.metrics


def data_description(config: RunConfig) -> str:
    d = config.data
    where = f" from {d.path}" if d.path else ""
    return f"{d.dataset}{where}, {d.image_size} px, seed {d.seed}"


def architecture_description(config: RunConfig) -> str:
    m = config.model
    kind = {"bert": "BERT", "clip": "CLIP text transformer", "siglip": "SigLIP text transformer"}[m.text.arch]
    text = m.text.pretrained or \
        f"{m.text.num_layers}-layer {kind} width {m.text.hidden_size}, vocab {m.text.vocab_size}"
    return f"image tower {m.image.name} ({m.image.image_size} px, pool {m.image.pool}); text tower {text}; " \
           f"embedding {m.embed_dim}"


# ----------------------------------------------------------------------------- the lifecycle

def restart_count() -> int:
    """How many times torchrun has restarted this worker group (``--max-restarts``); 0 otherwise."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def aside_dir(run_dir: Path) -> Path:
    """Where a run that will replace ``run_dir`` (``--overwrite``) trains until it completes; a fixed name, so
    every rank and a torchrun restart find it."""
    return run_dir.parent / f".{run_dir.name}.new"


def resume_dir(run_dir: Path) -> Path:
    """The folder a resume of ``run_dir`` continues: an interrupted ``--overwrite`` run's, if there is one."""
    return aside_dir(run_dir) if (aside_dir(run_dir) / CONFIG_FILE).exists() else run_dir


def run(config: RunConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
        cache_dir=None) -> dict[str, float]:
    """Train then evaluate, for any task. A new run never writes over an old one: without ``overwrite`` an
    existing run folder is an error; with it, the new run is built aside and swapped in only when complete.
    ``resume`` continues the run's latest complete checkpoint with the run's own config (``config`` may
    change only ``RESUMABLE_KEYS``); an ``overwrite`` run that was interrupted (preempted, killed) is resumed
    where it trains, and replaces ``run_dir`` when it completes. Under torchrun, ranks other than 0 train
    alongside and write nothing; after a torchrun restart (``--max-restarts``) every rank resumes from the
    latest complete checkpoint."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise ValueError("--resume continues a run and --overwrite replaces it; choose one")
    restarted = restart_count() > 0
    replacing = overwrite or ((resume or restarted) and resume_dir(run_dir) != run_dir)
    target = aside_dir(run_dir) if replacing else run_dir
    if replacing and not overwrite:
        log.info("resuming the interrupted --overwrite run in %s; it replaces %s when it completes", target, run_dir)
    changed: dict[str, tuple[Any, Any]] = {}
    if resume or restarted:
        if (target / CONFIG_FILE).exists():
            config, changed = merge_for_resume(read_run_config(target), config)
            if changed:
                log.info("resuming with %s", ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        resume = True
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise RunExistsError(f"run folder {run_dir} already exists; pass --resume to continue it, "
                             f"--overwrite to replace it once the new run completes, or choose another --name")
    env = init_distributed()
    try:
        if overwrite and not resume:
            if env.rank == 0:
                shutil.rmtree(target, ignore_errors=True)  # a stale aside run of an earlier attempt
            barrier(env)
        model, seconds = fit(config, target, resume=resume, cache_dir=cache_dir, changes=changed)
    finally:
        cleanup(env)
    if env.rank != 0:
        return {}
    metrics = evaluate_run(target, model, {"train_seconds": seconds}, cache_dir)
    if replacing:
        swap_into_place(target, run_dir)
    return metrics


def swap_into_place(new: Path, run_dir: Path) -> None:
    """Replace ``run_dir`` by the completed ``new`` run: the old folder is moved aside first and removed only
    once the new one is in place."""
    old = run_dir.parent / f".{run_dir.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if run_dir.exists():
        os.replace(run_dir, old)
    os.replace(new, run_dir)
    shutil.rmtree(old, ignore_errors=True)
