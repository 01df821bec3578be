"""Shared benchmark plumbing: machine facts, results JSON in bench/results/, a printed table."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "timm", "transformers", "tokenizers", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "versions": versions, "date": datetime.date.today().isoformat()}


def flop_counter():
    """``torch.utils.flop_counter.FlopCounterMode`` that also counts the CPU flash-attention kernels.

    torch's counter knows the CUDA SDPA kernels only: ``F.scaled_dot_product_attention`` on the CPU runs
    ``_scaled_dot_product_flash_attention_for_cpu`` (and its backward), which it skips, so a transformer's
    attention matmuls (~3% of the benchmark ViT step) went uncounted. They are counted here with torch's
    own SDPA formulas (2 matmuls forward, 4 backward: model FLOPs, without the scores the flash kernel
    recomputes in its backward), for every library alike."""
    from torch.utils import flop_counter as fc

    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        # the model's 4 backward matmuls; torch's formula adds the scores the flash kernel recomputes
        b, h, s_q, d = query_shape
        recomputed = fc.bmm_flop((b * h, s_q, d), (b * h, d, key_shape[2]))
        return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape) - recomputed

    aten = torch.ops.aten
    return fc.FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward})


def git_commit() -> dict:
    """The commit the benchmark ran on, and whether the working tree had uncommitted changes."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=RESULTS.parent.parent, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""
    return {"commit": git("rev-parse", "HEAD") or None,
            "commit_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


STARTED_ON = git_commit()  # the code a benchmark runs is the code it started with
PROVENANCE_KEYS = ("commit", "commit_dirty", "commit_at_end")  # what write_results adds besides the figures


def write_results(name: str, figures: dict, config: dict | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    ended_on = git_commit()
    data = {**figures, "config": config or {}, "machine": machine_info(), **STARTED_ON}
    if ended_on != STARTED_ON:  # the tree changed while it ran: say so rather than guess which code ran
        data["commit_at_end"] = ended_on
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    print_table(name, figures)
    print(f"wrote {path}")
    return path


def print_table(title: str, figures: dict) -> None:
    width = max(map(len, figures))
    print(f"\n{title}\n" + "-" * (width + 14))
    for key, value in figures.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown:>10}")
