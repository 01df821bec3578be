"""Captioning runs: train a captioner (CoCa-style, or a decoder on a frozen pre-trained dual encoder),
evaluate its captions and write the report; plus ``cmd_caption`` for the ``vlpt caption`` command.

- ``train.task: coca``: one image tower feeds both the contrastive loss (with the text tower) and the
  caption decoder; loss = contrastive_weight * contrastive + caption_weight * captioning.
- ``train.task: caption``: captioning loss only. With ``caption.from_run`` (a trained dual encoder)
  and ``caption.freeze_towers: true`` only the decoder trains, on the frozen image tower's tokens.

Run folder layout as for contrastive runs (``config.yaml``, ``log.jsonl``, ``checkpoints/``,
``metrics.json``, ``report.md``), with ``model/`` a captioner folder (``load_captioner``),
``dual_encoder/`` its dual encoder alone (``vlpt.load_model``), and ``captions.png``.
Single process: captioning runs do not use torchrun yet.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlpt.config import RunConfig
from vlpt.evaluate.captioning import (
    attribute_accuracy,
    caption_scores,
    clip_score,
    digit_caption_accuracy,
    digits_named,
    parse_shapes_caption,
    plot_captions,
)
from vlpt.evaluate.report import write_report
from vlpt.evaluate.suite import load_split
from vlpt.factory import create_model, find_model_dir, get_tokenizer, load_model
from vlpt.models.captioner import MODEL_TYPE, Captioner, load_captioner
from vlpt.models.decoding import DecodingConfig
from vlpt.models.dual_encoder import CONFIG_NAME, DualEncoder
from vlpt.tokenization import Tokenizer
from vlpt.train.run import fit_on_pairs, read_run_config, run
from vlpt.train.tasks import ContrastiveTask
from vlpt.train.trainer import read_log

log = logging.getLogger(__name__)
CAPTION_TASKS = ("caption", "coca")
TASKS = ("contrastive", *CAPTION_TASKS, "generate")  # every train.task (generate: vlpt.train.generate)
GRID_NAME = "captions.png"


# ----------------------------------------------------------------------------- objectives

def caption_loss(logits: torch.Tensor, input_ids: torch.Tensor, pad_id: int,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, T-1, V) predict input_ids[:, 1:]; padding is ignored."""
    targets = input_ids[:, 1:].masked_fill(input_ids[:, 1:] == pad_id, -100)  # (B, T-1)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                           label_smoothing=label_smoothing)


class CaptionTask:
    """Captioning alone: the decoder (and the image tower, unless it is locked) learn to caption."""

    def __init__(self, model: Captioner, label_smoothing: float = 0.0):
        self.model = model
        self.label_smoothing = label_smoothing

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.model(batch["images"], batch["input_ids"])
        loss = caption_loss(out["logits"], batch["input_ids"], self.model.pad_id, self.label_smoothing)
        return {"loss": loss, "caption_loss": loss.detach()}


class CocaTask:
    """CoCa: one image forward feeds a contrastive loss (image vs text tower) and the captioning loss."""

    def __init__(self, model: Captioner, loss: str = "infonce", contrastive_weight: float = 1.0,
                 caption_weight: float = 2.0, label_smoothing: float = 0.0, seed: int = 0):
        self.model = model
        self.contrastive = ContrastiveTask(model.dual_encoder, loss, seed=seed)  # its loss, over our features
        self.generator = self.contrastive.generator  # saved in checkpoints for an exact resume
        self.contrastive_weight, self.caption_weight = contrastive_weight, caption_weight
        self.label_smoothing = label_smoothing

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.model(batch["images"], batch["input_ids"], batch["attention_mask"], contrastive=True)
        contrastive = self.contrastive.loss_from_features(out["image_features"], out["text_features"],
                                                          out["logit_scale"], out["logit_bias"])
        captioning = caption_loss(out["logits"], batch["input_ids"], self.model.pad_id, self.label_smoothing)
        loss = self.contrastive_weight * contrastive + self.caption_weight * captioning
        return {"loss": loss, "contrastive_loss": contrastive.detach(), "caption_loss": captioning.detach(),
                "logit_scale": out["logit_scale"].detach()}


# ----------------------------------------------------------------------------- building

def is_caption_run(config: RunConfig) -> bool:
    """True for train.task caption | coca (this module's runs), False for contrastive; a ValueError
    listing the choices for anything else, so a typo never falls back to a contrastive run."""
    if config.train.task not in TASKS:
        raise ValueError(f"unknown train.task {config.train.task!r}; choose from {', '.join(TASKS)}")
    return config.train.task in CAPTION_TASKS


def load_dual_encoder(path: str | Path) -> DualEncoder:
    """A dual encoder from a model or run folder; a captioner's folder gives its dual encoder."""
    model_dir = find_model_dir(path)
    if json.loads((model_dir / CONFIG_NAME).read_text()).get("model_type") == MODEL_TYPE:
        return load_captioner(model_dir).dual_encoder
    return load_model(model_dir)


def build_captioner(config: RunConfig, corpus: Sequence[str] | None = None,
                    tokenizer: Tokenizer | None = None) -> Captioner:
    """The run's captioner: a dual encoder from ``caption.from_run`` (locked with ``freeze_towers``) or a
    new one (tokenizer trained on ``corpus``), plus a new decoder; both initialised from ``train.seed``.
    With ``from_run`` the towers' config is the loaded model's (``captioner.dual_encoder.config``)."""
    cap = config.caption
    if cap.freeze_towers and not cap.from_run:
        raise ValueError("caption.freeze_towers needs caption.from_run (a trained dual encoder's run or model "
                         "folder): frozen towers from scratch would caption from random features")
    if cap.from_run:
        dual = load_dual_encoder(cap.from_run)
        if cap.freeze_towers:
            dual.lock_towers(image=True, text=True)
    else:
        tokenizer = tokenizer or get_tokenizer(config.model, corpus)
        dual = create_model(copy.deepcopy(config.model), tokenizer, seed=config.train.seed)
    torch.manual_seed(config.train.seed)
    return Captioner(cap.model, dual)


def make_task(config: RunConfig, model: Captioner) -> CaptionTask | CocaTask:
    cap = config.caption
    if config.train.task == "caption":
        return CaptionTask(model, cap.label_smoothing)
    if config.train.task == "coca":
        return CocaTask(model, config.train.loss, cap.contrastive_weight, cap.caption_weight, cap.label_smoothing,
                        seed=config.train.seed)
    raise ValueError(f"train.task {config.train.task!r} is not a captioning task; choose from "
                     f"{', '.join(CAPTION_TASKS)} (contrastive runs go through vlpt.train.run)")


# ----------------------------------------------------------------------------- training

def train_captioner(config: RunConfig, run_dir: str | Path, from_run: str | Path | None = None,
                    resume: bool = False, cache_dir=None, stop_after: int | None = None
                    ) -> tuple[Captioner, float]:
    """Train (or resume) a captioner into ``run_dir``; returns (captioner, train_seconds).

    ``from_run`` overrides ``caption.from_run``. ``stop_after`` ends early at that step with a
    checkpoint and without writing the final model.
    """
    run_dir = Path(run_dir)
    if not is_caption_run(config):
        raise ValueError(f"train.task must be one of {', '.join(CAPTION_TASKS)} for a captioning run, "
                         f"got {config.train.task!r}")
    if config.train.accum_mode != "plain":
        raise ValueError("captioning runs support train.accum_mode=plain only")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("captioning runs are single-process for now; run them without torchrun")
    config = copy.deepcopy(config)  # the caller's config is left as it was
    if from_run is not None:
        config.caption.from_run = str(from_run)
    model, seconds, trainer = fit_on_pairs(
        config, run_dir, lambda cfg, corpus, tok: build_captioner(cfg, corpus=corpus, tokenizer=tok), make_task,
        config.caption.from_run, resume, cache_dir, stop_after, group_size=2 if config.data.twins else 1)
    if trainer.finished:
        model.save_pretrained(run_dir / "model")
        model.dual_encoder.save_pretrained(run_dir / "dual_encoder")  # usable on its own: vlpt classify / embed
    return model, seconds


# ----------------------------------------------------------------------------- evaluation

def evaluate_captioner(model: Captioner, config: RunConfig, cache_dir=None
                       ) -> tuple[dict[str, float], dict[str, object]]:
    """Caption held-out images greedily and with beam search; returns flat metrics and the grid data.

    Shapes: BLEU-4 / CIDEr-D against the five references, exact attribute accuracy (overall and by
    object count), CLIP-score. Digits: the same, with digit-naming accuracy instead of attributes.
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
        metrics[f"clip_score_{name}"] = clip_score(model.dual_encoder, images, texts)
        metrics[f"mean_words_{name}"] = float(np.mean([len(t.split()) for t in texts]))
    metrics["clip_score_reference"] = clip_score(model.dual_encoder, images, [caps[0] for caps in test.captions])
    k = min(cap.grid_images, len(images))
    if data.dataset == "digits":
        correct = [digits_named(t) == {int(y)} for t, y in zip(generated["beam"][:k], test.labels[:k])]
    else:
        correct = [parse_shapes_caption(t).matches([(o.color, o.shape) for o in s.objects])
                   for t, s in zip(generated["beam"][:k], test.scenes[:k])]
    grid = {"images": images[:k], "captions": list(zip(generated["greedy"][:k], generated["beam"][:k])),
            "correct": correct, "labels": ("greedy", f"beam {cap.beam}")}
    return metrics, grid


def evaluate_caption_run(run_dir: str | Path, model: Captioner | None = None, extra: dict | None = None,
                         cache_dir=None) -> dict[str, float]:
    """Evaluate a captioning run's final model; write metrics.json, captions.png and report.md."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    model = model or load_captioner(run_dir)
    metrics, grid = evaluate_captioner(model, config, cache_dir)
    metrics = {**metrics, **(extra or {})}
    metrics.setdefault("steps", config.train.steps)
    plot_captions(grid["images"], grid["captions"], run_dir / GRID_NAME, correct=grid["correct"],
                  labels=grid["labels"])
    history = [row for row in read_log(run_dir / "log.jsonl") if "loss" in row]
    write_report(run_dir, metrics, history=history,
                 extra_images={"Generated captions on test images (frame: beam caption right / wrong)":
                               run_dir / GRID_NAME})
    return metrics


def run_caption(config: RunConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
                cache_dir=None) -> dict[str, float]:
    """Train then evaluate a captioning run (``train.task`` caption | coca), with the run-folder rules of
    ``vlpt.train.run.run``: an existing folder is an error unless ``resume`` or ``overwrite``."""
    return run(config, run_dir, resume=resume, overwrite=overwrite, cache_dir=cache_dir,
               fit_fn=train_captioner, evaluate_fn=evaluate_caption_run)


# ----------------------------------------------------------------------------- command line

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
