"""The ``vlpt`` command: a thin map of subcommands onto library functions.

``main(argv)`` runs in-process, so tests drive train -> eval -> classify without a subprocess.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vlpt.config import ConfigError, list_configs, load_config
from vlpt.data.shapes import default_cache_dir
from vlpt.io import ImageLoadError
from vlpt.models.fusion import FUSION_METHODS
from vlpt.models.task_model import TASKS

DEFAULT_RUNS = Path("runs")


def run_functions(cfg) -> tuple:
    """(train-and-evaluate, evaluate) for the run's ``train.task``: contrastive | caption | coca | generate."""
    from vlpt.train.caption import evaluate_caption_run, is_caption_run, run_caption
    from vlpt.train.generate import evaluate_generate_run, is_generate_run, run_generate
    from vlpt.train.run import evaluate_run, run

    if is_caption_run(cfg):  # also rejects an unknown task, listing the choices
        return run_caption, evaluate_caption_run
    if is_generate_run(cfg):
        return run_generate, evaluate_generate_run
    return run, evaluate_run


def cmd_train(config: str, name: str | None, runs_dir: Path, resume: bool, overwrite: bool,
              overrides: list[str]) -> dict:
    cfg = load_config(config, overrides)
    run_dir = runs_dir / (name or cfg.name)
    train_fn, _ = run_functions(cfg)
    metrics = train_fn(cfg, run_dir, resume=resume, overwrite=overwrite, cache_dir=default_cache_dir())
    if metrics:  # empty on torchrun ranks other than 0, which write nothing
        print_metrics(metrics, f"{run_dir}/metrics.json; report: {run_dir}/report.md")
    return metrics


def cmd_finetune(task: str, fusion: str | None, from_run: Path | None, freeze_towers: bool, config: str,
                 name: str | None, runs_dir: Path, resume: bool, overwrite: bool, overrides: list[str]) -> dict:
    from vlpt.config import apply_overrides
    from vlpt.train.finetune import evaluate_finetune_run, finetune_config, fit_finetune
    from vlpt.train.run import run

    if from_run is not None and not from_run.exists():
        raise FileNotFoundError(f"--from {from_run}: no such run or model folder")
    cfg = apply_overrides(finetune_config(load_config(config), task, fusion, from_run, freeze_towers), overrides)
    default_name = task if task == "classify" else f"{task}-{cfg.finetune.fusion}"
    run_dir = runs_dir / (name or default_name)
    metrics = run(cfg, run_dir, resume=resume, overwrite=overwrite, cache_dir=default_cache_dir(),
                  fit_fn=fit_finetune, evaluate_fn=evaluate_finetune_run)
    print_metrics(metrics, f"{run_dir}/metrics.json; report: {run_dir}/report.md")
    return metrics


def cmd_ask(image: Path, question: str, model_dir: Path) -> tuple[str, float]:
    from vlpt.factory import load_task_model

    answer, prob = load_task_model(model_dir).answer([image], [question])[0]
    print(f"{answer}  (p={prob:.3f})")
    return answer, prob


def cmd_match(image: Path, caption: str, model_dir: Path) -> float:
    from vlpt.factory import load_task_model

    prob = load_task_model(model_dir).match([image], [caption])[0]
    print(f"{'match' if prob > 0.5 else 'no match'}  (p={prob:.3f})")
    return prob


def _is_task_run(run_dir: Path) -> bool:
    config = run_dir / "model" / "config.json"
    return config.exists() and json.loads(config.read_text()).get("model_type") == "vlpt-task"


def cmd_eval(run_dir: Path) -> dict:
    from vlpt.train.finetune import evaluate_finetune_run
    from vlpt.train.run import read_run_config

    evaluate = evaluate_finetune_run if _is_task_run(run_dir) else run_functions(read_run_config(run_dir))[1]
    metrics = evaluate(run_dir, cache_dir=default_cache_dir())
    print_metrics(metrics, f"{run_dir}/metrics.json; report: {run_dir}/report.md")
    return metrics


def cmd_demo(runs_dir: Path, overrides: list[str]) -> dict:
    """Train the embedded default (tiny-shapes) into runs/demo, evaluate, and write the report."""
    return cmd_train("tiny-shapes", "demo", runs_dir, resume=False, overwrite=True, overrides=overrides)


def _load_images(paths: Sequence[Path], model) -> torch.Tensor:
    from vlpt.data.transforms import images_as_batch

    image = model.config.image
    return images_as_batch(list(paths), image.image_size, image.mean, image.std)


def cmd_classify(images: list[Path], labels: str, model_dir: Path) -> list[dict]:
    from vlpt.factory import load_model

    names = [s.strip() for s in labels.split(",")]
    if len(names) < 2 or not all(names):
        raise ValueError("--labels needs at least two non-empty, comma-separated labels")
    model = load_model(model_dir)
    with torch.inference_mode():
        image_features = model.encode_image(_load_images(images, model))
        text_features = model.encode_text(names)
        scale = model.logit_scale.clamp(0, model.config.max_logit_scale).exp()
        probs = (scale * image_features @ text_features.T).softmax(dim=-1)
    results = []
    for path, p in zip(images, probs):
        ranked = sorted(zip(names, p.tolist()), key=lambda t: -t[1])
        results.append({"image": str(path), "label": ranked[0][0],
                        "probabilities": {n: round(v, 4) for n, v in ranked}})
        print(f"{path}: {ranked[0][0]}  (" + ", ".join(f"{n}: {v:.3f}" for n, v in ranked) + ")")
    return results


def cmd_embed(images: list[Path], texts: list[str], model_dir: Path, output: Path | None) -> np.ndarray:
    from vlpt.factory import load_model

    if bool(images) == bool(texts):
        raise ValueError("give either --image paths or --text strings (one kind per call)")
    model = load_model(model_dir)
    with torch.inference_mode():
        features = model.encode_image(_load_images(images, model)) if images else model.encode_text(texts)
    array = features.numpy()
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        np.save(output, array)
        print(f"wrote {array.shape[0]} embeddings of dim {array.shape[1]} to {output}")
    else:
        for name, row in zip(images or texts, array):
            print(json.dumps({"input": str(name), "embedding": [round(float(v), 6) for v in row]}))
    return array


def print_metrics(metrics: dict, where: str) -> None:
    width = max(map(len, metrics))
    for key in sorted(metrics):
        value = metrics[key]
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"  {key:<{width}}  {shown}")
    print(f"wrote {where}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlpt", description="Vision-language pre-training.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the full traceback instead of the one-line message")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a named config or YAML file, then evaluate it")
    p.add_argument("--config", default="tiny-shapes", help=f"named config ({', '.join(list_configs())}) or a file")
    p.add_argument("--name", help="run name (default: the config's name); the run goes to RUNS_DIR/NAME")
    p.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS)
    p.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run once the new one completes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config (values, task, paths), print it as YAML and exit: no data, no model")

    p = sub.add_parser("finetune", help="fine-tune a pre-trained run with fusion and a task head, then evaluate")
    p.add_argument("--task", required=True, choices=TASKS, help="classify: image -> class; match: image + caption "
                   "-> yes/no; vqa: image + question -> answer")
    p.add_argument("--fusion", choices=FUSION_METHODS, help="how image and text meet (match, vqa); default cross")
    p.add_argument("--from", dest="from_run", type=Path, help="pre-trained run or model folder (default: from scratch)")
    p.add_argument("--freeze-towers", action="store_true", help="train only fusion + head (linear probe for classify)")
    p.add_argument("--config", default="finetune", help="fine-tuning config: train budget, data sizes")
    p.add_argument("--name", help="run name (default: TASK or TASK-FUSION)")
    p.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config (values, paths), print it as YAML and exit: no data, no model")

    p = sub.add_parser("ask", help="answer a question about an image with a vqa model")
    p.add_argument("image", type=Path)
    p.add_argument("question")
    p.add_argument("--model", type=Path, required=True, help="a `vlpt finetune --task vqa` run or model folder")

    p = sub.add_parser("match", help="probability that a caption describes an image, with a match model")
    p.add_argument("image", type=Path)
    p.add_argument("caption")
    p.add_argument("--model", type=Path, required=True, help="a `vlpt finetune --task match` run or model folder")

    p = sub.add_parser("eval", help="evaluate a run's model and rewrite its metrics.json and report.md")
    p.add_argument("run_dir", type=Path)

    p = sub.add_parser("demo", help="train + evaluate the embedded default (tiny-shapes) into runs/demo")
    p.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    p = sub.add_parser("classify", help="zero-shot classify images among text labels")
    p.add_argument("images", type=Path, nargs="+")
    p.add_argument("--labels", required=True, help='comma-separated, e.g. "a red circle,a blue star"')
    p.add_argument("--model", type=Path, default=DEFAULT_RUNS / "demo", help="model or run folder")

    p = sub.add_parser("embed", help="print or save L2-normalised embeddings of images or texts")
    p.add_argument("--image", dest="images", type=Path, nargs="+", default=[])
    p.add_argument("--text", dest="texts", nargs="+", default=[])
    p.add_argument("--model", type=Path, default=DEFAULT_RUNS / "demo", help="model or run folder")
    p.add_argument("-o", "--output", type=Path, help="write a .npy file instead of printing JSON lines")

    p = sub.add_parser("caption", help="caption images with a trained captioner (train.task caption | coca)")
    p.add_argument("images", type=Path, nargs="+")
    p.add_argument("--model", type=Path, default=DEFAULT_RUNS / "caption-shapes", help="captioner model or run folder")
    p.add_argument("--beam", type=int, default=1, help="beam width; 1 is greedy search")
    p.add_argument("--max-length", type=int, default=None, help="tokens to generate at most (default: the model's)")
    p.add_argument("--sample", action="store_true", help="sample instead of searching (--top-k, --top-p, --temperature)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0: all")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the nucleus of this probability mass")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")

    p = sub.add_parser("generate", help="draw images from text prompts with a trained generator (train.task generate)")
    p.add_argument("prompts", nargs="+", help='one or more prompts, e.g. "a large red circle in the top left"')
    p.add_argument("--model", type=Path, default=DEFAULT_RUNS / "generate-shapes", help="generator model or run folder")
    p.add_argument("-n", "--num-images", type=int, default=8, help="images per prompt (one grid row per prompt)")
    # Sampling options left out come from the model's sampling.json: a trained run's best guidance and sampler.
    p.add_argument("--steps", type=int, default=None, help="DDIM sampling steps (default: the model's, else 30)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale; 1: none, 0: unconditional (default: the run's best, else 3)")
    p.add_argument("--eta", type=float, default=None,
                   help="fresh noise per DDIM step: 0 deterministic (DDIM), 1 ancestral (default: the model's, else 0)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only at noise levels in [LO, HI] (0 clean, 1 pure noise); e.g. 0 0.6 "
                        "(default: the model's, else 0 1)")
    p.add_argument("--seed", type=int, default=0, help="noise seed: the same seed gives the same images")
    p.add_argument("--scale", type=int, default=4, help="enlarge each image this many times in the grid (nearest)")
    p.add_argument("-o", "--output", type=Path, required=True, help="the grid PNG to write (folders are created)")

    p = sub.add_parser("data", help="prepare data: write webdataset shards")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("shards", help="write an image folder (with captions.csv/.jsonl) or shapes/digits as tar shards")
    p.add_argument("src", help="an image folder with a captions file, or shapes | digits")
    p.add_argument("out", type=Path, help="output folder for shard-%%06d.tar and index.json")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--split", default="train", help="shapes: train | val | test | compositional; digits: train | test")
    p.add_argument("--size", type=int, default=10000, help="shapes: number of scenes")
    p.add_argument("--image-size", type=int, default=64,
                   help="shapes / digits: pixels per side (folder images are copied as they are)")
    p.add_argument("--overwrite", action="store_true", help="replace the shards already in OUT")

    sub.add_parser("configs", help="list the named configs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A user error (a bad path, config, image, model folder or option) prints one line,
    ``vlpt: error: ...``, to stderr and returns 2 (``--debug``: the traceback too); a bug raises."""
    from vlpt.io import ModelLoadError

    # User errors, by class: ValueError stands for the library's checks of arguments and data (ConfigError,
    # ImageLoadError and ModelLoadError are ValueErrors that name what is wrong); OSError for paths the
    # operating system refuses (missing, a folder, no permission). Anything else is a bug and raises.
    user_errors = (ConfigError, ImageLoadError, ModelLoadError, FileNotFoundError, FileExistsError, OSError,
                   ValueError)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command in ("train", "finetune") and args.dry_run:  # check the config, print it, start nothing
            import yaml

            from vlpt.config import apply_overrides, to_dict, validate_config

            if args.command == "train":
                from vlpt.train.caption import TASKS as TRAIN_TASKS  # the task registry's names, once there is one

                cfg = validate_config(load_config(args.config, args.overrides), TRAIN_TASKS, check_paths=True)
            else:
                from vlpt.train.finetune import finetune_config

                cfg = validate_config(apply_overrides(finetune_config(
                    load_config(args.config), args.task, args.fusion, args.from_run, args.freeze_towers),
                    args.overrides), check_paths=True)
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        elif args.command == "train":
            cmd_train(args.config, args.name, args.runs_dir, args.resume, args.overwrite, args.overrides)
        elif args.command == "finetune":
            cmd_finetune(args.task, args.fusion, args.from_run, args.freeze_towers, args.config, args.name,
                         args.runs_dir, args.resume, args.overwrite, args.overrides)
        elif args.command == "ask":
            cmd_ask(args.image, args.question, args.model)
        elif args.command == "match":
            cmd_match(args.image, args.caption, args.model)
        elif args.command == "eval":
            cmd_eval(args.run_dir)
        elif args.command == "demo":
            cmd_demo(args.runs_dir, args.overrides)
        elif args.command == "classify":
            cmd_classify(args.images, args.labels, args.model)
        elif args.command == "embed":
            cmd_embed(args.images, args.texts, args.model, args.output)
        elif args.command == "caption":
            from vlpt.train.caption import cmd_caption

            cmd_caption(args.images, args.model, beam=args.beam, max_length=args.max_length,
                        strategy="sample" if args.sample else None, top_k=args.top_k, top_p=args.top_p,
                        temperature=args.temperature, seed=args.seed)
        elif args.command == "generate":
            from vlpt.train.generate import cmd_generate

            cmd_generate(args.prompts, args.model, args.output, num_images=args.num_images, steps=args.steps,
                         guidance=args.guidance, seed=args.seed, scale=args.scale, eta=args.eta,
                         guidance_interval=args.guidance_interval)
        elif args.command == "data" and args.data_command == "shards":
            from vlpt.data.shards import cmd_data_shards

            cmd_data_shards(args.src, args.out, args.shard_size, args.split, args.size, args.image_size, args.overwrite)
        elif args.command == "configs":
            print("\n".join(list_configs()))
    except user_errors as err:
        if args.debug:
            import traceback

            traceback.print_exc()
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        print(f"vlpt: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
