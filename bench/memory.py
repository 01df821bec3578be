"""Issue 6 acceptance: peak resident memory of a contrastive train step at a large batch, with and
without GradCache accumulation, on the demo config (tiny-shapes).

Each mode runs in a fresh Python process, so its peak RSS is its own: the model, tokenizer and one
batch are built, then ``--steps`` optimizer steps run through the real ``Trainer`` (the first
allocates AdamW's state). Modes:

- plain: ``accum_steps=1``, the whole batch in one forward + backward;
- accum: ``accum_mode=gradcache``, ``accum_steps=batch / micro_batch``; the contrastive batch is
  still the whole batch, activation memory that of one micro-batch.

The parent polls each child's RSS from /proc every 0.2 s and kills it above ``--limit-gb`` (plain
mode at batch 4,096 may not fit in RAM); that mode is then recorded as ``"> LIMIT"`` with
``<mode>_exceeded_limit: true``. Images are random uint8 (pixels do not change memory), captions are
real shapes-world captions. Writes bench/results/memory.json.

    .venv/bin/python bench/memory.py                 # batch 4,096, micro-batch 128
    .venv/bin/python bench/memory.py --batch 512     # a quick check
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_results

ROOT = Path(__file__).resolve().parents[1]
GB = 1024 ** 3
POLL_SECONDS = 0.2


def proc_status_bytes(pid: int | str, field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` (peak RSS) of a process from /proc, in bytes; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    except (OSError, ValueError):
        pass
    return None


# ----------------------------------------------------------------------------- child: one mode

def run_mode(mode: str, batch_size: int, micro_batch: int, steps: int, threads: int, out: Path) -> None:
    """Build the demo model and one batch, train ``steps`` steps in ``mode``, write figures to ``out``."""
    import numpy as np
    import torch

    from vlpt.config import load_config
    from vlpt.data.pairs import PairBatches
    from vlpt.data.shapes import sample_scene
    from vlpt.factory import create_model, get_tokenizer
    from vlpt.tasks.contrastive import ContrastiveTask
    from vlpt.train.trainer import Trainer

    if threads:
        torch.set_num_threads(threads)
    accum_steps = 1 if mode == "plain" else batch_size // micro_batch
    config = load_config("tiny-shapes", [
        f"train.batch_size={batch_size}", f"train.accum_steps={accum_steps}",
        f"train.accum_mode={'plain' if mode == 'plain' else 'gradcache'}", f"train.steps={steps}",
        "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=0", "train.device=cpu",
    ])
    # Real captions (scenes sampled without pixels); random pixels cost the same memory as real ones.
    scenes = [sample_scene(config.data.seed, "train", i, num_captions=config.data.num_captions,
                           count_weights=config.data.count_weights) for i in range(batch_size)]
    captions = [scene.captions for scene in scenes]
    size = config.data.image_size
    images = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)  # (B, H, W, 3)
    tokenizer = get_tokenizer(config.model, corpus=(c for caps in captions for c in caps))
    model = create_model(config.model, tokenizer, seed=config.train.seed)
    batches = PairBatches(images, captions, tokenizer, batch_size, config.train.seed)
    baseline = proc_status_bytes("self", "VmRSS")

    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(ContrastiveTask(model, config.train.loss), batches, config.train, run_dir)
        history = trainer.fit()
    # One log row per step; its images_per_s covers that step alone.
    step_seconds = [batch_size / row["images_per_s"] for row in history if "images_per_s" in row]
    timed = step_seconds[1:] or step_seconds  # the first step also allocates the optimizer state
    figures = {
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB,  # Linux: kB
        "baseline_rss_gb": baseline / GB,
        "seconds_per_step": float(np.mean(timed)),
        "step_seconds": [round(s, 3) for s in step_seconds],
        "accum_steps": accum_steps,
        "loss": history[-1]["loss"],
        "threads": torch.get_num_threads(),
    }
    out.write_text(json.dumps(figures))


# ----------------------------------------------------------------------------- parent

def measure(mode: str, args: argparse.Namespace) -> dict:
    """Run ``mode`` in a child process, polling its RSS; kill it above the limit."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--batch", str(args.batch),
               "--micro-batch", str(args.micro_batch), "--steps", str(args.steps), "--threads", str(args.threads),
               "--out", str(out)]
        start = time.perf_counter()
        child = subprocess.Popen(cmd, cwd=ROOT)
        peak_seen, exceeded = 0, False
        while child.poll() is None:
            rss = proc_status_bytes(child.pid, "VmRSS") or 0
            peak_seen = max(peak_seen, proc_status_bytes(child.pid, "VmHWM") or 0, rss)
            if rss > args.limit_gb * GB:
                exceeded = True
                child.kill()  # our own child, by its pid
                child.wait()
                break
            time.sleep(POLL_SECONDS)
        wall = time.perf_counter() - start
        if exceeded:
            return {"exceeded_limit": True, "peak_rss_gb": f"> {args.limit_gb:g}", "wall_seconds": wall,
                    "peak_rss_gb_seen": peak_seen / GB}
        if child.returncode != 0:
            raise RuntimeError(f"mode {mode} failed with exit code {child.returncode}")
        figures = json.loads(out.read_text())
        return {"exceeded_limit": False, **figures, "wall_seconds": wall, "peak_rss_gb_seen": peak_seen / GB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4096, help="contrastive batch per step")
    parser.add_argument("--micro-batch", type=int, default=128, help="GradCache micro-batch (accum mode)")
    parser.add_argument("--steps", type=int, default=2, help="train steps per mode (the first allocates AdamW)")
    parser.add_argument("--limit-gb", type=float, default=18.0, help="kill a mode whose RSS passes this")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the child; 0: torch's default")
    parser.add_argument("--modes", nargs="+", default=["plain", "accum"], choices=["plain", "accum"])
    parser.add_argument("--child", choices=["plain", "accum"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch % args.micro_batch:
        parser.error(f"--batch {args.batch} must be a multiple of --micro-batch {args.micro_batch}")
    if args.child:
        run_mode(args.child, args.batch, args.micro_batch, args.steps, args.threads, args.out)
        return

    figures: dict = {"batch_size": args.batch, "micro_batch": args.micro_batch}
    for mode in args.modes:
        result = measure(mode, args)
        figures[f"peak_rss_gb_{mode}"] = result["peak_rss_gb"]
        figures[f"{mode}_exceeded_limit"] = result["exceeded_limit"]
        figures[f"seconds_per_step_{mode}"] = result.get("seconds_per_step")
        figures[f"baseline_rss_gb_{mode}"] = result.get("baseline_rss_gb")
        figures[f"accum_steps_{mode}"] = result.get("accum_steps")
        figures[f"wall_seconds_{mode}"] = result["wall_seconds"]
        figures[f"step_seconds_{mode}"] = result.get("step_seconds")
    write_results("memory", figures, {"config": "tiny-shapes", "steps": args.steps, "limit_gb": args.limit_gb,
                                      "threads": args.threads, "images": "random uint8",
                                      "captions": "shapes train scenes", "accum_mode": "gradcache"})


if __name__ == "__main__":
    main()
