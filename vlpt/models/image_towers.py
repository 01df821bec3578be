"""Image towers: any timm model by name (or a tiny vlpt preset), exposing token-level features and a
pooled vector, projected into the shared embedding space by the dual encoder."""

from __future__ import annotations

import logging
from typing import Any

import timm
import torch
import torch.fx
import torch.nn.functional as F
from timm.layers.attention import Attention as TimmAttention
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from vlpt.config import IMAGE_POOLS, PACKAGE_PREPROCESSING, ImageTowerConfig
from vlpt.models.pretrained_weights import PACKAGE_WEIGHTS, load_package_weights

log = logging.getLogger(__name__)

# Tiny CPU presets: (timm architecture, keyword overrides). Plain data, not registered into timm.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    # output_stride 16: a 4x4 feature map at 64 px, so positions survive to the pooling layer.
    "resnet-tiny": ("resnet18", dict(layers=(1, 1, 1, 1), channels=(32, 64, 128, 256), stem_width=32,
                                     output_stride=16)),
    # CLIP's ModifiedResNet at its smallest, as timm builds it: bottleneck blocks, a 3-conv stem and average-pool
    # downsampling (resnet50d), width 16 (512 output channels), 0.5 M parameters. On the shapes world it keeps
    # colour-shape binding and places far better than resnet-tiny (docs/results.md, validation scenes).
    "resnetd-tiny": ("resnet50d", dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_width=8,
                                       output_stride=16)),
    "resnet-small": ("resnet18", dict(layers=(2, 2, 2, 2), channels=(64, 128, 256, 512), stem_width=32,
                                      output_stride=16)),
    "vit-tiny": ("vit_tiny_patch16_224", dict(patch_size=8, embed_dim=192, depth=4, num_heads=3)),
    "vit-small": ("vit_tiny_patch16_224", dict(patch_size=8, embed_dim=256, depth=4, num_heads=4)),
    # The vision transformers of CLIP and SigLIP, as timm builds them, at vit-tiny's size by default
    # (timm_kwargs sets another; an imported HF / OpenCLIP model sets its own). Pool them with `pool: timm`.
    # CLIP: LayerNorm before the blocks, class token after the final LayerNorm, no patch bias.
    "clip-vit": ("vit_base_patch16_clip_224", dict(patch_size=8, embed_dim=192, depth=4, num_heads=3, pre_norm=True,
                                                   class_token=True, global_pool="token", fc_norm=False)),
    # SigLIP: no class token, multi-head attention pooling (MAP) after the final LayerNorm.
    "siglip-vit": ("vit_base_patch16_siglip_224", dict(patch_size=8, embed_dim=192, depth=4, num_heads=3,
                                                       class_token=False, global_pool="map", fc_norm=False)),
}
POOLS = IMAGE_POOLS  # the names live in vlpt.config, which checks configs against them


def list_image_towers() -> list[str]:
    """vlpt presets; any name from ``timm.list_models()`` works too."""
    return sorted(PRESETS)


def create_backbone(config: ImageTowerConfig, load_pretrained_weights: bool = True) -> nn.Module:
    """The timm model of ``config`` without its classifier. ``pretrained: true`` loads its weights (unless
    ``load_pretrained_weights`` is False: a saved model's own weights replace them): from a package for the
    architectures of ``PACKAGE_WEIGHTS`` (offline), else timm's own."""
    arch, kwargs = PRESETS.get(config.name, (config.name, {}))
    kwargs = {**kwargs, **config.timm_kwargs}
    if not timm.is_model(arch):
        raise ValueError(f"unknown image tower {config.name!r}; vlpt presets: {', '.join(list_image_towers())}, "
                         f"or any timm model name (timm.list_models())")
    if "vit" in arch or "deit" in arch:
        kwargs.setdefault("img_size", config.image_size)
    if config.activation is not None:
        kwargs["act_layer"] = config.activation  # timm knows gelu, quick_gelu and gelu_tanh by these names
    from_package = config.pretrained and config.name in PACKAGE_WEIGHTS  # not through a preset's overrides
    from_timm = config.pretrained and load_pretrained_weights and not from_package
    try:
        backbone = timm.create_model(arch, pretrained=from_timm, num_classes=0, **kwargs)
    except TypeError as err:  # a keyword this timm architecture does not take
        raise ValueError(f"image tower {config.name!r} ({arch}): {err}") from err
    if from_package and load_pretrained_weights:
        load_package_weights(backbone, config.name)
        own = PACKAGE_PREPROCESSING[config.name]
        if (tuple(config.mean), tuple(config.std)) != (own["mean"], own["std"]):
            log.warning("image tower %s: its pretrained weights were trained on inputs normalised with mean %s, "
                        "std %s; this config normalises with mean %s, std %s", config.name, own["mean"], own["std"],
                        tuple(config.mean), tuple(config.std))
    if config.layer_norm_eps is not None:
        for module in backbone.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = config.layer_norm_eps
    return backbone


def class_token_only_ok(backbone: nn.Module, pool: str) -> bool:
    """True when the pooled output is a timm ViT's class token after plain pre-norm blocks, so the
    last block can run for the class token alone (``vit_class_token``)."""
    if pool != "timm" or type(backbone) is not VisionTransformer:
        return False
    if backbone.cls_token is None or backbone.global_pool != "token" or backbone.attn_pool is not None:
        return False
    if len(backbone.blocks) == 0 or getattr(backbone, "pos_embed", None) is None:
        return False
    last = backbone.blocks[-1]
    return type(last) is TimmBlock and type(last.attn) is TimmAttention


def block_class_token(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A timm pre-norm ``Block`` computed for token 0 only: (B, N, C) -> (B, 1, C).

    Keys and values still come from every token; the query, attention output, MLP and residuals
    only for the class token. Equals ``block(x)[:, :1]``; the other tokens' outputs are never needed
    when only the class token is pooled (1/N of the block's query, projection and MLP work)."""
    attn = block.attn
    B, N, _ = x.shape
    A, h, d = attn.attn_dim, attn.num_heads, attn.head_dim
    y = block.norm1(x)  # (B, N, C)
    weight, bias = attn.qkv.weight, attn.qkv.bias  # (3A, C), (3A,)
    kv = F.linear(y, weight[A:], None if bias is None else bias[A:])  # (B, N, 2A)
    k, v = kv.reshape(B, N, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, d) each
    q = F.linear(y[:, :1], weight[:A], None if bias is None else bias[:A])  # (B, 1, A)
    q = q.reshape(B, 1, h, d).transpose(1, 2)  # (B, h, 1, d)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0,
                                         scale=attn.scale)  # (B, h, 1, d)
    out = attn.norm(out.transpose(1, 2).reshape(B, 1, A))  # (B, 1, A)
    if attn.gate is not None:
        out = out * attn.gate(y[:, :1]).sigmoid()
    out = attn.proj_drop(attn.proj(out))  # (B, 1, C)
    x = x[:, :1] + block.drop_path1(block.ls1(out))  # (B, 1, C)
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def vit_class_token(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``backbone.forward_head(backbone.forward_features(images), pre_logits=True)`` for a timm ViT
    pooled by its class token (see ``class_token_only_ok``), with the last block and the final norm
    computed for the class token only. (B, 3, H, W) -> (B, C)."""
    x = backbone.patch_embed(images)
    x = backbone._pos_embed(x)
    x = backbone.norm_pre(backbone.patch_drop(x))  # (B, N, C)
    if backbone.grad_checkpointing and torch.is_grad_enabled():
        x = checkpoint_seq(backbone.blocks[:-1], x)
    else:
        x = backbone.blocks[:-1](x)
    x = backbone.norm(block_class_token(backbone.blocks[-1], x))  # (B, 1, C)
    return backbone.head_drop(backbone.fc_norm(x[:, 0]))  # (B, C)


class _ThroughBlocks(torch.fx.Tracer):
    """Traces into modules that hold others (blocks, stages) and keeps childless ones (a conv, a norm, timm's
    same-padding pool, whose shape arithmetic fx cannot trace) as single calls."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return next(module.children(), None) is None


class _Features(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(images)


def fold_batch_norms(backbone: nn.Module) -> int:
    """Folds every BatchNorm2d that reads a Conv2d's output (and is that output's only reader) into the conv's
    weight and bias, in place, and returns how many: in eval mode the same function with one pass less over
    each activation (a small ResNet encodes ~1.3x faster on a CPU). For inference only: the folded module has
    no batch statistics left to train. A backbone torch.fx cannot trace is left as it is (0)."""
    try:
        graph = _ThroughBlocks().trace(_Features(backbone))
    except Exception:  # noqa: BLE001 - any untraceable Python in a backbone: nothing is folded
        return 0
    modules = dict(backbone.named_modules())

    def name_of(node) -> str | None:  # a module call's name in the backbone (traced ones start "backbone.")
        if isinstance(node, torch.fx.Node) and node.op == "call_module":
            return node.target.removeprefix("backbone.")
        return None

    folded = 0
    for node in graph.nodes:
        norm_name = name_of(node)
        conv_name = name_of(node.args[0]) if norm_name and node.args else None
        norm, conv = modules.get(norm_name), modules.get(conv_name)
        if (isinstance(norm, nn.BatchNorm2d) and not norm.training and isinstance(conv, nn.Conv2d)
                and len(node.args[0].users) == 1):
            backbone.set_submodule(conv_name, fuse_conv_bn_eval(conv, norm))
            backbone.set_submodule(norm_name, nn.Identity())
            folded += 1
    return folded


def to_tokens(features: torch.Tensor) -> torch.Tensor:
    """CNN feature maps (B, C, H, W) become tokens (B, H*W, C); ViT tokens pass through."""
    return features.flatten(2).transpose(1, 2) if features.ndim == 4 else features


class AttentionPool(nn.Module):
    """One learned query attends over all tokens (with learned positions), as CLIP's ResNet head."""

    def __init__(self, width: int, num_tokens: int, num_heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, width) * width ** -0.5)
        self.pos = nn.Parameter(torch.randn(1, num_tokens, width) * 0.02)
        self.norm = nn.LayerNorm(width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.num_heads = num_heads

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Attention of the one query over the tokens, without projecting every token to a key and a value:
        with a single query, q.(W_k x + b_k) = (W_k^T q).x + const (the constant drops out of the softmax), and
        sum_n a_n (W_v x_n + b_v) = W_v (sum_n a_n x_n) + b_v. Same result as projecting all N tokens (the
        straightforward form, kept in tests), for about 1/N of the work: a third of a small ResNet's time."""
        B, N, C = tokens.shape
        h = self.num_heads
        x = self.norm(tokens + self.pos)  # (B, N, C)
        w_k, w_v = (w.reshape(h, C // h, C) for w in self.kv.weight.chunk(2, dim=0))  # (h, C/h, C) each
        b_v = self.kv.bias.chunk(2)[1].reshape(h, C // h)
        key = torch.einsum("hd,hdc->hc", self.query.reshape(h, C // h), w_k) * (C // h) ** -0.5  # (h, C)
        weights = torch.einsum("bnc,hc->bhn", x, key).softmax(-1)  # (B, h, N)
        mixed = torch.einsum("bhn,bnc->bhc", weights, x)  # (B, h, C)
        pooled = torch.einsum("bhc,hdc->bhd", mixed, w_v) + b_v  # (B, h, C/h)
        return self.out(pooled.reshape(B, C))  # (B, C)


class ImageTower(nn.Module):
    """timm backbone -> tokens (B, N, C) and pooled (B, C). Accepts normalised float images, or uint8
    images (normalised here, late, so data can stay uint8 up to the model)."""

    def __init__(self, config: ImageTowerConfig, load_pretrained_weights: bool = True):
        super().__init__()
        if config.pool not in POOLS:
            raise ValueError(f"unknown image pooling {config.pool!r}; choose from {', '.join(POOLS)}")
        self.config = config
        self.backbone = create_backbone(config, load_pretrained_weights)
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1) * 255, persistent=False)
        self.backbone.eval()  # probe the token grid once to size the pooling layer (BN needs eval at B=1)
        with torch.no_grad():
            tokens = to_tokens(self.backbone.forward_features(torch.zeros(1, 3, config.image_size, config.image_size)))
        self.backbone.train()
        self.num_tokens, self.width = tokens.shape[1], tokens.shape[2]
        self.pool = None
        if config.pool == "attn":
            self.pool = AttentionPool(self.width, self.num_tokens, num_heads=max(1, self.width // 64))
        self.output_dim = self.width if config.pool != "timm" else self.backbone.num_features
        # pooled-only encoding (encode_image) may skip work whose output the pooling throws away
        self.class_token_only = class_token_only_ok(self.backbone, config.pool)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (B, H, W, 3) or (B, 3, H, W) -> normalised floats (B, 3, S, S); square pixels of another
        size are resized to the tower's ``image_size`` S first (``interpolation``, antialiased), so small data
        (28 px Fashion-MNIST) can feed a tower pretrained at 224 px without storing it at that size."""
        if images.dtype == torch.uint8:
            if images.shape[-1] == 3 and images.shape[1] != 3:  # (B, H, W, 3) -> (B, 3, H, W)
                images = images.permute(0, 3, 1, 2)
            size = self.config.image_size
            if images.shape[-2:] != (size, size) and images.shape[-2] == images.shape[-1]:
                mode = self.config.interpolation
                images = F.interpolate(images.float(), size=(size, size), mode=mode, antialias=mode != "nearest",
                                       align_corners=False if mode != "nearest" else None).clamp(0, 255)
            # uint8 - float mean promotes to float in the same pass (no separate conversion); then in place
            images = (images - self.mean).div_(self.std)
        return images

    def forward_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (tokens (B, N, C), pooled (B, C'))."""
        features = self.backbone.forward_features(self.preprocess(images))
        tokens = to_tokens(features)  # (B, N, C)
        if self.config.pool == "attn":
            pooled = self.pool(tokens)
        elif self.config.pool == "avg":
            pooled = tokens.mean(dim=1)
        else:
            pooled = self.backbone.forward_head(features, pre_logits=True)
        return tokens, pooled

    def forward_pooled(self, images: torch.Tensor) -> torch.Tensor:
        """Only the pooled vector (B, C'), equal to ``forward_features(images)[1]``: what ``encode_image``
        needs. A timm ViT pooled by its class token (``pool: timm``) runs its last block for that token
        alone, since the other tokens' last-layer outputs would be discarded."""
        if self.class_token_only:
            return vit_class_token(self.backbone, self.preprocess(images))
        return self.forward_features(images)[1]
