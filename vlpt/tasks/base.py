"""What a task gives the one run lifecycle (``vlpt.train.run``): a ``TaskSpec`` subclass per task, registered
by name in ``vlpt.tasks``.

The lifecycle asks the task, in order: ``check`` the config, ``load_data``, ``build_model`` (fresh, or from a
base run), ``batches`` (this rank's share), ``objective`` (the trainer's ``training_step``, data-parallel
under torchrun), ``quick_eval`` (the periodic ``train.eval_every`` check), ``save_model``; afterwards
``evaluate`` (metrics and report figures) on the saved model, which ``vlpt.load`` reads back by its kind.
Everything else (run folder, resume, trainer, checkpoints, report, model card) is the lifecycle's.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vlpt.config import RunConfig, TrainConfig
from vlpt.data.pairs import PairBatches, RankSlice
from vlpt.data.splits import Pairs, applies
from vlpt.evaluate.report import EvalResult
from vlpt.factory import create_model, get_tokenizer, load, load_dual_encoder
from vlpt.models.dual_encoder import DualEncoder
from vlpt.tokenization import Tokenizer
from vlpt.train.distributed import DistributedEnv

MODEL_DIR = "model"  # a run's final model, inside the run folder
CONTRASTIVE_LOSS_OPTIONS = ("loss", "local_loss", "siglip_exchange", "pairwise_negatives", "num_negatives")


class Objective(Protocol):
    """The trainer's view of a task: the module it optimises and one training step."""
    model: nn.Module

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


class Batches(Protocol):
    def batch(self, step: int) -> dict[str, torch.Tensor]: ...


class TaskSpec(ABC):
    """One training task. Subclasses set ``name`` (the ``train.task`` value), ``description`` and
    ``sections`` (config sections beyond model / data / train / eval that the task reads; options in other
    task sections are reported as not applying), and implement the abstract methods."""

    name: ClassVar[str]
    description: ClassVar[str]
    sections: ClassVar[tuple[str, ...]] = ()
    datasets: ClassVar[tuple[str, ...]] = ("shapes", "digits", "files")  # data.dataset values it trains on
    gradcache: ClassVar[bool] = False  # train.accum_mode=gradcache (one contrastive batch over micro-batches)
    contrastive_loss: ClassVar[bool] = False  # reads train.loss and its options
    caption_noise: ClassVar[bool] = False  # reads data.caption_noise (captions only read, never generated)

    def check(self, config: RunConfig, env: DistributedEnv) -> list[str]:
        """Problems with ``config`` for this task (each names the key); [] when it can run. Checked before any
        data is loaded. The base checks the data set and that only contrastive runs use GradCache."""
        problems = []
        if config.data.dataset not in self.datasets:
            problems.append(f"data.dataset={config.data.dataset}: the {self.name} task trains on "
                            f"{' | '.join(self.datasets)}")
        if config.train.accum_mode == "gradcache" and not self.gradcache:
            problems.append(f"train.accum_mode=gradcache: one contrastive batch over micro-batches applies to "
                            f"contrastive runs only, not {self.name}; use accum_mode=plain")
        return problems

    def unused_options(self, config: RunConfig) -> list[str]:
        """Options set away from their defaults that this task does not read (the lifecycle logs them; options
        of other tasks' sections and of other data sets are found by the lifecycle itself)."""
        notes = []
        if config.data.caption_noise and not self.caption_noise:
            notes.append(f"data.caption_noise={config.data.caption_noise} does not apply to train.task={self.name}")
        if self.contrastive_loss:
            return notes
        defaults = TrainConfig()
        return notes + [f"train.{key}={getattr(config.train, key)!r} does not apply to train.task={self.name} (no "
                        f"contrastive loss)" for key in CONTRASTIVE_LOSS_OPTIONS
                        if getattr(config.train, key) != getattr(defaults, key)]

    @abstractmethod
    def load_data(self, config: RunConfig, cache_dir: Path | None) -> Any:
        """The training data (in memory, or a stream's description)."""

    @abstractmethod
    def build_model(self, config: RunConfig, data: Any, tokenizer: Tokenizer | None) -> nn.Module:
        """A new model initialised from ``train.seed`` (towers fresh or from a base run). ``tokenizer`` is the
        resumed checkpoint's vocabulary, to be used for a from-scratch text tower; None: train one."""

    @abstractmethod
    def dual_encoder(self, model: nn.Module) -> DualEncoder | None:
        """The dual encoder inside ``model`` (its config is recorded as the run's ``model`` section); None for
        a model without one."""

    @abstractmethod
    def batches(self, config: RunConfig, data: Any, model: nn.Module, env: DistributedEnv) -> Batches:
        """This rank's ``batch(step)`` source: its slice of every global batch of ``train.batch_size``."""

    @abstractmethod
    def objective(self, config: RunConfig, model: nn.Module, env: DistributedEnv, device: torch.device
                  ) -> Objective:
        """The training step over ``model``, data-parallel over ``env``'s ranks (``data_parallel``)."""

    def quick_eval(self, config: RunConfig, cache_dir: Path | None) -> Callable[[nn.Module, int], dict] | None:
        """A cheap check every ``train.eval_every`` steps (rank 0), or None when the task has none."""
        return None

    def save_model(self, model: nn.Module, run_dir: Path) -> None:
        model.save_pretrained(run_dir / MODEL_DIR)

    def load_model(self, run_dir: Path) -> nn.Module:
        return load(run_dir / MODEL_DIR)

    @abstractmethod
    def evaluate(self, model: nn.Module, config: RunConfig, run_dir: Path, cache_dir: Path | None) -> EvalResult:
        """Metrics on held-out data and the report's figures (written into ``run_dir``)."""


# ----------------------------------------------------------------------------- shared building blocks

def dual_encoder_for(config: RunConfig, from_run: str | None, corpus: Callable[[], Iterable[str]],
                     tokenizer: Tokenizer | None) -> DualEncoder:
    """The towers a task builds on: the dual encoder of ``from_run`` (any saved model or run folder), or a new
    one from the ``model`` section, its tokenizer ``tokenizer`` or trained on ``corpus()``, seeded by
    ``train.seed``."""
    if from_run:
        if not Path(from_run).exists():
            raise FileNotFoundError(f"{from_run}: no such run or model folder to build on; train a dual encoder "
                                    f"first (e.g. `vlpt demo` writes runs/demo) or point the run at one")
        return load_dual_encoder(from_run)
    tokenizer = tokenizer or get_tokenizer(config.model, corpus())
    return create_model(copy.deepcopy(config.model), tokenizer, seed=config.train.seed)


def pair_batches(config: RunConfig, data: Pairs, tokenizer: Tokenizer, env: DistributedEnv,
                 twins: bool = True, caption_noise: bool = False) -> Batches:
    """This rank's image-caption batches of an in-memory training set (one random caption per image),
    with the data set's augmentation, for shapes with ``twins`` minimal-edit twins kept together, and with
    ``caption_noise`` (tasks that only read captions, never write them) ``data.caption_noise``."""
    t, d = config.train, config.data
    group = 2 if twins and d.twins and applies(d, "twins") else 1
    noise = d.caption_noise if caption_noise else 0.0
    return rank_slice(PairBatches(data.images, data.captions, tokenizer, t.batch_size, t.seed, labels=data.labels,
                                  augment=d.augment and applies(d, "augment"), group_size=group,
                                  caption_noise=noise), env)


def rank_slice(batches: Batches, env: DistributedEnv) -> Batches:
    """This rank's contiguous share of every global batch (the global batch itself in one process)."""
    return RankSlice(batches, env.rank, env.world_size) if env.distributed else batches


class _StepModule(nn.Module):
    """An objective's whole training step as one module's forward, so DistributedDataParallel sees every use
    of every parameter (a step may call several of the model's methods: encode, fuse, head)."""

    def __init__(self, objective: Objective):
        super().__init__()
        self.inner = objective.model
        self.objective = objective

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.objective.training_step(batch)


class DataParallel:
    """``objective`` under DistributedDataParallel: every rank runs its step on its slice of the global batch
    and DDP averages the gradients. The objective's losses must be written so that this average is the
    gradient of the global batch's loss (a rank's sum over its rows divided by the global count, times the
    world size, where rows carry unequal weight)."""

    def __init__(self, objective: Objective, device: torch.device, find_unused_parameters: bool = True):
        self.objective = objective
        module = _StepModule(objective).to(device)
        self.model = DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                             find_unused_parameters=find_unused_parameters)
        if hasattr(objective, "generator"):  # its random state is checkpointed for an exact resume
            self.generator = objective.generator

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.model(batch)


def data_parallel(objective: Objective, env: DistributedEnv, device: torch.device) -> Objective:
    """The objective itself in one process; wrapped in ``DataParallel`` under torchrun."""
    return DataParallel(objective, device) if env.distributed else objective
