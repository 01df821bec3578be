"""The entry points: create a model from a config, load any saved vlpt model, get its tokenizer and transform."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from vlpt.config import ModelConfig
from vlpt.data.transforms import tower_transform
from vlpt.interop import foreign_format, import_model
from vlpt.io import ModelLoadError
from vlpt.models import captioner, generator, task_model
from vlpt.models.captioner import Captioner, load_captioner
from vlpt.models.dual_encoder import CONFIG_NAME, DualEncoder, find_model_dir, read_model_config
from vlpt.models.generator import TextToImageGenerator, load_generator
from vlpt.models.task_model import TaskModel, load_task_model
from vlpt.models.text_towers import build_hf_config, hf_config_dict, resolve_pretrained, special_token_ids
from vlpt.tokenization import Tokenizer, train_wordpiece

__all__ = ["MODEL_KINDS", "create_model", "find_model_dir", "get_tokenizer", "image_transform", "load",
           "load_captioner", "load_dual_encoder", "load_generator", "load_model", "load_task_model", "model_kind"]

# config.json's "model_type" -> the class that loads the folder; a dual encoder's config has none.
MODEL_KINDS: dict[str | None, type[nn.Module]] = {
    None: DualEncoder,
    task_model.MODEL_TYPE: TaskModel,
    captioner.MODEL_TYPE: Captioner,
    generator.MODEL_TYPE: TextToImageGenerator,
}


def model_kind(path: str | Path) -> type[nn.Module]:
    """The class of the model saved in ``path`` (a model folder or a run folder), from its config.json; a
    transformers CLIP / SigLIP or OpenCLIP checkpoint (``vlpt.interop``) is a dual encoder."""
    if foreign_format(path):
        return DualEncoder
    directory = find_model_dir(path)
    kind = read_model_config(directory).get("model_type")
    if kind not in MODEL_KINDS:
        known = ", ".join(k for k in MODEL_KINDS if k)
        raise ModelLoadError(f"{directory / CONFIG_NAME}: an unknown kind of model ({kind!r}); vlpt saves a dual "
                             f"encoder (no model_type) or one of {known}")
    return MODEL_KINDS[kind]


def load(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Any saved vlpt model (dual encoder, fine-tuned task model, captioner, generator), from its folder or
    its run folder, as the object its config.json says it is; a transformers CLIP / SigLIP or OpenCLIP
    checkpoint (folder, ``ARCH,FILE``, ``hf-hub:NAME``: see ``vlpt.interop``) as a dual encoder."""
    if foreign_format(path):
        return import_model(path, device=device)
    return model_kind(path).from_pretrained(find_model_dir(path), device=device)


def get_tokenizer(config: ModelConfig | str | Path, corpus: Iterable[str] | None = None) -> Tokenizer:
    """The tokenizer of a saved model (folder), of a pretrained text tower, or one trained on ``corpus``."""
    if isinstance(config, (str, Path)):
        return load_dual_encoder(config).tokenizer
    if config.init_from:
        return load_dual_encoder(config.init_from).tokenizer
    text = config.text
    if text.pretrained:
        from transformers import AutoTokenizer  # transformers is slow to import; only pretrained towers need it

        return Tokenizer(AutoTokenizer.from_pretrained(resolve_pretrained(text.pretrained)), text.context_length)
    if corpus is None:
        raise ValueError("a from-scratch text tower needs a caption corpus to train its tokenizer")
    return Tokenizer(train_wordpiece(corpus, text.vocab_size), text.context_length)


def create_model(config: ModelConfig, tokenizer: Tokenizer | None = None,
                 corpus: Iterable[str] | None = None, seed: int | None = 0) -> DualEncoder:
    """Build a dual encoder; a from-scratch text tower gets a WordPiece vocabulary trained on ``corpus``.
    With ``config.init_from`` the model is that one (any vlpt model's dual encoder, or an imported
    transformers / OpenCLIP checkpoint): its architecture, tokenizer and weights, with this config's
    ``locked`` flags; ``tokenizer`` (a resumed run's) replaces its tokenizer."""
    if config.init_from:
        model = load_dual_encoder(config.init_from)
        model.config.init_from = config.init_from  # recorded: a resumed run starts from the same weights
        if tokenizer is not None:
            model.tokenizer = tokenizer.with_padding(model.config.text.pad_to_context)
        model.lock_towers(image=config.image.locked, text=config.text.locked)
        return model
    if tokenizer is None:
        tokenizer = get_tokenizer(config, corpus)
    if not config.text.pretrained:
        config.text.vocab_size = tokenizer.vocab_size
        if config.text.arch != "bert" and config.text.hf_config is None:  # the tokenizer's end-of-text id
            config.text.hf_config = hf_config_dict(build_hf_config(config.text, special_token_ids(tokenizer.hf)))
    if seed is not None:
        torch.manual_seed(seed)
    return DualEncoder(config, tokenizer)


def load_model(path: str | Path, device: str | torch.device = "cpu", arch: str | None = None) -> DualEncoder:
    """A dual encoder saved with ``save_pretrained`` (or the final model of a run folder), or imported from a
    transformers CLIP / SigLIP or OpenCLIP checkpoint (``vlpt.interop``; ``arch``: the OpenCLIP model name
    or config JSON of a bare weights file); another kind of vlpt model is an error that names the loader
    to use (``load`` takes any kind)."""
    if arch is not None or foreign_format(path):
        return import_model(path, arch, device)
    kind = model_kind(path)
    if kind is not DualEncoder:
        raise ModelLoadError(f"{path} holds a {kind.__name__}, not a dual encoder: load it with vlpt.load "
                             f"(the dual encoder it is built on: vlpt.factory.load_dual_encoder)")
    return DualEncoder.from_pretrained(find_model_dir(path), device=device)


def load_dual_encoder(path: str | Path, device: str | torch.device = "cpu") -> DualEncoder:
    """The dual encoder of any saved model: a dual encoder itself, or the one a task model, captioner or
    generator is built on (e.g. to fine-tune or evaluate a captioner's towers)."""
    model = load(path, device)
    if isinstance(model, DualEncoder):
        return model
    return model.encoder if isinstance(model, TaskModel) else model.dual_encoder


def image_transform(model_or_config: DualEncoder | ModelConfig):
    """The PIL -> tensor preprocessing that matches a model's image tower."""
    config = model_or_config.config if isinstance(model_or_config, DualEncoder) else model_or_config
    return tower_transform(config.image)
