"""`vlpt train` / `vlpt finetune` under a real torchrun with 2 gloo processes (a rank killed and the group
restarted; fine-tuning data-parallel), and GradCache accumulation in the trainer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_run_config
from vlpt.cli import main
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


# ----------------------------------------------------------------------------- a rank killed: torchrun restarts

LAUNCH = """
import os, signal, sys
from vlpt.data import pairs

# Test side only: on the first attempt, rank 1 is SIGKILLed when it asks for batch KILL_AT (after that many
# steps), as a node lost mid-run would be. torchrun --max-restarts then restarts the whole group.
kill_at = int(os.environ["KILL_AT"])
if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and os.environ["RANK"] == "1":
    real_batch = pairs.RankSlice.batch

    def batch(self, step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_batch(self, step)

    pairs.RankSlice.batch = batch
from vlpt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def torchrun(tmp_path, args, kill_at=-1, restarts=0):
    launch = tmp_path / "launch.py"
    launch.write_text(LAUNCH)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLPT_CACHE": str(tmp_path / "cache"), "KILL_AT": str(kill_at),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(restarts), str(launch), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def losses(run_dir):
    return {r["step"]: r["loss"] for r in log_rows(run_dir) if "loss" in r}


def test_torchrun_restart_after_a_killed_rank_finishes_like_an_uninterrupted_run(tmp_path):
    config_path = tmp_path / "tiny.yaml"
    save_config(tiny_run_config(steps=8, **{"train.checkpoint_every": 2}), config_path)
    args = ["train", "--config", str(config_path), "--runs-dir", str(tmp_path / "runs")]
    done = torchrun(tmp_path, args + ["--name", "killed"], kill_at=5, restarts=1)
    assert done.returncode == 0, done.stderr[-3000:]
    # the group really lost a rank (SIGKILL: exit code -9) and the restarted group resumed from a checkpoint
    assert "exitcode: -9" in done.stderr and "resumed from" in done.stderr, done.stderr[-3000:]
    straight = torchrun(tmp_path, args + ["--name", "straight"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed, want = losses(tmp_path / "runs" / "killed"), losses(tmp_path / "runs" / "straight")
    assert sorted(killed) == list(range(1, 9))  # resumed from step 4's checkpoint: no step lost or repeated
    assert killed == pytest.approx(want, rel=1e-6)
    metrics = json.loads((tmp_path / "runs" / "killed" / "metrics.json").read_text())
    assert metrics["steps"] == 8


# ----------------------------------------------------------------------------- fine-tuning data-parallel

VIT = {"model.image.name": "vit_tiny_patch16_224", "model.image.pool": "timm",
       "model.image.timm_kwargs": json.dumps({"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2})}


def test_vlpt_finetune_on_two_processes_matches_one_on_the_global_batch(tmp_path):
    """`vlpt finetune` under torchrun trains data-parallel: the logged loss (the mean over ranks, what DDP
    optimises) equals one process's on the same global batches, step by step. A ViT tower: BatchNorm's batch
    statistics would depend on how the batch is split (SyncBatchNorm is GPU-only)."""
    pre = tiny_run_config(steps=2, **VIT, **{"train.checkpoint_every": 0})
    save_config(pre, tmp_path / "pre.yaml")
    assert main(["train", "--config", str(tmp_path / "pre.yaml"), "--name", "pre", "--runs-dir", str(tmp_path)]) == 0
    ft = tiny_run_config(steps=3, **{"finetune.train_size": 64, "finetune.test_size": 16, "train.batch_size": 16,
                                     "train.checkpoint_every": 0, "finetune.cross_width": 32,
                                     "finetune.cross_layers": 1, "finetune.cross_heads": 2})
    save_config(ft, tmp_path / "ft.yaml")
    args = ["finetune", "--task", "vqa", "--from", str(tmp_path / "pre"), "--config", str(tmp_path / "ft.yaml"),
            "--runs-dir", str(tmp_path)]
    done = torchrun(tmp_path, args + ["--name", "two"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(args + ["--name", "one"]) == 0
    two, one = log_rows(tmp_path / "two"), log_rows(tmp_path / "one")
    assert [r["world_size"] for r in two if "loss" in r] == [2, 2, 2]
    for a, b in zip([r for r in two if "loss" in r], [r for r in one if "loss" in r]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["steps"] == 3
