"""Fine-tuning a dual encoder with fusion and a task head (``vlpt finetune``): ``classify`` (image -> class),
``match`` (image + caption -> yes / no) and ``vqa`` (image + question -> answer), section ``finetune:``.

The run's ``model/`` is a ``TaskModel`` (``vlpt.load`` / ``load_task_model``). The towers come from
``finetune.from_run`` (a pre-trained run or model folder) or are built from the ``model`` section.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlpt.config import RunConfig, load_config
from vlpt.data import digits, fashion, shapes
from vlpt.data.finetune import CODED_WORDS, ClassifyBatches, MatchBatches, QuestionBatches, flatten_questions
from vlpt.data.splits import applies, load_split, without_training_options
from vlpt.evaluate.finetune import (
    answer_questions,
    evaluate_classifier,
    evaluate_matching,
    vqa_examples_figure,
    vqa_metrics,
)
from vlpt.evaluate.report import EvalResult
from vlpt.evaluate.suite import digits_classifier, fashion_classifier, shapes_classifier
from vlpt.factory import load_dual_encoder
from vlpt.models.dual_encoder import DualEncoder
from vlpt.models.fusion import FusionConfig
from vlpt.models.task_model import TaskModel, TaskModelConfig
from vlpt.tasks.base import TaskSpec, data_parallel, dual_encoder_for, rank_slice
from vlpt.tokenization import Tokenizer
from vlpt.train.distributed import DistributedEnv, all_gather_constant, all_gather_with_grad

RUN_CONFIG = "config.yaml"  # a run folder's config (vlpt.train.run.CONFIG_FILE)


# ----------------------------------------------------------------------------- objectives

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
    secretly true for the image is never used as a negative.

    Under torchrun the hard negatives come from the global batch: every rank gathers the images and true
    captions of all ranks (with gradients) and fuses its own rows' pairs; the loss is this rank's sum over
    its pairs divided by the global pair count, so the ranks together train exactly as one process."""

    def __init__(self, model: TaskModel, rank: int = 0, world_size: int = 1):
        self.model = model
        self.rank, self.world_size = rank, world_size

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        b, ws = len(batch["images"]), self.world_size
        ids = torch.cat([batch["input_ids"], batch["false_input_ids"]])  # (2b, L): true, then swapped
        mask = torch.cat([batch["attention_mask"], batch["false_attention_mask"]])
        local = self.model.encode(batch["images"], ids, mask)
        # The candidates for hard negatives: every rank's images and true captions (the global batch).
        pool = {key: all_gather_with_grad(local[key], ws) for key in ("image_embed", "image_tokens")}
        for key in ("text_embed", "text_tokens"):
            pool[key] = torch.cat([all_gather_with_grad(local[key][:b], ws), local[key][b:]])  # (B + b, ...)
        pool["text_mask"] = torch.cat([all_gather_constant(local["text_mask"][:b], ws), local["text_mask"][b:]])
        signatures = all_gather_constant(batch["signatures"], ws)  # (B,)
        total = len(signatures)  # B, the global batch
        hard_text, hard_image, valid = mine_hard_negatives(pool["image_embed"], pool["text_embed"][:total], signatures)
        rows = torch.arange(b, device=ids.device) + self.rank * b  # this rank's rows in the global batch
        mine = valid[rows]
        image_index = torch.cat([rows, rows, rows[mine], hard_image[rows][mine]])
        text_index = torch.cat([rows, total + torch.arange(b, device=ids.device), hard_text[rows][mine], rows[mine]])
        labels = torch.cat([torch.ones(b), torch.zeros(b + 2 * int(mine.sum()))]).to(ids.device)
        logits = self.model.head(self.model.fuse(pool, image_index, text_index))  # (P,)
        # Positives weigh as much as all negatives together, so "always no" is not a cheap optimum.
        pairs = 2 * total + 2 * int(valid.sum())  # in the global batch
        pos_weight = torch.tensor((pairs - total) / total, device=ids.device)
        per_pair = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=pos_weight, reduction="none")
        loss = per_pair.sum() * ws / pairs
        accuracy = ((logits > 0).float() == labels).float().sum() * ws / pairs
        return {"loss": loss, "accuracy": accuracy.detach()}


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


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass
class TaskData:
    train_images: np.ndarray
    test: object  # the held-out data set (ShapesDataset or DigitsDataset)
    outputs: list[str]  # class names or answers; [] for match
    train_scenes: list = dataclasses.field(default_factory=list)
    train_labels: np.ndarray | None = None


def task_split(config: RunConfig, split: str, cache_dir=None):
    """A split of the task's data: shapes classification uses single-object scenes (the label is that
    object's (color, shape)); vqa and match use 1-3 object scenes, i.i.d. (no twins); digits its fixed split;
    Fashion-MNIST the first ``finetune.train_size`` training images and its whole test file."""
    data, ft = config.data, config.finetune
    if data.dataset == "digits":
        return load_split(data, split)
    if data.dataset == "fashion":
        return load_split(data, split, ft.train_size)  # test: the whole published test file
    plain = without_training_options(data)
    size = ft.train_size if split == "train" else ft.test_size
    return load_split(plain, split, size, single=config.train.task == "classify", cache_dir=cache_dir)


def load_task_data(config: RunConfig, cache_dir=None) -> TaskData:
    """Fine-tuning and test sets of the run's task (``train.task``: classify | match | vqa)."""
    spec = FINETUNE_TASKS[config.train.task]
    train, test = task_split(config, "train", cache_dir), task_split(config, config.finetune.eval_split, cache_dir)
    return TaskData(train.images, test, spec.outputs(config), train_scenes=getattr(train, "scenes", []),
                    train_labels=train.labels)


# ----------------------------------------------------------------------------- model

def build_task_model(config: RunConfig, data: TaskData, tokenizer: Tokenizer | None = None) -> TaskModel:
    """The pre-trained encoder of ``finetune.from_run`` (or a fresh one from the model section, its
    tokenizer trained on the task's captions and questions) with fusion and head on top."""
    ft = config.finetune

    def corpus() -> list[str]:
        texts = [c for s in data.train_scenes for c in s.captions] + flatten_questions(data.train_scenes)[0]
        if texts:
            return texts
        if config.data.dataset == "fashion":  # the class-name data sets: their caption templates
            return [fashion.fill_template(t, c) for t in fashion.TRAIN_TEMPLATES for c in range(fashion.NUM_CLASSES)]
        return [digits.fill_template(t, d) for t in digits.TRAIN_TEMPLATES for d in range(digits.NUM_CLASSES)]

    encoder = dual_encoder_for(config, ft.from_run, corpus, None if ft.from_run else tokenizer)
    config.model = encoder.config  # the run records the architecture it actually fine-tuned
    torch.manual_seed(config.train.seed)  # fusion and head initialisation
    fusion = FusionConfig(method=ft.fusion, cross_width=ft.cross_width, cross_layers=ft.cross_layers,
                          cross_heads=ft.cross_heads, cross_where=ft.cross_where)
    coded = config.train.task == "vqa" and ft.fusion == "cross" and ft.word_codes  # only cross fusion reads tokens
    task_config = TaskModelConfig(task=config.train.task, fusion=fusion, outputs=data.outputs,
                                  head_hidden=ft.head_hidden, freeze_towers=ft.freeze_towers, inputs=ft.inputs,
                                  word_codes=sorted(CODED_WORDS) if coded else [], order_around_codes=bool(coded))
    model = TaskModel(task_config, encoder)
    if ft.init_head not in ("zero_shot", "random"):
        raise ValueError(f"unknown finetune.init_head {ft.init_head!r}; choose from zero_shot, random")
    if config.train.task == "classify" and ft.head_hidden is None and ft.from_run and ft.init_head == "zero_shot":
        init_zero_shot_head(model, config.data.dataset)
    return model


@torch.no_grad()
def init_zero_shot_head(model: TaskModel, dataset: str) -> None:
    """Start the linear classifier at the zero-shot classifier: class-prompt text embeddings times the
    learned temperature (as FLYP and WiSE-FT do). Fine-tuning then starts from the pre-trained model's
    zero-shot accuracy instead of chance, and the towers are not pulled apart by a random head."""
    encoder = model.encoder
    classifier = {"shapes": shapes_classifier, "digits": digits_classifier,
                  "fashion": fashion_classifier}[dataset](encoder)  # (D, C)
    scale = encoder.logit_scale.clamp(0, encoder.config.max_logit_scale).exp()
    model.head.net.weight.copy_(scale * classifier.T)  # (C, D)
    model.head.net.bias.zero_()


def finetune_config(base: RunConfig, task: str, fusion: str | None = None, from_run: str | None = None,
                    freeze_towers: bool = False) -> RunConfig:
    """``base`` (a fine-tuning config: train section, sizes) pointed at a task, a fusion method and
    a pre-trained run, whose model and data sections it takes over."""
    if task not in FINETUNE_TASKS:
        raise ValueError(f"unknown fine-tuning task {task!r}; choose from {', '.join(FINETUNE_TASKS)}")
    config = dataclasses.replace(
        base, train=dataclasses.replace(base.train, task=task),
        finetune=dataclasses.replace(base.finetune, fusion=fusion or base.finetune.fusion,
                                     freeze_towers=freeze_towers, from_run=str(from_run) if from_run else None))
    if from_run:
        source = Path(from_run)
        if (source / RUN_CONFIG).exists():  # a run folder: fine-tune on its data set
            pre = load_config(source / RUN_CONFIG)
            config.data = without_training_options(pre.data)
            config.model = pre.model
        else:
            config.model = load_dual_encoder(source).config
    return config


# ----------------------------------------------------------------------------- the tasks

class FineTune(TaskSpec):
    """What classify, match and vqa share: the data, the model (towers + fusion + head), the batches'
    rank slices; each sets its outputs, batches, objective and evaluation."""
    sections = ("finetune",)
    datasets = ("shapes",)

    def check(self, config: RunConfig, env: DistributedEnv) -> list[str]:
        problems = super().check(config, env)
        if config.data.dataset not in self.datasets:
            problems[0] += " (it needs the shapes world: questions and captions come from the scenes' ground truth; " \
                           "digits and fashion support classify)"
        return problems

    def outputs(self, config: RunConfig) -> list[str]:
        return []

    def load_data(self, config: RunConfig, cache_dir: Path | None) -> TaskData:
        return load_task_data(config, cache_dir)

    def build_model(self, config: RunConfig, data: TaskData, tokenizer: Tokenizer | None) -> TaskModel:
        return build_task_model(config, data, tokenizer)

    def dual_encoder(self, model: TaskModel) -> DualEncoder:
        return model.encoder


class Classify(FineTune):
    name = "classify"
    description = "image classification: a linear or MLP head on the image embedding"
    datasets = ("shapes", "digits", "fashion")

    def check(self, config: RunConfig, env: DistributedEnv) -> list[str]:
        problems = super().check(config, env)
        if config.finetune.inputs != "both":
            problems.append(f"finetune.inputs={config.finetune.inputs}: classify reads only the image; the blind "
                            f"baselines (question_only, image_only) are for match and vqa")
        return problems

    def outputs(self, config: RunConfig) -> list[str]:
        return list({"digits": digits.CLASS_NAMES, "fashion": fashion.CLASS_NAMES}.get(config.data.dataset,
                                                                                       shapes.CLASS_NAMES))

    def batches(self, config: RunConfig, data: TaskData, model: TaskModel, env: DistributedEnv):
        t = config.train
        return rank_slice(ClassifyBatches(data.train_images, data.train_labels, t.batch_size, t.seed,
                                          augment=config.data.augment and applies(config.data, "augment")), env)

    def objective(self, config: RunConfig, model: TaskModel, env: DistributedEnv, device: torch.device):
        return data_parallel(ClassifyTask(model), env, device)

    def evaluate(self, model: TaskModel, config: RunConfig, run_dir: Path, cache_dir: Path | None) -> EvalResult:
        test = task_split(config, config.finetune.eval_split, cache_dir)
        return evaluate_classifier(model, test.images, test.labels, config.eval.batch_size)


class VQA(FineTune):
    name = "vqa"
    description = "visual question answering over the closed answer vocabulary, with fusion"

    def outputs(self, config: RunConfig) -> list[str]:
        return list(shapes.ANSWERS)

    def batches(self, config: RunConfig, data: TaskData, model: TaskModel, env: DistributedEnv):
        t = config.train
        batches = QuestionBatches(data.train_images, data.train_scenes, model.tokenizer, t.batch_size, t.seed,
                                  config.finetune.question_noise, {"relation": config.finetune.relation_repeats},
                                  config.finetune.question_noise_kind, config.finetune.noun_variants,
                                  config.finetune.question_noise_per_question)
        if model.config.freeze_towers:  # the frozen question tower's features of every question asked, ahead
            model.enable_text_cache()
            model.prefill_text_cache(*batches.texts(t.steps))  # (under torchrun each rank: the global batch's)
        return rank_slice(batches, env)

    def objective(self, config: RunConfig, model: TaskModel, env: DistributedEnv, device: torch.device):
        if model.config.freeze_towers:
            model.enable_image_cache()  # every epoch shows the frozen towers the same images
        return data_parallel(VQATask(model), env, device)

    def evaluate(self, model: TaskModel, config: RunConfig, run_dir: Path, cache_dir: Path | None) -> EvalResult:
        """Test scenes in training and held-out wording, and scenes showing held-out (color, shape) pairs
        (the compositional split) as a separate set, every figure per question type."""
        test = task_split(config, config.finetune.eval_split, cache_dir)
        answered, heldout = answer_questions(model, test.images, test.scenes, config.eval.batch_size,
                                             ("train", "heldout"))
        metrics = vqa_metrics(answered) | vqa_metrics(heldout, suffix="_heldout_wording")
        compositional = task_split(config, "compositional", cache_dir)
        [unseen_pairs] = answer_questions(model, compositional.images, compositional.scenes, config.eval.batch_size)
        metrics |= vqa_metrics(unseen_pairs, prefix="vqa_compositional_")
        figure = vqa_examples_figure(test.images, answered, run_dir / "vqa_examples.png")
        return EvalResult(metrics, images={"Questions, answers and the truth (failures included)": figure})


class Match(FineTune):
    name = "match"
    description = "image-text matching (yes / no) with fusion and mined hard negatives"

    def batches(self, config: RunConfig, data: TaskData, model: TaskModel, env: DistributedEnv):
        t = config.train
        return rank_slice(MatchBatches(data.train_images, data.train_scenes, model.tokenizer, t.batch_size,
                                       t.seed), env)

    def objective(self, config: RunConfig, model: TaskModel, env: DistributedEnv, device: torch.device):
        return data_parallel(MatchTask(model, env.rank, env.world_size), env, device)

    def evaluate(self, model: TaskModel, config: RunConfig, run_dir: Path, cache_dir: Path | None) -> EvalResult:
        test = task_split(config, config.finetune.eval_split, cache_dir)
        return EvalResult(evaluate_matching(model, test.images, test.scenes, config.eval.batch_size))


FINETUNE_TASKS: dict[str, FineTune] = {task.name: task for task in (Classify(), Match(), VQA())}
