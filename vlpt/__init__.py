"""vlpt: vision-language pre-training, from a laptop CPU to torchrun clusters."""

from vlpt.config import ModelConfig, RunConfig, load_config
from vlpt.factory import (
           create_model,
           get_tokenizer,
           image_transform,
           load_model,
           load_task_model,
)
from vlpt.models.dual_encoder import DualEncoder

__all__ = ["DualEncoder", "ModelConfig", "RunConfig", "create_model", "get_tokenizer", "image_transform",
           "load_config", "load_model", "load_task_model"]
__version__ = "0.1.0"
