"""Image -> text: a captioner trained CoCa-style (``train.task: coca``) or as a decoder on a dual encoder
(``train.task: caption``), section ``caption:``.

- ``coca``: one image tower feeds both the contrastive loss (with the text tower) and the caption decoder;
  loss = contrastive_weight * contrastive + caption_weight * captioning.
- ``caption``: captioning loss only. With ``caption.from_run`` (a trained dual encoder) and
  ``caption.freeze_towers: true`` only the decoder trains, on the frozen image tower's tokens.

The run's ``model/`` is a captioner folder (``vlpt.load`` / ``load_captioner``), ``dual_encoder/`` its dual
encoder alone (``vlpt classify`` / ``vlpt embed`` use it), ``captions.png`` the report's caption grid.
Evaluation: BLEU-4 / CIDEr-D against the references, exact attributes (shapes) or digit naming (digits),
CLIP-score, for greedy and beam search.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlpt.config import RunConfig
from vlpt.data.splits import Pairs, load_pairs, load_split
from vlpt.evaluate.captioning import (
    attribute_accuracy,
    caption_scores,
    digit_caption_accuracy,
    digits_named,
    parse_shapes_caption,
)
from vlpt.evaluate.generation import resize_images
from vlpt.evaluate.report import EvalResult, plot_captions
from vlpt.evaluate.scoring import clip_score
from vlpt.factory import load_dual_encoder
from vlpt.models.captioner import Captioner
from vlpt.models.decoding import DecodingConfig
from vlpt.models.dual_encoder import DualEncoder
from vlpt.tasks.base import TaskSpec, data_parallel, dual_encoder_for, pair_batches
from vlpt.tasks.contrastive import ContrastiveTask
from vlpt.tokenization import Tokenizer
from vlpt.train.distributed import DistributedEnv

GRID_NAME = "captions.png"
DUAL_ENCODER_DIR = "dual_encoder"  # the captioner's dual encoder alone, inside the run folder


# ----------------------------------------------------------------------------- objectives

def caption_loss(logits: torch.Tensor, input_ids: torch.Tensor, pad_id: int, label_smoothing: float = 0.0,
                 world_size: int = 1) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, T-1, V) predict input_ids[:, 1:]; padding is ignored.

    The mean is over the caption tokens of the whole global batch: under torchrun this rank's token sum is
    divided by the token count of all ranks, times ``world_size`` (DDP averages gradients over ranks), so
    ranks holding more tokens weigh more, exactly as in one process."""
    targets = input_ids[:, 1:].masked_fill(input_ids[:, 1:] == pad_id, -100)  # (B, T-1)
    logits, targets = logits.flatten(0, 1).float(), targets.flatten()
    if world_size == 1:
        return F.cross_entropy(logits, targets, ignore_index=-100, label_smoothing=label_smoothing)
    total = F.cross_entropy(logits, targets, ignore_index=-100, label_smoothing=label_smoothing, reduction="sum")
    count = (targets != -100).sum()
    dist.all_reduce(count)  # caption tokens in the global batch
    return total * world_size / count.clamp(min=1)


class CaptionTask:
    """Captioning alone: the decoder (and the image tower, unless it is locked) learn to caption."""

    def __init__(self, model: Captioner, label_smoothing: float = 0.0, world_size: int = 1):
        self.model = model
        self.label_smoothing = label_smoothing
        self.world_size = world_size

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.model(batch["images"], batch["input_ids"])
        loss = caption_loss(out["logits"], batch["input_ids"], self.model.pad_id, self.label_smoothing,
                            self.world_size)
        return {"loss": loss, "caption_loss": loss.detach()}


class CocaTask:
    """CoCa: one image forward feeds a contrastive loss (image vs text tower) and the captioning loss."""

    def __init__(self, model: Captioner, loss: str = "infonce", contrastive_weight: float = 1.0,
                 caption_weight: float = 2.0, label_smoothing: float = 0.0, seed: int = 0,
                 rank: int = 0, world_size: int = 1, **loss_options):
        self.model = model
        # its loss over our features; under torchrun it gathers them, so the contrastive batch is global.
        # loss_options: ContrastiveTask's (local_loss, siglip_exchange, pairwise_negatives, num_negatives)
        self.contrastive = ContrastiveTask(model.dual_encoder, loss, seed=seed, rank=rank, world_size=world_size,
                                           **loss_options)
        self.generator = self.contrastive.generator  # saved in checkpoints for an exact resume
        self.contrastive_weight, self.caption_weight = contrastive_weight, caption_weight
        self.label_smoothing = label_smoothing
        self.world_size = world_size

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.model(batch["images"], batch["input_ids"], batch["attention_mask"], contrastive=True)
        contrastive = self.contrastive.loss_from_features(out["image_features"], out["text_features"],
                                                          out["logit_scale"], out["logit_bias"])
        captioning = caption_loss(out["logits"], batch["input_ids"], self.model.pad_id, self.label_smoothing,
                                  self.world_size)
        loss = self.contrastive_weight * contrastive + self.caption_weight * captioning
        return {"loss": loss, "contrastive_loss": contrastive.detach(), "caption_loss": captioning.detach(),
                "logit_scale": out["logit_scale"].detach()}


# ----------------------------------------------------------------------------- evaluation

def resized(images: np.ndarray, scorer: DualEncoder) -> torch.Tensor:
    """Images at the scorer's input size (it may have been trained at another resolution)."""
    return resize_images(images, scorer.config.image.image_size)


def evaluate_captioner(model: Captioner, config: RunConfig, cache_dir=None
                       ) -> tuple[dict[str, float], dict[str, object]]:
    """Caption held-out images greedily and with beam search; returns flat metrics and the grid data.

    Shapes: BLEU-4 / CIDEr-D against the five references, exact attribute accuracy (overall and by
    object count), and the attribute accuracy of beam captions on scenes with a held-out (color, shape) pair
    (``<key>_beam_compositional``: does it name a pair it never saw?). Digits: the same, with digit-naming
    accuracy instead of attributes. CLIP-score only with ``caption.scorer``, a dual encoder independent of the
    captioner (its own encoder would score captions it was trained to agree with).
    """
    cap = config.caption
    data = config.data
    if data.dataset == "digits":
        test = load_split(data, "test")
    else:
        test = load_split(data, "test", cap.eval_size, cache_dir=cache_dir)
    images = test.images  # (N, H, W, 3) uint8
    strategies = {"greedy": DecodingConfig(strategy="greedy"),
                  "beam": DecodingConfig(strategy="beam", beam=cap.beam, length_penalty=cap.length_penalty)}
    metrics: dict[str, float] = {"caption_eval_images": len(images)}
    scorer = load_dual_encoder(cap.scorer) if cap.scorer else None
    generated: dict[str, list[str]] = {}
    for name, decoding in strategies.items():
        start = time.perf_counter()
        texts = model.generate_caption(images, decoding)
        metrics[f"decode_seconds_{name}"] = time.perf_counter() - start
        generated[name] = texts
        scores = caption_scores(texts, test.captions)
        metrics[f"bleu4_{name}"], metrics[f"cider_{name}"] = scores["bleu4"], scores["cider"]
        if data.dataset == "digits":
            metrics[f"digits_caption_acc_{name}"] = digit_caption_accuracy(texts, test.labels)
        else:
            for key, value in attribute_accuracy(texts, test.scenes).items():
                metrics[f"{key}_{name}"] = value
        if scorer is not None:
            metrics[f"clip_score_{name}"] = clip_score(scorer, resized(images, scorer), texts)
        metrics[f"mean_words_{name}"] = float(np.mean([len(t.split()) for t in texts]))
    if scorer is not None:
        metrics["clip_score_reference"] = clip_score(scorer, resized(images, scorer), [c[0] for c in test.captions])
    if data.dataset == "shapes" and cap.compositional_size:
        held_out = load_split(data, "compositional", cap.compositional_size, cache_dir=cache_dir)
        texts = model.generate_caption(held_out.images, strategies["beam"])
        for key, value in attribute_accuracy(texts, held_out.scenes).items():
            metrics[f"{key}_beam_compositional"] = value
    k = min(cap.grid_images, len(images))
    if data.dataset == "digits":
        correct = [digits_named(t) == {int(y)} for t, y in zip(generated["beam"][:k], test.labels[:k])]
    else:
        correct = [parse_shapes_caption(t).matches([(o.color, o.shape) for o in s.objects])
                   for t, s in zip(generated["beam"][:k], test.scenes[:k])]
    grid = {"images": images[:k], "captions": list(zip(generated["greedy"][:k], generated["beam"][:k])),
            "correct": correct, "labels": ("greedy", f"beam {cap.beam}")}
    return metrics, grid


# ----------------------------------------------------------------------------- the tasks

class Captioning(TaskSpec):
    name = "caption"
    description = "image captioning: a caption decoder on a dual encoder's image tokens"
    sections = ("caption",)

    def check(self, config: RunConfig, env) -> list[str]:
        problems = super().check(config, env)
        if config.caption.freeze_towers and not config.caption.from_run:
            problems.append("caption.freeze_towers needs caption.from_run (a trained dual encoder's run or model "
                            "folder): frozen towers from scratch would caption from random features")
        return problems

    def load_data(self, config: RunConfig, cache_dir: Path | None) -> Pairs:
        return load_pairs(config.data, cache_dir)

    def build_model(self, config: RunConfig, data: Pairs, tokenizer: Tokenizer | None) -> Captioner:
        """A dual encoder from ``caption.from_run`` (locked with ``freeze_towers``) or a new one, plus a new
        decoder; both initialised from ``train.seed``."""
        cap = config.caption
        dual = dual_encoder_for(config, cap.from_run, data.corpus, None if cap.from_run else tokenizer)
        if cap.freeze_towers:
            dual.lock_towers(image=True, text=True)
        torch.manual_seed(config.train.seed)
        return Captioner(cap.model, dual)

    def dual_encoder(self, model: Captioner) -> DualEncoder:
        return model.dual_encoder

    def batches(self, config: RunConfig, data: Pairs, model: Captioner, env: DistributedEnv):
        return pair_batches(config, data, model.tokenizer, env)

    def objective(self, config: RunConfig, model: Captioner, env: DistributedEnv, device: torch.device):
        return data_parallel(CaptionTask(model, config.caption.label_smoothing, env.world_size), env, device)

    def save_model(self, model: Captioner, run_dir: Path) -> None:
        super().save_model(model, run_dir)
        model.dual_encoder.save_pretrained(run_dir / DUAL_ENCODER_DIR)  # usable on its own: classify / embed

    def evaluate(self, model: Captioner, config: RunConfig, run_dir: Path, cache_dir: Path | None) -> EvalResult:
        metrics, grid = evaluate_captioner(model, config, cache_dir)
        path = plot_captions(grid["images"], grid["captions"], run_dir / GRID_NAME, correct=grid["correct"],
                             labels=grid["labels"])
        return EvalResult(metrics, images={"Generated captions on test images (frame: beam caption right / wrong)":
                                           path})


class CoCa(Captioning):
    name = "coca"
    description = "CoCa: contrastive + captioning losses on one image forward"
    contrastive_loss = True

    def objective(self, config: RunConfig, model: Captioner, env: DistributedEnv, device: torch.device):
        cap = config.caption
        t = config.train
        task = CocaTask(model, t.loss, cap.contrastive_weight, cap.caption_weight, cap.label_smoothing,
                        seed=t.seed, rank=env.rank, world_size=env.world_size, local_loss=t.local_loss,
                        siglip_exchange=t.siglip_exchange, pairwise_negatives=t.pairwise_negatives,
                        num_negatives=t.num_negatives)
        return data_parallel(task, env, device)
