"""Training tasks by name. ``train.task`` is looked up here and nowhere else: the CLI, ``vlpt eval``, the run
lifecycle and loading all take a run's kind from its config through ``get_task``.

Adding a task is one ``TaskSpec`` subclass (see ``vlpt.tasks.base``) and one entry: ``register_task(MyTask())``
from your own code, or a line in ``TASKS`` below for a built-in one.
"""

from __future__ import annotations

from vlpt.tasks.base import MODEL_DIR, DataParallel, Objective, TaskSpec, data_parallel, dual_encoder_for, rank_slice
from vlpt.tasks.caption import Captioning, CoCa
from vlpt.tasks.contrastive import Contrastive
from vlpt.tasks.finetune import FINETUNE_TASKS
from vlpt.tasks.generate import TextToImage

__all__ = ["MODEL_DIR", "TASKS", "DataParallel", "Objective", "TaskSpec", "data_parallel", "dual_encoder_for",
           "get_task", "rank_slice", "register_task", "task_names"]

TASKS: dict[str, TaskSpec] = {task.name: task for task in (
    Contrastive(), Captioning(), CoCa(), TextToImage(), *FINETUNE_TASKS.values())}


def register_task(task: TaskSpec, replace: bool = False) -> TaskSpec:
    """Make ``task`` available as ``train.task: <task.name>``; an existing name needs ``replace=True``."""
    if not isinstance(task, TaskSpec):
        raise TypeError(f"register_task takes a TaskSpec instance, got {type(task).__name__}")
    if task.name in TASKS and not replace:
        raise ValueError(f"a task named {task.name!r} is already registered; pass replace=True to override it")
    TASKS[task.name] = task
    return task


def task_names() -> list[str]:
    return list(TASKS)


def get_task(name: str) -> TaskSpec:
    """The task registered as ``name``; an unknown name is an error listing the choices."""
    if name not in TASKS:
        raise ValueError(f"unknown train.task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]
