"""Image captioning: an autoregressive Transformer decoder that cross-attends to the image tower's tokens.

The captioner wraps a dual encoder and reads its image tower's token-level features (B, N, C):

    images -> image_tower.forward_features -> tokens (B, N, C) -> image_in (+ positions) -> (B, N, W)
    [CLS] w1 w2 ... -> token + position embeddings -> blocks (causal self-attention, cross-attention
    to the image, MLP) -> tied output head -> next-token logits (B, T, V)

Two ways to train it (``vlpt.train.caption``): CoCa-style, the towers and the decoder together with
contrastive + captioning losses; or on top of a frozen pre-trained dual encoder (its towers locked,
image features computed without gradients), where only the decoder learns.
The tokenizer is the dual encoder's: [CLS] starts a caption, [SEP] ends it, [PAD] fills after.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vlpt.config import CaptionerConfig
from vlpt.data.transforms import images_as_batch, tower_transform
from vlpt.models.decoding import DecodingConfig, beam_search, greedy_search, sample
from vlpt.models.dual_encoder import BuiltOnEncoder, DualEncoder, find_model_dir
from vlpt.models.fusion import Attention

__all__ = ["CaptionDecoder", "Captioner", "CaptionerConfig", "DecodingConfig", "load_captioner"]

MODEL_TYPE = "vlpt-captioner"  # config.json's "model_type": tells a captioner folder from a dual encoder's

_BEFORE_PUNCT = re.compile(r"\s+([,.:;!?])")
_HYPHEN = re.compile(r"(\w) - (\w)")

ImagesLike = torch.Tensor | np.ndarray | Sequence[Image.Image | str | Path]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t only."""

    def __init__(self, width: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"caption decoder heads ({num_heads}) must divide its width ({width})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, W = x.shape
        h = self.num_heads
        q, k, v = (t.reshape(B, T, h, W // h).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))  # (B, h, T, W/h)
        # Right padding needs no mask: a real token never attends to the padding after it.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, h, T, W/h)
        return self.out(y.transpose(1, 2).reshape(B, T, W))  # (B, T, W)


class DecoderBlock(nn.Module):
    """Pre-LayerNorm: causal self-attention, cross-attention to the image tokens, MLP; each residual."""

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        width = config.width
        self.ln_self = nn.LayerNorm(width)
        self.self_attn = CausalSelfAttention(width, config.heads, config.dropout)
        self.ln_cross = nn.LayerNorm(width)
        self.cross_attn = Attention(width, config.heads, config.dropout)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, config.mlp_ratio * width), nn.GELU(),
                                 nn.Linear(config.mlp_ratio * width, width))
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.self_attn(self.ln_self(x)))  # (B, T, W)
        x = x + self.drop(self.cross_attn(self.ln_cross(x), context=image))  # (B, T, W)
        return x + self.drop(self.mlp(self.ln_mlp(x)))  # (B, T, W)


class CaptionDecoder(nn.Module):
    """Token ids (B, T) + image tokens (B, N, C) -> next-token logits (B, T, V)."""

    def __init__(self, config: CaptionerConfig, image_dim: int, num_image_tokens: int):
        super().__init__()
        if config.vocab_size < 1:
            raise ValueError("CaptionerConfig.vocab_size is not set; build the decoder through Captioner")
        self.config = config
        W = config.width
        self.token_embed = nn.Embedding(config.vocab_size, W)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.max_length, W))
        # CNN tokens carry no explicit position; captions name positions ("in the top left").
        self.image_in = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, W))  # (B, N, C) -> (B, N, W)
        self.image_pos = nn.Parameter(torch.zeros(1, num_image_tokens, W))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(W)
        self.apply(_init_weights)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.image_pos, std=0.02)

    def encode_image(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """The image tower's tokens (B, N, C) as the decoder's cross-attention context (B, N, W)."""
        return self.image_in(image_tokens) + self.image_pos  # (B, N, W)

    def forward(self, input_ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) starting with [CLS]; image (B, N, W) from ``encode_image``."""
        T = input_ids.shape[1]
        if T > self.config.max_length:
            raise ValueError(f"{T} tokens exceed the caption decoder's max_length ({self.config.max_length})")
        x = self.drop(self.token_embed(input_ids) + self.pos_embed[:, :T])  # (B, T, W)
        for block in self.blocks:
            x = block(x, image)  # (B, T, W)
        x = self.ln_f(x)
        return F.linear(x, self.token_embed.weight)  # (B, T, V), output head tied to the input embedding


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class Captioner(BuiltOnEncoder, nn.Module):
    """A dual encoder plus a caption decoder that reads its image tower's tokens.

    With the dual encoder's image tower locked (``dual_encoder.lock_towers(image=True, ...)``), image
    features are computed without gradients and only the decoder trains (captioning on a frozen
    pre-trained encoder); otherwise gradients reach the tower (CoCa / captioning from scratch).
    """

    MODEL_TYPE = MODEL_TYPE  # save / load (BuiltOnEncoder): config.json's model_type and section
    CONFIG_SECTION = "captioner"
    CONFIG_CLASS = CaptionerConfig
    DESCRIPTION = "a captioner; train one with train.task=caption or coca"

    def __init__(self, config: CaptionerConfig, dual_encoder: DualEncoder):
        super().__init__()
        tokenizer = dual_encoder.tokenizer
        if tokenizer is None:
            raise ValueError("the captioner needs the dual encoder's tokenizer (it has none)")
        config = copy.deepcopy(config)
        if config.vocab_size and config.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"CaptionerConfig.vocab_size {config.vocab_size} does not match the tokenizer's "
                             f"{tokenizer.vocab_size} tokens")
        config.vocab_size = tokenizer.vocab_size
        if config.max_length < tokenizer.context_length:
            raise ValueError(f"caption max_length ({config.max_length}) must be at least the tokenizer's "
                             f"context_length ({tokenizer.context_length}), or training captions would not fit")
        self.config = config
        self.dual_encoder = dual_encoder
        self.tokenizer = tokenizer
        hf = tokenizer.hf
        self.bos_id, self.eos_id, self.pad_id = hf.cls_token_id, hf.sep_token_id, hf.pad_token_id  # [CLS] [SEP] [PAD]
        if self.bos_id is None or self.eos_id is None:  # BPE tokenizers (CLIP's): <|startoftext|>, <|endoftext|>
            self.bos_id, self.eos_id = hf.bos_token_id, hf.eos_token_id
        if self.pad_id is None or self.pad_id == self.eos_id:
            # CLIP's tokenizer pads with its end-of-text token: the first one must stay a target (the loss
            # ignores pad_id), and decoding pads with pad_id after it; id 0 is what OpenCLIP pads with
            self.pad_id = next(i for i in range(hf.vocab_size) if i not in (self.bos_id, self.eos_id))
        tower = dual_encoder.image_tower
        self.decoder = CaptionDecoder(config, image_dim=tower.width, num_image_tokens=tower.num_tokens)

    @property
    def frozen(self) -> bool:
        """True when the image tower is locked: its features are computed without gradients."""
        return self.dual_encoder.config.image.locked

    # ------------------------------------------------------------------ training
    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image tower's (tokens (B, N, C), pooled (B, C')); no gradients when the tower is locked."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.dual_encoder.image_tower.forward_features(images)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                contrastive: bool = False) -> dict[str, torch.Tensor]:
        """Teacher forcing: ``logits`` (B, T-1, V) predict input_ids[:, 1:] from input_ids[:, :-1].

        With ``contrastive`` (CoCa), the same image forward pass also gives the dual encoder's outputs
        (image_features, text_features, logit_scale, logit_bias) for the contrastive loss.
        """
        tokens, pooled = self.encode_image_tokens(images)  # (B, N, C), (B, C')
        out = {"logits": self.decoder(input_ids[:, :-1], self.decoder.encode_image(tokens))}  # (B, T-1, V)
        if contrastive:
            dual = self.dual_encoder
            if attention_mask is None:
                raise ValueError("the contrastive outputs need the captions' attention_mask")
            out["image_features"] = F.normalize(dual.image_proj(pooled), dim=-1)  # (B, D)
            out["text_features"] = dual.encode_text({"input_ids": input_ids, "attention_mask": attention_mask})
            out["logit_scale"] = dual.logit_scale.clamp(0, dual.config.max_logit_scale).exp()
            out["logit_bias"] = dual.logit_bias
        return out

    # ------------------------------------------------------------------ decoding
    def prepare_images(self, images: ImagesLike) -> torch.Tensor:
        """uint8 (B, H, W, 3) / float normalised (B, 3, H, W) tensors or arrays pass through; PIL images and
        file paths are loaded (an unreadable file is named in the error) and preprocessed for the tower."""
        image = self.dual_encoder.config.image
        return images_as_batch(images, transform=tower_transform(image))

    @torch.inference_mode()
    def generate(self, images: torch.Tensor, decoding: DecodingConfig) -> torch.Tensor:
        """Token ids (B, L) of one caption per image (no [CLS]; [SEP] then [PAD] after the end)."""
        limit = self.config.max_length
        max_length = decoding.max_length or limit
        if max_length > limit:
            raise ValueError(f"max_length must be between 1 and {limit} (the caption decoder's positions), "
                             f"got {max_length}")
        device = self.decoder.pos_embed.device
        images = images.to(device)
        tokens, _ = self.encode_image_tokens(images)
        context = self.decoder.encode_image(tokens)  # (B, N, W), computed once for all steps

        def logits_fn(ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return self.decoder(ids, context[rows])[:, -1]  # (R, V): the next token only

        common = {"batch_size": len(images), "bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id,
                  "max_length": max_length, "device": device}
        if decoding.strategy == "greedy":
            return greedy_search(logits_fn, **common)
        if decoding.strategy == "beam":
            return beam_search(logits_fn, beam=decoding.beam, length_penalty=decoding.length_penalty, **common)
        generator = torch.Generator(device).manual_seed(decoding.seed)
        return sample(logits_fn, temperature=decoding.temperature, top_k=decoding.top_k, top_p=decoding.top_p,
                      generator=generator, **common)

    def generate_caption(self, images: ImagesLike, decoding: DecodingConfig | None = None, **options) -> list[str]:
        """One caption per image. ``options`` override ``decoding`` fields, e.g.
        ``generate_caption(images, strategy="beam", beam=3)`` or ``strategy="sample", top_p=0.9, seed=1``."""
        decoding = decoding or DecodingConfig()
        if options:
            valid = {f.name for f in dataclasses.fields(DecodingConfig)}
            unknown = sorted(set(options) - valid)
            if unknown:
                raise ValueError(f"unknown decoding option(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
            decoding = dataclasses.replace(decoding, **options)  # re-validated by __post_init__
        pixels = self.prepare_images(images)
        was_training = self.training
        self.eval()
        try:
            captions: list[str] = []
            for chunk, start in enumerate(range(0, len(pixels), decoding.batch_size)):
                # Each chunk gets its own stream, so captions do not depend on earlier chunks' lengths.
                chunk_decoding = dataclasses.replace(decoding, seed=decoding.seed + chunk)
                ids = self.generate(pixels[start:start + decoding.batch_size], chunk_decoding)
                captions += self.decode_ids(ids)
        finally:
            self.train(was_training)
        return captions

    def decode_ids(self, ids: torch.Tensor) -> list[str]:
        """Token ids (B, L) -> strings, stopping at [SEP]."""
        texts = []
        for row in ids.tolist():
            if self.eos_id in row:
                row = row[:row.index(self.eos_id)]
            text = self.tokenizer.decode(row).strip()
            # WordPiece decoding spaces out punctuation ("shapes : a", "hand - written"); undo it for reading.
            texts.append(_HYPHEN.sub(r"\1-\2", _BEFORE_PUNCT.sub(r"\1", text)))
        return texts


def load_captioner(path: str | Path, device: str | torch.device = "cpu") -> Captioner:
    """A captioner saved with ``save_pretrained``, or the final model of a caption/coca run folder."""
    return Captioner.from_pretrained(find_model_dir(path), device=device)
