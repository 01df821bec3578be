"""A model-agnostic trainer: AdamW, warm-up + cosine schedule, clipping, accumulation, autocast on
CUDA, an optional moving average of the weights (EMA), progress bar, JSONL metrics, atomic checkpoints
and exact resume; a guard against non-finite losses and gradients, and a clean stop on SIGTERM / SIGINT
(preemption) with a checkpoint to resume from."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from vlpt.config import TrainConfig
from vlpt.io import atomic_write_text, fsync_file
from vlpt.train.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from vlpt.train.gradcache import gradcache_step, split_micro_batches

log = logging.getLogger(__name__)

# Exit codes of `vlpt train` when training stops early (sysexits.h): a job script can tell them apart.
EXIT_NONFINITE = 65  # EX_DATAERR: a non-finite loss or gradient; don't retry as is (lower train.lr, check the data)
EXIT_CHECKPOINT_FAILED = 74  # EX_IOERR: the final checkpoint could not be written (a full disk?)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM / SIGINT after writing a checkpoint; rerun with --resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(RuntimeError):
    """Training ended before its last step; ``step`` is where, ``exit_code`` what `vlpt` exits with."""

    exit_code = 1

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


class NonFiniteLossError(TrainingStopped):
    """A NaN / inf loss, loss part or gradient norm (``train.nonfinite``); the weights were not updated with it."""

    exit_code = EXIT_NONFINITE


class Preempted(TrainingStopped):
    """SIGTERM or SIGINT (on any rank): a checkpoint of ``step`` was written; ``fit(resume=True)`` continues
    exactly."""

    exit_code = EXIT_PREEMPTED


class CheckpointWriteError(TrainingStopped):
    """The checkpoint that ends ``fit`` (or a preemption) could not be written; the cause is chained."""

    exit_code = EXIT_CHECKPOINT_FAILED


# What a checkpoint write that runs out of disk raises: OSError from Python writes, RuntimeError from
# torch.save's zip writer, SafetensorError from safetensors (both wrap the OS error in their message).
def _write_errors() -> tuple[type[BaseException], ...]:
    return OSError, RuntimeError, SafetensorError


class Task(Protocol):
    model: nn.Module

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


class Batches(Protocol):
    def batch(self, step: int) -> dict[str, torch.Tensor]: ...


# glibc mallopt(3) parameters
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next allocation instead of giving it back to the kernel.

    A CPU training step frees and allocates the same few hundred MB of activations every step. By default
    glibc serves each block over 32 MB (and, after trimming, much of the rest) with fresh pages that fault
    in, zeroed by the kernel, on first touch: 38,000-105,000 page faults per step of the benchmark ViT.
    With mmap off and trimming off, the next step reuses the last one's pages: 0 faults, 1.11x faster
    steps (bench/cpu_memory.py). Process-wide and lasting: the process keeps its peak memory until it
    exits (like a GPU caching allocator). Returns False, changing nothing, where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    # -1 disables trimming (mallopt(3)); every block comes from the heap, which is then never trimmed
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use device=cpu or auto")
    return device


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on CUDA by default; fp32 on CPU (this CPU class has no fast bf16)."""
    choices = ("auto", "fp32", "bf16")
    if precision not in choices:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(choices)}")
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """lr multiplier: linear warm-up from 1/warmup to 1, then cosine down to ``min_ratio``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def ema_decay_at(step: int, decay: float) -> float:
    """The EMA decay after ``step`` updates: (1 + step) / (10 + step), capped at ``decay`` (the warm-up of
    timm's and diffusers' EMA): early averages forget the random initialisation within a few steps."""
    return min(decay, (1 + step) / (10 + step))


class WeightAverage:
    """An exponential moving average of a model's trainable parameters: avg <- d * avg + (1 - d) * param
    after every optimizer step (Polyak averaging; the weights diffusion models are sampled with)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"train.ema_decay must be in (0, 1) (0 turns the average off), got {decay}")
        self.decay = decay
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.average = {name: p.detach().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the current weights in, ``step`` being the number of optimizer steps taken before this one."""
        weight = 1 - ema_decay_at(step, self.decay)
        for name, p in self.params.items():
            self.average[name].lerp_(p.detach(), weight)

    def to(self, device: torch.device) -> None:
        """Keep the average where the model trains (``fit`` moves both)."""
        self.average = {name: t.to(device) for name, t in self.average.items()}

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for name, p in self.params.items():
            p.copy_(self.average[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().cpu().clone() for name, t in self.average.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.average) - set(state)
        if missing:
            raise ValueError(f"the checkpoint's weight average lacks {len(missing)} parameters, e.g. "
                             f"{sorted(missing)[0]}; was it saved with another model?")
        for name, t in self.average.items():
            t.copy_(state[name])


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: biases, norms, temperature and embeddings' 1-d params are left alone."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def tensorboard_writer(directory: Path):
    """A TensorBoard SummaryWriter into ``directory``; a clear error when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package
    except ImportError as err:
        raise ValueError("train.report_to includes tensorboard, which needs the tensorboard package: "
                         "pip install 'vlpt[tensorboard]' (or pip install tensorboard)") from err
    return SummaryWriter(log_dir=str(directory))


def read_log(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``log.jsonl`` (training and periodic-eval rows), or [] if there is none."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Trainer:
    def __init__(self, task: Task, batches: Batches, config: TrainConfig, run_dir: str | Path,
                 evaluate: Callable[[nn.Module, int], dict[str, float]] | None = None,
                 rank: int = 0, world_size: int = 1, save_model: nn.Module | None = None):
        if config.accum_mode not in ("plain", "gradcache"):
            raise ValueError(f"unknown accum_mode {config.accum_mode!r}; choose from plain, gradcache")
        if config.batch_size % config.accum_steps:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by accum_steps {config.accum_steps}")
        if config.max_seconds and world_size > 1:
            raise ValueError("train.max_seconds works in single-process runs only: under torchrun each rank would "
                             "stop at its own step and the others would wait for it forever")
        if config.nonfinite not in ("stop", "skip"):
            raise ValueError(f"unknown train.nonfinite {config.nonfinite!r}; choose from stop, skip")
        if config.max_nonfinite_skips < 0:
            raise ValueError(f"train.max_nonfinite_skips must be >= 0, got {config.max_nonfinite_skips}")
        self.task, self.batches, self.config = task, batches, config
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.log_path = self.run_dir / "log.jsonl"
        self.evaluate = evaluate
        self.rank, self.world_size = rank, world_size
        self.model = task.model
        self.save_model = save_model or getattr(self.model, "module", self.model)  # unwrap DDP
        self.device = resolve_device(config.device)
        if self.device.type == "cpu" and config.keep_cpu_memory:
            keep_freed_cpu_memory()
        # fused AdamW: one kernel over all parameters (on CPU ~3x faster than the per-tensor loop)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, config.weight_decay), lr=config.lr,
                                           betas=(0.9, 0.98), eps=1e-6,
                                           fused=self.device.type in ("cuda", "cpu") or None)
        min_ratio = config.min_lr / config.lr if config.lr > 0 else 0.0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(config.warmup_steps, config.steps, min_ratio))
        self.weight_average = WeightAverage(self.save_model, config.ema_decay) if config.ema_decay else None
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.tensorboard = None  # a SummaryWriter while fit runs, with train.report_to tensorboard (rank 0)
        self.out_of_time = False  # fit stopped by config.max_seconds before config.steps
        self.nonfinite_skips = 0  # consecutive steps skipped for a non-finite loss or gradient (nonfinite=skip)
        self.resumed_from: Path | None = None  # the checkpoint resume() loaded; never pruned by this trainer
        self.last_checkpoint: Path | None = None  # the newest checkpoint written or resumed from
        self._checkpoint_step: int | None = None  # its step: fit's last checkpoint isn't written twice
        self._stop_signal: int | None = None  # SIGTERM / SIGINT received during fit

    @property
    def finished(self) -> bool:
        """Trained to config.steps, or stopped by the config.max_seconds budget: time to save the model."""
        return self.step >= self.config.steps or self.out_of_time

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                 "nonfinite_skips": self.nonfinite_skips}
        generator = getattr(self.task, "generator", None)
        if generator is not None:
            state["task_rng"] = generator.get_state()
        if self.weight_average is not None:
            state["weight_average"] = self.weight_average.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.nonfinite_skips = int(state.get("nonfinite_skips", 0))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if "task_rng" in state:
            self.task.generator.set_state(state["task_rng"])
        if self.weight_average is not None:
            if "weight_average" not in state:
                raise ValueError("train.ema_decay is set but the checkpoint has no weight average; resume with "
                                 "the ema_decay the run started with")
            self.weight_average.load_state_dict(state["weight_average"])

    def resume(self) -> bool:
        """Load the latest complete checkpoint (a damaged one is skipped: ``latest_checkpoint``); False when
        there is none. The checkpoint is kept however many newer ones this trainer writes."""
        checkpoint = latest_checkpoint(self.checkpoint_dir)
        if checkpoint is None:
            return False
        self.save_model.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
        self.load_state_dict(load_trainer_state(checkpoint))
        self.resumed_from = self.last_checkpoint = checkpoint
        self._checkpoint_step = self.step
        self.history = [row for row in self._read_log() if row.get("step", 0) <= self.step]
        if self.rank == 0:  # drop log rows written after the checkpoint, so the curve has no repeats
            atomic_write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in self.history))
        log.info("resumed from %s at step %d", checkpoint, self.step)
        return True

    def _read_log(self) -> list[dict[str, Any]]:
        return read_log(self.log_path)

    def _log(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if self.rank == 0:
            with self.log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if self.tensorboard is not None:
                for key, value in row.items():
                    if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                        self.tensorboard.add_scalar(key, value, global_step=row["step"])

    def _open_reports(self) -> None:
        """Rank 0's extra sinks for the log rows (``train.report_to``); log.jsonl is always written."""
        if self.rank == 0 and "tensorboard" in self.config.report_to and self.tensorboard is None:
            self.tensorboard = tensorboard_writer(self.run_dir / "tensorboard")

    def _close_reports(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def save_checkpoint(self, must_succeed: bool = True) -> Path | None:
        """Write a checkpoint of the current step (rank 0 only; other ranks return None).

        A write that fails (a full disk, an I/O error) leaves the earlier checkpoints as they were and no
        temp folder. With ``must_succeed`` (the checkpoint that ends ``fit``, or a preemption: without it the
        weights would be lost) it raises ``CheckpointWriteError``; otherwise (periodic checkpoints) it logs a
        warning and a ``{"step", "checkpoint_failed"}`` row and returns None, and training goes on."""
        if self.rank != 0:
            return None
        try:
            path = save_checkpoint(self.checkpoint_dir, self.step, self.save_model, self.state_dict(),
                                   keep=self.config.keep_checkpoints,
                                   protect=[self.resumed_from] if self.resumed_from else [])
        except _write_errors() as err:
            reason = f"{type(err).__name__}: {err}"
            self._log({"step": self.step, "checkpoint_failed": reason})
            last = self.last_checkpoint or "none"
            if must_succeed:
                raise CheckpointWriteError(self.step, f"could not write the checkpoint of step {self.step} ({reason}); "
                                           f"the last checkpoint is {last}") from err
            log.warning("could not write the checkpoint of step %d (%s); training goes on, the last checkpoint "
                        "is %s", self.step, reason, last)
            return None
        self.last_checkpoint, self._checkpoint_step = path, self.step
        return path

    # ------------------------------------------------------------------ loop
    def fit(self, stop_after: int | None = None) -> list[dict[str, Any]]:
        """Train to ``config.steps``; with ``stop_after``, checkpoint and return at that step instead
        (training in chunks, e.g. under a job time limit; ``resume`` continues exactly).

        Every step, after the backward pass and before clipping and the update, the loss, each loss part
        the task returns and the total gradient norm are checked for NaN / inf (``train.nonfinite``):

        - ``stop``: the weights are not updated, a ``{"step", "nonfinite": <parts>}`` row is logged, no
          checkpoint is written of this state (the last good one stays the latest) and
          ``NonFiniteLossError`` is raised; resume from that checkpoint, e.g. with a lower lr.
        - ``skip``: the gradients are dropped and the optimizer, scheduler and EMA are not stepped (the
          model's buffers, e.g. BatchNorm statistics, are restored as well), but the step counter still
          advances, so the batch order stays a pure function of the step; after
          ``train.max_nonfinite_skips`` consecutive skips the next non-finite step stops as above.

        SIGTERM and SIGINT (handlers installed while ``fit`` runs, in the main thread only; the previous
        ones are restored) finish the current step, write a checkpoint of it, log a
        ``{"stopped": "preempted"}`` row and raise ``Preempted``. A second SIGINT interrupts at once.

        Under torch.distributed one small all_reduce (MAX) per step of the non-finite and stop flags makes
        every rank take the same decision at the same step, whichever rank saw the NaN or the signal.
        """
        cfg = self.config
        end = cfg.steps if stop_after is None else min(stop_after, cfg.steps)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.model.to(self.device).train()
        if self.weight_average is not None:
            self.weight_average.to(self.device)
        autocast = autocast_context(self.device, cfg.precision)
        # A bar on a terminal; in a log file (not a TTY) no per-step redraws: a line per log row instead.
        interactive = self.rank == 0 and sys.stderr.isatty()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not interactive, desc="train", dynamic_ncols=True)
        self._open_reports()
        window_images, window_start = 0, time.perf_counter()
        eager_model = self.task.model
        self._stop_signal = None
        with self._catch_stop_signals():
            try:
                compiling = cfg.compile and self._compile()
                fit_start = time.perf_counter()
                while self.step < end:
                    if cfg.max_seconds and time.perf_counter() - fit_start >= cfg.max_seconds:
                        self.out_of_time = True  # the time budget: stop here, as if this were the last step
                        log.warning("train.max_seconds (%g s) reached at step %d of %d; stopping", cfg.max_seconds,
                                    self.step, cfg.steps)
                        self._log({"step": self.step, "stopped": "max_seconds"})
                        break
                    batch = self.batches.batch(self.step)
                    buffers = self._buffers() if cfg.nonfinite == "skip" else None
                    try:
                        parts = self._forward_backward(batch, autocast)
                    except Exception as err:  # a failed compile falls back to eager
                        if not compiling:
                            raise
                        log.warning("torch.compile failed (%s: %s); training eagerly", type(err).__name__, err)
                        self.task.model = eager_model
                        self.optimizer.zero_grad(set_to_none=True)
                        parts = self._forward_backward(batch, autocast)
                    compiling = False
                    grad_norm = torch.nn.utils.get_total_norm(
                        [p.grad for p in self.model.parameters() if p.grad is not None])
                    parts["grad_norm"] = float(grad_norm)
                    nonfinite, stop_requested = self._agree(parts)
                    lr = self.optimizer.param_groups[0]["lr"]
                    if nonfinite:
                        self._skip_nonfinite(nonfinite, buffers)  # raises unless the step may be skipped
                    else:
                        if cfg.grad_clip > 0:
                            torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), cfg.grad_clip, grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                        self.scheduler.step()
                        if self.weight_average is not None:
                            self.weight_average.update(self.step)
                        self.nonfinite_skips = 0
                    self.step += 1
                    window_images += len(batch["images"]) * self.world_size
                    bar.update(1)

                    if not nonfinite and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                        parts = self._mean_over_ranks(parts)
                        elapsed = time.perf_counter() - window_start
                        row = {"step": self.step, "lr": lr, **parts,
                               "images_per_s": window_images / max(elapsed, 1e-9), "world_size": self.world_size}
                        self._log(row)
                        bar.set_postfix(loss=f"{parts['loss']:.3f}", lr=f"{lr:.2e}",
                                        img_s=f"{row['images_per_s']:.0f}")
                        if self.rank == 0 and not interactive:
                            log.info("step %d/%d  loss %.4f  lr %.2e  %.0f images/s", self.step, cfg.steps,
                                     parts["loss"], lr, row["images_per_s"])
                        window_images, window_start = 0, time.perf_counter()
                    if self.evaluate and cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                        self.model.eval()
                        self._log({"step": self.step, **self.evaluate(self.save_model, self.step)})
                        self.model.train()
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                        self.save_checkpoint(must_succeed=False)
                    if stop_requested:
                        self._preempt()
                if self._agree_to_stop():  # a signal after the last step's check: stop before evaluation
                    self._preempt()
            finally:
                bar.close()
                self.task.model = eager_model
                self._close_reports()
        if self._checkpoint_step != self.step:  # (not written already by a periodic save or the resume)
            self.save_checkpoint()  # the trained weights (and their average): resume continues exactly
        if self.weight_average is not None and self.finished:
            self.weight_average.copy_to_model()  # the final model is the average
        self.model.eval()
        return self.history

    # ------------------------------------------------------------------ non-finite guard, preemption
    def _agree(self, parts: dict[str, float]) -> tuple[dict[str, int], bool]:
        """This step's verdict, the same on every rank: ({non-finite part: the highest rank that saw it},
        whether any rank got a stop signal). Under torch.distributed, one all_reduce (MAX) of a small tensor."""
        names = sorted(parts)
        flags = [0 if math.isfinite(parts[name]) else self.rank + 1 for name in names]
        flags.append(int(self._stop_signal is not None))
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            agreed = torch.tensor(flags, dtype=torch.int64, device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            flags = agreed.tolist()
        return {name: flag - 1 for name, flag in zip(names, flags) if flag}, bool(flags[-1])

    def _mean_over_ranks(self, parts: dict[str, float]) -> dict[str, float]:
        """The loss parts averaged over ranks, as logged: what DDP optimises when each rank holds its slice's
        loss (ranks that compute the global batch's loss, as the gathering contrastive losses do, agree)."""
        if self.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return parts
        names = sorted(parts)
        values = torch.tensor([parts[name] for name in names], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        return {name: value / self.world_size for name, value in zip(names, values.tolist())}

    def _agree_to_stop(self) -> bool:
        """Whether any rank got a stop signal (one all_reduce under torch.distributed)."""
        return self._agree({})[1]

    def _buffers(self) -> dict[str, torch.Tensor]:
        return {name: b.detach().clone() for name, b in self.save_model.named_buffers()}

    @torch.no_grad()
    def _skip_nonfinite(self, nonfinite: dict[str, int], buffers: dict[str, torch.Tensor] | None) -> None:
        """Drop this step's gradients; log it; return if ``train.nonfinite=skip`` allows one more skipped
        step (restoring the model's buffers), else raise ``NonFiniteLossError``."""
        cfg, step = self.config, self.step + 1  # the step whose update this would have been
        what = ", ".join(nonfinite)
        where = f" (on rank {max(nonfinite.values())})" if self.world_size > 1 else ""
        skip = cfg.nonfinite == "skip" and self.nonfinite_skips < cfg.max_nonfinite_skips
        self.optimizer.zero_grad(set_to_none=True)
        row = {"step": step, "nonfinite": what, "action": "skip" if skip else "stop"}
        if self.world_size > 1:
            row["rank"] = max(nonfinite.values())
        self._log(row)
        if skip:
            self.nonfinite_skips += 1
            if buffers is not None:
                for name, b in self.save_model.named_buffers():
                    b.copy_(buffers[name])
            log.warning("non-finite %s at step %d%s: update skipped (%d in a row, train.max_nonfinite_skips=%d)",
                        what, step, where, self.nonfinite_skips, cfg.max_nonfinite_skips)
            return
        after = (f", after {self.nonfinite_skips} skipped step(s) in a row (train.max_nonfinite_skips="
                 f"{cfg.max_nonfinite_skips})" if cfg.nonfinite == "skip" else "")
        last = self.last_checkpoint or f"the newest in {self.checkpoint_dir}"
        raise NonFiniteLossError(step, f"non-finite {what} at step {step}{where}{after}; the weights were not "
                                 f"updated and no checkpoint was written of this state. The last good checkpoint "
                                 f"({last}) can be resumed with --resume, perhaps with a lower train.lr "
                                 f"(or train.nonfinite=skip to skip such batches)")

    def _preempt(self) -> None:
        """Write a checkpoint of the current step, flush the log and raise ``Preempted`` (every rank)."""
        received = signal.Signals(self._stop_signal).name if self._stop_signal is not None else None
        by = received or "a stop signal on another rank"
        log.warning("%s: stopping at step %d with a checkpoint", by, self.step)
        self._log({"step": self.step, "stopped": "preempted", "signal": received or "other rank"})
        try:
            path = self.save_checkpoint() if self._checkpoint_step != self.step else self.last_checkpoint
        finally:  # no rank exits (and gets the others killed by torchrun) before rank 0 has written it
            if self.world_size > 1 and dist.is_available() and dist.is_initialized():
                dist.barrier()
        if self.rank == 0 and self.log_path.exists():
            fsync_file(self.log_path)
        where = path or f"{self.checkpoint_dir} (by rank 0)"
        raise Preempted(self.step, f"stopped by {by} at step {self.step}; checkpoint written to {where}; "
                                   f"continue with --resume")

    def _on_stop_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self._stop_signal is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self._stop_signal = signum

    @contextlib.contextmanager
    def _catch_stop_signals(self):
        """SIGTERM / SIGINT set a flag that ``fit`` acts on at the end of the step; the previous handlers
        come back afterwards. Python allows handlers in the main thread only: elsewhere nothing is caught."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_stop_signal) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python

    def _compile(self) -> bool:
        """Let the task call ``torch.compile(model)`` (same parameters; compiling happens at the first
        step, and ``fit`` falls back to the eager model if it fails). False if torch.compile is missing."""
        try:
            self.task.model = torch.compile(self.task.model)
        except Exception as err:
            log.warning("torch.compile unavailable (%s); training eagerly", err)
            return False
        return True

    def _forward_backward(self, batch: dict[str, torch.Tensor], autocast) -> dict[str, float]:
        """Forward and backward over one batch (its micro-batches, or GradCache); returns the loss parts."""
        cfg = self.config
        parts: dict[str, float] = {}
        if cfg.accum_mode == "gradcache":  # the contrastive batch is the whole accumulated batch
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with autocast:
                parts["loss"] = float(gradcache_step(self.task.model, batch, cfg.accum_steps,
                                                     self.task.loss_from_features))
            return parts
        for micro in split_micro_batches(batch, cfg.accum_steps, required=("images",)):
            micro = {k: v.to(self.device, non_blocking=True) for k, v in micro.items()}
            with autocast:
                out = self.task.training_step(micro)
            (out["loss"] / cfg.accum_steps).backward()
            for k, v in out.items():
                parts[k] = parts.get(k, 0.0) + float(v.detach()) / cfg.accum_steps
        return parts
