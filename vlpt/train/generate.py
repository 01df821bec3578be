"""Text -> image runs: train a diffusion generator on a dual encoder's text tower, judge its images,
write the report; plus ``cmd_generate`` for the ``vlpt generate`` command.

``train.task: generate``, section ``generate:``. The dual encoder comes from ``generate.from_run`` (a
trained run or model folder: its text tower conditions the UNet, frozen unless
``generate.model.freeze_text: false``; its image tower scores CLIP-score and the Fréchet distance) or
is built from scratch (then the text tower should train: ``freeze_text: false``).

Run folder as for other runs (``config.yaml``, ``log.jsonl``, ``checkpoints/``, ``metrics.json``,
``report.md``), with ``model/`` a generator folder (``load_generator``), ``samples.png`` (prompts x
samples at the best guidance) and ``guidance.png`` (the same prompts at every guidance scale).
Single process: generator runs do not use torchrun yet.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from vlpt.config import RunConfig, SamplingConfig
from vlpt.data import shapes
from vlpt.data.digits import DigitsConfig, DigitsDataset
from vlpt.evaluate.captioning import clip_score
from vlpt.evaluate.generation import (
    DIGIT_ATTRIBUTES,
    SHAPE_ATTRIBUTES,
    JudgeConfig,
    digit_prompt,
    frechet_distance,
    resize_images,
    shapes_attribute_labels,
    shapes_prompt,
    tower_features,
    train_judge,
)
from vlpt.evaluate.report import write_report
from vlpt.evaluate.suite import load_split
from vlpt.factory import create_model, find_model_dir, get_tokenizer
from vlpt.io import atomic_write
from vlpt.models.generator import (
    TextToImageGenerator,
    check_guidance_interval,
    check_sampling,
    load_generator,
    write_sampling,
)
from vlpt.tokenization import Tokenizer
from vlpt.train.caption import (
    load_dual_encoder,  # a captioner's folder also gives its dual encoder
)
from vlpt.train.run import fit_on_pairs, read_run_config, run
from vlpt.train.trainer import read_log

log = logging.getLogger(__name__)
SAMPLES_NAME = "samples.png"
GUIDANCE_NAME = "guidance.png"
SAMPLES_PER_PROMPT = 4  # in the report's grid


class GenerateTask:
    """Denoising diffusion with condition dropout (classifier-free guidance) on a text -> image generator.

    ``training_step(batch)`` takes a pairs batch (``images`` uint8 (B, H, W, 3), ``input_ids`` /
    ``attention_mask`` of one caption per image, as ``PairBatches`` serves) and returns the loss."""

    def __init__(self, model: TextToImageGenerator, seed: int = 0):
        self.model = model
        # Noise, timesteps and condition dropout come from this stream; the Trainer saves its state in
        # checkpoints, so a resumed run draws the same noise as an uninterrupted one.
        self.generator = torch.Generator().manual_seed(seed)

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        loss = self.model.training_loss(batch["images"], batch["input_ids"], batch["attention_mask"],
                                        self.generator)
        return {"loss": loss, "diffusion_loss": loss.detach()}


def is_generate_run(config: RunConfig) -> bool:
    return config.train.task == "generate"


# ----------------------------------------------------------------------------- building + training

def build_generator(config: RunConfig, corpus: Sequence[str] | None = None,
                    tokenizer: Tokenizer | None = None) -> TextToImageGenerator:
    """The run's generator: the dual encoder of ``generate.from_run`` (or a new one, tokenizer trained on
    ``corpus``) plus a new UNet, initialised from ``train.seed``."""
    gen = config.generate
    if gen.from_run:
        if not Path(gen.from_run).exists():
            raise FileNotFoundError(f"generate.from_run {gen.from_run} does not exist; train a dual encoder "
                                    f"first (e.g. `vlpt demo` for runs/demo) or point it at one")
        dual = load_dual_encoder(gen.from_run)
    else:
        tokenizer = tokenizer or get_tokenizer(config.model, corpus)
        dual = create_model(copy.deepcopy(config.model), tokenizer, seed=config.train.seed)
    torch.manual_seed(config.train.seed)
    return TextToImageGenerator(gen.model, dual)


def check_generate_config(config: RunConfig) -> None:
    if config.train.task != "generate":
        raise ValueError(f"train.task must be generate for a generator run, got {config.train.task!r}")
    if config.data.dataset not in ("shapes", "digits", "files"):
        raise ValueError(f"generator runs train on shapes, digits or files (an image folder), "
                         f"not data.dataset={config.data.dataset}")
    if config.data.image_size != config.generate.model.image_size:
        raise ValueError(f"data.image_size ({config.data.image_size}) must equal generate.model.image_size "
                         f"({config.generate.model.image_size}): the generator learns images at the size it makes")
    if config.train.accum_mode != "plain" or config.train.accum_steps != 1:
        raise ValueError("generator runs support train.accum_steps=1 with accum_mode=plain only")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("generator runs are single-process for now; run them without torchrun")
    if any(not g >= 0 for g in config.generate.guidance):
        raise ValueError(f"generate.guidance scales must be >= 0, got {list(config.generate.guidance)}")
    if not 0 <= config.generate.sampling_eta <= 1:
        raise ValueError(f"generate.sampling_eta must be in [0, 1] (0: DDIM, 1: ancestral), "
                         f"got {config.generate.sampling_eta}")
    check_guidance_interval(config.generate.guidance_interval, "generate.guidance_interval")


def train_generator(config: RunConfig, run_dir: str | Path, resume: bool = False, cache_dir=None,
                    stop_after: int | None = None) -> tuple[TextToImageGenerator, float]:
    """Train (or resume) a generator into ``run_dir``; returns (generator, train_seconds)."""
    run_dir = Path(run_dir)
    check_generate_config(config)
    config = copy.deepcopy(config)
    model, seconds, trainer = fit_on_pairs(
        config, run_dir, lambda cfg, corpus, tok: build_generator(cfg, corpus=corpus, tokenizer=tok),
        lambda cfg, model: GenerateTask(model, seed=cfg.train.seed), config.generate.from_run, resume,
        cache_dir, stop_after)
    if trainer.finished:
        model.save_pretrained(run_dir / "model")
    return model, seconds


# ----------------------------------------------------------------------------- evaluation

def evaluation_set(config: RunConfig, cache_dir=None) -> dict:
    """Held-out prompts with the attributes they ask for, real test images, and the judge's training data.

    Shapes: single-object test scenes described in full ("a large red circle in the top left"); the
    judge learns from other real single-object scenes (another data seed than the generator's).
    Digits: "a handwritten digit N" for N cycling 0..9; the judge learns from the real train split."""
    data, gen = config.data, config.generate
    size = gen.model.image_size
    if data.dataset == "shapes":
        test = load_split(data, "test", gen.eval_size, single=True, cache_dir=cache_dir)
        judge_data = shapes.ShapesDataset(shapes.ShapesConfig(
            split="train", size=gen.judge_train_size, image_size=size, min_objects=1, max_objects=1,
            seed=data.seed + 1), cache_dir=cache_dir)
        return {"prompts": [shapes_prompt(s.primary) for s in test.scenes],
                "labels": shapes_attribute_labels(test.scenes), "real": test.images,
                "attributes": SHAPE_ATTRIBUTES, "judge_images": judge_data.images,
                "judge_labels": shapes_attribute_labels(judge_data.scenes)}
    if data.dataset == "digits":
        test = DigitsDataset(DigitsConfig(split="test", image_size=size))
        train = DigitsDataset(DigitsConfig(split="train", image_size=size))
        digits = np.arange(gen.eval_size) % 10
        return {"prompts": [digit_prompt(int(d)) for d in digits], "labels": {"digit": digits},
                "real": test.images, "real_labels": {"digit": test.labels}, "attributes": DIGIT_ATTRIBUTES,
                "judge_images": train.images, "judge_labels": {"digit": train.labels}}
    raise ValueError(f"no judge for data.dataset={data.dataset}: the judged evaluation needs shapes or digits "
                     f"(the model trains on files, and `vlpt generate` samples from it)")


def generate_in_chunks(model: TextToImageGenerator, prompts: Sequence[str], guidance: float, steps: int,
                       seed: int, chunk: int = 128, eta: float = 0.0,
                       guidance_interval: Sequence[float] = (0.0, 1.0)) -> np.ndarray:
    """uint8 (N, H, W, 3) for N prompts, ``chunk`` prompts per sampling batch, each chunk its own seed."""
    parts = [model.generate_images(list(prompts[start:start + chunk]), num_inference_steps=steps,
                                   guidance_scale=guidance, seed=seed + start, progress=False, eta=eta,
                                   guidance_interval=guidance_interval).numpy()
             for start in range(0, len(prompts), chunk)]
    return np.concatenate(parts)


def evaluate_generator(model: TextToImageGenerator, config: RunConfig, cache_dir=None
                       ) -> tuple[dict[str, float], dict]:
    """Generate the held-out prompts at every guidance scale; judge, CLIP-score and Fréchet distance each.

    Returns flat metrics (``judge_<attribute>_acc_g<scale>``, ``clip_score_g<scale>``,
    ``frechet_distance_g<scale>``, ``seconds_per_image_g<scale>``; the unsuffixed keys are at the best
    guidance, the one with the highest mean judge accuracy) and the images for the report's figures."""
    gen = config.generate
    evalset = evaluation_set(config, cache_dir)
    attributes = evalset["attributes"]
    start = time.perf_counter()
    judge = train_judge(evalset["judge_images"], evalset["judge_labels"], attributes,
                        JudgeConfig(image_size=gen.model.image_size, steps=gen.judge_steps, seed=config.train.seed))
    metrics: dict[str, float] = {"judge_train_seconds": time.perf_counter() - start,
                                 "generation_eval_prompts": len(evalset["prompts"])}
    real_labels = evalset.get("real_labels", evalset["labels"])
    for name, value in judge.accuracy(evalset["real"], real_labels).items():
        metrics[f"judge_real_{name}_acc"] = value  # the judge's ceiling: real held-out images
    dual = model.dual_encoder
    scored_by_pretrained = bool(gen.from_run)  # a CLIP-score needs a trained dual encoder
    real_features = tower_features(dual, evalset["real"])
    # The floor: real test images against as many other real images (sampling noise alone).
    other_real = evalset["judge_images"][: len(evalset["real"])]
    metrics["frechet_distance_real"] = frechet_distance(real_features, tower_features(dual, other_real))
    prompts = evalset["prompts"]
    samples: dict[float, np.ndarray] = {}
    scores: dict[float, float] = {}
    for g in gen.guidance:
        suffix = f"_g{g:g}"
        start = time.perf_counter()
        images = generate_in_chunks(model, prompts, g, gen.sampling_steps, seed=config.train.seed,
                                    eta=gen.sampling_eta, guidance_interval=gen.guidance_interval)
        metrics[f"seconds_per_image{suffix}"] = (time.perf_counter() - start) / len(prompts)
        accuracy = judge.accuracy(images, evalset["labels"])
        for name, value in accuracy.items():
            metrics[f"judge_{name}_acc{suffix}"] = value
        metrics[f"judge_mean_acc{suffix}"] = scores[g] = float(np.mean(list(accuracy.values())))
        if scored_by_pretrained:
            metrics[f"clip_score{suffix}"] = clip_score(dual, resize_images(images, dual.config.image.image_size),
                                                        prompts)
        metrics[f"frechet_distance{suffix}"] = frechet_distance(real_features, tower_features(dual, images))
        samples[g] = images
    best = max(gen.guidance, key=lambda g: scores[g])
    metrics["best_guidance"] = best
    for key in [k for k in metrics if k.endswith(f"_g{best:g}")]:
        metrics[key[: -len(f"_g{best:g}")]] = metrics[key]
    if scored_by_pretrained and config.data.dataset == "shapes":  # the prompts describe these very images
        metrics["clip_score_real"] = clip_score(dual, resize_images(evalset["real"], dual.config.image.image_size),
                                                prompts)
    figures = {"prompts": prompts, "samples": samples, "best": best}
    return metrics, figures


def plot_samples(rows: Sequence[np.ndarray], titles: Sequence[str], path: str | Path,
                 column_labels: Sequence[str] | None = None) -> Path:
    """One row per title, its images (S, H, W, 3) side by side; written atomically."""
    columns = max(len(r) for r in rows)
    fig = Figure(figsize=(1.6 * columns + 2.6, 1.7 * len(rows)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for i, (images, title) in enumerate(zip(rows, titles)):
        for j, ax in enumerate(axes[i]):
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(images):
                ax.set_axis_off()
                continue
            ax.imshow(np.asarray(images[j]), interpolation="nearest")
            if i == 0 and column_labels:
                ax.set_title(column_labels[j], fontsize=8)
        axes[i][0].set_ylabel(textwrap.fill(title, 22), fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def write_figures(model: TextToImageGenerator, config: RunConfig, figures: dict, run_dir: Path) -> dict[str, Path]:
    gen = config.generate
    k = min(gen.grid_prompts, len(figures["prompts"]))
    prompts = figures["prompts"][:k]
    best = figures["best"]
    grid = model.generate_images(prompts, num_inference_steps=gen.sampling_steps, guidance_scale=best,
                                 seed=config.train.seed, progress=False, eta=gen.sampling_eta,
                                 guidance_interval=gen.guidance_interval,
                                 num_images_per_prompt=SAMPLES_PER_PROMPT).numpy()
    samples = plot_samples([grid[i * SAMPLES_PER_PROMPT:(i + 1) * SAMPLES_PER_PROMPT] for i in range(k)], prompts,
                           run_dir / SAMPLES_NAME)
    by_guidance = [np.stack([figures["samples"][g][i] for g in gen.guidance]) for i in range(k)]
    guidance = plot_samples(by_guidance, prompts, run_dir / GUIDANCE_NAME,
                            column_labels=[f"guidance {g:g}" for g in gen.guidance])
    return {f"Samples at guidance {best:g} ({SAMPLES_PER_PROMPT} seeds per prompt)": samples,
            "The same prompts at each guidance scale": guidance}


def evaluate_generate_run(run_dir: str | Path, model: TextToImageGenerator | None = None,
                          extra: dict | None = None, cache_dir=None) -> dict[str, float]:
    """Evaluate a generator run's final model; write metrics.json, the sample grids and report.md, and the
    best guidance with the run's sampler into the model's sampling.json (``vlpt generate``'s defaults)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    model = model or load_generator(run_dir)
    metrics, figures = evaluate_generator(model, config, cache_dir)
    gen = config.generate
    model.sampling = check_sampling(SamplingConfig(gen.sampling_steps, figures["best"], gen.sampling_eta,
                                                   gen.guidance_interval), model.config.train_timesteps)
    write_sampling(find_model_dir(run_dir), model.sampling)
    metrics = {**metrics, **(extra or {})}
    rows = read_log(run_dir / "log.jsonl")
    metrics["steps"] = max((row["step"] for row in rows), default=config.train.steps)  # fewer if out of time
    history = [row for row in rows if "loss" in row]
    images = write_figures(model, config, figures, run_dir)
    write_report(run_dir, metrics, history=history, extra_images=images)
    return metrics


def run_generate(config: RunConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
                 cache_dir=None) -> dict[str, float]:
    """Train then evaluate a generator run, with the run-folder rules of ``vlpt.train.run.run``."""
    check_generate_config(config)
    return run(config, run_dir, resume=resume, overwrite=overwrite, cache_dir=cache_dir,
               fit_fn=train_generator, evaluate_fn=evaluate_generate_run)


# ----------------------------------------------------------------------------- command line

def image_grid(images: np.ndarray, columns: int, scale: int = 1) -> Image.Image:
    """uint8 (N, H, W, 3) -> one PIL image, ``columns`` per row, each enlarged ``scale`` times (nearest)."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    canvas = np.zeros((rows * h, columns * w, 3), np.uint8)
    for k, image in enumerate(images):
        r, c = divmod(k, columns)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    grid = Image.fromarray(canvas)
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST) if scale > 1 else grid


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
