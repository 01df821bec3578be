"""Hugging Face transformers ``CLIPModel`` and ``SiglipModel`` <-> vlpt ``DualEncoder``.

Import: transformers loads the folder (or hub name) with its own ``from_pretrained``; the tensors are
renamed into a vlpt dual encoder whose image tower is timm's VisionTransformer built as CLIP's / SigLIP's
and whose text tower is transformers' own ``CLIPTextModel`` / ``SiglipTextModel`` (built from the saved
config). Export: the reverse renaming into a ``CLIPModel`` / ``SiglipModel`` saved by its own
``save_pretrained``, with the tokenizer and an image processor config.

What moves where (vlpt <- HF):

- ``image_tower.backbone.*`` (timm) <- ``vision_model.*``: ``cls_token`` (1, 1, C) <- ``class_embedding`` (C);
  ``pos_embed`` (1, N, C) <- ``position_embedding.weight`` (N, C); each block's fused ``attn.qkv`` (3C, C) <-
  ``q_proj`` | ``k_proj`` | ``v_proj`` (C, C) each; ``norm_pre`` <- ``pre_layrnorm`` (CLIP); ``norm`` <-
  ``post_layernorm``; SigLIP's MAP head ``attn_pool.q`` | ``attn_pool.kv`` <- ``head.attention.in_proj``
  (split at C), ``attn_pool.latent`` <- ``head.probe``.
- ``text_tower.encoder.*`` <- ``text_model.*`` (the same module class, the same names); SigLIP's text
  ``head`` (a Linear with bias) -> ``text_proj``.
- ``image_proj.weight`` <- ``visual_projection.weight`` and ``text_proj.weight`` <- ``text_projection.weight``
  (both ``nn.Linear`` weights, no transpose); SigLIP has no image projection (``image_projection: none``).
- ``logit_scale`` () <- () (CLIP) or (1,) (SigLIP); ``logit_bias`` () <- (1,) (SigLIP).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
)
from transformers.utils import logging as hf_logging

from vlpt.config import ModelConfig, TextTowerConfig
from vlpt.interop.common import (
    OPENAI_MEAN,
    OPENAI_STD,
    PIL_RESAMPLE,
    NotRepresentable,
    VitSpec,
    check_pos_embed,
    from_hf_activation,
    layers_from_hf,
    layers_to_hf,
    prefixed,
    save_tokenizer,
    vit_spec,
)
from vlpt.io import ModelLoadError, atomic_directory
from vlpt.models.dual_encoder import DualEncoder, _short, load_matching_state
from vlpt.models.text_towers import HF_ACTIVATIONS, hf_config_dict
from vlpt.tokenization import Tokenizer

log = logging.getLogger(__name__)

KINDS = {"clip": CLIPModel, "siglip": SiglipModel}  # config.json model_type -> the transformers class
TEXT_MODEL_TYPES = {"clip": "clip_text_model", "siglip": "siglip_text_model"}
# One encoder layer, vlpt (timm block) name <- HF name; the attention's q|k|v are joined separately.
_LAYER = [("norm1", "layer_norm1"), ("attn.proj", "self_attn.out_proj"), ("norm2", "layer_norm2"),
          ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]
_MAP_HEAD = [("attn_pool.proj", "head.attention.out_proj"), ("attn_pool.norm", "head.layernorm"),
             ("attn_pool.mlp.fc1", "head.mlp.fc1"), ("attn_pool.mlp.fc2", "head.mlp.fc2")]


# ----------------------------------------------------------------------------- vision: HF <-> timm

def vision_to_timm(hf: dict[str, torch.Tensor], spec: VitSpec) -> dict[str, torch.Tensor]:
    """A ``CLIPVisionModel`` / ``SiglipVisionModel`` state dict (without the ``vision_model.`` prefix) in
    timm's VisionTransformer names."""
    out = {"patch_embed.proj.weight": hf["embeddings.patch_embedding.weight"],
           "pos_embed": hf["embeddings.position_embedding.weight"].unsqueeze(0),  # (N, C) -> (1, N, C)
           "norm.weight": hf["post_layernorm.weight"], "norm.bias": hf["post_layernorm.bias"]}
    if spec.patch_bias:
        out["patch_embed.proj.bias"] = hf["embeddings.patch_embedding.bias"]
    if spec.class_token:
        out["cls_token"] = hf["embeddings.class_embedding"].view(1, 1, -1)  # (C,) -> (1, 1, C)
    if spec.pre_norm:
        out["norm_pre.weight"], out["norm_pre.bias"] = hf["pre_layrnorm.weight"], hf["pre_layrnorm.bias"]
    out |= layers_from_hf(hf, spec.layers, "blocks.", "attn.qkv.", _LAYER)
    if spec.pool == "map":
        width = spec.width
        out["attn_pool.latent"] = hf["head.probe"]  # (1, 1, C)
        for param in ("weight", "bias"):
            fused = hf[f"head.attention.in_proj_{param}"]  # (3C, ...) [q; k; v]
            out[f"attn_pool.q.{param}"], out[f"attn_pool.kv.{param}"] = fused[:width], fused[width:]
            for ours, theirs in _MAP_HEAD:
                out[f"{ours}.{param}"] = hf[f"{theirs}.{param}"]
    return out


def vision_from_timm(timm: dict[str, torch.Tensor], spec: VitSpec) -> dict[str, torch.Tensor]:
    """The inverse of ``vision_to_timm``."""
    out = {"embeddings.patch_embedding.weight": timm["patch_embed.proj.weight"],
           "embeddings.position_embedding.weight": timm["pos_embed"][0],  # (1, N, C) -> (N, C)
           "post_layernorm.weight": timm["norm.weight"], "post_layernorm.bias": timm["norm.bias"]}
    if spec.patch_bias:
        out["embeddings.patch_embedding.bias"] = timm["patch_embed.proj.bias"]
    if spec.class_token:
        out["embeddings.class_embedding"] = timm["cls_token"].reshape(-1)  # (1, 1, C) -> (C,)
    if spec.pre_norm:
        out["pre_layrnorm.weight"], out["pre_layrnorm.bias"] = timm["norm_pre.weight"], timm["norm_pre.bias"]
    out |= layers_to_hf(timm, spec.layers, "blocks.", "attn.qkv.", _LAYER)
    if spec.pool == "map":
        out["head.probe"] = timm["attn_pool.latent"]
        for param in ("weight", "bias"):
            out[f"head.attention.in_proj_{param}"] = torch.cat([timm[f"attn_pool.q.{param}"],
                                                                timm[f"attn_pool.kv.{param}"]])
            for ours, theirs in _MAP_HEAD:
                out[f"{theirs}.{param}"] = timm[f"{ours}.{param}"]
    return out


# ----------------------------------------------------------------------------- configs

def vision_spec(kind: str, vision) -> VitSpec:
    """The vision transformer of a ``CLIPVisionConfig`` / ``SiglipVisionConfig``."""
    if kind == "siglip" and not getattr(vision, "vision_use_head", True):
        raise NotRepresentable("a SigLIP vision model without its attention pooling head (vision_use_head: false) "
                               "gives no image embedding")
    return VitSpec(image_size=vision.image_size, patch_size=vision.patch_size, width=vision.hidden_size,
                   layers=vision.num_hidden_layers, heads=vision.num_attention_heads,
                   mlp_width=vision.intermediate_size,
                   activation=from_hf_activation(vision.hidden_act, f"{kind} vision_config.hidden_act"),
                   eps=vision.layer_norm_eps, class_token=kind == "clip", pool="token" if kind == "clip" else "map",
                   pre_norm=kind == "clip", patch_bias=kind == "siglip")


def preprocessing_from(processor, kind: str) -> dict:
    """vlpt's image preprocessing fields from a transformers image processor (None: the model's defaults)."""
    if processor is None:
        mean, std = (OPENAI_MEAN, OPENAI_STD) if kind == "clip" else ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        log.warning("no image processor config (preprocessor_config.json): using %s's defaults", kind)
        return dict(mean=mean, std=std, interpolation="bicubic",
                    resize_mode="shortest" if kind == "clip" else "squash")
    resample = int(getattr(processor, "resample", 3) or 3)
    interpolation = {v: k for k, v in PIL_RESAMPLE.items()}.get(resample)
    if interpolation is None:
        log.warning("image processor resample=%s has no torchvision counterpart here; using bicubic", resample)
        interpolation = "bicubic"
    size = dict(getattr(processor, "size", None) or {})
    fields = dict(mean=tuple(float(x) for x in processor.image_mean), std=tuple(float(x) for x in processor.image_std),
                  interpolation=interpolation)
    if "shortest_edge" in size:
        return dict(fields, resize_mode="shortest", resize_size=int(size["shortest_edge"]))
    return dict(fields, resize_mode="squash")


def model_config_from(kind: str, config, processor, logit_scale: float, logit_bias: float | None) -> ModelConfig:
    """The vlpt config of a ``CLIPConfig`` / ``SiglipConfig`` (+ its image processor and learned logit scale)."""
    spec = vision_spec(kind, config.vision_config)
    preprocessing = preprocessing_from(processor, kind)
    if preprocessing.get("resize_size") == spec.image_size:
        preprocessing.pop("resize_size")
    image = spec.tower_config(**preprocessing)
    t = config.text_config
    text = TextTowerConfig(
        arch=kind, hf_config=hf_config_dict(t), hidden_size=t.hidden_size, num_layers=t.num_hidden_layers,
        num_heads=t.num_attention_heads, intermediate_size=t.intermediate_size, vocab_size=t.vocab_size,
        context_length=t.max_position_embeddings,
        activation=from_hf_activation(t.hidden_act, f"{kind} text_config.hidden_act"),
        # CLIP: the end-of-text token under a causal mask; SigLIP: the last position of a text padded to the
        # full context, padding attended to (as trained, and as get_text_features(input_ids) computes it)
        pool="eos" if kind == "clip" else "last", pad_to_context=kind == "siglip", mask_padding=kind == "clip")
    if kind == "clip":
        embed_dim, projections = config.projection_dim, ("linear", "linear")
    else:
        embed_dim, projections = config.vision_config.hidden_size, ("none", "linear_bias")
        if t.projection_size != embed_dim:
            raise NotRepresentable(f"SigLIP text projection_size {t.projection_size} differs from the vision width "
                                   f"{embed_dim}: its image and text embeddings cannot be compared")
    return ModelConfig(embed_dim=embed_dim, image=image, text=text, init_logit_scale=logit_scale,
                       max_logit_scale=max(math.log(100.0), logit_scale), init_logit_bias=logit_bias,
                       image_projection=projections[0], text_projection=projections[1])


# ----------------------------------------------------------------------------- HF model -> vlpt

def from_hf_model(hf_model: CLIPModel | SiglipModel, tokenizer=None, processor=None) -> DualEncoder:
    """A vlpt dual encoder with the weights of a transformers ``CLIPModel`` / ``SiglipModel`` (its tokenizer
    and image processor carried over when given)."""
    kind = hf_model.config.model_type
    if kind not in KINDS:
        raise NotRepresentable(f"a transformers {type(hf_model).__name__} ({kind}); vlpt imports clip and siglip")
    state = hf_model.state_dict()
    bias = float(state["logit_bias"].reshape(())) if kind == "siglip" else None
    config = model_config_from(kind, hf_model.config, processor, float(state["logit_scale"].reshape(())), bias)
    spec = vision_spec(kind, hf_model.config.vision_config)
    check_pos_embed(state["vision_model.embeddings.position_embedding.weight"].shape[0], spec,
                    f"{kind} vision_model.embeddings.position_embedding")
    ours = {f"image_tower.backbone.{k}": v for k, v in vision_to_timm(prefixed(state, "vision_model."), spec).items()}
    text = prefixed(state, "text_model.")
    if kind == "siglip":
        ours["text_proj.weight"], ours["text_proj.bias"] = text.pop("head.weight"), text.pop("head.bias")
        ours["logit_bias"] = state["logit_bias"].reshape(())
    else:
        ours["image_proj.weight"] = state["visual_projection.weight"]
        ours["text_proj.weight"] = state["text_projection.weight"]
    ours |= {f"text_tower.encoder.{k}": v for k, v in text.items()}
    ours["logit_scale"] = state["logit_scale"].reshape(())
    context = config.text.context_length
    model = DualEncoder(config, None if tokenizer is None else Tokenizer(tokenizer, context),
                        load_pretrained_weights=False)
    load_matching_state(model, {k: v.detach().clone() for k, v in ours.items()},
                        f"the {kind} weights do not fit the vlpt model built from its config")
    return model.eval()


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).exists() for name in ("tokenizer.json", "vocab.json", "spiece.model",
                                                   "tokenizer_config.json"))


def import_hf(path: str | Path, device: str | torch.device = "cpu") -> DualEncoder:
    """A transformers ``CLIPModel`` / ``SiglipModel`` folder (``config.json`` + ``model.safetensors`` or
    ``pytorch_model.bin``, loaded by transformers itself) or hub name, as a vlpt dual encoder."""
    where = str(path)
    try:
        config = AutoConfig.from_pretrained(where)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelLoadError(f"{Path(where) / 'config.json'}: not a readable transformers config ({_short(err)})") \
            from err
    kind = config.model_type
    if kind not in KINDS:
        raise ModelLoadError(f"{Path(where) / 'config.json'}: a transformers {kind!r} model; vlpt imports "
                             f"CLIPModel (clip) and SiglipModel (siglip) checkpoints")
    try:
        with quiet_transformers():  # its progress bars and load report would break the CLI's one-line errors
            # mismatched shapes come back in the loading info, which names them, instead of as an error
            # that points at the report
            hf_model, info = KINDS[kind].from_pretrained(where, output_loading_info=True,
                                                         ignore_mismatched_sizes=True)
    except (OSError, ValueError, RuntimeError, SafetensorError, KeyError, TypeError) as err:
        raise ModelLoadError(f"{where}: transformers cannot load the {KINDS[kind].__name__} it holds "
                             f"({_short(err)})") from err
    missing = [k for k in info.get("missing_keys", ()) if not k.endswith("position_ids")]
    mismatched = [_mismatch(m) for m in info.get("mismatched_keys", ())]
    if missing or mismatched:
        what = [f"{len(missing)} missing (first: {missing[0]})"] if missing else []
        what += [f"{len(mismatched)} of another shape, file vs config (first: {mismatched[0]})"] if mismatched else []
        raise ModelLoadError(f"{where}: the weights do not match its config.json: {'; '.join(what)}")
    with quiet_transformers():
        return _import_rest(hf_model, where).to(device)


def _import_rest(hf_model, where: str) -> DualEncoder:
    """The tokenizer and image processor of a loaded transformers model's folder, and the vlpt model."""
    tokenizer = processor = None
    local = Path(where)
    if not local.exists() or _has_tokenizer(local):
        try:
            tokenizer = AutoTokenizer.from_pretrained(where)
        except (OSError, ValueError, KeyError, TypeError, ImportError) as err:
            raise ModelLoadError(f"{where}: its tokenizer cannot be loaded ({_short(err)})") from err
    else:
        log.warning("%s has no tokenizer files: the imported model takes token ids only", where)
    if not local.exists() or (local / "preprocessor_config.json").exists():
        try:
            processor = AutoImageProcessor.from_pretrained(where)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ModelLoadError(f"{where}: its preprocessor_config.json cannot be read ({_short(err)})") from err
    try:
        return from_hf_model(hf_model, tokenizer, processor)
    except NotRepresentable as err:
        raise ModelLoadError(f"{where}: {err}") from err


def _mismatch(item) -> str:
    """transformers' mismatched_keys entry (key, file shape, model shape) as one phrase."""
    if isinstance(item, (tuple, list)) and len(item) == 3:
        key, theirs, ours = item
        return f"{key} {tuple(theirs)} vs {tuple(ours)}"
    return str(item)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers without progress bars and below-error log lines (they go to stderr on their own)."""
    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# ----------------------------------------------------------------------------- vlpt -> HF model

def _check_text(model: DualEncoder, kind: str, target: str) -> None:
    text = model.text_tower
    model_type = text.encoder.config.model_type
    if model_type != TEXT_MODEL_TYPES[kind]:
        raise NotRepresentable(f"{target} has no counterpart of a {model_type} text tower; it needs "
                               f"model.text.arch: {kind} (transformers' {TEXT_MODEL_TYPES[kind]})")
    pool = "eos" if kind == "clip" else "last"
    if text.config.pool != pool:
        where = "end-of-text token" if pool == "eos" else "last position"
        raise NotRepresentable(f"{target} pools its text tower at the {where} (model.text.pool: {pool}), not by "
                               f"{text.config.pool!r}")


def to_hf_model(model: DualEncoder, kind: str) -> CLIPModel | SiglipModel:
    """A transformers ``CLIPModel`` (kind clip) / ``SiglipModel`` (siglip) with the weights of a vlpt dual
    encoder; NotRepresentable names what the target has no place for."""
    target = f"HF {KINDS[kind].__name__}"
    spec = vit_spec(model.image_tower, target)
    want = ("token", True, False, True) if kind == "clip" else ("map", False, True, False)
    if (spec.pool, spec.pre_norm, spec.patch_bias, spec.class_token) != want:
        raise NotRepresentable(f"{target} needs {'CLIP' if kind == 'clip' else 'SigLIP'}'s vision transformer "
                               f"(model.image.name: {'clip-vit' if kind == 'clip' else 'siglip-vit'}): pooling "
                               f"{want[0]}, pre-norm {want[1]}, patch bias {want[2]}, class token {want[3]}; this "
                               f"one has {spec.pool}, {spec.pre_norm}, {spec.patch_bias}, {spec.class_token}")
    _check_text(model, kind, target)
    c = model.config
    if kind == "clip":
        if (c.image_projection, c.text_projection) != ("linear", "linear"):
            raise NotRepresentable(f"{target} projects both towers by a Linear without bias; this model has "
                                   f"image_projection {c.image_projection}, text_projection {c.text_projection}")
        if model.logit_bias is not None:
            raise NotRepresentable(f"{target} has no logit_bias, and this model was trained with one (the sigmoid "
                                   f"loss): export it to hf-siglip, or drop the bias knowingly")
    elif c.image_projection != "none" or c.text_projection == "none":
        raise NotRepresentable(f"{target} has no image projection (model.image_projection: none) and a text head "
                               f"(text_projection: linear_bias); this model has {c.image_projection}, "
                               f"{c.text_projection}")
    vision = dict(hidden_size=spec.width, intermediate_size=spec.mlp_width, num_hidden_layers=spec.layers,
                  num_attention_heads=spec.heads, image_size=spec.image_size, patch_size=spec.patch_size,
                  hidden_act=HF_ACTIVATIONS[spec.activation], layer_norm_eps=spec.eps, num_channels=3)
    text = hf_config_dict(model.text_tower.encoder.config)
    text.pop("model_type")
    text.pop("_attn_implementation", None)
    scale = float(model.logit_scale.detach())
    if kind == "clip":
        config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=c.embed_dim,
                            logit_scale_init_value=scale)
    else:
        text["projection_size"] = c.embed_dim
        config = SiglipConfig(text_config=text, vision_config=vision)
    hf_model = KINDS[kind](config)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    out = {f"vision_model.{k}": v for k, v in vision_from_timm(prefixed(state, "image_tower.backbone."),
                                                               spec).items()}
    out |= {f"text_model.{k}": v for k, v in prefixed(state, "text_tower.encoder.").items()}
    if kind == "clip":
        out["visual_projection.weight"], out["text_projection.weight"] = state["image_proj.weight"], \
            state["text_proj.weight"]
        out["logit_scale"] = state["logit_scale"].reshape(())
    else:
        head_weight = state["text_proj.weight"]
        out["text_model.head.weight"] = head_weight
        out["text_model.head.bias"] = state.get("text_proj.bias", torch.zeros(head_weight.shape[0]))
        out["logit_scale"] = state["logit_scale"].reshape(1)
        bias = state.get("logit_bias")
        out["logit_bias"] = torch.zeros(1) if bias is None else bias.reshape(1)  # no bias: 0 gives the same logits
    load_matching_state(hf_model, {k: v.clone() for k, v in out.items()},
                        f"internal: the mapped weights do not fit the {target}")
    return hf_model.eval()


def image_processor_for(model: DualEncoder, kind: str):
    """The transformers image processor doing the vlpt model's preprocessing."""
    image = model.config.image
    common = dict(image_mean=list(image.mean), image_std=list(image.std), resample=PIL_RESAMPLE[image.interpolation],
                  do_rescale=True, do_normalize=True, do_convert_rgb=True)
    if image.resize_mode == "squash":
        size = {"height": image.image_size, "width": image.image_size}
        if kind == "siglip":
            return SiglipImageProcessor(size=size, **common)
        return CLIPImageProcessor(size=size, do_center_crop=False, **common)
    return CLIPImageProcessor(size={"shortest_edge": image.resize_size or image.image_size}, do_center_crop=True,
                              crop_size={"height": image.image_size, "width": image.image_size}, **common)


def export_hf(model: DualEncoder, out: str | Path, kind: str) -> Path:
    """Write ``model`` as a transformers ``CLIPModel`` / ``SiglipModel`` folder (config.json,
    model.safetensors, preprocessor_config.json, the tokenizer), which ``from_pretrained`` loads."""
    with quiet_transformers():
        hf_model = to_hf_model(model, kind)
        processor = image_processor_for(model, kind)
    with atomic_directory(out) as tmp, quiet_transformers():
        hf_model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if model.tokenizer is not None:
            save_tokenizer(model, tmp)
        else:
            log.warning("the model has no tokenizer: %s gets none (its users must bring token ids)", out)
    return Path(out)
