"""Training checkpoints: the model (``save_pretrained`` layout) plus optimizer, scheduler, RNG and step
state, each written atomically; ``latest_checkpoint`` only ever sees complete ones."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch

from vlpt.io import atomic_directory
from vlpt.models.dual_encoder import DualEncoder

STATE_NAME = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def save_checkpoint(checkpoint_dir: Path, step: int, model: DualEncoder, state: dict[str, Any],
                    keep: int = 2) -> Path:
    target = checkpoint_dir / f"step_{step:07d}"
    with atomic_directory(target) as tmp:
        model.write_files(tmp)
        torch.save(state, tmp / STATE_NAME)
    for old in list_checkpoints(checkpoint_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp folders of an interrupted save are ignored)."""
    if not checkpoint_dir.exists():
        return []
    found = [p for p in checkpoint_dir.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_NAME).exists()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    found = list_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / STATE_NAME, map_location="cpu", weights_only=True)
