"""Scaling: vlpt's training step time as batch size, image size and text length double.

The step is bench/train_throughput.py's vlpt step (its ``Runner``, ``vlpt_loss_step`` and the ``Trainer``'s
fused AdamW via ``vlpt_optimizer``): forward both towers, InfoNCE (``ContrastiveTask``), backward, AdamW
step, zero_grad; no clipping. The model is train_throughput's ViT shape (patch 8, width 256, 4 layers,
class-token pooling; BERT text tower width 256, 4 layers, WordPiece vocabulary trained on shapes captions;
embedding 256), built from ``vlpt_model_config`` with the image size / context length of the point.
Inputs: random normalised float images (B, 3, S, S) and full-length random tokens (no padding, so
the text tower's length grouping has nothing to trim and the text length is exactly L).

Axes, each with the other two at the defaults (batch 128, image 64 px, text 32 tokens):
- batch 32, 64, 128, 256 (``step_ms_batch_<B>``, ``ms_per_sample_batch_<B>``);
- image 32, 64, 128 px at patch 8, i.e. 16, 64, 256 image tokens (+ class token) (``*_image_<S>``);
- text 16, 32, 64, 128 tokens (``*_text_<L>``).
Each point's FLOPs per step (forward + backward, ``common.flop_counter``) give ``gflop_per_step_*`` and
``achieved_gflops_*`` (GFLOP/s).

Exponents (least-squares slope of log step time against log size over the axis's points):
``scaling_batch_exponent`` (vs batch; ~1.0 when the step is compute-bound at every size),
``scaling_image_exponent_vs_tokens`` (vs image tokens, (S/8)^2), ``scaling_text_exponent`` (vs text
length). Only one tower grows on the image and text axes, so those exponents stay below 1 even for linear
cost; ``scaling_*_flop_exponent*`` are the same slopes for FLOPs per step, the exponent the time would have
at a constant FLOP rate. Every model of every point is built first; then rounds time one step of every
point in turn (order reversed every other round), after ``--warmup`` untimed steps each, and each figure
is the median over ``--repeats`` rounds.

    .venv/bin/python bench/scaling.py [--threads 2] [--repeats 10] [--warmup 2] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import write_results
from train_throughput import (
    PATCH,
    Runner,
    alternate,
    count_step_flops,
    fixed_tokens,
    shapes_captions,
    vlpt_loss_step,
    vlpt_model_config,
    vlpt_optimizer,
)

log = logging.getLogger("scaling")

DEFAULTS = {"batch": 128, "image": 64, "text": 32}
AXES = {"batch": (32, 64, 128, 256), "image": (32, 64, 128), "text": (16, 32, 64, 128)}
QUICK_DEFAULTS = {"batch": 32, "image": 64, "text": 32}
QUICK_AXES = {"batch": (16, 32), "image": (32, 64), "text": (16, 32)}


def build_runner(batch: int, image: int, text: int, captions: list[str]) -> Runner:
    """vlpt's step at one point: a model for (image size, context), its optimizer, one fixed batch."""
    from vlpt.factory import create_model

    config = vlpt_model_config("vit", text)
    config.image.image_size = image  # timm gets img_size from it: (image / 8)^2 patches + class token
    model = create_model(config, corpus=captions, seed=0)
    g = torch.Generator().manual_seed(1)
    images = (torch.randint(0, 256, (batch, 3, image, image), dtype=torch.uint8, generator=g).float() / 255 - 0.5) / 0.25
    tokens, _ = fixed_tokens(batch, text, model.tokenizer.vocab_size, seed=2)
    return Runner(f"b{batch}_i{image}_t{text}", model, vlpt_optimizer(model), vlpt_loss_step(), [(images, tokens)])


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (median; default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per point first (default 2)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 2 points per axis at batch 32, 2 rounds; writes scaling-quick.json")
    args = parser.parse_args()
    defaults, axes = (QUICK_DEFAULTS, QUICK_AXES) if args.quick else (DEFAULTS, AXES)
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 2), 1
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(args.threads)
    captions = shapes_captions(400 if args.quick else 2000)

    points: dict[tuple[int, int, int], list[tuple[str, int]]] = {}  # (batch, image, text) -> [(axis, value)]
    for axis, values in axes.items():
        for value in values:
            point = {**defaults, axis: value}
            points.setdefault((point["batch"], point["image"], point["text"]), []).append((axis, value))
    log.info("building %d models", len(points))
    runners = {p: build_runner(*p, captions) for p in points}
    flops = {p: count_step_flops(r) for p, r in runners.items()}
    log.info("timing: %d rounds over %d points", args.repeats, len(points))
    alternate(list(runners.values()), args.repeats, args.warmup)

    figures: dict = {}
    series: dict[str, dict[int, tuple[float, float]]] = {axis: {} for axis in axes}  # value -> (ms, flops)
    for p, runner in runners.items():
        ms = 1000 * statistics.median(runner.times)
        for axis, value in points[p]:
            series[axis][value] = (ms, flops[p])
            figures[f"step_ms_{axis}_{value}"] = ms
            figures[f"ms_per_sample_{axis}_{value}"] = ms / p[0]
            figures[f"gflop_per_step_{axis}_{value}"] = flops[p] / 1e9
            figures[f"achieved_gflops_{axis}_{value}"] = flops[p] / 1e9 / (ms / 1000)
    exponents = {}
    for axis, name in (("batch", "scaling_batch_exponent"), ("image", "scaling_image_exponent_vs_tokens"),
                       ("text", "scaling_text_exponent")):
        values = sorted(series[axis])
        xs = [(v // PATCH) ** 2 if axis == "image" else v for v in values]
        exponents[name] = slope(xs, [series[axis][v][0] for v in values])
        exponents[name.replace("_exponent", "_flop_exponent")] = slope(xs, [series[axis][v][1] for v in values])
    figures = {**exponents, **dict(sorted(figures.items(), key=lambda kv: _order(kv[0])))}
    config = {"quick": args.quick, "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
              "defaults": defaults, "axes": {k: list(v) for k, v in axes.items()}, "patch": PATCH,
              "image_tokens": {str(v): (v // PATCH) ** 2 + 1 for v in axes["image"]},
              "statistic": "median step time over rounds; each round times one step of every point, "
                           "order reversed every other round",
              "step": "train_throughput.py's vlpt step: forward + InfoNCE + backward + fused AdamW + zero_grad; "
                      "no clipping",
              "model": "ViT patch 8 width 256 layers 4 heads 4 (class-token pool); BERT text width 256 layers 4 "
                       "heads 4 mlp 1024 (mean pool); embedding 256",
              "inputs": "random normalised float images; full-length random tokens (no padding)",
              "exponent": "least-squares slope of log(step time) vs log(batch | image tokens (S/8)^2 | text length); "
                          "*_flop_exponent*: the same for FLOPs per step (common.flop_counter: "
                          "FlopCounterMode + CPU flash attention, forward + backward)",
              "vocab": runners[next(iter(runners))].model.tokenizer.vocab_size}
    write_results("scaling-quick" if args.quick else "scaling", figures, config)


METRICS = ("step_ms", "ms_per_sample", "gflop_per_step", "achieved_gflops")


def _order(key: str) -> tuple:
    """Group the flat keys by axis, then metric, then the point's value."""
    kind, _, value = key.rpartition("_")
    metric, _, axis = kind.rpartition("_")
    return list(AXES).index(axis), METRICS.index(metric), int(value)


if __name__ == "__main__":
    main()
