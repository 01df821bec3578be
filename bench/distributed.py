"""Issue 6: a 2-process torchrun run of the demo config vs the 1-process demo (same global batch 128 and
steps). Reads the 1-process figures from bench/results/demo.json; writes bench/results/distributed.json.

    .venv/bin/python bench/distributed.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, write_results

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    single = json.loads((RESULTS / "demo.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "VLPT_CACHE": str(Path(tmp) / "cache")}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vlpt",
               "train", "--config", "tiny-shapes", "--name", "ddp", "--runs-dir", str(Path(tmp) / "runs")]
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        seconds = time.perf_counter() - start
        metrics = json.loads((Path(tmp) / "runs" / "ddp" / "metrics.json").read_text())
    figures = {"ddp2_wall_seconds": seconds, "ddp2_train_seconds": metrics["train_seconds"]}
    for key in ("zeroshot_top1", "zeroshot_compositional_top1", "retrieval_i2t_r5", "retrieval_t2i_r5"):
        figures[f"ddp2_{key}"] = metrics[key]
        figures[f"single_{key}"] = single[f"demo_{key}"]
    figures["zeroshot_top1_difference_points"] = 100 * (figures["ddp2_zeroshot_top1"] - figures["single_zeroshot_top1"])
    write_results("distributed", figures, {"config": "tiny-shapes", "processes": 2, "backend": "gloo",
                                           "threads_per_process": 1})


if __name__ == "__main__":
    main()
