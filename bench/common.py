"""Shared benchmark plumbing: machine facts, results JSON in bench/results/, a printed table."""

from __future__ import annotations

import datetime
import json
import os
import platform
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


def write_results(name: str, figures: dict, config: dict | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {**figures, "config": config or {}, "machine": machine_info()}
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
