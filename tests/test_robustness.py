"""Issue 18: training survives a NaN, a preemption and a failing disk.

- The non-finite guard (``train.nonfinite``): a batch of NaN images stops training before its update
  (``stop``) or has its update skipped (``skip``, up to ``train.max_nonfinite_skips`` in a row); on two
  real gloo processes a NaN on rank 1 alone stops both ranks at the same step.
- Preemption: SIGTERM / SIGINT finish the step, write a checkpoint, exit with EXIT_PREEMPTED, and a
  resumed run has the loss curve of an uninterrupted one; on two processes a signal to one rank stops both.
- Checkpoints: a write that fails (the kernel refusing writes past RLIMIT_FSIZE, as on a full disk)
  leaves the previous checkpoint and training goes on; damaged checkpoints are skipped on resume; the
  checkpoint a run resumed from is never pruned; files are synced before the rename, the folder after.

The poison, the signals and the full disk are test-side hooks around real vlpt code: a Batches wrapper
handed to every Trainer vlpt builds, a real signal, a real resource limit.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlpt.io
import vlpt.train.trainer as trainer_module
from tests.conftest import tiny_run_config
from vlpt.config import save_config
from vlpt.factory import load_model
from vlpt.train.checkpoint import CheckpointError, latest_checkpoint, save_checkpoint
from vlpt.train.run import fit
from vlpt.train.trainer import (
    EXIT_CHECKPOINT_FAILED,
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    CheckpointWriteError,
    NonFiniteLossError,
    Preempted,
    Trainer,
)


def log_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in log_rows(run_dir) if "loss" in r}


def logged_loss_steps(path):
    """The steps with a loss row in a log another process is appending to (complete lines only)."""
    if not path.exists():
        return set()
    lines = path.read_text().split("\n")[:-1]  # the last piece is "" or a line still being written
    return {row["step"] for row in map(json.loads, lines) if "loss" in row}


def checkpoint_names(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())  # temp folders included


def nan_images(batch):
    """The batch with every image NaN: float images go into the model as they are (already normalised)."""
    B, H, W, _ = batch["images"].shape
    return {**batch, "images": torch.full((B, 3, H, W), float("nan"))}


class Hooked:
    """Batches that are NaN at ``poison`` steps and run ``on_batch(step, trainer)`` before each batch."""

    def __init__(self, batches, poison=(), on_batch=None):
        self.batches, self.poison, self.on_batch = batches, set(poison), on_batch
        self.trainer = None  # set by the hook_batches fixture

    def batch(self, step):
        if self.on_batch is not None:
            self.on_batch(step, self.trainer)
        batch = self.batches.batch(step)
        return nan_images(batch) if step in self.poison else batch


@pytest.fixture
def hook_batches(monkeypatch):
    """``hook_batches(**kwargs)``: every Trainer built from now on trains on ``Hooked(batches, **kwargs)``
    (``hook_batches()`` with no arguments: the plain batches). Returns the trainers built."""
    original, trainers, hook = Trainer.__init__, [], {}

    def init(self, task, batches, *args, **kwargs):
        wrapped = Hooked(batches, **hook) if hook else batches
        original(self, task, wrapped, *args, **kwargs)
        if hook:
            wrapped.trainer = self
        trainers.append(self)

    monkeypatch.setattr(Trainer, "__init__", init)

    def install(**kwargs):
        hook.clear()
        hook.update(kwargs)
        return trainers
    return install


# ----------------------------------------------------------------------------- non-finite guard

def test_nan_stops_before_the_update_and_the_last_checkpoint_resumes_exactly(tmp_path, hook_batches):
    config = tiny_run_config(steps=8, **{"train.checkpoint_every": 4})
    fit(config, tmp_path / "clean")
    clean = losses(tmp_path / "clean")
    run_dir = tmp_path / "nan"
    trainers = hook_batches(poison={4})  # batch 4 feeds the update of step 5
    with pytest.raises(NonFiniteLossError, match=r"non-finite grad_norm, loss at step 5\b.*--resume") as info:
        fit(config, run_dir)
    assert info.value.step == 5 and info.value.exit_code == EXIT_NONFINITE
    assert log_rows(run_dir)[-1] == {"step": 5, "nonfinite": "grad_norm, loss", "action": "stop"}
    assert losses(run_dir) == pytest.approx({s: clean[s] for s in range(1, 5)}, rel=1e-6)
    assert checkpoint_names(run_dir) == ["step_0000004"]  # nothing written of the poisoned state
    assert not (run_dir / "model").exists()
    # The update of step 5 was not applied: the weights are still those after step 4, the checkpoint's.
    saved = load_file(str(latest_checkpoint(run_dir / "checkpoints") / "model.safetensors"))
    for name, param in trainers[-1].save_model.named_parameters():
        assert torch.equal(param.detach(), saved[name]), name
    # The data is fixed: resuming from the last good checkpoint finishes like the clean run.
    hook_batches()
    fit(config, run_dir, resume=True)
    assert losses(run_dir) == pytest.approx(clean, rel=1e-6)
    assert sorted(losses(run_dir)) == list(range(1, 9))


def test_skip_mode_drops_one_update_and_training_finishes(tmp_path, hook_batches):
    config = tiny_run_config(steps=8, **{"train.nonfinite": "skip"})
    fit(config, tmp_path / "clean")
    clean = losses(tmp_path / "clean")
    states = {}

    def record(step, trainer):  # before batch `step` the model holds the weights after `step` updates
        if step in (4, 5):
            model = trainer.save_model
            states[step] = {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}

    trainers = hook_batches(poison={4}, on_batch=record)
    fit(config, tmp_path / "skip")
    rows = log_rows(tmp_path / "skip")
    assert {"step": 5, "nonfinite": "grad_norm, loss", "action": "skip"} in rows
    got = losses(tmp_path / "skip")
    assert sorted(got) == [1, 2, 3, 4, 6, 7, 8]  # every step but the skipped one, in order
    assert {s: got[s] for s in range(1, 5)} == pytest.approx({s: clean[s] for s in range(1, 5)}, rel=1e-6)
    # The skipped step changed nothing: weights, and BatchNorm statistics (restored after the NaN forward).
    for name, value in states[4].items():
        assert torch.equal(states[5][name], value), name
    trainer = trainers[-1]
    assert trainer.step == 8 and trainer.scheduler.last_epoch == 7  # the schedule counts updates made
    assert trainer.nonfinite_skips == 0  # reset by the good steps after it
    model = load_model(tmp_path / "skip")  # the final model was saved, and is finite in eval mode too
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert torch.isfinite(model.encode_image(torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8))).all()


def test_skip_limit_stops_a_run_that_stays_nan(tmp_path, hook_batches):
    config = tiny_run_config(steps=8, **{"train.nonfinite": "skip", "train.max_nonfinite_skips": 2})
    hook_batches(poison=range(2, 8))  # every update from step 3 on
    with pytest.raises(NonFiniteLossError, match=r"at step 5\b.*after 2 skipped step\(s\) in a row") as info:
        fit(config, tmp_path)
    assert info.value.step == 5
    nonfinite = [(r["step"], r["action"]) for r in log_rows(tmp_path) if "nonfinite" in r]
    assert nonfinite == [(3, "skip"), (4, "skip"), (5, "stop")]
    assert sorted(losses(tmp_path)) == [1, 2]
    assert not (tmp_path / "model").exists()


WORKER = r'''
import json, os, signal, sys
from pathlib import Path
import torch
from vlpt.config import load_config
from vlpt.train.run import fit
from vlpt.train.trainer import Trainer, TrainingStopped

config_path, out, poison_at, signal_at = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rank, mode = int(os.environ["RANK"]), {}

class RankOneHook:
    """Rank 1 only: NaN images in batch poison_at (mode nan); SIGTERM to itself before batch signal_at (sigterm)."""
    def __init__(self, batches):
        self.batches = batches
    def batch(self, step):
        if rank == 1 and mode["now"] == "sigterm" and step == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        batch = self.batches.batch(step)
        if rank == 1 and mode["now"] == "nan" and step == poison_at:
            B, H, W, _ = batch["images"].shape
            batch = {**batch, "images": torch.full((B, 3, H, W), float("nan"))}
        return batch

init = Trainer.__init__
Trainer.__init__ = lambda self, task, batches, *a, **k: init(self, task, RankOneHook(batches), *a, **k)
result = {}
for name in ("nan", "sigterm"):
    mode["now"] = name
    try:
        fit(load_config(config_path), out / name)
        result[name] = None
    except TrainingStopped as err:
        result[name] = {"type": type(err).__name__, "step": err.step, "exit_code": err.exit_code}
(out / f"rank{rank}.json").write_text(json.dumps(result))
torch.distributed.destroy_process_group()
'''


def test_two_processes_stop_together_on_one_ranks_nan_or_signal(tmp_path):
    """A real 2-process gloo group (torchrun). Rank 1 alone gets NaN images, then (second run) SIGTERM:
    both ranks stop at the same step, rank 0 logs once and, on the signal, writes the checkpoint."""
    config_path, worker = tmp_path / "tiny.yaml", tmp_path / "worker.py"
    save_config(tiny_run_config(steps=8, **{"train.checkpoint_every": 3}), config_path)
    worker.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLPT_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           str(config_path), str(tmp_path), "4", "3"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = {"nan": {"type": "NonFiniteLossError", "step": 5, "exit_code": EXIT_NONFINITE},
                "sigterm": {"type": "Preempted", "step": 4, "exit_code": EXIT_PREEMPTED}}
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected, rank
    rows = log_rows(tmp_path / "nan")
    nonfinite = [r for r in rows if "nonfinite" in r]
    assert len(nonfinite) == 1 and nonfinite[0]["step"] == 5 and nonfinite[0]["rank"] == 1
    assert "loss" in nonfinite[0]["nonfinite"].split(", ") and nonfinite[0]["action"] == "stop"
    assert sorted(r["step"] for r in rows if "loss" in r) == [1, 2, 3, 4]
    assert checkpoint_names(tmp_path / "nan") == ["step_0000003"]
    rows = log_rows(tmp_path / "sigterm")
    assert rows[-1] == {"step": 4, "stopped": "preempted", "signal": "other rank"}  # rank 0 got no signal
    assert latest_checkpoint(tmp_path / "sigterm" / "checkpoints").name == "step_0000004"


# ----------------------------------------------------------------------------- preemption

GATED_TRAIN = r'''
import sys, time
from pathlib import Path
from vlpt.cli import main
from vlpt.train.trainer import Trainer

gate_step, go = int(sys.argv[1]), Path(sys.argv[2])

class Gate:
    """Hold batch gate_step until the test has sent SIGTERM (it creates `go` after the kill), so the signal
    lands at a known step however loaded the machine is."""
    def __init__(self, batches):
        self.batches = batches
    def batch(self, step):
        while step == gate_step and not go.exists():
            time.sleep(0.01)
        return self.batches.batch(step)

init = Trainer.__init__
Trainer.__init__ = lambda self, task, batches, *a, **k: init(self, task, Gate(batches), *a, **k)
sys.exit(main(sys.argv[3:]))
'''


def test_sigterm_checkpoints_exits_75_and_the_resumed_run_matches(tmp_path):
    steps = 10
    k = random.Random(18).randint(2, steps - 2)  # SIGTERM once the log shows step k
    config = tiny_run_config(steps=steps, **{"train.threads": 1})
    config_path, go = tmp_path / "tiny.yaml", tmp_path / "go"
    save_config(config, config_path)
    run_dir = tmp_path / "runs" / "r"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLPT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-c", GATED_TRAIN, str(k), str(go), "train", "--config",
                             str(config_path), "--name", "r", "--runs-dir", str(tmp_path / "runs")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300  # a guard against a hang, not a timing assertion
        while k not in logged_loss_steps(run_dir / "log.jsonl"):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training never reached step k"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        go.touch()
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert f"vlpt: stopped by SIGTERM at step {k + 1}; checkpoint written to" in stderr
    assert log_rows(run_dir)[-1] == {"step": k + 1, "stopped": "preempted", "signal": "SIGTERM"}
    assert latest_checkpoint(run_dir / "checkpoints").name == f"step_{k + 1:07d}"
    assert not (run_dir / "model").exists()
    fit(config, run_dir, resume=True)
    fit(config, tmp_path / "full")
    assert sorted(losses(run_dir)) == list(range(1, steps + 1))
    assert losses(run_dir) == pytest.approx(losses(tmp_path / "full"), rel=1e-6)


def test_sigint_in_process_stops_at_the_step_and_restores_the_handlers(tmp_path, hook_batches):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def interrupt(step, trainer):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)  # delivered here, during the fetch of batch 4

    hook_batches(on_batch=interrupt)
    config = tiny_run_config(steps=8)
    with pytest.raises(Preempted, match="stopped by SIGINT at step 5") as info:
        fit(config, tmp_path)
    assert info.value.step == 5 and info.value.exit_code == EXIT_PREEMPTED
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_0000005"
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX resource limits")
def test_a_checkpoint_that_cannot_be_written_leaves_the_previous_one(tmp_path, monkeypatch, caplog):
    """From step 4 on the kernel refuses writes past half of model.safetensors (RLIMIT_FSIZE: EFBIG), as a
    full disk would. The periodic checkpoint of step 4 fails: logged, training goes on. The final one (step
    5, stop_after) fails too: that raises, since the weights would otherwise be lost. Step 2's survives."""
    import resource

    config = tiny_run_config(steps=8, **{"train.checkpoint_every": 2})
    fit(config, tmp_path / "clean")
    clean = losses(tmp_path / "clean")
    limit = (latest_checkpoint(tmp_path / "clean" / "checkpoints") / "model.safetensors").stat().st_size // 2
    real_save = trainer_module.save_checkpoint

    def full_disk(checkpoint_dir, step, *args, **kwargs):
        if step < 4:
            return real_save(checkpoint_dir, step, *args, **kwargs)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            return real_save(checkpoint_dir, step, *args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, previous)

    monkeypatch.setattr(trainer_module, "save_checkpoint", full_disk)
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="vlpt.train.trainer"), \
            pytest.raises(CheckpointWriteError, match="checkpoint of step 5") as info:
        fit(config, run_dir, stop_after=5)
    assert info.value.exit_code == EXIT_CHECKPOINT_FAILED
    assert "could not write the checkpoint of step 4" in caplog.text
    failed = [r for r in log_rows(run_dir) if "checkpoint_failed" in r]
    assert [r["step"] for r in failed] == [4, 5]
    assert all(f"os error {errno.EFBIG}" in r["checkpoint_failed"] for r in failed)  # from the kernel
    assert losses(run_dir) == pytest.approx({s: clean[s] for s in range(1, 6)}, rel=1e-6)  # went on past 4
    assert checkpoint_names(run_dir) == ["step_0000002"]  # no temp folder, nothing half-written
    load_model(latest_checkpoint(run_dir / "checkpoints"))
    monkeypatch.setattr(trainer_module, "save_checkpoint", real_save)  # space freed
    fit(config, run_dir, resume=True)
    assert losses(run_dir) == pytest.approx(clean, rel=1e-6)


class Linear(torch.nn.Linear):
    """A model that saves like a vlpt model: config.json + model.safetensors."""

    def write_files(self, directory):
        (directory / "config.json").write_text("{}")
        save_file(self.state_dict(), str(directory / "model.safetensors"))


class LosesItsWeights(Linear):
    def write_files(self, directory):
        super().write_files(directory)
        (directory / "model.safetensors").write_bytes(b"")  # the data never reached the file, and no error


def test_a_checkpoint_that_does_not_read_back_is_not_put_in_place(tmp_path):
    """A writer that loses data without an error (safetensors can, on a full disk) is caught by reading
    the checkpoint back before the rename."""
    good = save_checkpoint(tmp_path, 1, Linear(2, 2), {"step": 1})
    with pytest.raises(CheckpointError, match="step 2 does not read back: model.safetensors is unreadable"):
        save_checkpoint(tmp_path, 2, LosesItsWeights(2, 2), {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]  # no temp folder either
    assert latest_checkpoint(tmp_path) == good


def test_keep_checkpoints_never_prunes_the_one_the_run_resumed_from(tmp_path):
    config = tiny_run_config(steps=12, **{"train.checkpoint_every": 2, "train.keep_checkpoints": 2})
    fit(config, tmp_path, stop_after=4)
    assert checkpoint_names(tmp_path) == ["step_0000002", "step_0000004"]
    fit(config, tmp_path, resume=True)  # from step 4; writes 6, 8, 10, 12 and keeps the last two
    assert checkpoint_names(tmp_path) == ["step_0000004", "step_0000010", "step_0000012"]


DAMAGES = {  # (file of the newest checkpoint, damage, what the warning says)
    "truncated weights": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
                          "unreadable"),
    "missing weights": ("model.safetensors", lambda p: p.unlink(), "missing"),
    "truncated state": ("trainer_state.pt", lambda p: p.write_bytes(p.read_bytes()[:-100]), "truncated"),
    "empty config": ("config.json", lambda p: p.write_text(""), "unreadable"),
    "truncated tokenizer": ("tokenizer/tokenizer.json", lambda p: p.write_text(p.read_text()[:100]), "unreadable"),
}


def test_damaged_checkpoints_are_skipped_with_a_warning_and_resume_from_the_one_before(tmp_path, caplog):
    config = tiny_run_config(steps=6)  # checkpoints at steps 3 and 6
    run_dir = tmp_path / "run"
    fit(config, run_dir)
    clean = losses(run_dir)
    for label, (name, damage, says) in DAMAGES.items():
        checkpoints = tmp_path / label.replace(" ", "_")
        shutil.copytree(run_dir / "checkpoints", checkpoints)
        damage(checkpoints / "step_0000006" / name)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vlpt.train.checkpoint"):
            assert latest_checkpoint(checkpoints).name == "step_0000003", label
        assert f"skipping checkpoint {checkpoints / 'step_0000006'}: {name} is {says}" in caplog.text, label
    # The run whose final weights were truncated resumes from step 3 and redoes steps 4-6 exactly.
    DAMAGES["truncated weights"][1](run_dir / "checkpoints" / "step_0000006" / "model.safetensors")
    fit(config, run_dir, resume=True)
    assert sorted(losses(run_dir)) == list(range(1, 7))
    assert losses(run_dir) == pytest.approx(clean, rel=1e-6)
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_0000006"  # rewritten whole


def test_atomic_writes_sync_the_files_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))  # the inode names the file on any POSIX system
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "out"
    with vlpt.io.atomic_directory(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "a.bin").write_bytes(b"a")
        (tmp / "sub" / "b.bin").write_bytes(b"b")
    inode = lambda path: os.stat(path).st_ino  # unchanged by the rename
    synced_before = {ino for kind, ino in events[:-2] if kind == "fsync"}
    assert {inode(target / "a.bin"), inode(target / "sub" / "b.bin"), inode(target / "sub")} <= synced_before
    assert events[-2:] == [("rename", str(target)), ("fsync", inode(tmp_path))]
    events.clear()
    vlpt.io.atomic_write_text(tmp_path / "f.txt", "hello")
    assert [kind for kind, _ in events] == ["fsync", "rename", "fsync"]
    assert events[0] == ("fsync", inode(tmp_path / "f.txt"))
    assert events[1:] == [("rename", str(tmp_path / "f.txt")), ("fsync", inode(tmp_path))]
    assert (tmp_path / "f.txt").read_text() == "hello" and (target / "sub" / "b.bin").read_bytes() == b"b"
