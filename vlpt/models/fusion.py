"""Multimodal fusion: combine an image and a text representation into one vector for the task heads.

Every method has one interface, chosen by name with ``create_fusion(FusionConfig(method=...))``:

    fused = fusion(image_embed, text_embed, image_tokens, text_tokens, text_mask)  # (B, fusion.out_dim)

- concat: [e_I, e_T]                                  (out_dim 2D)
- sum:    e_I + e_T                                   (out_dim D)
- gated:  σ(W_a [e_I, e_T]) · e_I + σ(W_b [e_I, e_T]) · e_T, vector gates   (out_dim D)
- cross:  ALBEF-style: text tokens self-attend and cross-attend to image tokens, which carry their grid
          position; each head also reads out where it looked, and the looks of the question's first
          and last words enter the output with opposite signs (out_dim cross_width)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlpt.config import FUSION_METHODS  # the names live in vlpt.config, which checks configs against them


@dataclass
class FusionConfig:
    method: str = "concat"  # concat | sum | gated | cross
    dim: int = 128  # width D of the embeddings e_I and e_T (the dual encoder's embed_dim)
    image_token_dim: int = 256  # width Ci of the image tower's tokens (cross only; resnet-tiny: 256)
    text_token_dim: int = 128  # width Ct of the text tower's tokens (cross only; its hidden_size)
    image_tokens: int = 0  # cross only: number of image tokens N; > 0 adds learned position embeddings to them
    cross_width: int = 128  # width of the cross-attention Transformer, and its out_dim
    cross_layers: int = 2  # blocks of (self-attention, cross-attention, MLP)
    cross_heads: int = 4  # attention heads; must divide cross_width
    cross_where: bool = True  # cross only, with image_tokens: each cross-attention head adds where it looked
    dropout: float = 0.0  # on the fused vector, and inside the cross-attention blocks


def create_fusion(config: FusionConfig) -> nn.Module:
    """The fusion module named by ``config.method``; it has ``forward(...) -> (B, out_dim)`` and ``out_dim``."""
    if config.method == "concat":
        return ConcatFusion(config)
    if config.method == "sum":
        return SumFusion(config)
    if config.method == "gated":
        return GatedFusion(config)
    if config.method == "cross":
        return CrossAttentionFusion(config)
    raise ValueError(f"unknown fusion method {config.method!r}; choose from {', '.join(FUSION_METHODS)}")


class ConcatFusion(nn.Module):
    """e = [e_I, e_T]."""

    def __init__(self, config: FusionConfig):
        super().__init__()
        self.out_dim = 2 * config.dim
        self.drop = nn.Dropout(config.dropout)

    def forward(self, image_embed: torch.Tensor, text_embed: torch.Tensor,
                image_tokens: torch.Tensor | None = None, text_tokens: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.drop(torch.cat([image_embed, text_embed], dim=-1))  # (B, 2D)


class SumFusion(nn.Module):
    """e = e_I + e_T: no parameters; relies on both embeddings living in the same (contrastive) space."""

    def __init__(self, config: FusionConfig):
        super().__init__()
        self.out_dim = config.dim
        self.drop = nn.Dropout(config.dropout)

    def forward(self, image_embed: torch.Tensor, text_embed: torch.Tensor,
                image_tokens: torch.Tensor | None = None, text_tokens: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.drop(image_embed + text_embed)  # (B, D)


class GatedFusion(nn.Module):
    """a = σ(W_a [e_I, e_T]), b = σ(W_b [e_I, e_T]), e = a·e_I + b·e_T: each pair decides, per
    dimension, how much of each modality to keep (gated multimodal unit, Arevalo et al. 2017)."""

    def __init__(self, config: FusionConfig):
        super().__init__()
        self.out_dim = config.dim
        self.gate_image = nn.Linear(2 * config.dim, config.dim)  # W_a, b_a
        self.gate_text = nn.Linear(2 * config.dim, config.dim)  # W_b, b_b
        self.drop = nn.Dropout(config.dropout)

    def forward(self, image_embed: torch.Tensor, text_embed: torch.Tensor,
                image_tokens: torch.Tensor | None = None, text_tokens: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        both = torch.cat([image_embed, text_embed], dim=-1)  # (B, 2D)
        a = torch.sigmoid(self.gate_image(both))  # (B, D)
        b = torch.sigmoid(self.gate_text(both))  # (B, D)
        return self.drop(a * image_embed + b * text_embed)  # (B, D)


# ----------------------------------------------------------------------------- cross-attention (ALBEF)

def grid_positions(num_tokens: int, width: int) -> torch.Tensor:
    """(1, N, W) position codes: 2-D sine-cosine of (row, column) when N is a square (half the channels
    each, as in MAE), else 1-D over the token index; unit RMS."""
    side = math.isqrt(num_tokens)
    if side * side == num_tokens and width % 4 == 0:
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        code = torch.cat([_sincos(rows.flatten(), width // 2), _sincos(cols.flatten(), width // 2)], dim=1)
    else:
        code = _sincos(torch.arange(num_tokens), width)
    return (code / code.pow(2).mean().sqrt())[None]


def grid_coords(num_tokens: int) -> torch.Tensor:
    """(N, 2) (row, column) of each token in [-1, 1]: a square grid, else (index, 0) along one line."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        return torch.stack([torch.linspace(-1, 1, num_tokens), torch.zeros(num_tokens)], dim=1)
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=1)


def _sincos(position: torch.Tensor, width: int) -> torch.Tensor:
    """(N, width) sine and cosine of ``position`` at ``width // 2`` frequencies (Transformer style)."""
    half = width // 2
    frequency = 1.0 / 100.0 ** (torch.arange(half, dtype=torch.float32) / max(half, 1))
    angle = position.float()[:, None] * frequency[None]
    code = torch.cat([angle.sin(), angle.cos()], dim=1)
    return F.pad(code, (0, width - code.shape[1]))


class Attention(nn.Module):
    """Multi-head attention of queries x over a context (x itself for self-attention). With ``where``, each
    head also reports where it looked: the attention-weighted coordinates of the context tokens, projected and
    added to the output, so "where is the red circle?" and "is it above the star?" read positions directly."""

    def __init__(self, width: int, num_heads: int, dropout: float = 0.0, where: bool = False,
                 relative: bool = False):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"cross_heads ({num_heads}) must divide cross_width ({width})")
        self.num_heads = num_heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.where = nn.Linear(2 * num_heads, width) if where else None
        self.where_relative = nn.Linear(2 * num_heads, width, bias=False) if where and relative else None
        self.dropout = dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x (B, L, W), context (B, S, W), mask (B, S) bool: True for keys that may be attended to -> (B, L, W)."""
        return self.attend(x, context, mask)[0]

    def attend(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
               coords: torch.Tensor | None = None, origin: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward``, and where each head looked. x (B, L, W), context (B, S, W), mask (B, S);
        coords (S, 2): each context token's (row, column) in [-1, 1] (read when built with ``where``);
        origin (B, L, h, 2): where each head looked in an earlier block (read when built ``relative``).
        Returns the output (B, L, W) and where each head looked (B, L, h, 2), None without ``where``."""
        context = x if context is None else context
        B, L, W = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, L, h, W // h).transpose(1, 2)  # (B, h, L, W/h)
        k, v = self.kv(context).chunk(2, dim=-1)  # (B, S, W) each
        k, v = (t.reshape(B, -1, h, W // h).transpose(1, 2) for t in (k, v))  # (B, h, S, W/h)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, S), broadcast over heads and queries
        if self.where is None or coords is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                               dropout_p=self.dropout if self.training else 0.0)  # (B, h, L, W/h)
            return self.out(y.transpose(1, 2).reshape(B, L, W)), None  # (B, L, W)
        scores = q @ k.transpose(-1, -2) / math.sqrt(W // h)  # (B, h, L, S)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        weights = scores.softmax(-1)
        y = F.dropout(weights, self.dropout, self.training) @ v  # (B, h, L, W/h)
        looked = (weights @ coords.to(weights.dtype)).transpose(1, 2)  # (B, L, h, 2)
        out = self.out(y.transpose(1, 2).reshape(B, L, W)) + self.where(looked.reshape(B, L, 2 * h))
        if self.where_relative is not None and origin is not None:  # "is it above what I found before?"
            out = out + self.where_relative((looked - origin).reshape(B, L, 2 * h))
        return out, looked  # (B, L, W), (B, L, h, 2)


class CrossBlock(nn.Module):
    """Pre-LayerNorm block: self-attention over text, cross-attention text -> image, MLP; each residual."""

    def __init__(self, width: int, num_heads: int, dropout: float = 0.0, where: bool = False,
                 relative: bool = False):
        super().__init__()
        self.ln_self = nn.LayerNorm(width)
        self.self_attn = Attention(width, num_heads, dropout)
        self.ln_cross = nn.LayerNorm(width)
        self.cross_attn = Attention(width, num_heads, dropout, where, relative)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, text: torch.Tensor, image: torch.Tensor, text_mask: torch.Tensor,
                image_coords: torch.Tensor | None = None, origin: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text tokens after the block (B, L, W), and where its cross-attention looked (see Attention)."""
        text = text + self.drop(self.self_attn(self.ln_self(text), mask=text_mask))  # (B, L, W)
        seen, looked = self.cross_attn.attend(self.ln_cross(text), image, coords=image_coords, origin=origin)
        text = text + self.drop(seen)  # (B, L, W)
        return text + self.drop(self.mlp(self.ln_mlp(text))), looked  # (B, L, W)


class CrossAttentionFusion(nn.Module):
    """ALBEF's fusion encoder, small: text tokens attend to each other and to the image tokens.

    The embeddings e_T and e_I enter as one extra token each, a [CLS]-like first text token and an
    extra image token, so the global (contrastively trained) summaries are available to every layer.
    The output is the mask-weighted mean of the output text tokens (the first token included).
    """

    def __init__(self, config: FusionConfig):
        super().__init__()
        width = config.cross_width
        self.text_in = nn.Linear(config.text_token_dim, width)  # (B, L, Ct) -> (B, L, W)
        self.image_in = nn.Linear(config.image_token_dim, width)  # (B, N, Ci) -> (B, N, W)
        # Where each image token sits (a CNN's feature map carries little of it; position and relation questions
        # need it): learned, started at a 2-D sine-cosine code of the token's (row, column) when the tokens form a
        # square grid, at unit scale like the normalised tokens it is added to (a small random start drowns).
        self.image_norm = nn.LayerNorm(width)
        self.image_pos = nn.Parameter(grid_positions(config.image_tokens, width)) if config.image_tokens else None
        self.text_embed_in = nn.Linear(config.dim, width)
        self.image_embed_in = nn.Linear(config.dim, width)
        where = config.cross_where and config.image_tokens > 0
        self.blocks = nn.ModuleList(CrossBlock(width, config.cross_heads, config.dropout, where, relative=k > 0)
                                    for k in range(config.cross_layers))
        # (row, column) in [-1, 1] of the global image token (the centre) and of each image token
        self.register_buffer("image_coords", torch.cat([torch.zeros(1, 2), grid_coords(config.image_tokens)])
                             if where else None, persistent=False)
        self.ln_f = nn.LayerNorm(width)
        # Order-signed where: each block's looks, weighted by where the looking token stands in the text (-1 first
        # ... +1 last) and averaged. "Is the red circle above the star?" then reads (star's place - circle's place)
        # off one linear feature, where a plain average of the two places would hold no hint of which is which.
        self.signed_where = nn.Linear(2 * config.cross_heads * config.cross_layers, width) if where else None
        self.out_dim = width
        self.drop = nn.Dropout(config.dropout)
        self.token_dims = (config.image_token_dim, config.text_token_dim)

    def forward(self, image_embed: torch.Tensor, text_embed: torch.Tensor,
                image_tokens: torch.Tensor | None = None, text_tokens: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, text_pivot: torch.Tensor | None = None) -> torch.Tensor:
        """text_pivot (B,): index of the text token the order-signed where counts around (-1 before it, +1 after);
        -1 (or None) counts from the question's ends."""
        if image_tokens is None or text_tokens is None:
            raise ValueError("cross fusion needs image_tokens (B, N, Ci) and text_tokens (B, L, Ct): pass the "
                             "towers' forward_features tokens, or use the concat | sum | gated methods")
        if (image_tokens.shape[-1], text_tokens.shape[-1]) != self.token_dims:
            raise ValueError(f"cross fusion was built for token widths (image, text) = {self.token_dims}, "
                             f"got {(image_tokens.shape[-1], text_tokens.shape[-1])}; set "
                             f"FusionConfig.image_token_dim / text_token_dim to the towers' widths")
        B, L, _ = text_tokens.shape
        if text_mask is None:
            text_mask = torch.ones(B, L, dtype=torch.bool, device=text_tokens.device)
        first = torch.ones(B, 1, dtype=torch.bool, device=text_tokens.device)
        mask = torch.cat([first, text_mask.bool()], dim=1)  # (B, 1+L); the first token is never masked
        text = torch.cat([self.text_embed_in(text_embed)[:, None], self.text_in(text_tokens)], dim=1)  # (B, 1+L, W)
        image_tokens = self.image_norm(self.image_in(image_tokens))  # (B, N, W)
        if self.image_pos is not None:
            if image_tokens.shape[1] != self.image_pos.shape[1]:
                raise ValueError(f"cross fusion was built for {self.image_pos.shape[1]} image tokens, "
                                 f"got {image_tokens.shape[1]}")
            image_tokens = image_tokens + self.image_pos
        image = torch.cat([self.image_embed_in(image_embed)[:, None], image_tokens], dim=1)  # (B, 1+N, W)
        looks, looked = [], None
        for block in self.blocks:  # later blocks also see positions relative to the previous block's look
            text, looked = block(text, image, mask, self.image_coords, looked)  # (B, 1+L, W)
            looks.append(looked)
        text = self.ln_f(text)
        weights = mask.unsqueeze(-1).to(text.dtype)  # (B, 1+L, 1)
        pooled = (text * weights).sum(1) / weights.sum(1)  # (B, W); padded tokens drop out here too
        if self.signed_where is not None:
            index = weights.cumsum(1) - 1  # (B, 1+L, 1): 0 .. length-1 over the real tokens
            order = 2 * index / (weights.sum(1, keepdim=True) - 1).clamp_min(1) - 1  # -1 (first) .. +1 (last)
            if text_pivot is not None:  # the first token (the text embedding) stands before any pivot
                pivot = text_pivot[:, None, None]  # (B, 1, 1)
                place = torch.arange(1 + L, device=text.device)[None, :, None]  # (1, 1+L, 1)
                order = torch.where(pivot >= 0, torch.sign(place - 1 - pivot).to(order.dtype), order)
            looked = torch.cat(looks, dim=2).flatten(2)  # (B, 1+L, 2 h layers)
            pooled = pooled + self.signed_where((looked * order * weights).sum(1) / weights.sum(1))
        return self.drop(pooled)

