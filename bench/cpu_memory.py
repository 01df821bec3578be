"""Keeping freed CPU memory (``train.keep_cpu_memory``): vlpt's training step with glibc's malloc at its
defaults vs with ``keep_freed_cpu_memory``, paired.

glibc's malloc settings last for the life of a process, so each setting gets its own process, and the two
take turns: a parent tells one process to run a training step, waits for it, then the other, the order
reversing every round, so they never compete for the cores and slow drift of the machine hits both
alike. The step is bench/train_throughput.py's vlpt step (ViT 64 px patch 8 width 256 x 4 layers, BERT
text tower width 256 x 4 layers, context 32 full-length tokens, batch 128, InfoNCE, backward, the
``Trainer``'s fused AdamW). Per step each process also reports its minor page faults and system CPU time
(``getrusage``): the kernel's work of faulting in and zeroing fresh pages.

Keys: ``keep_cpu_memory_speedup`` (median step time with defaults / with the setting), ``step_ms_*``,
``page_faults_per_step_*``, ``system_seconds_per_step_*`` (``*`` = ``malloc_defaults`` / ``keep_cpu_memory``),
``paired_step_ms_difference`` (median over rounds of keep - defaults) and ``rounds_faster`` (rounds where
the setting's step was the faster one).

    .venv/bin/python bench/cpu_memory.py [--threads 2] [--rounds 12] [--warmup 3] [--batch 128] [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import write_results

SETTINGS = ("malloc_defaults", "keep_cpu_memory")


def serve_steps(conn, keep: bool, threads: int, batch: int) -> None:
    """A process holding one setting's model: builds it, then runs one training step per request and
    answers (seconds, minor page faults, system CPU seconds)."""
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(threads)
    import train_throughput as tt

    from vlpt.train.trainer import keep_freed_cpu_memory

    kept = keep and keep_freed_cpu_memory()  # before anything is allocated, as in a training run
    model = tt.build_vlpt("vit", 32, tt.shapes_captions(400))
    tokens, _ = tt.fixed_tokens(batch, 32, model.tokenizer.vocab_size, seed=2)
    runner = tt.Runner("vlpt", model, tt.vlpt_optimizer(model, keep_cpu_memory=keep), tt.vlpt_loss_step(),
                       [(tt.random_images(batch, seed=1), tokens)])
    conn.send(kept)
    while conn.recv() != "stop":
        before = resource.getrusage(resource.RUSAGE_SELF)
        seconds = runner.step(timed=False)
        after = resource.getrusage(resource.RUSAGE_SELF)
        conn.send((seconds, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds, one step per setting each")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per setting first")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 128; 32 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke test: batch 32, 2 rounds, 1 warm-up")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.warmup = min(args.rounds, 2), 1
    batch = args.batch or (32 if args.quick else 128)

    ctx = mp.get_context("spawn")  # fresh processes: nothing allocated under the parent's malloc settings
    conns, procs = [], []
    for name in SETTINGS:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=serve_steps, args=(child, name == "keep_cpu_memory", args.threads, batch))
        proc.start()
        conns.append(parent)
        procs.append(proc)
        kept = parent.recv()  # built one after the other
        if name == "keep_cpu_memory" and not kept:
            raise SystemExit("keep_freed_cpu_memory changed nothing here (not glibc): nothing to compare")
    try:
        for _ in range(args.warmup):
            for conn in conns:
                conn.send("step")
                conn.recv()
        results: dict[str, list[tuple[float, int, float]]] = {name: [] for name in SETTINGS}
        for r in range(args.rounds):
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                conns[i].send("step")
                results[SETTINGS[i]].append(conns[i].recv())
    finally:
        for conn in conns:
            conn.send("stop")
        for proc in procs:
            proc.join()

    figures: dict = {}
    for name in SETTINGS:
        seconds, faults, system = zip(*results[name])
        figures[f"step_ms_{name}"] = 1000 * statistics.median(seconds)
        figures[f"page_faults_per_step_{name}"] = statistics.median(faults)
        figures[f"system_seconds_per_step_{name}"] = statistics.median(system)
    figures["keep_cpu_memory_speedup"] = figures["step_ms_malloc_defaults"] / figures["step_ms_keep_cpu_memory"]
    differences = [1000 * (keep[0] - default[0])
                   for default, keep in zip(results["malloc_defaults"], results["keep_cpu_memory"])]
    figures["paired_step_ms_difference"] = statistics.median(differences)
    figures["rounds_faster"] = sum(d < 0 for d in differences)
    figures = {"keep_cpu_memory_speedup": figures.pop("keep_cpu_memory_speedup"), **figures}
    config = {"batch": batch, "threads": args.threads, "rounds": args.rounds, "warmup": args.warmup,
              "quick": args.quick,
              "model": "bench/train_throughput.py's vlpt ViT step (fixed shapes, context 32)",
              "design": "one process per setting (glibc settings are per process), taking turns step by step, "
                        "order reversed every round; medians over rounds",
              "step_ms_per_round": {name: [round(1000 * s, 1) for s, _, _ in results[name]] for name in SETTINGS}}
    write_results("cpu_memory-quick" if args.quick else "cpu_memory", figures, config)


if __name__ == "__main__":
    main()
