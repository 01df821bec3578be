"""Issue 20 diagnostic: does held-out wording, rather than the generator, lose position?

The generate-shapes run of bench/generation.py (``--run``, default bench/runs/generation/generate-shapes) draws
the same validation scenes twice at guidance 2 (DDIM 30, the run's guidance interval): prompted in training wording
("a large red circle in the top left") and in the validation templates ("a photo of ...", "a drawing of ...").
A judge trained as the evaluation trains it (real scenes of another data seed, the run's judge steps and seed)
reads both. Validation scenes only: the test prompts stay unseen. Writes bench/results/generation_wording.json.

    .venv/bin/python bench/generation_wording.py [--run RUN] [--scenes 135] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, write_results

from vlpt.config import load_config
from vlpt.data.shapes import default_cache_dir
from vlpt.data.splits import load_split
from vlpt.evaluate.generation import shapes_prompt
from vlpt.models.generator import load_generator
from vlpt.tasks.generate import JUDGE_SEED_OFFSET, JudgeConfig, evaluation_sets, generate_in_chunks, train_judge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=RESULTS.parent / "runs" / "generation" / "generate-shapes")
    parser.add_argument("--scenes", type=int, default=135, help="validation scenes (single object)")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(str(args.run / "config.yaml"))
    gen = config.generate
    gen.val_size, gen.eval_size, gen.compositional_size = args.scenes, 0, 0
    sets, judge_data = evaluation_sets(config, default_cache_dir())
    judge = train_judge(judge_data["images"], judge_data["labels"], judge_data["attributes"],
                        JudgeConfig(image_size=gen.model.image_size, steps=gen.judge_steps,
                                    seed=config.train.seed + JUDGE_SEED_OFFSET))
    model = load_generator(args.run / "model").eval()
    val = sets["val"]
    scenes = load_split(config.data, "val", args.scenes, single=True, cache_dir=default_cache_dir()).scenes
    training_wording = [shapes_prompt(s.primary) for s in scenes]
    if not all(p.endswith(t) for p, t in zip(val.prompts, training_wording)):
        raise SystemExit("the validation prompts do not describe the same scenes")  # the comparison needs pairs
    figures: dict = {}
    for name, prompts in (("training_wording", training_wording), ("validation_templates", val.prompts)):
        images = generate_in_chunks(model, prompts, args.guidance, gen.sampling_steps, seed=config.train.seed,
                                    eta=gen.sampling_eta, guidance_interval=gen.guidance_interval)
        for attribute, value in judge.accuracy(images, val.labels).items():
            figures[f"{name}_{attribute}_acc"] = round(float(value), 4)
    write_results("generation_wording", figures, {"run": str(args.run), "scenes": args.scenes,
                                                  "guidance": args.guidance, "example_prompts": val.prompts[:2]})


if __name__ == "__main__":
    main()
