"""The ``vlpt`` command: a thin map of subcommands onto library functions. Every command lives here.

``main(argv)`` runs in-process, so tests drive train -> eval -> classify without a subprocess.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import yaml

from vlpt.config import ConfigError, RunConfig, apply_overrides, list_configs, load_config, to_dict
from vlpt.data import digits, shapes
from vlpt.data.shapes import default_cache_dir
from vlpt.data.shards import read_index, write_shards
from vlpt.data.transforms import images_as_batch, tower_transform
from vlpt.evaluate.report import image_grid
from vlpt.factory import load_dual_encoder
from vlpt.interop import FORMATS
from vlpt.io import ImageLoadError, ModelLoadError, atomic_write
from vlpt.models.captioner import load_captioner
from vlpt.models.decoding import DecodingConfig
from vlpt.models.fusion import FUSION_METHODS
from vlpt.models.generator import check_guidance_interval, load_generator
from vlpt.models.task_model import load_task_model
from vlpt.tasks.finetune import FINETUNE_TASKS, finetune_config
from vlpt.train.distributed import DistributedEnv
from vlpt.train.run import CONFIG_FILE, check_run, evaluate_model, evaluate_run, read_run_config, resume_dir, run
from vlpt.train.trainer import TrainingStopped

DEFAULT_RUNS = Path("runs")
DEFAULT_CONFIG = "tiny-shapes"


def cmd_train(config: str | None, name: str | None, runs_dir: Path, resume: bool, overwrite: bool,
              overrides: list[str], dry_run: bool = False) -> dict:
    """Train ``config`` (default tiny-shapes) into RUNS_DIR/NAME, then evaluate. With ``resume`` and no
    ``config`` the run's own config.yaml is the base the overrides apply to. ``dry_run``: check the config
    (everything checked before a run starts), print it, start nothing."""
    cfg = load_config(config or DEFAULT_CONFIG, overrides)
    run_dir = runs_dir / (name or cfg.name)
    if resume and config is None and (resume_dir(run_dir) / CONFIG_FILE).exists():
        cfg = apply_overrides(read_run_config(resume_dir(run_dir)), overrides)
    return start_run(cfg, run_dir, resume, overwrite, dry_run)


def cmd_finetune(task: str, fusion: str | None, from_run: Path | None, freeze_towers: bool, config: str,
                 name: str | None, runs_dir: Path, resume: bool, overwrite: bool, overrides: list[str],
                 dry_run: bool = False) -> dict:
    if from_run is not None and not from_run.exists():
        raise FileNotFoundError(f"--from {from_run}: no such run or model folder")
    cfg = apply_overrides(finetune_config(load_config(config), task, fusion, from_run, freeze_towers), overrides)
    default_name = task if task == "classify" else f"{task}-{cfg.finetune.fusion}"
    return start_run(cfg, runs_dir / (name or default_name), resume, overwrite, dry_run)


def start_run(config: RunConfig, run_dir: Path, resume: bool, overwrite: bool, dry_run: bool) -> dict:
    if dry_run:
        check_run(config, DistributedEnv())
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return {}
    metrics = run(config, run_dir, resume=resume, overwrite=overwrite, cache_dir=default_cache_dir())
    if metrics:  # empty on torchrun ranks other than 0, which write nothing
        print_metrics(metrics, f"{run_dir}/metrics.json; report: {run_dir}/report.md")
    return metrics


def cmd_ask(image: Path, question: str, model_dir: Path) -> tuple[str, float]:
    answer, prob = load_task_model(model_dir).answer([image], [question])[0]
    print(f"{answer}  (p={prob:.3f})")
    return answer, prob


def cmd_match(image: Path, caption: str, model_dir: Path) -> float:
    prob = load_task_model(model_dir).match([image], [caption])[0]
    print(f"{'match' if prob > 0.5 else 'no match'}  (p={prob:.3f})")
    return prob


def cmd_eval(run_dir: Path, config: str | None = None, overrides: Sequence[str] = (), output: Path | None = None
             ) -> dict:
    """``vlpt eval RUN``: re-evaluate a run with its own config. ``vlpt eval MODEL [--config C] [--set K=V]
    [--output DIR]``: any model that is not a run (a vlpt model folder, a transformers CLIP / SigLIP or OpenCLIP
    checkpoint) evaluated as a dual encoder on C's data and eval sections (default tiny-shapes)."""
    if (Path(run_dir) / CONFIG_FILE).exists():
        if config is not None or overrides or output is not None:
            raise ValueError(f"{run_dir} is a run: it is evaluated with its own config.yaml and writes into itself; "
                             f"--config, --set and --output apply to a model that is not a run")
        metrics = evaluate_run(run_dir, cache_dir=default_cache_dir())
        print_metrics(metrics, f"{run_dir}/metrics.json; report: {run_dir}/report.md")
        return metrics
    model = load_dual_encoder(str(run_dir))
    sizes = [] if any(o.strip().startswith("data.image_size=") for o in overrides) else \
        [f"data.image_size={model.config.image.image_size}"]  # images at the size the tower takes, unless set
    cfg = load_config(config or DEFAULT_CONFIG, sizes + list(overrides) + ["train.task=contrastive"])
    metrics = evaluate_model(model, cfg, output, cache_dir=default_cache_dir(), source=str(run_dir))
    print_metrics(metrics, f"{output}/metrics.json; report: {output}/report.md" if output else "nothing (no --output)")
    return metrics


def cmd_export(source: str, to: str, out: Path, overwrite: bool = False) -> Path:
    """``vlpt export RUN_OR_MODEL --to hf-clip|hf-siglip|open-clip OUT``: the dual encoder of any saved or
    importable model, written in another library's format (a folder that library loads)."""
    if to not in FORMATS:
        raise ValueError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    model = load_dual_encoder(source)
    model.export(to, out)
    how = {"hf-clip": f"transformers.CLIPModel.from_pretrained('{out}')",
           "hf-siglip": f"transformers.SiglipModel.from_pretrained('{out}')",
           "open-clip": f"open_clip.create_model_and_transforms('local-dir:{out}')"}[to]
    print(f"wrote {out} ({to}); load it with {how}")
    return out


def cmd_demo(runs_dir: Path, overrides: list[str]) -> dict:
    """Train the embedded default (tiny-shapes) into runs/demo, evaluate, and write the report."""
    return cmd_train(DEFAULT_CONFIG, "demo", runs_dir, resume=False, overwrite=True, overrides=overrides)


def _load_images(paths: Sequence[Path], model) -> torch.Tensor:
    image = model.config.image
    return images_as_batch(list(paths), transform=tower_transform(image))


def cmd_classify(images: list[Path], labels: str, model_dir: Path) -> list[dict]:
    names = [s.strip() for s in labels.split(",")]
    if len(names) < 2 or not all(names):
        raise ValueError("--labels needs at least two non-empty, comma-separated labels")
    model = load_dual_encoder(model_dir)  # a dual encoder, or the one any saved model is built on
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
    if bool(images) == bool(texts):
        raise ValueError("give either --image paths or --text strings (one kind per call)")
    model = load_dual_encoder(model_dir)
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


def cmd_caption(images: list[Path], model_dir: Path, beam: int = 1, max_length: int | None = None,
                strategy: str | None = None, top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0,
                seed: int = 0) -> list[dict]:
    """``vlpt caption IMAGE [IMAGE...]``: print one caption per image. Beam search when ``beam`` > 1
    (unless ``strategy`` says otherwise); bad options fail before the model or images are loaded."""
    decoding = DecodingConfig(strategy=strategy or ("beam" if beam > 1 else "greedy"), beam=beam,
                              max_length=max_length, top_k=top_k, top_p=top_p, temperature=temperature, seed=seed)
    if not images:
        raise ValueError("give at least one image to caption")
    model = load_captioner(model_dir)
    captions = model.generate_caption(list(images), decoding)
    results = []
    for path, text in zip(images, captions):
        results.append({"image": str(path), "caption": text})
        print(f"{path}: {text}")
    return results


def cmd_generate(prompts: Sequence[str], model_dir: Path, output: Path, num_images: int = 8, steps: int | None = None,
                 guidance: float | None = None, seed: int = 0, columns: int | None = None, scale: int = 4,
                 progress: bool = True, eta: float | None = None,
                 guidance_interval: Sequence[float] | None = None) -> Path:
    """``vlpt generate "PROMPT" [-n 8] [--steps 30] [--guidance 3] [--eta 1] [--guidance-interval 0 0.6] -o out.png``:
    a grid PNG of samples, ``num_images`` per prompt, one row per prompt (or ``columns`` per row). A sampling
    option not given comes from the model's sampling.json (a trained run's best guidance). Bad options fail
    before the model is loaded; the PNG is written to a temp file and renamed, so ``output`` is never
    half-written."""
    prompts = list(prompts)
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError("every prompt must be non-empty; describe the image in at least one word")
    if num_images < 1:
        raise ValueError(f"-n (images per prompt) must be at least 1, got {num_images}")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    if guidance is not None and not guidance >= 0:
        raise ValueError(f"--guidance must be >= 0 (0: unconditional, 1: no guidance), got {guidance}")
    if eta is not None and not 0 <= eta <= 1:
        raise ValueError(f"--eta must be in [0, 1] (0: deterministic DDIM, 1: ancestral), got {eta}")
    if guidance_interval is not None:
        guidance_interval = check_guidance_interval(guidance_interval, "--guidance-interval")
    if scale < 1 or (columns is not None and columns < 1):
        raise ValueError("--scale and --columns must be at least 1")
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise ValueError(f"the output must be a .png file, got {output}")
    if output.exists() and output.is_dir():
        raise ValueError(f"the output {output} is a folder; give a file name ending in .png")
    model = load_generator(model_dir)
    used = model.resolve_sampling(num_inference_steps=steps, guidance_scale=guidance, eta=eta,
                                  guidance_interval=guidance_interval)
    images = model.generate_images(prompts, seed=seed, progress=progress, num_images_per_prompt=num_images,
                                   **dataclasses.asdict(used)).numpy()
    grid = image_grid(images, columns or num_images, scale)
    atomic_write(output, lambda tmp: grid.save(tmp, format="PNG"))
    lo, hi = used.guidance_interval
    where = "" if (lo, hi) == (0, 1) else f" in [{lo:g}, {hi:g}]"
    print(f"wrote {output} ({len(images)} images, {len(prompts)} prompt(s), {used.num_inference_steps} steps, "
          f"guidance {used.guidance_scale:g}{where}, eta {used.eta:g}, seed {seed})")
    return output


def cmd_data_shards(src: str, out: Path, shard_size: int, split: str = "train", size: int = 1000,
                    image_size: int = 64, overwrite: bool = False) -> list[Path]:
    """``vlpt data shards SRC OUT``: SRC is an image folder (files copied as they are; ``split``,
    ``size`` and ``image_size`` do not apply) or ``shapes`` / ``digits`` (rendered at ``image_size``;
    shapes: ``size`` scenes of ``split``; digits: its fixed ``split``)."""
    if src == "shapes":
        source = shapes.ShapesDataset(shapes.ShapesConfig(split=split, size=size, image_size=image_size),
                                      cache_dir=shapes.default_cache_dir())
        names = shapes.CLASS_NAMES
    elif src == "digits":
        source = digits.DigitsDataset(digits.DigitsConfig(split=split, image_size=image_size))
        names = digits.CLASS_NAMES
    else:
        if not Path(src).is_dir():
            raise FileNotFoundError(f"{src}: not a folder, and not one of the built-in data sets shapes, digits")
        source, names = Path(src), None
    paths = write_shards(source, out, shard_size, class_names=names, overwrite=overwrite)
    total = read_index(Path(out))["samples"]
    names = paths[0].name if len(paths) == 1 else f"{paths[0].name}..{paths[-1].name}"
    print(f"wrote {total} samples from {src} in {len(paths)} shard(s) of up to {shard_size} to {out}/{names}")
    return paths


def cmd_index(model: str, source: str, out: Path, add: bool = False, overwrite: bool = False,
              index_type: str = "auto", dedup: float | None = None, part_size: int = 1024, batch_size: int = 256,
              workers: int = 0, target_recall: float = 0.95, keep_parts: bool = False, progress: bool = True,
              precision: str = "auto"):
    """``vlpt index MODEL SOURCE OUT``: embed SOURCE (an image folder with or without a captions file, webdataset
    shards, or a .txt file of captions) with MODEL into faiss indexes + metadata + a manifest in OUT. Under
    torchrun every rank embeds its share of the parts and rank 0 merges them."""
    from datetime import timedelta

    from vlpt.serve.index import IndexOptions, build_index, summary
    from vlpt.train.distributed import cleanup, init_distributed

    options = IndexOptions(index_type=index_type, part_size=part_size, batch_size=batch_size, workers=workers,
                           dedup=dedup, target_recall=target_recall, keep_parts=keep_parts, precision=precision)
    env = init_distributed(timeout=timedelta(hours=12))  # a rank waits at the barrier while the others embed
    try:
        result = build_index(model, source, out, options, add=add, overwrite=overwrite, env=env, progress=progress)
    finally:
        cleanup(env)
    if result.manifest is not None:
        state = "up to date" if result.up_to_date else \
            f"{result.computed_parts} part(s) embedded, {result.reused_parts} reused"
        print(f"wrote {out}: {summary(result.manifest)}; {state}")
        failed = result.manifest["failures"]
        if failed:
            shown = "; ".join(f"{f['where']}: {f['reason']}" for f in failed[:3])
            print(f"skipped {len(failed)} unreadable item(s) (listed in {out}/manifest.json): {shown}"
                  f"{'; ...' if len(failed) > 3 else ''}")
    return result


def cmd_serve(index: Path | None, model: str | None, caption: str | None = None, vqa: str | None = None,
              match: str | None = None, generate: str | None = None, host: str = "127.0.0.1", port: int = 8000,
              limit_overrides: Sequence[str] = (), max_batch: int = 32, max_wait_ms: float = 2.0,
              threads: int = 1) -> None:
    """``vlpt serve --index OUT [--model RUN] [--caption RUN] [--vqa RUN] [--match RUN] [--generate RUN]``:
    search, embeddings and the applications over HTTP (FastAPI + uvicorn), and the web page at /."""
    from vlpt.serve.app import ServeConfig, parse_limits, serve

    config = ServeConfig(index=index, model=model, caption=caption, vqa=vqa, match=match, generate=generate,
                         host=host, port=port, limits=parse_limits(limit_overrides), max_batch=max_batch,
                         max_wait_ms=max_wait_ms, threads=threads)
    serve(config)


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
    p.add_argument("--config", help=f"named config ({', '.join(list_configs())}) or a file (default: {DEFAULT_CONFIG}; "
                   f"with --resume: the run's own config.yaml)")
    p.add_argument("--name", help="run name (default: the config's name); the run goes to RUNS_DIR/NAME")
    p.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS)
    p.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint, with "
                   "its own config (--set may change only train.steps, eval_every, log_every, checkpoint_every, "
                   "keep_checkpoints, max_seconds, threads)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run once the new one completes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config (values, task, paths), print it as YAML and exit: no data, no model")

    p = sub.add_parser("finetune", help="fine-tune a pre-trained run with fusion and a task head, then evaluate")
    p.add_argument("--task", required=True, choices=list(FINETUNE_TASKS), help="classify: image -> class; match: image + caption "
                   "-> yes/no; vqa: image + question -> answer")
    p.add_argument("--fusion", choices=FUSION_METHODS, help="how image and text meet (match, vqa); default cross")
    p.add_argument("--from", dest="from_run", type=Path,
                   help="pre-trained run or model folder (vlpt, transformers CLIP / SigLIP, OpenCLIP; default: from "
                        "scratch)")
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

    p = sub.add_parser("eval", help="evaluate a run's model and rewrite its metrics.json and report.md; or evaluate "
                                    "any model (vlpt, transformers CLIP / SigLIP, OpenCLIP) on a config's data")
    p.add_argument("run_dir", type=Path, help="a run folder, or a model (folder, OpenCLIP ARCH,FILE, hf-hub:NAME)")
    p.add_argument("--config", help="a model that is not a run: the config whose data and eval sections it is "
                                    f"evaluated on (default: {DEFAULT_CONFIG})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a model that is not a run: override a config value, e.g. --set data.dataset=files")
    p.add_argument("--output", type=Path, help="a model that is not a run: write metrics.json and report.md here")

    p = sub.add_parser("export", help="write a model in another library's format: transformers CLIPModel / "
                                      "SiglipModel or an OpenCLIP local-dir folder")
    p.add_argument("source", help="a run or model folder (vlpt, transformers CLIP / SigLIP, OpenCLIP) or an "
                                  "OpenCLIP ARCH,FILE")
    p.add_argument("--to", required=True, choices=FORMATS, help="the format to write")
    p.add_argument("out", type=Path, help="the folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    p = sub.add_parser("demo", help="train + evaluate the embedded default (tiny-shapes) into runs/demo")
    p.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    p = sub.add_parser("classify", help="zero-shot classify images among text labels")
    p.add_argument("images", type=Path, nargs="+")
    p.add_argument("--labels", required=True, help='comma-separated, e.g. "a red circle,a blue star"')
    p.add_argument("--model", type=Path, default=DEFAULT_RUNS / "demo",
                   help="model or run folder (vlpt, transformers CLIP / SigLIP, OpenCLIP; or OpenCLIP ARCH,FILE)")

    p = sub.add_parser("embed", help="print or save L2-normalised embeddings of images or texts")
    p.add_argument("--image", dest="images", type=Path, nargs="+", default=[])
    p.add_argument("--text", dest="texts", nargs="+", default=[])
    p.add_argument("--model", type=Path, default=DEFAULT_RUNS / "demo",
                   help="model or run folder (vlpt, transformers CLIP / SigLIP, OpenCLIP; or OpenCLIP ARCH,FILE)")
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

    p = sub.add_parser("index", help="embed an image folder, shards or a captions file into a faiss index "
                                     "(+ metadata and a manifest) for `vlpt serve`")
    p.add_argument("model", help="model or run folder (vlpt, transformers CLIP / SigLIP, OpenCLIP; or OpenCLIP ARCH,FILE)")
    p.add_argument("source", help="an image folder (with captions.csv / captions.jsonl, or just images), webdataset "
                                  "shards (a folder of .tar, a .tar, a {000..009} pattern), or a .txt file of captions")
    p.add_argument("out", type=Path, help="the index folder to write")
    p.add_argument("--add", action="store_true", help="add SOURCE to the index in OUT (no retraining)")
    p.add_argument("--overwrite", action="store_true", help="replace the index in OUT")
    p.add_argument("--index-type", default="auto", choices=["auto", "flat", "hnsw", "ivfpq"],
                   help="auto: flat up to 20,000 vectors, HNSW up to 500,000, IVF-PQ above")
    p.add_argument("--dedup", type=float, default=None, metavar="SIM",
                   help="drop near-duplicates: an image (a text, for a .txt source) whose cosine similarity with one "
                        "kept before is >= SIM, e.g. 0.98 (listed in the manifest)")
    p.add_argument("--part-size", type=int, default=1024, help="images (or lines) per part of work (resumable unit)")
    p.add_argument("--batch-size", type=int, default=256, help="images per model forward")
    p.add_argument("--workers", type=int, default=0,
                   help="threads that decode (and on a CPU embed) images (0: as many as torch's threads)")
    p.add_argument("--target-recall", type=float, default=0.95,
                   help="HNSW / IVF-PQ: search settings are tuned to reach this recall@10 against exact search")
    p.add_argument("--keep-parts", action="store_true", help="keep OUT/parts after merging")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="the image forward: auto = bf16 on CPUs with native bf16 (AVX512-BF16 / AMX), else fp32")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("serve", help="serve search, embeddings and the applications over HTTP, with a web page")
    p.add_argument("--index", type=Path, help="an index folder written by `vlpt index`")
    p.add_argument("--model", help="the dual encoder for queries (default: the index's model)")
    p.add_argument("--caption", help="a captioner (model or run folder): POST /caption")
    p.add_argument("--vqa", help="a `vlpt finetune --task vqa` model: POST /answer")
    p.add_argument("--match", help="a `vlpt finetune --task match` model: POST /match")
    p.add_argument("--generate", help="a text -> image generator: POST /generate")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--limit", dest="limits", action="append", default=[], metavar="NAME=VALUE",
                   help="change a limit, e.g. --limit max_k=100 (see docs/serving.md for the names and defaults)")
    p.add_argument("--max-batch", type=int, default=32, help="largest batch the dynamic batcher forms (1: off)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="how long a batch waits to fill")
    p.add_argument("--threads", type=int, default=1, help="torch / faiss threads per model worker")

    sub.add_parser("configs", help="list the named configs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A user error (a bad path, config, image, model folder or option) prints one line,
    ``vlpt: error: ...``, to stderr and returns 2 (``--debug``: the traceback too); a bug raises."""
    # User errors, by class: ValueError stands for the library's checks of arguments and data (ConfigError,
    # ImageLoadError and ModelLoadError are ValueErrors that name what is wrong); OSError for paths the
    # operating system refuses (missing, a folder, no permission). Anything else is a bug and raises.
    user_errors = (ConfigError, ImageLoadError, ModelLoadError, FileNotFoundError, FileExistsError, OSError,
                   ValueError)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "train":
            cmd_train(args.config, args.name, args.runs_dir, args.resume, args.overwrite, args.overrides,
                      args.dry_run)
        elif args.command == "finetune":
            cmd_finetune(args.task, args.fusion, args.from_run, args.freeze_towers, args.config, args.name,
                         args.runs_dir, args.resume, args.overwrite, args.overrides, args.dry_run)
        elif args.command == "ask":
            cmd_ask(args.image, args.question, args.model)
        elif args.command == "match":
            cmd_match(args.image, args.caption, args.model)
        elif args.command == "eval":
            cmd_eval(args.run_dir, args.config, args.overrides, args.output)
        elif args.command == "export":
            cmd_export(args.source, args.to, args.out, args.overwrite)
        elif args.command == "demo":
            cmd_demo(args.runs_dir, args.overrides)
        elif args.command == "classify":
            cmd_classify(args.images, args.labels, args.model)
        elif args.command == "embed":
            cmd_embed(args.images, args.texts, args.model, args.output)
        elif args.command == "caption":
            cmd_caption(args.images, args.model, beam=args.beam, max_length=args.max_length,
                        strategy="sample" if args.sample else None, top_k=args.top_k, top_p=args.top_p,
                        temperature=args.temperature, seed=args.seed)
        elif args.command == "generate":
            cmd_generate(args.prompts, args.model, args.output, num_images=args.num_images, steps=args.steps,
                         guidance=args.guidance, seed=args.seed, scale=args.scale, eta=args.eta,
                         guidance_interval=args.guidance_interval)
        elif args.command == "data" and args.data_command == "shards":
            cmd_data_shards(args.src, args.out, args.shard_size, args.split, args.size, args.image_size, args.overwrite)
        elif args.command == "index":
            cmd_index(args.model, args.source, args.out, args.add, args.overwrite, args.index_type, args.dedup,
                      args.part_size, args.batch_size, args.workers, args.target_recall, args.keep_parts,
                      not args.no_progress, args.precision)
        elif args.command == "serve":
            cmd_serve(args.index, args.model, args.caption, args.vqa, args.match, args.generate, args.host,
                      args.port, args.limits, args.max_batch, args.max_wait_ms, args.threads)
        elif args.command == "configs":
            print("\n".join(list_configs()))
    except user_errors as err:
        if args.debug:
            traceback.print_exc()
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        print(f"vlpt: error: {message}", file=sys.stderr)
        return 2
    except TrainingStopped as err:  # preempted (75), non-finite loss (65), final checkpoint not written (74)
        print(f"vlpt: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
