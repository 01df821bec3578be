"""The entry points: create a model from a config, load a saved one, get its tokenizer and transform."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from vlpt.config import ModelConfig
from vlpt.data.transforms import image_transform as _image_transform
from vlpt.io import ModelLoadError
from vlpt.models.dual_encoder import CONFIG_NAME, DualEncoder, read_model_config
from vlpt.models.text_towers import resolve_pretrained
from vlpt.tokenization import Tokenizer, train_wordpiece


def get_tokenizer(config: ModelConfig | str | Path, corpus: Iterable[str] | None = None) -> Tokenizer:
    """The tokenizer of a saved model (folder), of a pretrained text tower, or one trained on ``corpus``."""
    if isinstance(config, (str, Path)):
        return load_model(config).tokenizer
    text = config.text
    if text.pretrained:
        from transformers import AutoTokenizer

        return Tokenizer(AutoTokenizer.from_pretrained(resolve_pretrained(text.pretrained)), text.context_length)
    if corpus is None:
        raise ValueError("a from-scratch text tower needs a caption corpus to train its tokenizer")
    return Tokenizer(train_wordpiece(corpus, text.vocab_size), text.context_length)


def create_model(config: ModelConfig, tokenizer: Tokenizer | None = None,
                 corpus: Iterable[str] | None = None, seed: int | None = 0) -> DualEncoder:
    """Build a dual encoder; a from-scratch text tower gets a WordPiece vocabulary trained on ``corpus``."""
    if tokenizer is None:
        tokenizer = get_tokenizer(config, corpus)
    if not config.text.pretrained:
        config.text.vocab_size = tokenizer.vocab_size
    if seed is not None:
        torch.manual_seed(seed)
    return DualEncoder(config, tokenizer)


def find_model_dir(path: str | Path) -> Path:
    """A model folder, or a run folder holding ``model/``."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / CONFIG_NAME).exists():
            return candidate
    raise FileNotFoundError(f"no vlpt model in {path} (expected {CONFIG_NAME} there or in {path / 'model'})")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> DualEncoder:
    """Load a model saved with ``save_pretrained`` (or the final model of a run folder)."""
    directory = find_model_dir(path)
    kind = read_model_config(directory).get("model_type")
    if kind == "vlpt-task":
        raise ModelLoadError(f"{path} holds a fine-tuned task model: load it with vlpt.load_task_model")
    if kind == "vlpt-captioner":
        raise ModelLoadError(f"{path} holds a captioner: load it with vlpt.models.load_captioner (its dual encoder "
                             f"is in the run's dual_encoder/ folder)")
    if kind is not None:
        raise ModelLoadError(f"{path} holds a {kind} model, not a dual encoder")
    return DualEncoder.from_pretrained(directory, device=device)


def load_task_model(path: str | Path, device: str | torch.device = "cpu"):
    """Load a fine-tuned task model (``vlpt finetune``: classify, match or vqa) from its folder or run."""
    from vlpt.models.task_model import TaskModel

    return TaskModel.from_pretrained(find_model_dir(path), device=device)


def image_transform(model_or_config: DualEncoder | ModelConfig):
    """The PIL -> tensor preprocessing that matches a model's image tower."""
    config = model_or_config.config if isinstance(model_or_config, DualEncoder) else model_or_config
    return _image_transform(config.image.image_size, config.image.mean, config.image.std)
