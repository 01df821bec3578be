"""Contrastive pre-training of a dual encoder (``train.task: contrastive``): InfoNCE, SigLIP or the pairwise
matching loss over image-text pairs, the global batch gathered across ranks under torchrun. Evaluated with
zero-shot classification, retrieval and a linear probe (``vlpt.evaluate.suite``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vlpt.config import RunConfig
from vlpt.data.shards import ShardBatches, ShardReader, shard_captions
from vlpt.data.splits import Pairs, load_pairs, load_split
from vlpt.evaluate.report import EvalResult
from vlpt.evaluate.scoring import embed_images
from vlpt.evaluate.suite import evaluate, shapes_classifier
from vlpt.evaluate.zero_shot import accuracy, zero_shot_logits
from vlpt.losses import check_pairwise_options, get_loss, get_siglip_loss
from vlpt.models.dual_encoder import DualEncoder
from vlpt.tasks.base import TaskSpec, dual_encoder_for, pair_batches
from vlpt.tokenization import Tokenizer
from vlpt.train.anchors import ClassAnchors, anchor_problems, classifier_anchors
from vlpt.train.distributed import DistributedEnv

log = logging.getLogger(__name__)


class ContrastiveTask:
    """Image-text contrastive pre-training with InfoNCE, SigLIP or the pairwise matching loss."""

    def __init__(self, model: nn.Module, loss: str = "infonce", rank: int = 0, world_size: int = 1,
                 seed: int = 0, local_loss: bool = False, siglip_exchange: str = "gather",
                 pairwise_negatives: str = "random", num_negatives: int = 1,
                 anchors: ClassAnchors | None = None, anchor_weight: float = 0.0):
        self.loss_fn = get_loss(loss)  # fails early, listing the choices
        # gather (all-gather texts) | neighbour (ring exchange); checked for every loss, so a typo
        # fails early even when the loss is not SigLIP.
        siglip_fn = get_siglip_loss(siglip_exchange)
        if loss == "siglip":
            self.loss_fn = siglip_fn
        self.siglip_exchange = siglip_exchange
        check_pairwise_options(pairwise_negatives, num_negatives)  # random | hard, >= 1; any loss, like the above
        self.pairwise_negatives, self.num_negatives = pairwise_negatives, num_negatives
        self.loss = loss
        self.model = model
        self.rank, self.world_size = rank, world_size
        self.local_loss = local_loss
        self.generator = torch.Generator().manual_seed(seed)  # negatives for the pairwise loss, anchors drawn
        self.anchors = anchors if anchor_weight > 0 else None  # LiT: the image tower's classifier (train.anchors)
        self.anchor_weight = anchor_weight
        if self.anchors is not None and (problems := anchor_problems(loss=loss)):
            raise ValueError("; ".join(problems))
        core = getattr(model, "module", model)
        if loss in ("siglip", "pairwise") and core.logit_bias is None:
            raise ValueError(f"the {loss} loss needs a logit bias: set model.init_logit_bias (SigLIP uses -10)")

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = batch["images"]
        anchors = None if self.anchors is None else self.anchors.sample(len(images), self.generator, images.device)
        out = self.model(images, batch["input_ids"], batch["attention_mask"], anchors=anchors)
        loss = self.loss_from_features(out["image_features"], out["text_features"], out["logit_scale"],
                                       out["logit_bias"])
        parts = {"logit_scale": out["logit_scale"].detach()}
        if anchors is not None:  # every rank draws the same anchors: a term of its own, not gathered
            args = dict(image_features=out["anchor_image_features"], text_features=out["anchor_text_features"],
                        logit_scale=out["logit_scale"], rank=0, world_size=1)
            if self.loss == "siglip":
                args["logit_bias"] = out["logit_bias"]
            anchor_loss = self.loss_fn(**args)
            parts["contrastive_loss"], parts["anchor_loss"] = loss.detach(), anchor_loss.detach()
            loss = loss + self.anchor_weight * anchor_loss
        return {"loss": loss, **parts}

    def loss_from_features(self, image_features: torch.Tensor, text_features: torch.Tensor,
                           logit_scale: torch.Tensor, logit_bias: torch.Tensor | None) -> torch.Tensor:
        """The loss over already-computed features (what GradCache calls on the cached batch)."""
        args = dict(image_features=image_features, text_features=text_features, logit_scale=logit_scale)
        if self.loss == "infonce":
            return self.loss_fn(**args, rank=self.rank, world_size=self.world_size, local_loss=self.local_loss)
        if self.loss == "siglip":
            return self.loss_fn(**args, logit_bias=logit_bias, rank=self.rank, world_size=self.world_size)
        return self.loss_fn(**args, logit_bias=logit_bias, num_negatives=self.num_negatives,
                            negatives=self.pairwise_negatives, generator=self.generator, rank=self.rank,
                            world_size=self.world_size)


def _shards_path(config: RunConfig) -> str:
    if not config.data.path:
        raise ValueError("data.dataset=shards needs data.path (a shard folder, file, glob or {a..b} pattern), "
                         "e.g. --set data.path=shards/")
    return config.data.path


class Contrastive(TaskSpec):
    name = "contrastive"
    description = "contrastive pre-training of a dual encoder (InfoNCE | SigLIP | pairwise)"
    datasets = ("shapes", "digits", "fashion", "files", "shards")
    gradcache = True
    contrastive_loss = True
    caption_noise = True

    def check(self, config: RunConfig, env: DistributedEnv) -> list[str]:
        problems = super().check(config, env)
        if config.train.local_loss and config.train.loss != "infonce":
            problems.append(f"train.local_loss applies to the infonce loss only, not train.loss={config.train.loss}")
        if config.train.anchor_weight > 0:  # a model to start from (init_from) brings its own towers
            image = None if config.model.init_from else config.model.image
            problems += anchor_problems(image, config.train.loss, config.train.accum_mode)
        return problems

    def load_data(self, config: RunConfig, cache_dir: Path | None) -> Pairs | None:
        return None if config.data.dataset == "shards" else load_pairs(config.data, cache_dir)  # shards: streamed

    def build_model(self, config: RunConfig, data: Pairs | None, tokenizer: Tokenizer | None) -> DualEncoder:
        corpus = (lambda: shard_captions(_shards_path(config))) if data is None else data.corpus
        model = dual_encoder_for(config, None, corpus, tokenizer)
        if config.model.text.locked:
            model.enable_text_cache()  # LiT: a frozen tower's caption features are computed once
        if config.model.image.locked and not config.data.augment:
            model.enable_image_cache()  # and a frozen image tower's features, when the pixels repeat exactly
        return model

    def dual_encoder(self, model: DualEncoder) -> DualEncoder:
        return model

    def batches(self, config: RunConfig, data: Pairs | None, model: DualEncoder, env: DistributedEnv):
        """In-memory pairs (each rank slices the global batch), or for shards a ShardReader over this rank's
        share of the shards (``train.batch_size`` is global)."""
        train = config.train
        if data is None:
            if train.batch_size % env.world_size:
                raise ValueError(f"batch_size {train.batch_size} must be divisible by the world size {env.world_size}")
            d = config.data
            reader = ShardReader(_shards_path(config), train.batch_size // env.world_size, d.image_size,
                                 seed=train.seed, rank=env.rank, world_size=env.world_size,
                                 num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer, resample=d.resample,
                                 max_consecutive_failures=d.max_consecutive_failures)
            log.info("shards: %d samples in %d shards, %d steps per epoch", reader.num_samples, len(reader.paths),
                     reader.steps_per_epoch)
            return ShardBatches(reader, model.tokenizer)
        return pair_batches(config, data, model.tokenizer, env, caption_noise=True)

    def objective(self, config: RunConfig, model: DualEncoder, env: DistributedEnv,
                  device: torch.device) -> ContrastiveTask:
        # DDP around the dual encoder itself: the loss gathers the features of every rank (the global batch
        # is the contrastive batch) and GradCache runs the towers chunk by chunk.
        trained = model
        if env.distributed:
            trained = DistributedDataParallel(model.to(device), device_ids=[device] if device.type == "cuda" else None)
        t = config.train
        anchors = None
        if t.anchor_weight > 0:
            anchors = classifier_anchors(model.config.image, model.tokenizer, t.anchor_template,
                                         config.data.holdout_classes)
            if anchors.directions.shape[1] != model.image_tower.output_dim:
                raise ValueError(f"the classifier's rows have {anchors.directions.shape[1]} features but the image "
                                 f"tower pools {model.image_tower.output_dim} (timm_kwargs changing the network?)")
            log.info("class anchors: %d ImageNet classes (%d left out as naming held-out classes: %s)", len(anchors),
                     len(anchors.dropped), ", ".join(anchors.dropped) or "none")
        return ContrastiveTask(trained, t.loss, rank=env.rank, world_size=env.world_size, seed=t.seed,
                               local_loss=t.local_loss, siglip_exchange=t.siglip_exchange,
                               pairwise_negatives=t.pairwise_negatives, num_negatives=t.num_negatives,
                               anchors=anchors, anchor_weight=t.anchor_weight)

    def quick_eval(self, config: RunConfig, cache_dir: Path | None) -> Callable[[nn.Module, int], dict] | None:
        """48-way zero-shot on 200 single-object validation scenes (shapes only)."""
        if config.data.dataset != "shapes":
            return None
        val = load_split(config.data, "val", 200, single=True, cache_dir=cache_dir)

        def run(model: DualEncoder, step: int) -> dict[str, float]:
            logits = zero_shot_logits(embed_images(model, val.images), shapes_classifier(model))
            return accuracy(logits, torch.from_numpy(val.labels), prefix="val_zeroshot_")
        return run

    def evaluate(self, model: DualEncoder, config: RunConfig, run_dir: Path, cache_dir: Path | None) -> EvalResult:
        return evaluate(model, config.data, config.eval, cache_dir)
