"""OpenCLIP checkpoints <-> vlpt ``DualEncoder``.

Import: a ``local-dir`` folder (``open_clip_config.json`` + ``open_clip_model.safetensors``, what OpenCLIP's
``create_model('local-dir:...')`` reads) or a plain state-dict file with its architecture (an OpenCLIP model
name or config JSON: ``"ViT-B-32,weights.pt"``, as CLIP_benchmark's ``--pretrained_model``). OpenCLIP itself
builds the model and loads the file (``open_clip.load_checkpoint``: its format conversions, strict); the
tensors are then renamed into a vlpt dual encoder: the vision transformer into timm's (timm's own
``_convert_openai_clip``), the text transformer into transformers' ``CLIPTextModel`` (causal) or
``SiglipTextModel`` (``no_causal_mask``). A timm vision trunk (``timm_model_name``) is the same timm model in
vlpt. The tokenizer is OpenAI CLIP's BPE (built from the vocabulary open_clip ships) or the folder's
Hugging Face tokenizer (``hf_tokenizer_name``).

Export: the reverse renaming, written as a ``local-dir`` folder that ``open_clip.create_model_and_transforms
('local-dir:OUT')`` and CLIP_benchmark load (``open_clip_config.json`` with the preprocessing,
``open_clip_model.safetensors``, and the tokenizer's files unless it is OpenAI CLIP's BPE).

Names (vlpt <- OpenCLIP): the fused ``in_proj`` of ``nn.MultiheadAttention`` is timm's ``qkv`` as is, and
``q_proj`` | ``k_proj`` | ``v_proj`` of transformers' text layers split from it; the projections
``visual.proj`` / ``text_projection`` (width, embed: ``x @ proj``) are the transposed ``nn.Linear`` weights
``image_proj.weight`` / ``text_proj.weight`` (embed, width); a text projection with bias is an
``nn.Linear`` on both sides.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from transformers import AutoTokenizer, CLIPTextConfig, SiglipTextConfig

from vlpt.config import ModelConfig, TextTowerConfig
from vlpt.interop.common import (
    FROM_HF_ACTIVATIONS,
    OPENAI_MEAN,
    OPENAI_STD,
    NotRepresentable,
    VitSpec,
    check_pos_embed,
    layers_from_hf,
    layers_to_hf,
    mlp_ratio_for,
    prefixed,
    save_tokenizer,
    vit_spec,
)
from vlpt.io import ModelLoadError, atomic_directory
from vlpt.models.dual_encoder import DualEncoder, load_matching_state
from vlpt.models.image_towers import PRESETS
from vlpt.models.text_towers import HF_ACTIVATIONS, hf_config_dict, special_token_ids
from vlpt.tokenization import Tokenizer, clip_bpe_tokenizer, is_clip_bpe

log = logging.getLogger(__name__)

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
# the weight files open_clip's local-dir loading looks for, in its order of preference
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth",
                "model.pth")
# One text layer, OpenCLIP resblock name <- transformers' CLIPTextModel / SiglipTextModel name; q|k|v apart.
_TEXT_LAYER = [("ln_1", "layer_norm1"), ("attn.out_proj", "self_attn.out_proj"), ("ln_2", "layer_norm2"),
               ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]


def open_clip_module():
    try:
        import open_clip
    except ImportError as err:
        raise ImportError("OpenCLIP checkpoints need the open_clip package: pip install open-clip-torch "
                          "(or `pip install vlpt[interop]`)") from err
    return open_clip


# ----------------------------------------------------------------------------- where a checkpoint is

def weights_in(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} has {CONFIG_NAME} but no weights file (expected one of "
                            f"{', '.join(WEIGHT_FILES)})")


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path}: not a readable {what} ({' '.join(str(err).split())})") from err
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object ({what}), got {type(data).__name__}")
    return data


def resolve(spec: str | Path, arch: str | None = None) -> tuple[dict, dict, Path, Path | None]:
    """(model_cfg, preprocess_cfg, weights file, folder holding tokenizer files or None) of an OpenCLIP
    checkpoint: a ``local-dir`` folder, or a weights file with ``arch`` (a model name or config JSON)."""
    path = Path(str(spec).removeprefix("local-dir:"))
    if path.is_dir():
        data = read_json(path / CONFIG_NAME, "OpenCLIP config")
        if not isinstance(data.get("model_cfg"), dict):
            raise ModelLoadError(f"{path / CONFIG_NAME}: no 'model_cfg' object, so not an OpenCLIP model config")
        return data["model_cfg"], data.get("preprocess_cfg") or {}, weights_in(path), path
    if arch is None:
        raise ModelLoadError(f"{path}: an OpenCLIP weights file needs its architecture: an OpenCLIP model name or "
                             f"config JSON, given as 'ARCH,{path}' (or load_model(path, arch=...))")
    if not path.is_file():
        raise FileNotFoundError(f"OpenCLIP weights file not found: {path}")
    if arch.endswith(".json"):
        data = read_json(Path(arch), "OpenCLIP config")
        model_cfg = data.get("model_cfg", data)
        return model_cfg, data.get("preprocess_cfg") or {}, path, None
    model_cfg = open_clip_module().get_model_config(arch)
    if model_cfg is None:
        raise ModelLoadError(f"{arch!r} is not an OpenCLIP model name (open_clip.list_models()) or a config .json")
    return model_cfg, model_cfg.get("preprocess_cfg") or {}, path, None


def build_peer(model_cfg: dict, weights: Path):
    """The OpenCLIP model ``model_cfg`` describes, with ``weights`` loaded by OpenCLIP itself (strict)."""
    open_clip = open_clip_module()
    cfg = copy.deepcopy(model_cfg)
    custom = cfg.pop("custom_text", False)
    cfg.pop("preprocess_cfg", None)
    if "multimodal_cfg" in cfg:
        raise NotRepresentable("an OpenCLIP CoCa model (multimodal_cfg): vlpt imports contrastive dual encoders")
    if (cfg.get("text_cfg") or {}).get("hf_model_name"):
        raise NotRepresentable(f"an OpenCLIP text tower from transformers ({cfg['text_cfg']['hf_model_name']}, "
                               f"with OpenCLIP's own pooling head); vlpt maps OpenCLIP's text transformer")
    try:
        peer = (open_clip.CustomTextCLIP if custom else open_clip.CLIP)(**cfg)
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        raise ModelLoadError(f"OpenCLIP cannot build the model its config describes ({_short(err)})") from err
    try:
        open_clip.load_checkpoint(peer, str(weights), strict=True)
    except (RuntimeError, ValueError, OSError, SafetensorError, KeyError, EOFError, pickle.UnpicklingError,
            AttributeError, StopIteration, AssertionError) as err:  # OpenCLIP asserts on some mismatches
        raise ModelLoadError(f"{weights}: not OpenCLIP weights of the model its config describes "
                             f"({_short(err)})") from err
    return peer.eval()


def _short(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ----------------------------------------------------------------------------- configs

def _activation(tower_cfg: dict, quick_gelu: bool, where: str) -> str:
    approximate = (tower_cfg.get("act_kwargs") or {}).get("approximate", "none")
    if quick_gelu:
        return "quick_gelu"
    if approximate not in ("none", "tanh") or set(tower_cfg.get("act_kwargs") or {}) - {"approximate"}:
        raise NotRepresentable(f"{where}.act_kwargs {tower_cfg.get('act_kwargs')}: vlpt's towers take GELU, its "
                               f"tanh approximation or QuickGELU")
    return "gelu_tanh" if approximate == "tanh" else "gelu"


def _eps(tower_cfg: dict, where: str) -> float:
    kwargs = tower_cfg.get("norm_kwargs") or {}
    if set(kwargs) - {"eps"}:
        raise NotRepresentable(f"{where}.norm_kwargs {kwargs}: only a LayerNorm epsilon maps")
    return float(kwargs.get("eps", 1e-5))


def _unsupported(cfg: dict, defaults: dict[str, Any], where: str) -> None:
    found = [f"{k}={cfg[k]!r}" for k, default in defaults.items() if k in cfg and cfg[k] not in default]
    if found:
        raise NotRepresentable(f"{where}: {', '.join(found)} has no counterpart in vlpt's towers (nor in "
                               f"transformers' CLIP / SigLIP)")


def vision_spec(model_cfg: dict) -> VitSpec:
    v = model_cfg.get("vision_cfg") or {}
    if isinstance(v.get("layers", 12), (list, tuple)):
        raise NotRepresentable("an OpenCLIP ModifiedResNet image tower (attention pooling over a ResNet): vlpt's "
                               "towers come from timm, which has no model with that head")
    _unsupported(v, {"ls_init_value": (None,), "attentional_pool": (False,), "pos_embed_type": ("learnable",),
                     "final_ln_after_pool": (False,), "pool_type": ("tok", "avg"), "no_ln_pre": (False,),
                     "block_type": (None, "default"), "qk_norm": (False,), "scaled_cosine_attn": (False,),
                     "scale_heads": (False,), "scale_attn_inner": (False,), "scale_attn": (False,),
                     "scale_fc": (False,)}, "vision_cfg")
    size = v.get("image_size", 224)
    patch = v.get("patch_size", 16)
    if isinstance(size, (list, tuple)):
        if size[0] != size[1]:
            raise NotRepresentable(f"vision_cfg.image_size {size}: vlpt's towers take square images")
        size = size[0]
    width = v.get("width", 768)
    return VitSpec(image_size=size, patch_size=patch, width=width, layers=v.get("layers", 12),
                   heads=width // v.get("head_width", 64), mlp_width=int(width * v.get("mlp_ratio", 4.0)),
                   activation=_activation(v, model_cfg.get("quick_gelu", False), "vision_cfg"),
                   eps=_eps(v, "vision_cfg"), class_token=True, pool="token" if v.get("pool_type", "tok") == "tok"
                   else "avg", pre_norm=True, patch_bias=False)


def text_config(model_cfg: dict, eos_token_id: int, pad_token_id: int, bos_token_id: int) -> TextTowerConfig:
    """vlpt's text tower for OpenCLIP's text transformer: transformers' CLIPTextModel (causal) or
    SiglipTextModel (no causal mask), with OpenCLIP's pooling."""
    t = model_cfg.get("text_cfg") or {}
    _unsupported(t, {"ls_init_value": (None,), "embed_cls": (False,), "final_ln_after_pool": (False,),
                     "pool_type": ("argmax", "eos", "last"), "proj_type": ("linear", "none"),
                     "block_type": (None, "default"), "qk_norm": (False,), "scaled_cosine_attn": (False,),
                     "scale_heads": (False,), "scale_attn_inner": (False,), "scale_attn": (False,),
                     "scale_fc": (False,), "tokenizer_mode": (None, "")}, "text_cfg")
    width, causal = t.get("width", 512), not t.get("no_causal_mask", False)
    arch = "clip" if causal else "siglip"
    activation = _activation(t, model_cfg.get("quick_gelu", False), "text_cfg")
    context = t.get("context_length", 77)
    sizes = dict(vocab_size=t.get("vocab_size", 49408), hidden_size=width, num_hidden_layers=t.get("layers", 12),
                 num_attention_heads=t.get("heads", 8), intermediate_size=int(width * t.get("mlp_ratio", 4.0)),
                 max_position_embeddings=context, layer_norm_eps=_eps(t, "text_cfg"), attention_dropout=0.0,
                 hidden_act=HF_ACTIVATIONS[activation],
                 eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=bos_token_id)
    hf = CLIPTextConfig(**sizes) if causal else SiglipTextConfig(**sizes, projection_size=width)
    pool = {"argmax": "eos", "eos": "eos", "last": "last"}[t.get("pool_type", "argmax")]
    # OpenCLIP pads every text to the full context and masks nothing but the future (causal) or nothing at all
    return TextTowerConfig(arch=arch, hf_config=hf_config_dict(hf), hidden_size=width, num_layers=sizes[
        "num_hidden_layers"], num_heads=sizes["num_attention_heads"], intermediate_size=sizes["intermediate_size"],
        vocab_size=sizes["vocab_size"], context_length=context, activation=activation, pool=pool,
        pad_to_context=not (causal and pool == "eos"), mask_padding=False)


def preprocessing_from(preprocess_cfg: dict, image_size: int) -> dict:
    """vlpt's image preprocessing fields from OpenCLIP's preprocess_cfg."""
    interpolation = preprocess_cfg.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear", "nearest"):
        log.warning("OpenCLIP interpolation %r: vlpt preprocesses with bicubic", interpolation)
        interpolation = "bicubic"
    resize_mode = preprocess_cfg.get("resize_mode", "shortest")
    if resize_mode not in ("shortest", "squash"):
        log.warning("OpenCLIP resize_mode %r (aspect kept, padded): vlpt resizes the short side and crops",
                    resize_mode)
        resize_mode = "shortest"
    size = preprocess_cfg.get("size", image_size)
    if (size[0] if isinstance(size, (list, tuple)) else size) != image_size:
        log.warning("OpenCLIP preprocess size %s differs from the tower's image size %d; vlpt uses the latter",
                    size, image_size)
    return dict(mean=tuple(preprocess_cfg.get("mean", OPENAI_MEAN)), std=tuple(preprocess_cfg.get("std", OPENAI_STD)),
                interpolation=interpolation, resize_mode=resize_mode)


def _timm_vision(model_cfg: dict) -> dict | None:
    """(name, pool, proj, proj_bias, image_size) of an OpenCLIP timm trunk, or None for its own ViT."""
    v = model_cfg.get("vision_cfg") or {}
    if not v.get("timm_model_name"):
        return None
    pool, proj = v.get("timm_pool", "avg"), v.get("timm_proj", "linear")
    if pool in ("abs_attn", "rot_attn") or proj == "mlp":
        raise NotRepresentable(f"an OpenCLIP timm trunk with OpenCLIP's own head (timm_pool {pool!r}, timm_proj "
                               f"{proj!r}); vlpt maps timm's own pooling and a linear projection")
    size = v.get("image_size", 224)
    return dict(name=v["timm_model_name"], pool=pool, proj=proj or "none", proj_bias=v.get("timm_proj_bias", False),
                image_size=size[0] if isinstance(size, (list, tuple)) else size)


def model_config_from(model_cfg: dict, preprocess_cfg: dict, tokenizer_ids: tuple[int, int, int],
                      logit_scale: float, logit_bias: float | None) -> ModelConfig:
    from vlpt.config import ImageTowerConfig

    timm_vision = _timm_vision(model_cfg)
    if timm_vision is None:
        spec = vision_spec(model_cfg)
        image = spec.tower_config(**preprocessing_from(preprocess_cfg, spec.image_size))
        image_projection = "linear"
    else:
        pool = timm_vision["pool"]
        if not pool and timm_vision["proj"] == "none":
            raise NotRepresentable("an OpenCLIP timm trunk without pooling or projection gives tokens, not an "
                                   "embedding")
        image = ImageTowerConfig(name=timm_vision["name"], image_size=timm_vision["image_size"], pool="timm",
                                 timm_kwargs={"global_pool": pool} if pool else {},  # "": timm's default pooling
                                 **preprocessing_from(preprocess_cfg, timm_vision["image_size"]))
        image_projection = {"none": "none", "linear": "linear_bias" if timm_vision["proj_bias"] else "linear"}[
            timm_vision["proj"]]
    t = model_cfg.get("text_cfg") or {}
    eos, pad, bos = tokenizer_ids
    if t.get("pool_type", "argmax") == "eos":
        eos = t.get("eos_id", 2)
        if eos == 2:
            raise NotRepresentable("text_cfg.eos_id 2: transformers' CLIP text model reads that id as argmax "
                                   "pooling (a legacy rule), so it cannot name a real end-of-text token")
    text = text_config(model_cfg, eos, pad, bos)
    text_projection = "none" if t.get("proj_type", "linear") == "none" else \
        "linear_bias" if t.get("proj_bias", False) else "linear"
    return ModelConfig(embed_dim=model_cfg["embed_dim"], image=image, text=text, init_logit_scale=logit_scale,
                       max_logit_scale=max(math.log(100.0), logit_scale), init_logit_bias=logit_bias,
                       image_projection=image_projection, text_projection=text_projection)


# ----------------------------------------------------------------------------- tensors

def text_to_hf(oc: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """OpenCLIP's text transformer (without prefix) in transformers' CLIPTextModel / SiglipTextModel names."""
    out = {"embeddings.token_embedding.weight": oc["token_embedding.weight"],
           "embeddings.position_embedding.weight": oc["positional_embedding"],
           "final_layer_norm.weight": oc["ln_final.weight"], "final_layer_norm.bias": oc["ln_final.bias"]}
    return out | layers_to_hf(oc, layers, "transformer.resblocks.", "attn.in_proj_", _TEXT_LAYER)


def text_from_hf(hf: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """The inverse of ``text_to_hf``."""
    out = {"token_embedding.weight": hf["embeddings.token_embedding.weight"],
           "positional_embedding": hf["embeddings.position_embedding.weight"],
           "ln_final.weight": hf["final_layer_norm.weight"], "ln_final.bias": hf["final_layer_norm.bias"]}
    return out | layers_from_hf(hf, layers, "transformer.resblocks.", "attn.in_proj_", _TEXT_LAYER)


def vision_from_timm(timm_state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """timm's CLIP VisionTransformer -> OpenCLIP's (``visual.`` without prefix, no ``proj``): the inverse
    of timm's ``_convert_openai_clip``."""
    out = {"conv1.weight": timm_state["patch_embed.proj.weight"],
           "class_embedding": timm_state["cls_token"].reshape(-1),  # (1, 1, C) -> (C,)
           "positional_embedding": timm_state["pos_embed"][0],  # (1, N, C) -> (N, C)
           "ln_pre.weight": timm_state["norm_pre.weight"], "ln_pre.bias": timm_state["norm_pre.bias"],
           "ln_post.weight": timm_state["norm.weight"], "ln_post.bias": timm_state["norm.bias"]}
    names = [("norm1.", "ln_1."), ("attn.qkv.", "attn.in_proj_"), ("attn.proj.", "attn.out_proj."),
             ("norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")]
    for i in range(layers):
        for ours, theirs in names:
            for param in ("weight", "bias"):
                out[f"transformer.resblocks.{i}.{theirs}{param}"] = timm_state[f"blocks.{i}.{ours}{param}"]
    return out


def state_from_peer(state: dict[str, torch.Tensor], model_cfg: dict, config: ModelConfig) -> dict[str, torch.Tensor]:
    """An OpenCLIP state dict in vlpt's names."""
    from timm.models.vision_transformer import _convert_openai_clip

    ours: dict[str, torch.Tensor] = {}
    if _timm_vision(model_cfg) is None:
        timm_state = _convert_openai_clip(state, None, prefix="visual.")  # timm's own OpenAI/OpenCLIP -> timm
        ours["image_proj.weight"] = timm_state.pop("head.weight")  # visual.proj (C, E), transposed by timm
        timm_state.pop("head.bias")  # zeros timm adds for its classifier head
        ours |= {f"image_tower.backbone.{k}": v for k, v in timm_state.items()}
    else:
        ours |= {f"image_tower.backbone.{k}": v for k, v in prefixed(state, "visual.trunk.").items()}
        ours |= {f"image_proj.{k}": v for k, v in prefixed(state, "visual.head.proj.").items()}
    prefix = "text." if model_cfg.get("custom_text") else ""
    text = prefixed(state, prefix) if prefix else {k: v for k, v in state.items() if not k.startswith("visual.")}
    ours |= {f"text_tower.encoder.{k}": v for k, v in text_to_hf(text, config.text.num_layers).items()}
    projection = text.get("text_projection")
    if projection is not None:
        ours["text_proj.weight"] = projection.T  # x @ (W, E) -> Linear weight (E, W)
    elif "text_projection.weight" in text:
        ours["text_proj.weight"] = text["text_projection.weight"]
        if "text_projection.bias" in text:
            ours["text_proj.bias"] = text["text_projection.bias"]
    ours["logit_scale"] = state["logit_scale"].reshape(())
    if state.get("logit_bias") is not None:
        ours["logit_bias"] = state["logit_bias"].reshape(())
    return {k: v.detach().clone().contiguous() for k, v in ours.items()}


# ----------------------------------------------------------------------------- import

def tokenizer_for(model_cfg: dict, folder: Path | None, where: str):
    """The Hugging Face tokenizer OpenCLIP would use: the folder's (``hf_tokenizer_name``), or OpenAI
    CLIP's BPE (OpenCLIP's SimpleTokenizer); (tokenizer, (eos, pad, bos) ids)."""
    t = model_cfg.get("text_cfg") or {}
    name = t.get("hf_tokenizer_name")
    if name:
        source = str(folder) if folder is not None else name
        try:
            hf = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, KeyError, TypeError, ImportError) as err:
            raise ModelLoadError(f"{where}: its tokenizer ({source}) cannot be loaded ({_short(err)})") from err
        ids = special_token_ids(hf)
        return hf, (ids.get("eos_token_id", 2), ids.get("pad_token_id", 0), ids.get("bos_token_id", 0))
    if t.get("vocab_size", 49408) != 49408:
        raise NotRepresentable(f"{where}: text_cfg.vocab_size {t.get('vocab_size')} without an hf_tokenizer_name; "
                               f"OpenCLIP's default tokenizer (OpenAI CLIP's BPE) has 49408 tokens")
    hf = clip_bpe_tokenizer(t.get("context_length", 77))
    return hf, (49407, 49407, 49406)


def from_peer(peer, model_cfg: dict, preprocess_cfg: dict, folder: Path | None, where: str) -> DualEncoder:
    """A vlpt dual encoder with the weights of an OpenCLIP model built from ``model_cfg``."""
    hf_tokenizer, ids = tokenizer_for(model_cfg, folder, where)
    state = peer.state_dict()
    bias = float(state["logit_bias"].reshape(())) if state.get("logit_bias") is not None else None
    config = model_config_from(model_cfg, preprocess_cfg, ids, float(state["logit_scale"].reshape(())), bias)
    timm_vision = _timm_vision(model_cfg)
    if timm_vision is None:
        check_pos_embed(state["visual.positional_embedding"].shape[0], vision_spec(model_cfg),
                        f"{where}: visual.positional_embedding")
    model = DualEncoder(config, Tokenizer(hf_tokenizer, config.text.context_length), load_pretrained_weights=False)
    if timm_vision and timm_vision["proj"] == "linear" and \
            type(model.image_tower.backbone.norm) is not type(peer.visual.trunk.norm):  # noqa: E721
        raise NotRepresentable(f"OpenCLIP builds timm trunk {timm_vision['name']} with its default pooling and then "
                               f"switches it to {timm_vision['pool']!r}, which leaves other norms than timm builds "
                               f"for that pooling; vlpt builds timm's own (use timm_proj none, or the trunk's "
                               f"default pooling)")
    load_matching_state(model, state_from_peer(state, model_cfg, config),
                        f"{where}: the OpenCLIP weights do not fit the vlpt model built from its config")
    return model.eval()


def import_open_clip(spec: str | Path, arch: str | None = None, device: str | torch.device = "cpu") -> DualEncoder:
    """An OpenCLIP ``local-dir`` folder, or a weights file with its ``arch``, as a vlpt dual encoder."""
    model_cfg, preprocess_cfg, weights, folder = resolve(spec, arch)
    where = str(folder / CONFIG_NAME) if folder is not None else f"{arch},{weights}"
    try:
        peer = build_peer(model_cfg, weights)
        return from_peer(peer, model_cfg, preprocess_cfg, folder, where).to(device)
    except NotRepresentable as err:
        raise ModelLoadError(f"{where}: {err}") from err


# ----------------------------------------------------------------------------- export

def _text_spec(model: DualEncoder, target: str) -> dict:
    text = model.text_tower
    hf = text.encoder.config
    if hf.model_type not in ("clip_text_model", "siglip_text_model"):
        raise NotRepresentable(f"{target} has no counterpart of a {hf.model_type} text tower; it needs "
                               f"model.text.arch clip (causal) or siglip (bidirectional)")
    causal = hf.model_type == "clip_text_model"
    pool = text.config.pool
    if pool not in ("eos", "last"):
        raise NotRepresentable(f"{target} pools its text transformer at the end-of-text token or the last "
                               f"position (model.text.pool eos | last), not by {pool!r}")
    if not (causal and pool == "eos"):  # the pooled vector then sees the padding, which OpenCLIP never masks
        if text.config.mask_padding or not text.config.pad_to_context:
            raise NotRepresentable(f"{target} pads every text to its context and masks no padding; this text "
                                   f"tower needs model.text.pad_to_context: true and mask_padding: false")
    return dict(causal=causal, pool=pool, hf=hf)


def peer_config(model: DualEncoder, target: str = "OpenCLIP") -> tuple[dict, dict, bool]:
    """(model_cfg, preprocess_cfg, uses OpenCLIP's default tokenizer) for a vlpt model."""
    c = model.config
    image = model.image_tower.config
    timm_vision = image.name not in PRESETS and set(image.timm_kwargs) <= {"global_pool"} and \
        image.activation is None and image.layer_norm_eps is None
    activations = set()
    if timm_vision:  # OpenCLIP's TimmModel: timm.create_model(name, global_pool=...) and nothing else
        backbone = model.image_tower.backbone
        if image.pool != "timm":
            raise NotRepresentable(f"{target} has no counterpart of vlpt's {image.pool!r} pooling head on a timm "
                                   f"trunk; it needs the trunk's own pooling (model.image.pool: timm)")
        if c.image_projection != "none":  # OpenCLIP then builds timm's default pooling and switches to timm_pool
            import timm

            default_pool = getattr(timm.create_model(image.name, pretrained=False, num_classes=0), "global_pool", "")
            if default_pool != getattr(backbone, "global_pool", ""):
                raise NotRepresentable(f"{target} builds timm trunk {image.name} with its default pooling "
                                       f"({default_pool!r}) before switching to {backbone.global_pool!r} when it "
                                       f"projects by a Linear; export with the default pooling, or "
                                       f"model.image_projection: none")
        default_size = backbone.pretrained_cfg.get("input_size", (3, image.image_size))[-1]
        if default_size != image.image_size:
            raise NotRepresentable(f"{target} builds timm trunk {image.name} at its default size {default_size}; "
                                   f"this model's image size is {image.image_size}")
        if c.image_projection == "none" and backbone.num_features != c.embed_dim:
            raise NotRepresentable("internal: image projection none with a width other than embed_dim")
        vision_cfg = dict(timm_model_name=image.name, timm_model_pretrained=False, image_size=image.image_size,
                          timm_pool=getattr(backbone, "global_pool", "avg") or "",
                          timm_proj="none" if c.image_projection == "none" else "linear",
                          timm_proj_bias=c.image_projection == "linear_bias")
    else:
        spec = vit_spec(model.image_tower, target)
        if not spec.class_token or not spec.pre_norm or spec.pool not in ("token", "avg"):
            raise NotRepresentable(f"{target}'s vision transformer has a class token and a LayerNorm before its "
                                   f"blocks, pooled by the class token or the mean (model.image.name: clip-vit); "
                                   f"for another timm model, name it (model.image.name) without timm_kwargs")
        if c.image_projection != "linear":
            raise NotRepresentable(f"{target}'s vision transformer projects by a matrix without bias "
                                   f"(model.image_projection: linear), not {c.image_projection}")
        activations.add(spec.activation)
        vision_cfg = dict(image_size=spec.image_size, patch_size=spec.patch_size, width=spec.width,
                          layers=spec.layers, head_width=spec.width // spec.heads,
                          mlp_ratio=mlp_ratio_for(spec.width, spec.mlp_width),
                          pool_type="tok" if spec.pool == "token" else "avg")
        if spec.eps != 1e-5:
            vision_cfg["norm_kwargs"] = {"eps": spec.eps}
        if spec.activation == "gelu_tanh":
            vision_cfg["act_kwargs"] = {"approximate": "tanh"}
    text = _text_spec(model, target)
    hf = text["hf"]
    act_text = FROM_HF_ACTIVATIONS.get(hf.hidden_act, hf.hidden_act)
    activations.add(act_text)
    quick_gelu = "quick_gelu" in activations
    if quick_gelu and len(activations) > 1:
        raise NotRepresentable(f"{target} takes QuickGELU in both towers or in neither; this model mixes "
                               f"{', '.join(sorted(activations))}")
    if act_text not in ("gelu", "gelu_tanh", "quick_gelu"):
        raise NotRepresentable(f"{target} has no counterpart of text activation {hf.hidden_act!r}")
    tokenizer = model.tokenizer
    default_tokenizer = tokenizer is not None and text["causal"] and text["pool"] == "eos" and is_clip_bpe(tokenizer.hf)
    if tokenizer is None:
        raise NotRepresentable(f"{target} needs the model's tokenizer, and this model has none")
    eos = hf.eos_token_id
    text_cfg = dict(context_length=c.text.context_length, vocab_size=hf.vocab_size, width=hf.hidden_size,
                    heads=hf.num_attention_heads, layers=hf.num_hidden_layers,
                    mlp_ratio=mlp_ratio_for(hf.hidden_size, hf.intermediate_size))
    if text["pool"] == "last":
        text_cfg["pool_type"] = "last"
    elif eos == 2 or default_tokenizer:
        text_cfg["pool_type"] = "argmax"  # the highest id: OpenAI's end-of-text token (or transformers' legacy rule)
    else:
        text_cfg |= dict(pool_type="eos", eos_id=eos)
    if not text["causal"]:
        text_cfg["no_causal_mask"] = True
    if c.text_projection == "none":
        text_cfg["proj_type"] = "none"
    elif c.text_projection == "linear_bias":
        text_cfg["proj_bias"] = True
    if hf.layer_norm_eps != 1e-5:
        text_cfg["norm_kwargs"] = {"eps": hf.layer_norm_eps}
    if act_text == "gelu_tanh":
        text_cfg["act_kwargs"] = {"approximate": "tanh"}
    if not default_tokenizer:
        text_cfg["hf_tokenizer_name"] = "local-dir"  # replaced by the export folder's path
        if tokenizer.pad_token_id is not None:
            text_cfg["pad_id"] = tokenizer.pad_token_id
    model_cfg: dict[str, Any] = dict(embed_dim=c.embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg)
    if quick_gelu:
        model_cfg["quick_gelu"] = True
    if model.logit_bias is not None:
        model_cfg["init_logit_bias"] = float(model.logit_bias.detach())
    if image.resize_size not in (None, image.image_size):
        log.warning("OpenCLIP's preprocessing has no resize before the crop: resize_size %d is dropped (the short "
                    "side goes to %d)", image.resize_size, image.image_size)
    preprocess_cfg = dict(size=image.image_size, mode="RGB", mean=list(image.mean), std=list(image.std),
                          interpolation=image.interpolation, resize_mode=image.resize_mode)
    return model_cfg, preprocess_cfg, default_tokenizer


def peer_state(model: DualEncoder, model_cfg: dict) -> dict[str, torch.Tensor]:
    """The vlpt model's tensors in OpenCLIP's names (the model ``model_cfg`` describes)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    backbone = prefixed(state, "image_tower.backbone.")
    if model_cfg["vision_cfg"].get("timm_model_name"):
        out |= {f"visual.trunk.{k}": v for k, v in backbone.items()}
        out |= {f"visual.head.proj.{k}": v for k, v in prefixed(state, "image_proj.").items()}
    else:
        out |= {f"visual.{k}": v for k, v in vision_from_timm(backbone, model_cfg["vision_cfg"]["layers"]).items()}
        out["visual.proj"] = state["image_proj.weight"].T  # Linear (E, C) -> x @ (C, E)
    out |= text_from_hf(prefixed(state, "text_tower.encoder."), model_cfg["text_cfg"]["layers"])
    if "text_proj.bias" in state:
        out["text_projection.weight"], out["text_projection.bias"] = state["text_proj.weight"], state["text_proj.bias"]
    elif "text_proj.weight" in state:
        out["text_projection"] = state["text_proj.weight"].T  # Linear (E, C) -> x @ (C, E)
    out["logit_scale"] = state["logit_scale"].reshape(())
    if "logit_bias" in state:
        out["logit_bias"] = state["logit_bias"].reshape(())
    return {k: v.contiguous().clone() for k, v in out.items()}


def export_open_clip(model: DualEncoder, out: str | Path) -> Path:
    """Write ``model`` as an OpenCLIP ``local-dir`` folder: ``open_clip_config.json`` (model_cfg +
    preprocess_cfg), ``open_clip_model.safetensors`` and, unless it is OpenAI CLIP's BPE, the tokenizer."""
    out = Path(out)
    model_cfg, preprocess_cfg, default_tokenizer = peer_config(model)
    if not default_tokenizer:
        model_cfg["text_cfg"]["hf_tokenizer_name"] = str(out.resolve())  # open_clip's local-dir reads it there
    state = peer_state(model, model_cfg)
    with atomic_directory(out) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg},
                                                  indent=2))
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if not default_tokenizer:
            save_tokenizer(model, tmp)
    return out
