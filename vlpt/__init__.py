"""vlpt: vision-language pre-training, from a laptop CPU to torchrun clusters."""

from vlpt.config import ModelConfig, RunConfig, load_config
from vlpt.factory import (
    create_model,
    get_tokenizer,
    image_transform,
    load,
    load_captioner,
    load_dual_encoder,
    load_generator,
    load_model,
    load_task_model,
)
from vlpt.models.dual_encoder import DualEncoder
from vlpt.serve.client import Client
from vlpt.tasks import TaskSpec, register_task

__all__ = ["Client", "DualEncoder", "ModelConfig", "RunConfig", "TaskSpec", "create_model", "get_tokenizer", "image_transform",
           "load", "load_captioner", "load_config", "load_dual_encoder", "load_generator", "load_model",
           "load_task_model", "register_task"]
__version__ = "0.1.0"
