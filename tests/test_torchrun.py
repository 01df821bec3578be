"""`vlpt train` under a real torchrun with 2 gloo processes, and GradCache accumulation in the trainer."""

import json
import os
import subprocess
import sys

from tests.conftest import tiny_run_config
from vlpt.config import save_config
from vlpt.train.run import fit


def log_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_torchrun_two_processes_train_and_only_rank0_writes(tmp_path):
    config_path = tmp_path / "tiny.yaml"
    save_config(tiny_run_config(steps=8, **{"train.checkpoint_every": 4}), config_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLPT_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vlpt", "train", "--config", str(config_path), "--name", "ddp", "--runs-dir", str(tmp_path / "runs")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "ddp"
    rows = [r for r in log_rows(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))  # one writer: no duplicated rows
    assert all(r["world_size"] == 2 for r in rows)
    assert "2 process(es)" in done.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000004", "step_0000008"]
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 8


def test_gradcache_accumulation_trains_through_the_trainer(tmp_path):
    config = tiny_run_config(steps=6, **{"train.accum_steps": 4, "train.accum_mode": "gradcache"})
    fit(config, tmp_path)
    rows = [r for r in log_rows(tmp_path) if "loss" in r]
    assert len(rows) == 6 and all(r["loss"] > 0 for r in rows)
