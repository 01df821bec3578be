"""Issue 2 acceptance: the demo's wall time and held-out quality, and the LiT digits run.

Runs `vlpt demo` (train + eval + report of tiny-shapes) in a fresh process against a cold data cache,
timing everything but the install, then the lit-digits config. Writes bench/results/demo.json.

    .venv/bin/python bench/demo.py [--skip-lit]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_results

ROOT = Path(__file__).resolve().parents[1]
VLPT = [sys.executable, "-m", "vlpt"]


def timed(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, env=env, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-lit", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "VLPT_CACHE": str(Path(tmp) / "cache")}  # cold cache: rendering is timed too
        runs = Path(tmp) / "runs"
        demo_seconds = timed(VLPT + ["demo", "--runs-dir", str(runs)], env)
        metrics = json.loads((runs / "demo" / "metrics.json").read_text())
        figures = {"demo_wall_seconds": demo_seconds, **{f"demo_{k}": v for k, v in metrics.items()}}
        if not args.skip_lit:
            lit_seconds = timed(VLPT + ["train", "--config", "lit-digits", "--runs-dir", str(runs)], env)
            lit = json.loads((runs / "lit-digits" / "metrics.json").read_text())
            figures |= {"lit_digits_wall_seconds": lit_seconds, **{f"lit_digits_{k}": v for k, v in lit.items()}}
    write_results("demo", figures, {"demo_config": "tiny-shapes", "lit_config": "lit-digits"})


if __name__ == "__main__":
    main()
