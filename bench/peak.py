"""The machine's measured fp32 matmul ceiling: GFLOP/s of a 2048 x 2048 x 2048 matmul at a thread count.

Every throughput benchmark divides its model FLOP/s by this figure (``mfu_*``: model FLOPs utilisation),
so "how close to the hardware" is measured on the same machine and thread count as the model.
Writes bench/results/peak.json.

    .venv/bin/python bench/peak.py [--threads 2] [--repeats 20] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_results

SIZE = 2048


def matmul_seconds(threads: int, size: int = SIZE, repeats: int = 20, warmup: int = 3) -> list[float]:
    """Seconds of each of ``repeats`` timed ``size``^3 fp32 matmuls with ``threads`` torch threads, after
    ``warmup`` untimed ones. The previous thread count is restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=g)
        b = torch.randn(size, size, generator=g)
        out = torch.empty(size, size)
        for _ in range(warmup):
            torch.mm(a, b, out=out)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            times.append(time.perf_counter() - start)
        return times
    finally:
        torch.set_num_threads(previous)


def measure_peak_gflops(threads: int, size: int = SIZE, repeats: int = 20, warmup: int = 3) -> float:
    """Median GFLOP/s of ``size``^3 fp32 matmuls (2 * size^3 FLOPs each) with ``threads`` torch threads.

    The previous thread count is restored afterwards, so a benchmark can call this first and then
    time its model at the same setting."""
    return 2 * size ** 3 / statistics.median(matmul_seconds(threads, size, repeats, warmup)) / 1e9


class InterleavedPeak:
    """The ceiling sampled through a benchmark's run: ``repeats`` matmuls at the start, then a few
    more each time ``sample`` is called (between timed rounds), the figure being the median of all.

    On a shared machine the matmul rate drifts by tens of percent over minutes; a ceiling measured only
    before the model's steps would compare them with another moment's machine."""

    def __init__(self, threads: int, repeats: int = 20, per_sample: int = 3):
        self.threads, self.per_sample = threads, per_sample
        self.times = matmul_seconds(threads, repeats=repeats)
        self.first = len(self.times)

    def sample(self) -> None:
        self.times += matmul_seconds(self.threads, repeats=self.per_sample, warmup=1)

    def gflops(self) -> float:
        return 2 * SIZE ** 3 / statistics.median(self.times) / 1e9

    def gflops_at_start(self) -> float:
        return 2 * SIZE ** 3 / statistics.median(self.times[:self.first]) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=20, help="timed matmuls; the median is reported")
    parser.add_argument("--quick", action="store_true", help="3 repeats: a smoke test, not a measurement")
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    torch.set_num_threads(args.threads)
    gflops = measure_peak_gflops(args.threads, repeats=repeats, warmup=1 if args.quick else 3)
    write_results("peak", {"peak_gflops_fp32": gflops, "threads": args.threads},
                  {"matmul": f"{SIZE}x{SIZE}x{SIZE} fp32 torch.mm", "repeats": repeats, "statistic": "median",
                   "quick": args.quick})


if __name__ == "__main__":
    main()
