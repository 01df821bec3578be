"""What the Hugging Face (CLIP, SigLIP) and OpenCLIP mappings share: a description of the vision
transformer a vlpt image tower holds (and the tower config that builds one), q|k|v split and join, the
renaming of transformer layers to and from transformers' encoder layers, the activation names of each
library, the tokenizer files an export writes, and the error for what a format cannot hold.

The towers themselves are built by their libraries (timm's VisionTransformer, transformers'
CLIPTextModel / SiglipTextModel); only the renaming of tensors is vlpt's own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlpt.config import ImageTowerConfig
from vlpt.models.image_towers import ImageTower

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's (and OpenCLIP's default) image normalisation
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# transformers' hidden_act -> vlpt.config.ACTIVATIONS (the inverse of vlpt.models.text_towers.HF_ACTIVATIONS).
# gelu_new is the tanh approximation written out (the same function as gelu_pytorch_tanh, rounded differently).
FROM_HF_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh",
                       "gelu_new": "gelu_tanh"}
# PIL's resampling codes (transformers' preprocessor_config.json "resample") <-> vlpt.config.INTERPOLATIONS
PIL_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}


class NotRepresentable(ValueError):
    """A vlpt model (or a checkpoint) holding something the other format has no place for; the message
    names it."""


def from_hf_activation(name: str, where: str) -> str:
    if name not in FROM_HF_ACTIVATIONS:
        raise NotRepresentable(f"{where}: activation {name!r} has no counterpart in vlpt's towers "
                               f"(supported: {', '.join(FROM_HF_ACTIVATIONS)})")
    return FROM_HF_ACTIVATIONS[name]


def split_qkv(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused in-projection (3C, ...) laid out [q; k; v] (timm's qkv, nn.MultiheadAttention's in_proj)."""
    q, k, v = weight.chunk(3, dim=0)
    return q, k, v


def join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.cat([q, k, v], dim=0)  # (3C, ...)


def layers_to_hf(state: dict[str, torch.Tensor], layers: int, block: str, qkv: str,
                 names: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """The ``layers`` pre-norm transformer layers of ``state`` (``{block}{i}.``, their fused q|k|v at
    ``{qkv}weight`` / ``{qkv}bias``, their other parts renamed by ``names``: (theirs, transformers') pairs) in
    transformers' CLIP / SigLIP encoder layer names (``encoder.layers.{i}.``, q|k|v apart)."""
    out = {}
    for i in range(layers):
        a, b = f"{block}{i}.", f"encoder.layers.{i}."
        for param in ("weight", "bias"):
            for x, part in zip("qkv", split_qkv(state[f"{a}{qkv}{param}"])):
                out[f"{b}self_attn.{x}_proj.{param}"] = part
            for theirs, hf_name in names:
                out[f"{b}{hf_name}.{param}"] = state[f"{a}{theirs}.{param}"]
    return out


def layers_from_hf(hf: dict[str, torch.Tensor], layers: int, block: str, qkv: str,
                   names: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """The inverse of ``layers_to_hf``."""
    out = {}
    for i in range(layers):
        a, b = f"{block}{i}.", f"encoder.layers.{i}."
        for param in ("weight", "bias"):
            out[f"{a}{qkv}{param}"] = join_qkv(*(hf[f"{b}self_attn.{x}_proj.{param}"] for x in "qkv"))
            for theirs, hf_name in names:
                out[f"{a}{theirs}.{param}"] = hf[f"{b}{hf_name}.{param}"]
    return out


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix``, without it."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def save_tokenizer(model, out: Path) -> None:
    """The model's tokenizer files into ``out``, with ``model_max_length`` its context length (so that
    ``truncation=True`` stops there)."""
    hf_tokenizer = model.tokenizer.hf
    saved_max = hf_tokenizer.model_max_length
    hf_tokenizer.model_max_length = model.config.text.context_length
    try:
        hf_tokenizer.save_pretrained(str(out))
    finally:
        hf_tokenizer.model_max_length = saved_max


def mlp_ratio_for(width: int, mlp_width: int) -> float:
    """The mlp_ratio for which timm's ``int(width * mlp_ratio)`` is exactly ``mlp_width``."""
    ratio = mlp_width / width
    return ratio if int(width * ratio) == mlp_width else (mlp_width + 0.5) / width


# ----------------------------------------------------------------------------- the vision transformer

@dataclass
class VitSpec:
    """A CLIP- or SigLIP-style vision transformer, in the terms every library uses."""
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_width: int
    activation: str  # vlpt.config.ACTIVATIONS
    eps: float  # LayerNorm epsilon
    class_token: bool  # CLIP: a class token with a position; SigLIP: none
    pool: str  # token (the class token) | map (attention pooling head, SigLIP) | avg (mean of the patch tokens)
    pre_norm: bool  # a LayerNorm before the blocks (CLIP's ln_pre / pre_layrnorm)
    patch_bias: bool  # the patch embedding has a bias (SigLIP) or not (CLIP)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def tower_config(self, **preprocessing) -> ImageTowerConfig:
        """The vlpt image tower (timm's VisionTransformer) with exactly this architecture."""
        if self.class_token != (self.pool == "token") and self.pool != "avg":
            raise NotRepresentable(f"a vision transformer pooled by {self.pool!r} with class_token={self.class_token}")
        if self.pre_norm == self.patch_bias:  # timm ties them: patch bias = not pre_norm
            raise NotRepresentable(f"a vision transformer with pre_norm={self.pre_norm} and patch_bias="
                                   f"{self.patch_bias} (timm builds the patch bias exactly when there is no pre-norm)")
        kwargs = dict(patch_size=self.patch_size, embed_dim=self.width, depth=self.layers, num_heads=self.heads,
                      mlp_ratio=mlp_ratio_for(self.width, self.mlp_width), pre_norm=self.pre_norm,
                      class_token=self.class_token, global_pool=self.pool, fc_norm=False)
        name = "siglip-vit" if self.pool == "map" else "clip-vit"
        return ImageTowerConfig(name=name, image_size=self.image_size, pool="timm", timm_kwargs=kwargs,
                                activation=self.activation, layer_norm_eps=self.eps, **preprocessing)


def _activation_name(act: nn.Module) -> str | None:
    name = type(act).__name__
    if name == "QuickGELU":
        return "quick_gelu"
    if name == "GELUTanh" or (name == "GELU" and getattr(act, "approximate", "none") == "tanh"):
        return "gelu_tanh"
    if name == "GELU" and getattr(act, "approximate", "none") == "none":
        return "gelu"
    return None


def vit_spec(tower: ImageTower, target: str) -> VitSpec:
    """The vision transformer a vlpt image tower holds; NotRepresentable naming what ``target`` (a format's
    name) has no place for: another architecture, vlpt's own pooling heads, register tokens, layer scale, ..."""
    from timm.layers import AttentionPoolLatent
    from timm.models.vision_transformer import VisionTransformer

    config, vit = tower.config, tower.backbone
    if type(vit) is not VisionTransformer:
        raise NotRepresentable(f"{target} has no counterpart of image tower {config.name!r} "
                               f"({type(vit).__name__}); it needs a vision transformer (e.g. model.image.name: "
                               f"clip-vit)")
    if config.pool != "timm":
        raise NotRepresentable(f"{target} has no counterpart of vlpt's {config.pool!r} pooling head on the image "
                               f"tower; it needs the vision transformer's own pooling (model.image.pool: timm)")
    problems = []
    if vit.reg_token is not None:
        problems.append("register tokens")
    if vit.no_embed_class:
        problems.append("a class token without a position embedding (no_embed_class)")
    if vit.pos_embed is None or vit.dynamic_img_size:
        problems.append("no learned position embedding of a fixed size")
    if not isinstance(vit.fc_norm, nn.Identity):
        problems.append("a LayerNorm after pooling (fc_norm)")
    if isinstance(vit.norm, nn.Identity):
        problems.append("no final LayerNorm")
    if vit.global_pool not in ("token", "map", "avg"):
        problems.append(f"global pooling {vit.global_pool!r}")
    if vit.attn_pool is not None and (type(vit.attn_pool) is not AttentionPoolLatent or vit.attn_pool.latent_len != 1
                                      or vit.attn_pool.pos_embed is not None
                                      or not isinstance(vit.attn_pool.q_norm, nn.Identity)):
        problems.append("an attention pooling head other than SigLIP's (one latent query)")
    if not isinstance(vit.patch_embed.norm, nn.Identity):
        problems.append("a LayerNorm on the patch embedding")
    block = vit.blocks[0]
    if type(block).__name__ != "Block" or not isinstance(block.ls1, nn.Identity) or \
            not isinstance(block.attn.q_norm, nn.Identity) or not isinstance(block.attn.norm, nn.Identity) or \
            not isinstance(block.mlp.norm, nn.Identity) or block.attn.qkv.bias is None:
        problems.append("blocks other than pre-norm attention + MLP with q|k|v bias (layer scale, q/k norm, ...)")
    activation = _activation_name(block.mlp.act)
    if activation is None:
        problems.append(f"MLP activation {type(block.mlp.act).__name__}")
    norms = [m for m in vit.modules() if isinstance(m, nn.LayerNorm)]
    if len({m.eps for m in norms}) > 1:
        problems.append("LayerNorms of different epsilons")
    height, width = vit.patch_embed.img_size
    patch = vit.patch_embed.patch_size
    if height != width or patch[0] != patch[1]:
        problems.append(f"a non-square image {height}x{width} or patch {patch}")
    elif height % patch[0]:
        problems.append(f"an image size {height} that is not a multiple of the patch size {patch[0]}")
    if problems:
        raise NotRepresentable(f"{target} cannot hold image tower {config.name!r}: " + "; ".join(problems))
    return VitSpec(image_size=height, patch_size=patch[0], width=vit.embed_dim, layers=len(vit.blocks),
                   heads=block.attn.num_heads, mlp_width=block.mlp.fc1.out_features, activation=activation,
                   eps=norms[0].eps, class_token=vit.cls_token is not None, pool=vit.global_pool,
                   pre_norm=not isinstance(vit.norm_pre, nn.Identity), patch_bias=vit.patch_embed.proj.bias is not None)


def check_pos_embed(rows: int, spec: VitSpec, where: str) -> None:
    """The position embedding's rows must fit the image size and patch size of the config."""
    expected = spec.grid ** 2 + (1 if spec.class_token else 0)
    if rows != expected:
        raise NotRepresentable(f"{where}: the position embedding has {rows} rows, but image size {spec.image_size} "
                               f"with patch {spec.patch_size} needs {expected} ({spec.grid}x{spec.grid} patches"
                               f"{' + the class token' if spec.class_token else ''}); the config and the weights "
                               f"do not belong together")
