"""Issue 4 acceptance: image -> text captioning on the shapes world and on real digits.

Trains the benchmark captioner (config caption-shapes: CoCa-style, one tiny ResNet image tower trained
from scratch with contrastive + captioning losses, a 3-layer decoder cross-attending to its 4x4 token
grid), captions ~500 held-out test scenes greedily and with beam search (beam 3), and scores BLEU-4 and
CIDEr-D against the five reference captions (pycocoevalcap), the exact attribute accuracy split by number
of objects (1, 2, 3), the attribute accuracy on scenes with a held-out (color, shape) pair (does it name a
pair it never saw?), and the CLIP-score from an independent dual encoder (tiny-shapes trained here with
another data and init seed: the captioner's own encoder would score captions it was trained to agree with).
Then trains caption-digits on scikit-learn's real digits and scores whether the caption names the right
digit. Writes bench/results/captioning.json (commit and machine recorded).

Why CoCa rather than a decoder on a frozen dual encoder: one run instead of two inside the time budget,
and the captioning loss itself teaches the image tower to keep every object's color and shape (a
contrastive tower only has to tell captions apart within a batch; its token grid need not keep all of
each object). The frozen mode is tested in tests/test_captioning.py and available with
``caption.from_run`` + ``caption.freeze_towers``.

    .venv/bin/python bench/captioning.py [--quick] [--threads 2] [--runs-dir DIR] [--scorer RUN]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_results

from vlpt.config import load_config
from vlpt.data.shapes import default_cache_dir
from vlpt.train.run import run

QUICK = ["train.steps=30", "train.warmup_steps=5", "data.train_size=1024", "caption.eval_size=60",
         "train.checkpoint_every=0"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: a few steps, tiny sets; figures are printed, not written")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--runs-dir", type=Path, help="keep the two runs (reports, caption grids, models) here; "
                                                        "default: a temporary folder")
    parser.add_argument("--scorer", type=Path, help="an independent tiny-shapes run (data.seed=1, train.seed=1, as "
                                                     "trained here by default), e.g. the quality bench's seed1")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = [f"train.threads={args.threads}"] + (QUICK if args.quick else [])
    with tempfile.TemporaryDirectory() as tmp:
        runs = args.runs_dir or Path(tmp)
        figures: dict = {}

        start = time.perf_counter()
        scorer = args.scorer or runs / "tiny-shapes-scorer"  # independent of the captioner: other seeds and scenes
        if args.scorer is None:
            run(load_config("tiny-shapes", [f"train.threads={args.threads}", "data.seed=1", "train.seed=1"]
                            + (["train.steps=20", "data.train_size=1024"] if args.quick else [])),
                scorer, overwrite=True, cache_dir=default_cache_dir())
            figures["scorer_wall_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        shapes_config = load_config("caption-shapes", overrides + [f"caption.scorer={scorer}"])
        shapes = run(shapes_config, runs / "caption-shapes", overwrite=True, cache_dir=default_cache_dir())
        figures["shapes_wall_seconds"] = time.perf_counter() - start
        for key in ("attr_acc_1obj", "attr_acc_2obj", "attr_acc_3obj"):  # the headline figures use beam search
            figures[key] = shapes[f"{key}_beam"]
            figures[f"{key}_greedy"] = shapes[f"{key}_greedy"]
        for key in ("attr_acc", "bleu4", "cider", "clip_score"):
            figures |= {f"{key}_{mode}": shapes[f"{key}_{mode}"] for mode in ("greedy", "beam")}
        figures |= {k: v for k, v in shapes.items() if k.endswith("_beam_compositional")}
        figures |= {
            "clip_score_reference": shapes["clip_score_reference"],
            "decode_seconds_greedy": shapes["decode_seconds_greedy"],
            "decode_seconds_beam": shapes["decode_seconds_beam"],
            "shapes_test_images": shapes["caption_eval_images"],
            "train_seconds": shapes["train_seconds"],
        }

        start = time.perf_counter()
        digits_config = load_config("caption-digits", overrides)
        digits = run(digits_config, runs / "caption-digits", overwrite=True, cache_dir=default_cache_dir())
        figures["digits_wall_seconds"] = time.perf_counter() - start
        figures |= {
            "digits_caption_acc": digits["digits_caption_acc_beam"],
            "digits_caption_acc_greedy": digits["digits_caption_acc_greedy"],
            "digits_bleu4_beam": digits["bleu4_beam"],
            "digits_cider_beam": digits["cider_beam"],
            "digits_test_images": digits["caption_eval_images"],
            "digits_train_seconds": digits["train_seconds"],
        }
    if args.quick:  # a smoke run's figures mean nothing: shown, never written over the results
        print_table("captioning (--quick smoke run, not written)", figures)
        return
    write_results("captioning", figures, {"shapes_config": "caption-shapes", "digits_config": "caption-digits",
                                          "overrides": overrides, "decoding": "greedy vs beam 3 (length_penalty 1.0)",
                                          "scorer": str(scorer)})


if __name__ == "__main__":
    main()
