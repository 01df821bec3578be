"""Issue 24: a VQA run's accuracy per held-out *validation* wording, and what it answers where it fails.

Diagnosis for choosing a recipe: it reads only validation scenes (their held-out wordings,
``shapes.QUESTION_WORDING[kind][1]``), never the test set, so what it shows may steer a change. Prints a table
(type, wording, accuracy, count) and, for the wordings under ``--worst`` accuracy, the most common
(truth -> answer) pairs; writes bench/results/vqa_wordings.json (keys ``<kind>: <wording>``).

    .venv/bin/python bench/vqa_wordings.py RUN [--worst 0.9] [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_results  # noqa: E402

from vlpt.config import apply_overrides, load_config  # noqa: E402
from vlpt.data import shapes  # noqa: E402
from vlpt.evaluate.finetune import answer_questions, vqa_metrics  # noqa: E402
from vlpt.models.task_model import load_task_model  # noqa: E402
from vlpt.tasks.finetune import task_split  # noqa: E402


def wording_patterns() -> list[tuple[str, str, re.Pattern]]:
    """(kind, template, regex) for every validation wording; slots ({object}, ...) match any words."""
    return [(kind, template, re.compile("^" + re.sub(r"\\\{\w+\\\}", ".+", re.escape(template)) + "$"))
            for kind, wordings in shapes.QUESTION_WORDING.items() for template in wordings[1]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path, help="a fine-tuned VQA run (vlpt finetune --task vqa)")
    parser.add_argument("--worst", type=float, default=0.9, help="show the answers of wordings below this accuracy")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = apply_overrides(load_config(args.run / "config.yaml"), ["finetune.eval_split=val"])
    val = task_split(config, "val", shapes.default_cache_dir())
    [held] = answer_questions(load_task_model(args.run), val.images, val.scenes, config.eval.batch_size,
                              wordings=("heldout",))
    patterns = wording_patterns()
    right: dict[tuple[str, str], list[bool]] = collections.defaultdict(list)
    answers: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    for question, predicted, answer in zip(held.questions, held.predicted, held.answers):
        key = next(((kind, t) for kind, t, rx in patterns if rx.match(question)), ("?", question))
        right[key].append(bool(predicted == answer))
        answers[key][(shapes.ANSWERS[answer], shapes.ANSWERS[predicted])] += 1
    figures = {f"{kind}: {t}": sum(v) / len(v) for (kind, t), v in sorted(right.items())}
    figures |= vqa_metrics(held, suffix="_heldout_wording")
    for (kind, t), v in sorted(right.items()):
        if sum(v) / len(v) < args.worst:
            print(f"{kind}: {t}  ({sum(v)}/{len(v)}) truth -> answer:",
                  ", ".join(f"{a} -> {p} x{n}" for (a, p), n in answers[(kind, t)].most_common(6)))
    write_results("vqa_wordings", figures, {"run": str(args.run), "split": "val", "wordings": "held-out (val)"})


if __name__ == "__main__":
    main()
