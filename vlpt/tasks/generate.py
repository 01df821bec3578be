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

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vlpt.config import RunConfig, SamplingConfig
from vlpt.data import digits as digits_data
from vlpt.data import shapes
from vlpt.data.digits import DigitsConfig, DigitsDataset
from vlpt.data.splits import Pairs, load_pairs, load_split
from vlpt.evaluate.generation import (
    DIGIT_ATTRIBUTES,
    SHAPE_ATTRIBUTES,
    JudgeConfig,
    frechet_distance,
    resize_images,
    shapes_attribute_labels,
    shapes_prompt,
    train_judge,
)
from vlpt.evaluate.report import EvalResult, plot_samples
from vlpt.evaluate.scoring import clip_score
from vlpt.factory import load_dual_encoder
from vlpt.models.dual_encoder import DualEncoder
from vlpt.models.generator import TextToImageGenerator, check_guidance_interval, check_sampling, write_sampling
from vlpt.tasks.base import MODEL_DIR, TaskSpec, data_parallel, dual_encoder_for, pair_batches
from vlpt.tokenization import Tokenizer
from vlpt.train.distributed import DistributedEnv

SAMPLES_NAME = "samples.png"
GUIDANCE_NAME = "guidance.png"
SAMPLES_PER_PROMPT = 4  # in the report's grid
JUDGE_SEED_OFFSET = 1000  # the judge's own seed: train.seed + this


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

# Held-out wording: no training caption uses these templates around a prompt's object. Validation (choosing
# the guidance) and test (the reported figures) use different ones, so no prompt string is in both sets.
SHAPES_PROMPT_TEMPLATES = {"val": ("a photo of {}", "a drawing of {}"),
                           "test": ("an illustration of {}", "a rendering of {}")}
DIGITS_PROMPT_TEMPLATES = {"val": digits_data.EVAL_TEMPLATES[:2], "test": digits_data.EVAL_TEMPLATES[2:]}


def shapes_prompts(scenes: Sequence[shapes.Scene], split: str) -> list[str]:
    """Each scene's object in full ("a large red circle in the top left") in the split's held-out templates."""
    templates = SHAPES_PROMPT_TEMPLATES[split]
    return [templates[i % len(templates)].format(shapes_prompt(s.primary)) for i, s in enumerate(scenes)]


def digits_prompts(labels: Sequence[int], split: str) -> list[str]:
    templates = DIGITS_PROMPT_TEMPLATES[split]
    return [digits_data.fill_template(templates[i % len(templates)], int(d)) for i, d in enumerate(labels)]


@dataclasses.dataclass
class PromptSet:
    """Prompts, the attributes each asks for, and real images of the same attributes."""
    prompts: list[str]
    labels: dict[str, np.ndarray]
    real: np.ndarray  # real images of these prompts (shapes: their scenes; digits: real test digits)
    real_labels: dict[str, np.ndarray]
    other_real: np.ndarray  # a second, independent real set of the same attribute mix (the Fréchet floor)


def rerendered(scenes: Sequence[shapes.Scene], image_size: int, seed: int) -> np.ndarray:
    """The same scenes drawn again with other noise and texture: real images of the same prompts."""
    return np.stack([shapes.render_scene(s, image_size, np.random.default_rng([seed, 77, i]))
                     for i, s in enumerate(scenes)])


def evaluation_sets(config: RunConfig, cache_dir=None) -> tuple[dict[str, PromptSet], dict]:
    """Prompt sets ``val`` (choose the guidance), ``test`` (report) and, for shapes, ``compositional`` (held-out
    (color, shape) pairs), all worded with held-out templates; and the judge's training data, disjoint from the
    generator's training images. Shapes: single-object scenes of the val / test / compositional splits; the judge
    learns from other real scenes (another data seed). Digits: the generator trains on the train split, so the
    judge learns from the first half of the test split and real figures come from the second half."""
    data, gen = config.data, config.generate
    size = gen.model.image_size
    if data.dataset == "shapes":
        sets = {}
        for name, split, count in (("val", "val", gen.val_size), ("test", "test", gen.eval_size),
                                   ("compositional", "compositional", gen.compositional_size)):
            if count == 0:
                continue
            ds = load_split(data, split, count, single=True, cache_dir=cache_dir)
            labels = shapes_attribute_labels(ds.scenes)
            sets[name] = PromptSet(shapes_prompts(ds.scenes, "val" if name == "val" else "test"), labels, ds.images,
                                   labels, rerendered(ds.scenes, size, data.seed + 1))
        judge_data = shapes.ShapesDataset(shapes.ShapesConfig(
            split="train", size=gen.judge_train_size, image_size=size, min_objects=1, max_objects=1,
            seed=data.seed + 1), cache_dir=cache_dir)
        judge = {"images": judge_data.images, "labels": shapes_attribute_labels(judge_data.scenes),
                 "attributes": SHAPE_ATTRIBUTES}
        return sets, judge
    if data.dataset == "digits":
        test = DigitsDataset(DigitsConfig(split="test", image_size=size, seed=data.seed))
        half = len(test.images) // 2
        real, real_labels = test.images[half:], {"digit": test.labels[half:]}
        sets = {}
        for name, count in (("val", gen.val_size), ("test", gen.eval_size)):
            wanted = np.arange(count) % 10
            sets[name] = PromptSet(digits_prompts(wanted, name), {"digit": wanted}, real, real_labels,
                                   test.images[:half])
        judge = {"images": test.images[:half], "labels": {"digit": test.labels[:half]}, "attributes": DIGIT_ATTRIBUTES}
        return sets, judge
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
    """Choose the guidance on the validation prompts, then report the test prompts (and the compositional ones)
    at that guidance only: judge accuracy per attribute, the Fréchet distance in the judge's feature space with
    its floor (two independent real sets of the same prompts), and a CLIP-score from the independent
    ``generate.scorer`` when one is given.

    Keys: ``val_judge_mean_acc_g<scale>`` (the selection, every scale), ``best_guidance`` and
    ``guidance_selected_on: "val"``; at it, on test prompts: ``judge_<attribute>_acc``, ``frechet_distance``,
    ``frechet_distance_real``, ``clip_score`` / ``clip_score_real``, ``seconds_per_image``; the same with the
    suffix ``_compositional`` for held-out pairs (shapes). Also the judge's accuracy on real images."""
    gen = config.generate
    sets, judge_data = evaluation_sets(config, cache_dir)
    start = time.perf_counter()
    judge = train_judge(judge_data["images"], judge_data["labels"], judge_data["attributes"],
                        JudgeConfig(image_size=gen.model.image_size, steps=gen.judge_steps,
                                    seed=config.train.seed + JUDGE_SEED_OFFSET))
    metrics: dict[str, float | str] = {"judge_train_seconds": time.perf_counter() - start,
                                       "guidance_selected_on": "val"}
    for name, value in judge.accuracy(sets["test"].real, sets["test"].real_labels).items():
        metrics[f"judge_real_{name}_acc"] = value  # the judge's ceiling: real held-out images
    scores: dict[float, float] = {}
    samples: dict[float, np.ndarray] = {}
    val = sets["val"]
    for g in gen.guidance:
        images = generate_in_chunks(model, val.prompts, g, gen.sampling_steps, seed=config.train.seed,
                                    eta=gen.sampling_eta, guidance_interval=gen.guidance_interval)
        accuracy = judge.accuracy(images, val.labels)
        for name, value in accuracy.items():
            metrics[f"val_judge_{name}_acc_g{g:g}"] = value
        metrics[f"val_judge_mean_acc_g{g:g}"] = scores[g] = float(np.mean(list(accuracy.values())))
        samples[g] = images
    best = max(gen.guidance, key=lambda g: scores[g])
    metrics["best_guidance"] = best
    scorer = load_dual_encoder(gen.scorer) if gen.scorer else None
    for name, prompt_set in sets.items():
        if name == "val":
            continue
        suffix = "" if name == "test" else f"_{name}"
        start = time.perf_counter()
        images = generate_in_chunks(model, prompt_set.prompts, best, gen.sampling_steps, seed=config.train.seed + 1,
                                    eta=gen.sampling_eta, guidance_interval=gen.guidance_interval)
        metrics[f"seconds_per_image{suffix}"] = (time.perf_counter() - start) / len(prompt_set.prompts)
        accuracy = judge.accuracy(images, prompt_set.labels)
        for attribute, value in accuracy.items():
            metrics[f"judge_{attribute}_acc{suffix}"] = value
        metrics[f"judge_mean_acc{suffix}"] = float(np.mean(list(accuracy.values())))
        real_features = judge.embed(prompt_set.real)
        metrics[f"frechet_distance{suffix}"] = frechet_distance(real_features, judge.embed(images))
        metrics[f"frechet_distance_real{suffix}"] = frechet_distance(real_features, judge.embed(prompt_set.other_real))
        if scorer is not None:
            size = scorer.config.image.image_size
            metrics[f"clip_score{suffix}"] = clip_score(scorer, resize_images(images, size), prompt_set.prompts)
            if config.data.dataset == "shapes":  # the prompts describe these very images
                metrics[f"clip_score_real{suffix}"] = clip_score(scorer, resize_images(prompt_set.real, size),
                                                                 prompt_set.prompts)
        metrics[f"generation_eval_prompts{suffix}"] = len(prompt_set.prompts)
    figures = {"prompts": val.prompts, "samples": samples, "best": best}
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
    by_guidance = [np.stack([figures["samples"][g][i] for g in gen.guidance]) for i in range(k)]  # validation prompts
    guidance = plot_samples(by_guidance, prompts, run_dir / GUIDANCE_NAME,
                            column_labels=[f"guidance {g:g}" for g in gen.guidance])
    return {f"Samples at guidance {best:g} ({SAMPLES_PER_PROMPT} seeds per prompt)": samples,
            "The same prompts at each guidance scale": guidance}


# ----------------------------------------------------------------------------- the task

class TextToImage(TaskSpec):
    name = "generate"
    description = "text -> image: a diffusion UNet conditioned on a dual encoder's text tower"
    sections = ("generate",)
    caption_noise = True  # prompts in wording the generator never trained on pass (docs/generation.md)

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
        return pair_batches(config, data, model.tokenizer, env, twins=False, caption_noise=True)

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
