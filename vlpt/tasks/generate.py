"""Text -> image (``train.task: generate``, section ``generate:``): a diffusion UNet conditioned on a dual
encoder's text tower, judged by an independent classifier on its images.

The dual encoder comes from ``generate.from_run`` (a trained run or model folder: its text tower conditions
the UNet, frozen unless ``generate.model.freeze_text: false``; its image tower scores CLIP-score and the
Fréchet distance) or is built from scratch (then the text tower should train: ``freeze_text: false``).

The run's ``model/`` is a generator folder (``vlpt.load`` / ``load_generator``) whose ``sampling.json`` holds
the guidance the evaluation measured best (``vlpt generate``'s defaults); the report shows ``samples.png``
(prompts x samples at the best guidance) and ``guidance.png`` (the same prompts at every guidance scale).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vlpt.config import RunConfig, SamplingConfig
from vlpt.data import shapes
from vlpt.data.digits import DigitsConfig, DigitsDataset
from vlpt.data.splits import Pairs, load_pairs, load_split
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
from vlpt.evaluate.report import EvalResult, plot_samples
from vlpt.evaluate.scoring import clip_score
from vlpt.models.dual_encoder import DualEncoder
from vlpt.models.generator import TextToImageGenerator, check_guidance_interval, check_sampling, write_sampling
from vlpt.tasks.base import MODEL_DIR, TaskSpec, data_parallel, dual_encoder_for, pair_batches
from vlpt.tokenization import Tokenizer
from vlpt.train.distributed import DistributedEnv

SAMPLES_NAME = "samples.png"
GUIDANCE_NAME = "guidance.png"
SAMPLES_PER_PROMPT = 4  # in the report's grid


class GenerateTask:
    """Denoising diffusion with condition dropout (classifier-free guidance) on a text -> image generator.

    ``training_step(batch)`` takes a pairs batch (``images`` uint8 (B, H, W, 3), ``input_ids`` /
    ``attention_mask`` of one caption per image, as ``PairBatches`` serves) and returns the loss. Under
    torchrun every rank draws the noise of the whole global batch and takes its own rows, so N ranks train
    on exactly the noise one process would."""

    def __init__(self, model: TextToImageGenerator, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.model = model
        # Noise, timesteps and condition dropout come from this stream; the Trainer saves its state in
        # checkpoints, so a resumed run draws the same noise as an uninterrupted one.
        self.generator = torch.Generator().manual_seed(seed)
        self.rank, self.world_size = rank, world_size

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        loss = self.model.training_loss(batch["images"], batch["input_ids"], batch["attention_mask"],
                                        self.generator, share=(self.rank, self.world_size))
        return {"loss": loss, "diffusion_loss": loss.detach()}


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


# ----------------------------------------------------------------------------- the task

class TextToImage(TaskSpec):
    name = "generate"
    description = "text -> image: a diffusion UNet conditioned on a dual encoder's text tower"
    sections = ("generate",)

    def check(self, config: RunConfig, env: DistributedEnv) -> list[str]:
        problems = super().check(config, env)
        gen = config.generate
        if config.data.image_size != gen.model.image_size:
            problems.append(f"data.image_size ({config.data.image_size}) must equal generate.model.image_size "
                            f"({gen.model.image_size}): the generator learns images at the size it makes")
        if any(not g >= 0 for g in gen.guidance):
            problems.append(f"generate.guidance scales must be >= 0, got {list(gen.guidance)}")
        if not 0 <= gen.sampling_eta <= 1:
            problems.append(f"generate.sampling_eta must be in [0, 1] (0: DDIM, 1: ancestral), got {gen.sampling_eta}")
        try:
            check_guidance_interval(gen.guidance_interval, "generate.guidance_interval")
        except ValueError as err:
            problems.append(str(err))
        return problems

    def load_data(self, config: RunConfig, cache_dir: Path | None) -> Pairs:
        return load_pairs(config.data, cache_dir)

    def build_model(self, config: RunConfig, data: Pairs, tokenizer: Tokenizer | None) -> TextToImageGenerator:
        """The dual encoder of ``generate.from_run`` (or a new one) plus a new UNet, seeded by ``train.seed``."""
        gen = config.generate
        dual = dual_encoder_for(config, gen.from_run, data.corpus, None if gen.from_run else tokenizer)
        torch.manual_seed(config.train.seed)
        return TextToImageGenerator(gen.model, dual)

    def dual_encoder(self, model: TextToImageGenerator) -> DualEncoder:
        return model.dual_encoder

    def batches(self, config: RunConfig, data: Pairs, model: TextToImageGenerator, env: DistributedEnv):
        return pair_batches(config, data, model.tokenizer, env, twins=False)

    def objective(self, config: RunConfig, model: TextToImageGenerator, env: DistributedEnv, device: torch.device):
        return data_parallel(GenerateTask(model, config.train.seed, env.rank, env.world_size), env, device)

    def evaluate(self, model: TextToImageGenerator, config: RunConfig, run_dir: Path,
                 cache_dir: Path | None) -> EvalResult:
        """Judge, CLIP-score and Fréchet distance at every guidance scale; the best guidance with the run's
        sampler becomes the model's sampling.json (``vlpt generate``'s defaults)."""
        metrics, figures = evaluate_generator(model, config, cache_dir)
        gen = config.generate
        model.sampling = check_sampling(SamplingConfig(gen.sampling_steps, figures["best"], gen.sampling_eta,
                                                       gen.guidance_interval), model.config.train_timesteps)
        if (run_dir / MODEL_DIR).exists():
            write_sampling(run_dir / MODEL_DIR, model.sampling)
        return EvalResult(metrics, images=write_figures(model, config, figures, run_dir))
