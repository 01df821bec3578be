"""Issues 5 and 20: text -> image generation on the shapes world and on real digits, judged independently,
with the guidance chosen on validation prompts and the figures reported on test prompts.

Shapes (config generate-shapes): a small diffusers UNet at 32 px learns single-object scenes, conditioned on
the frozen text tower of a tiny-shapes dual encoder (`--shapes-run`, or one is trained here first: ~8 min).
Prompts describe single objects in full ("... a large red circle in the top left") in templates no training
caption uses; validation prompts (val scenes, two templates) choose the guidance among the config's scales,
test prompts (test scenes, two other templates) and compositional prompts (held-out (color, shape) pairs) are
generated at that guidance only. A separate CNN judge, trained with its own seed on real scenes of another data
seed, reads color / shape / size / position; the Fréchet distance is measured in the judge's feature space,
against the floor of two independent real renderings of the same prompts; the CLIP-score comes from an
independent dual encoder (tiny-shapes with another data and init seed, trained here or `--shapes-scorer`).

Digits (config generate-digits): the same UNet on scikit-learn's real digits (train split), conditioned on the
frozen pretrained MiniLM text tower of a LiT run (`--digits-run`, or lit-digits is trained here: ~2 min);
prompts from the digits' evaluation templates (validation and test ones disjoint); the judge learns from half of
the test split, real figures come from the other half; CLIP-score from lit-digits with other seeds.

Both sections run in one go (one run of the current code) and write bench/results/generation.json (flat keys,
commit and machine recorded) plus the sample grids next to it.

    .venv/bin/python bench/generation.py [--shapes-run RUN] [--shapes-scorer RUN] [--digits-run RUN]
                                         [--digits-scorer RUN] [--threads 2] [--quick] [--runs-dir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, write_results

from vlpt.config import load_config
from vlpt.data.shapes import default_cache_dir
from vlpt.train.run import run

QUICK = ["train.steps=20", "train.warmup_steps=5", "generate.eval_size=30", "generate.val_size=20",
         "generate.compositional_size=20", "generate.judge_steps=30", "generate.sampling_steps=5",
         "generate.judge_train_size=2000", "train.checkpoint_every=0"]
# Reported at the guidance chosen on validation: test prompts, and (suffix _compositional) held-out pairs.
SHAPES_KEYS = ("judge_color_acc", "judge_shape_acc", "judge_position_acc", "judge_size_acc", "judge_mean_acc",
               "clip_score", "clip_score_real", "frechet_distance", "frechet_distance_real", "seconds_per_image")
OTHER_SEEDS = ["data.seed=1", "train.seed=1"]  # an independent scorer: other data (split) and other init


def dual_encoder_run(config: str, given: str | None, runs_dir: Path, threads: int, quick: bool,
                     name: str | None = None, overrides: tuple[str, ...] = ()) -> Path:
    """A pre-trained dual encoder: the given run, or one trained now."""
    if given:
        return Path(given)
    overrides = [f"train.threads={threads}", *overrides] + (["train.steps=20", "data.train_size=2000"] if quick
                                                             else [])
    run_dir = runs_dir / (name or config)
    start = time.perf_counter()
    run(load_config(config, overrides), run_dir, overwrite=True, cache_dir=default_cache_dir())
    print(f"trained {config} in {time.perf_counter() - start:.0f} s -> {run_dir}")
    return run_dir


def bench_generator(config_name: str, encoder: Path, scorer: Path, runs_dir: Path, threads: int,
                    quick: bool) -> dict:
    overrides = [f"generate.from_run={encoder}", f"generate.scorer={scorer}", f"train.threads={threads}"]
    config = load_config(config_name, overrides + (QUICK if quick else []))
    run_dir = runs_dir / config_name
    start = time.perf_counter()
    metrics = run(config, run_dir, overwrite=True, cache_dir=default_cache_dir())
    metrics["wall_seconds"] = time.perf_counter() - start
    metrics["run_dir"] = str(run_dir)
    metrics["guidance"] = [f"{g:g}" for g in config.generate.guidance]  # the _g<scale> suffixes of the selection
    metrics["sampler"] = {"sampling_steps": config.generate.sampling_steps, "sampling_eta": config.generate.sampling_eta,
                          "guidance_interval": list(config.generate.guidance_interval)}
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes-run", help="a trained tiny-shapes run (dual encoder); default: train one")
    parser.add_argument("--shapes-scorer", help="an independent tiny-shapes run (other seeds); default: train one")
    parser.add_argument("--digits-run", help="a trained lit-digits run (dual encoder); default: train one")
    parser.add_argument("--digits-scorer", help="an independent lit-digits run (other seeds); default: train one")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a smoke run (minutes); figures are meaningless")
    parser.add_argument("--runs-dir", type=Path, default=None, help="where the runs go (default: a temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="vlpt-bench-generation-"))
    name = "generation-quick" if args.quick else "generation"
    figures: dict = {}
    config: dict = {"threads": args.threads, "quick": args.quick, "guidance_selected_on": "val"}

    encoder = dual_encoder_run("tiny-shapes", args.shapes_run, runs_dir, args.threads, args.quick)
    scorer = dual_encoder_run("tiny-shapes", args.shapes_scorer, runs_dir, args.threads, args.quick,
                              "tiny-shapes-scorer", tuple(OTHER_SEEDS))
    m = bench_generator("generate-shapes", encoder, scorer, runs_dir, args.threads, args.quick)
    for key in SHAPES_KEYS:
        for suffix in ("", "_compositional"):
            if f"{key}{suffix}" in m:
                figures[f"{key}{suffix}"] = m[f"{key}{suffix}"]
    figures.update(best_guidance=m["best_guidance"], guidance_selected_on=m["guidance_selected_on"],
                   train_seconds=m["train_seconds"], judge_train_seconds=m["judge_train_seconds"],
                   shapes_wall_seconds=m["wall_seconds"], **{k: m[k] for k in m if k.startswith(("judge_real_", "val_"))})
    config["shapes"] = {"config": "generate-shapes", "dual_encoder": str(encoder), "scorer": str(scorer),
                        "steps": m["steps"], "test_prompts": m["generation_eval_prompts"],
                        "compositional_prompts": m.get("generation_eval_prompts_compositional"), **m["sampler"]}
    shutil.copy(Path(m["run_dir"]) / "samples.png", RESULTS / f"{name}-shapes-samples.png")
    shutil.copy(Path(m["run_dir"]) / "guidance.png", RESULTS / f"{name}-shapes-guidance.png")

    encoder = dual_encoder_run("lit-digits", args.digits_run, runs_dir, args.threads, args.quick)
    scorer = dual_encoder_run("lit-digits", args.digits_scorer, runs_dir, args.threads, args.quick,
                              "lit-digits-scorer", tuple(OTHER_SEEDS))
    m = bench_generator("generate-digits", encoder, scorer, runs_dir, args.threads, args.quick)
    figures.update(digits_judge_acc=m["judge_digit_acc"], digits_best_guidance=m["best_guidance"],
                   digits_train_seconds=m["train_seconds"], digits_clip_score=m["clip_score"],
                   digits_frechet_distance=m["frechet_distance"], digits_frechet_distance_real=m["frechet_distance_real"],
                   digits_judge_real_acc=m["judge_real_digit_acc"], digits_wall_seconds=m["wall_seconds"],
                   **{f"digits_{k}": m[k] for k in m if k.startswith("val_")})
    config["digits"] = {"config": "generate-digits", "dual_encoder": str(encoder), "scorer": str(scorer),
                        "steps": m["steps"], "test_prompts": m["generation_eval_prompts"], **m["sampler"]}
    shutil.copy(Path(m["run_dir"]) / "samples.png", RESULTS / f"{name}-digits-samples.png")
    write_results(name, figures, config)


if __name__ == "__main__":
    main()
