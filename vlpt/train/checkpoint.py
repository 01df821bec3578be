"""Training checkpoints: the model (``save_pretrained`` layout) plus optimizer, scheduler, RNG and step
state, written atomically and durably (``vlpt.io.atomic_directory``) and read back before they are put in
place; ``latest_checkpoint`` only ever returns a complete, readable one."""

from __future__ import annotations

import json
import logging
import re
import shutil
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from vlpt.io import atomic_directory
from vlpt.models.dual_encoder import CONFIG_NAME, WEIGHTS_NAME, DualEncoder

log = logging.getLogger(__name__)

STATE_NAME = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(OSError):
    """A checkpoint that was written but does not read back (e.g. a write lost on a full disk)."""


def checkpoint_step(checkpoint: Path) -> int:
    return int(_STEP_DIR.match(checkpoint.name).group(1))


def save_checkpoint(checkpoint_dir: Path, step: int, model: DualEncoder, state: dict[str, Any],
                    keep: int = 2, protect: Iterable[Path] = ()) -> Path:
    """Write ``checkpoint_dir/step_<step>`` and prune old ones (``prune_checkpoints``; ``protect`` are
    never deleted). If anything fails, the error propagates, no temp folder is left and the checkpoints
    already there are untouched (none is pruned)."""
    target = checkpoint_dir / f"step_{step:07d}"
    with atomic_directory(target) as tmp:
        model.write_files(tmp)
        torch.save(state, tmp / STATE_NAME)
        problem = checkpoint_problem(tmp)  # some writers lose a failed write silently (a full disk)
        if problem is not None:
            raise CheckpointError(f"the checkpoint of step {step} does not read back: {problem}")
    if keep > 0:
        prune_checkpoints(checkpoint_dir, keep, protect=[target, *protect])
    return target


def prune_checkpoints(checkpoint_dir: Path, keep: int, protect: Iterable[Path] = ()) -> list[Path]:
    """Keep the newest ``keep`` readable checkpoints and those in ``protect`` (e.g. the one the run
    resumed from); delete every other checkpoint older than the oldest kept (broken ones included).
    Returns the deleted folders."""
    found = list_checkpoints(checkpoint_dir)
    whole = [p for p in found if checkpoint_problem(p) is None][-keep:]
    if not whole:
        return []
    protected = {p.name for p in whole} | {Path(p).name for p in protect}
    oldest_kept = checkpoint_step(whole[0])
    deleted = [p for p in found if p.name not in protected and checkpoint_step(p) < oldest_kept]
    for old in deleted:
        shutil.rmtree(old, ignore_errors=True)
    return deleted


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first (temp folders of an interrupted save are ignored). A
    folder listed here may still be damaged; ``latest_checkpoint`` checks."""
    if not checkpoint_dir.exists():
        return []
    found = [p for p in checkpoint_dir.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_NAME).exists()]
    return sorted(found, key=checkpoint_step)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (a missing, truncated or unreadable file), or None.

    Cheap, reading no tensors: the files ``save_checkpoint`` writes exist, model.safetensors' header
    parses and covers the whole file, trainer_state.pt's zip directory (at its end) is there, and every
    JSON file (config.json, the tokenizer's) parses."""
    for name in (WEIGHTS_NAME, CONFIG_NAME, STATE_NAME):
        if not (checkpoint / name).is_file():
            return f"{name} is missing"
    try:
        with safe_open(str(checkpoint / WEIGHTS_NAME), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as err:
        return f"{WEIGHTS_NAME} is unreadable ({err})"
    if not zipfile.is_zipfile(checkpoint / STATE_NAME):
        return f"{STATE_NAME} is truncated or not a torch.save file"
    for path in sorted(checkpoint.rglob("*.json")):
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as err:
            return f"{path.relative_to(checkpoint)} is unreadable ({err})"
    return None


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest readable checkpoint (``checkpoint_problem``): a damaged one is skipped with a warning
    naming it, falling back to the one before. None if there is none."""
    for checkpoint in reversed(list_checkpoints(checkpoint_dir)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        log.warning("skipping checkpoint %s: %s; falling back to the one before", checkpoint, problem)
    return None


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / STATE_NAME, map_location="cpu", weights_only=True)
