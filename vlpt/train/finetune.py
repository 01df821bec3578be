"""Fine-tuning a pre-trained dual encoder with fusion and a task head: classify, match or vqa.

Same trainer, checkpoints, resume and report as pre-training; the run folder has the same layout,
and ``model/`` holds a ``TaskModel``. The task objects below are the trainer's ``training_step``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlpt.config import RunConfig, save_config
from vlpt.data import digits, shapes
from vlpt.data.finetune import (
    ClassifyBatches,
    MatchBatches,
    QuestionBatches,
    flatten_questions,
)
from vlpt.evaluate.finetune import evaluate_task_model
from vlpt.evaluate.report import write_report
from vlpt.evaluate.suite import digits_classifier, load_split, shapes_classifier
from vlpt.factory import create_model, load_model
from vlpt.models.fusion import FusionConfig
from vlpt.models.task_model import TaskModel, TaskModelConfig, check_task
from vlpt.tokenization import Tokenizer
from vlpt.train.checkpoint import latest_checkpoint
from vlpt.train.trainer import Trainer, read_log

log = logging.getLogger(__name__)
CONFIG_FILE = "config.yaml"


# ----------------------------------------------------------------------------- task objects

class ClassifyTask:
    """Cross-entropy over classes from the image embedding."""

    def __init__(self, model: TaskModel):
        self.model = model

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.model(batch["images"])  # (B, C)
        loss = F.cross_entropy(logits, batch["labels"])
        return {"loss": loss, "accuracy": (logits.argmax(-1) == batch["labels"]).float().mean()}


class VQATask:
    """Cross-entropy over the closed answer vocabulary (answers as classes, as in ViLT and ALBEF's
    VQA-as-classification setting)."""

    def __init__(self, model: TaskModel):
        self.model = model

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.model(batch["images"], batch["input_ids"], batch["attention_mask"])  # (B, A)
        loss = F.cross_entropy(logits, batch["labels"])
        return {"loss": loss, "accuracy": (logits.argmax(-1) == batch["labels"]).float().mean()}


class MatchTask:
    """Binary image-text matching (ALBEF's ITM) on four kinds of pair per image in the batch:
    its true caption (1), an attribute-swapped caption (0), the most similar wrong caption in the
    batch (0, a hard negative mined from the contrastive similarity) and, for its caption, the most
    similar wrong image (0). "Wrong" means another (color, shape) multiset, so a caption that is
    secretly true for the image is never used as a negative."""

    def __init__(self, model: TaskModel):
        self.model = model

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        b = len(batch["images"])
        ids = torch.cat([batch["input_ids"], batch["false_input_ids"]])  # (2B, L): true, then swapped
        mask = torch.cat([batch["attention_mask"], batch["false_attention_mask"]])
        features = self.model.encode(batch["images"], ids, mask)
        hard_text, hard_image, valid = mine_hard_negatives(features["image_embed"], features["text_embed"][:b],
                                                           batch["signatures"])
        rows = torch.arange(b, device=ids.device)
        image_index = torch.cat([rows, rows, rows[valid], hard_image[valid]])
        text_index = torch.cat([rows, rows + b, hard_text[valid], rows[valid]])
        labels = torch.cat([torch.ones(b), torch.zeros(b + 2 * int(valid.sum()))]).to(ids.device)
        logits = self.model.head(self.model.fuse(features, image_index, text_index))  # (P,)
        # Positives weigh as much as all negatives together, so "always no" is not a cheap optimum.
        pos_weight = torch.tensor((len(labels) - b) / b, device=ids.device)
        loss = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=pos_weight)
        accuracy = ((logits > 0).float() == labels).float().mean()
        return {"loss": loss, "accuracy": accuracy}


@torch.no_grad()
def mine_hard_negatives(image_embed: torch.Tensor, text_embed: torch.Tensor, signatures: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each image the most similar caption of another signature, and for each caption the most
    similar image of another signature; ``valid`` is False where every other row shares the signature."""
    similarity = image_embed @ text_embed.T  # (B, B)
    same = signatures[:, None] == signatures[None, :]
    similarity = similarity.masked_fill(same, float("-inf"))
    valid = ~same.all(dim=1)
    return similarity.argmax(dim=1), similarity.argmax(dim=0), valid


TASK_OBJECTS = {"classify": ClassifyTask, "vqa": VQATask, "match": MatchTask}


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass
class TaskData:
    train_images: np.ndarray
    test: object  # the held-out data set (ShapesDataset or DigitsDataset)
    outputs: list[str]  # class names or answers; [] for match
    train_scenes: list = dataclasses.field(default_factory=list)
    train_labels: np.ndarray | None = None


def load_task_data(config: RunConfig, cache_dir=None) -> TaskData:
    """Fine-tuning and test sets of the task. Shapes classification uses single-object scenes (the
    label is that object's (color, shape)); vqa and match use 1-3 object scenes, i.i.d. (no twins)."""
    ft, data = config.finetune, config.data
    check_task(ft.task)
    if data.dataset == "digits":
        if ft.task != "classify":
            raise ValueError(f"the {ft.task} task needs the shapes world (questions, scene ground truth); "
                             f"digits supports task=classify")
        train, test = load_split(data, "train"), load_split(data, "test")
        return TaskData(train.images, test, list(digits.CLASS_NAMES), train_labels=train.labels)
    plain = dataclasses.replace(data, twins=False, count_weights=(1.0, 1.0, 1.0))
    single = ft.task == "classify"
    train = load_split(plain, "train", ft.train_size, single=single, cache_dir=cache_dir)
    test = load_split(plain, "test", ft.test_size, single=single, cache_dir=cache_dir)
    outputs = list(shapes.CLASS_NAMES) if single else list(shapes.ANSWERS) if ft.task == "vqa" else []
    return TaskData(train.images, test, outputs, train_scenes=train.scenes, train_labels=train.labels)


def make_batches(config: RunConfig, data: TaskData, tokenizer: Tokenizer):
    ft, train = config.finetune, config.train
    if ft.task == "classify":
        return ClassifyBatches(data.train_images, data.train_labels, train.batch_size, train.seed,
                               augment=config.data.augment)
    if ft.task == "vqa":
        return QuestionBatches(data.train_images, data.train_scenes, tokenizer, train.batch_size, train.seed)
    return MatchBatches(data.train_images, data.train_scenes, tokenizer, train.batch_size, train.seed)


# ----------------------------------------------------------------------------- model

def build_task_model(config: RunConfig, data: TaskData) -> TaskModel:
    """The pre-trained encoder of ``finetune.from_run`` (or a fresh one from the model section, its
    tokenizer trained on the task's captions and questions) with fusion and head on top."""
    ft = config.finetune
    if ft.from_run:
        encoder = load_model(ft.from_run)
        config.model = encoder.config  # the run records the architecture it actually fine-tuned
    else:
        corpus = [c for s in data.train_scenes for c in s.captions] + flatten_questions(data.train_scenes)[0]
        if not corpus:  # digits: its caption templates
            corpus = [digits.fill_template(t, d) for t in digits.TRAIN_TEMPLATES for d in range(digits.NUM_CLASSES)]
        encoder = create_model(config.model, corpus=corpus, seed=config.train.seed)
    torch.manual_seed(config.train.seed)  # fusion and head initialisation
    fusion = FusionConfig(method=ft.fusion, cross_width=ft.cross_width, cross_layers=ft.cross_layers,
                          cross_heads=ft.cross_heads)
    task_config = TaskModelConfig(task=ft.task, fusion=fusion, outputs=data.outputs, head_hidden=ft.head_hidden,
                                  freeze_towers=ft.freeze_towers)
    model = TaskModel(task_config, encoder)
    if ft.init_head not in ("zero_shot", "random"):
        raise ValueError(f"unknown finetune.init_head {ft.init_head!r}; choose from zero_shot, random")
    if ft.task == "classify" and ft.head_hidden is None and ft.from_run and ft.init_head == "zero_shot":
        init_zero_shot_head(model, config.data.dataset)
    return model


@torch.no_grad()
def init_zero_shot_head(model: TaskModel, dataset: str) -> None:
    """Start the linear classifier at the zero-shot classifier: class-prompt text embeddings times the
    learned temperature (as FLYP and WiSE-FT do). Fine-tuning then starts from the pre-trained model's
    zero-shot accuracy instead of chance, and the towers are not pulled apart by a random head."""
    encoder = model.encoder
    classifier = shapes_classifier(encoder) if dataset == "shapes" else digits_classifier(encoder)  # (D, C)
    scale = encoder.logit_scale.clamp(0, encoder.config.max_logit_scale).exp()
    model.head.net.weight.copy_(scale * classifier.T)  # (C, D)
    model.head.net.bias.zero_()


# ----------------------------------------------------------------------------- run

def fit_finetune(config: RunConfig, run_dir: Path, resume: bool = False, cache_dir=None,
                 stop_after: int | None = None) -> tuple[TaskModel, float]:
    """Fine-tune into ``run_dir`` (or resume it); returns (model, train_seconds)."""
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / CONFIG_FILE)
    data = load_task_data(config, cache_dir)
    model = build_task_model(config, data)
    checkpoint = latest_checkpoint(run_dir / "checkpoints") if resume else None
    if checkpoint is not None:  # same architecture; the trainer loads the checkpoint's weights
        log.info("resuming fine-tuning from %s", checkpoint)
    batches = make_batches(config, data, model.tokenizer)
    trainer = Trainer(TASK_OBJECTS[config.finetune.task](model), batches, config.train, run_dir)
    if resume:
        trainer.resume()
    start = time.perf_counter()
    trainer.fit(stop_after)
    seconds = time.perf_counter() - start
    if trainer.finished:
        model.save_pretrained(run_dir / "model")
    return model, seconds


def evaluate_finetune_run(run_dir: str | Path, model: TaskModel | None = None, extra: dict | None = None,
                          cache_dir=None) -> dict[str, float]:
    """Score a fine-tuning run's model on its task's test set and write metrics.json + report.md."""
    from vlpt.train.run import read_run_config

    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    model = model or TaskModel.from_pretrained(run_dir / "model")
    data = load_task_data(config, cache_dir)
    result = evaluate_task_model(model, data.test, config.eval.batch_size)
    metrics = {**result.metrics, **(extra or {}), "steps": config.train.steps}
    history = [row for row in read_log(run_dir / "log.jsonl") if "loss" in row]
    write_report(run_dir, metrics, history=history, confusion=result.confusion, class_names=result.class_names)
    return metrics


def finetune_config(base: RunConfig, task: str, fusion: str | None = None, from_run: str | None = None,
                    freeze_towers: bool = False) -> RunConfig:
    """``base`` (a fine-tuning config: train section, sizes) pointed at a task, a fusion method and
    a pre-trained run, whose model and data sections it takes over."""
    from vlpt.train.run import read_run_config

    check_task(task)
    config = dataclasses.replace(base, finetune=dataclasses.replace(
        base.finetune, task=task, fusion=fusion or base.finetune.fusion, freeze_towers=freeze_towers,
        from_run=str(from_run) if from_run else None))
    if from_run:
        source = Path(from_run)
        if (source / CONFIG_FILE).exists():  # a run folder: fine-tune on its data set
            pre = read_run_config(source)
            config.data = dataclasses.replace(pre.data, twins=False, count_weights=(1.0, 1.0, 1.0))
            config.model = pre.model
        else:
            config.model = load_model(source).config
    return config

