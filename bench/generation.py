"""Issue 5 acceptance: text -> image generation on the shapes world and on real digits, judged independently.

Shapes (config generate-shapes): a small diffusers UNet at 32 px learns single-object scenes, conditioned on
the frozen text tower of a tiny-shapes dual encoder (`--shapes-run`, or one is trained here first: ~8 min).
Held-out prompts ("a large red circle in the top left", from test scenes) are generated at guidance 1 (none), 1.5,
3 and 5 with the config's sampler (`generate.sampling_steps` / `sampling_eta`, recorded under config; both
configs: 30 DDIM steps, eta 0). A separate CNN judge, trained only on real single-object scenes of another data
seed, reads color / shape / size / position of each generated image; the dual encoder gives the CLIP-score,
its image tower the features of the Fréchet distance to real test images.

Digits (config generate-digits): the same UNet on scikit-learn's real digits, conditioned on the frozen
pretrained MiniLM text tower of a LiT run (`--digits-run`, or lit-digits is trained here: ~2 min); prompts
"a handwritten digit N" are judged by a digit classifier trained on the real train split.

Writes bench/results/generation.json (flat keys) and copies the sample grids next to it.

    .venv/bin/python bench/generation.py [--shapes-run RUN] [--digits-run RUN] [--sections shapes digits]
                                         [--threads 2] [--quick] [--runs-dir DIR]
"""

from __future__ import annotations

import argparse
import json
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

QUICK = ["train.steps=20", "train.warmup_steps=5", "generate.eval_size=30", "generate.judge_steps=30",
         "generate.sampling_steps=5", "generate.judge_train_size=2000", "train.checkpoint_every=0"]
SHAPES_KEYS = ("judge_color_acc", "judge_shape_acc", "judge_position_acc", "judge_size_acc", "judge_mean_acc",
               "clip_score", "frechet_distance", "seconds_per_image")


def dual_encoder_run(config: str, given: str | None, runs_dir: Path, threads: int, quick: bool) -> Path:
    """The pre-trained dual encoder a generator is conditioned on: the given run, or one trained now."""
    if given:
        return Path(given)
    overrides = [f"train.threads={threads}"] + (["train.steps=20", "data.train_size=2000"] if quick else [])
    run_dir = runs_dir / config
    start = time.perf_counter()
    run(load_config(config, overrides), run_dir, overwrite=True, cache_dir=default_cache_dir())
    print(f"trained {config} in {time.perf_counter() - start:.0f} s -> {run_dir}")
    return run_dir


def bench_generator(config_name: str, encoder: Path, runs_dir: Path, threads: int, quick: bool) -> dict:
    overrides = [f"generate.from_run={encoder}", f"train.threads={threads}"] + (QUICK if quick else [])
    config = load_config(config_name, overrides)
    run_dir = runs_dir / config_name
    start = time.perf_counter()
    metrics = run(config, run_dir, overwrite=True, cache_dir=default_cache_dir())
    metrics["wall_seconds"] = time.perf_counter() - start
    metrics["run_dir"] = str(run_dir)
    metrics["guidance"] = [f"{g:g}" for g in config.generate.guidance]  # the _g<scale> suffixes it reported
    metrics["sampler"] = {"sampling_steps": config.generate.sampling_steps, "sampling_eta": config.generate.sampling_eta,
                          "guidance_interval": list(config.generate.guidance_interval)}
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes-run", help="a trained tiny-shapes run (dual encoder); default: train one")
    parser.add_argument("--digits-run", help="a trained lit-digits run (dual encoder); default: train one")
    parser.add_argument("--sections", nargs="+", choices=("shapes", "digits"), default=["shapes", "digits"],
                        help="rerun only these; the other section's figures are kept from the last results")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a smoke run (minutes); figures are meaningless")
    parser.add_argument("--runs-dir", type=Path, default=None, help="where the runs go (default: a temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="vlpt-bench-generation-"))
    name = "generation-quick" if args.quick else "generation"
    previous = RESULTS / f"{name}.json"
    figures: dict = {}
    config: dict = {"threads": args.threads, "quick": args.quick, "sections_rerun": args.sections}
    if set(args.sections) != {"shapes", "digits"} and previous.exists():
        old = json.loads(previous.read_text())
        figures = {k: v for k, v in old.items() if k not in ("config", "machine")}
        config = {**old.get("config", {}), **config}

    if "shapes" in args.sections:
        encoder = dual_encoder_run("tiny-shapes", args.shapes_run, runs_dir, args.threads, args.quick)
        m = bench_generator("generate-shapes", encoder, runs_dir, args.threads, args.quick)
        for key in SHAPES_KEYS:
            figures[key] = m[key]
            for g in m["guidance"]:
                if f"{key}_g{g}" in m:
                    figures[f"{key}_g{g}"] = m[f"{key}_g{g}"]
        figures.update(best_guidance=m["best_guidance"], train_seconds=m["train_seconds"],
                       clip_score_real=m["clip_score_real"], frechet_distance_real=m["frechet_distance_real"],
                       judge_train_seconds=m["judge_train_seconds"], shapes_wall_seconds=m["wall_seconds"],
                       **{k: m[k] for k in m if k.startswith("judge_real_")})
        config["shapes"] = {"config": "generate-shapes", "dual_encoder": str(encoder), "steps": m["steps"],
                            "eval_prompts": m["generation_eval_prompts"], **m["sampler"]}
        shutil.copy(Path(m["run_dir"]) / "samples.png", RESULTS / f"{name}-shapes-samples.png")
        shutil.copy(Path(m["run_dir"]) / "guidance.png", RESULTS / f"{name}-shapes-guidance.png")
        write_results(name, figures, config)  # the shapes figures are safe even if digits fails

    if "digits" in args.sections:
        encoder = dual_encoder_run("lit-digits", args.digits_run, runs_dir, args.threads, args.quick)
        m = bench_generator("generate-digits", encoder, runs_dir, args.threads, args.quick)
        figures["digits_judge_acc"] = m["judge_digit_acc"]
        for g in m["guidance"]:
            figures[f"digits_judge_acc_g{g}"] = m[f"judge_digit_acc_g{g}"]
        figures.update(digits_best_guidance=m["best_guidance"], digits_train_seconds=m["train_seconds"],
                       digits_clip_score=m["clip_score"], digits_frechet_distance=m["frechet_distance"],
                       digits_frechet_distance_real=m["frechet_distance_real"],
                       digits_judge_real_acc=m["judge_real_digit_acc"], digits_wall_seconds=m["wall_seconds"])
        config["digits"] = {"config": "generate-digits", "dual_encoder": str(encoder), "steps": m["steps"],
                            "eval_prompts": m["generation_eval_prompts"], **m["sampler"]}
        shutil.copy(Path(m["run_dir"]) / "samples.png", RESULTS / f"{name}-digits-samples.png")
        write_results(name, figures, config)


if __name__ == "__main__":
    main()
