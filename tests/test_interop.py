"""Checkpoint interoperability with transformers (CLIPModel, SiglipModel) and OpenCLIP, both directions.

Peer models are random-initialised with the peers' own classes at two sizes with non-default settings,
saved with the peers' own save functions, and never downloaded. Embeddings and logits are compared with
the peer's on the same pixel inputs and token ids (``assert_close_to_scale``, 1e-5 of the values' scale);
after a round trip every tensor is equal."""

import json
import shutil
import types

import open_clip  # the test extra installs it: these tests never skip
import pytest
import torch
from open_clip.model import set_model_preprocess_cfg
from open_clip.push_to_hf_hub import save_for_hf
from PIL import Image
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
)

from tests.conftest import TINY_CORPUS, assert_close_to_scale, tiny_model_config, tiny_run_config
from vlpt import cli
from vlpt.config import ConfigError, ModelConfig, TextTowerConfig, load_config
from vlpt.data.shapes import CLASS_NAMES
from vlpt.factory import create_model, image_transform, load, load_model
from vlpt.interop import NotRepresentable, export_model, foreign_format
from vlpt.interop.common import check_pos_embed, join_qkv, split_qkv
from vlpt.interop.hf import vision_from_timm, vision_spec, vision_to_timm
from vlpt.interop.open_clip import text_from_hf, text_to_hf
from vlpt.io import ModelLoadError
from vlpt.models.text_towers import eos_positions
from vlpt.tokenization import Tokenizer, clip_bpe_tokenizer, train_wordpiece

TEXTS = ["a red circle", "two blue stars in the top left corner of the picture", "x",
         "a small yellow hexagon above a purple triangle"]
CORPUS = TINY_CORPUS + list(CLASS_NAMES)


def features(out) -> torch.Tensor:
    """transformers' get_*_features: a tensor, or an output whose pooler_output is the embedding."""
    return out if torch.is_tensor(out) else out.pooler_output


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def wordpiece(context_length: int) -> PreTrainedTokenizerFast:
    hf = train_wordpiece(CORPUS, 200)
    hf.model_max_length = context_length
    return hf


def pixels(size: int, n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))  # (B, 3, S, S) normalised


# ----------------------------------------------------------------------------- transformers CLIP

CLIP_SIZES = {
    "small-bpe": dict(
        text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=16, hidden_act="gelu", layer_norm_eps=1e-6, vocab_size=49408,
                         eos_token_id=49407, bos_token_id=49406, pad_token_id=49407),
        vision_config=dict(hidden_size=40, intermediate_size=100, num_hidden_layers=2, num_attention_heads=5,
                           image_size=24, patch_size=6, hidden_act="quick_gelu"),
        projection_dim=24, logit_scale_init_value=3.0,
        processor=dict(size={"shortest_edge": 28}, crop_size={"height": 24, "width": 24}, resample=2,
                       image_mean=[0.4, 0.45, 0.5], image_std=[0.2, 0.25, 0.3])),
    "wide-wordpiece": dict(
        text_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=20, hidden_act="quick_gelu", eos_token_id=3, bos_token_id=2,
                         pad_token_id=0),
        vision_config=dict(hidden_size=24, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=32, patch_size=8, hidden_act="gelu", layer_norm_eps=1e-6),
        projection_dim=16, logit_scale_init_value=4.0,
        processor=dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, resample=3,
                       image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25])),
}


def save_hf_clip(folder, size: str) -> CLIPModel:
    """A random CLIPModel of ``size`` saved by transformers with its tokenizer and image processor."""
    spec = dict(CLIP_SIZES[size])
    processor = spec.pop("processor")
    context = spec["text_config"]["max_position_embeddings"]
    tokenizer = clip_bpe_tokenizer(context) if size == "small-bpe" else wordpiece(context)
    spec["text_config"] = {**spec["text_config"], "vocab_size": len(tokenizer)}
    torch.manual_seed(1)
    model = CLIPModel(CLIPConfig(**spec)).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(**processor).save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=sorted(CLIP_SIZES))
def hf_clip(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-clip") / request.param
    return folder, save_hf_clip(folder, request.param)


def test_hf_clip_to_vlpt_to_hf_clip(hf_clip, tmp_path):
    folder, peer = hf_clip
    model = load_model(folder)
    size = peer.config.vision_config.image_size
    image = pixels(size)
    ids = AutoTokenizer.from_pretrained(folder)(TEXTS, padding=True, truncation=True, return_tensors="pt")
    ours = model.tokenize(TEXTS)
    assert torch.equal(ours["input_ids"], ids["input_ids"])
    assert torch.equal(ours["attention_mask"], ids["attention_mask"])
    with torch.no_grad():
        assert_close_to_scale(model.encode_image(image, normalize=False),
                              features(peer.get_image_features(pixel_values=image)))
        assert_close_to_scale(model.encode_text(TEXTS, normalize=False), features(peer.get_text_features(**ids)))
        out = model(image, ours["input_ids"], ours["attention_mask"])
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        assert_close_to_scale(logits, peer(pixel_values=image, **ids).logits_per_image)
    model.export("hf-clip", tmp_path / "back")
    again = CLIPModel.from_pretrained(tmp_path / "back")
    assert_same_tensors(again.state_dict(), peer.state_dict())
    saved = json.loads((folder / "preprocessor_config.json").read_text())
    written = json.loads((tmp_path / "back" / "preprocessor_config.json").read_text())
    for key in ("size", "crop_size", "resample", "image_mean", "image_std", "do_center_crop"):
        assert written[key] == pytest.approx(saved[key]), key
    assert AutoTokenizer.from_pretrained(tmp_path / "back")(TEXTS)["input_ids"] == \
        AutoTokenizer.from_pretrained(folder)(TEXTS)["input_ids"]


# ----------------------------------------------------------------------------- transformers SigLIP

SIGLIP_SIZES = {
    "small": dict(
        text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=12, projection_size=40),
        vision_config=dict(hidden_size=40, intermediate_size=100, num_hidden_layers=2, num_attention_heads=5,
                           image_size=24, patch_size=6)),
    "wide": dict(
        text_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=3,
                         max_position_embeddings=18, projection_size=24, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=24, intermediate_size=80, num_hidden_layers=3, num_attention_heads=2,
                           image_size=32, patch_size=8, layer_norm_eps=1e-5)),
}


@pytest.fixture(scope="module", params=sorted(SIGLIP_SIZES))
def hf_siglip(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-siglip") / request.param
    spec = SIGLIP_SIZES[request.param]
    tokenizer = wordpiece(spec["text_config"]["max_position_embeddings"])
    spec = {**spec, "text_config": {**spec["text_config"], "vocab_size": len(tokenizer)}}
    torch.manual_seed(2)
    peer = SiglipModel(SiglipConfig(**spec)).eval()
    with torch.no_grad():
        peer.logit_scale.fill_(2.5)
        peer.logit_bias.fill_(-7.0)
    peer.save_pretrained(folder)
    tokenizer.save_pretrained(folder)  # SigLIP's own is a SentencePiece model that only the hub has
    size = spec["vision_config"]["image_size"]
    SiglipImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                         resample=2).save_pretrained(folder)
    return folder, peer


def test_hf_siglip_to_vlpt_to_hf_siglip(hf_siglip, tmp_path):
    folder, peer = hf_siglip
    model = load_model(folder)
    c = model.config
    assert (c.image_projection, c.text_projection, c.text.pool, c.text.pad_to_context) == ("none", "linear_bias",
                                                                                          "last", True)
    assert (c.image.resize_mode, c.image.interpolation, c.init_logit_bias) == ("squash", "bilinear", -7.0)
    image = pixels(peer.config.vision_config.image_size)
    # SigLIP is fed texts padded to its full context, and is called without an attention mask
    ids = AutoTokenizer.from_pretrained(folder)(TEXTS, padding="max_length", truncation=True, return_tensors="pt")
    ours = model.tokenize(TEXTS)
    assert torch.equal(ours["input_ids"], ids["input_ids"])
    with torch.no_grad():
        assert_close_to_scale(model.encode_image(image, normalize=False),
                              features(peer.get_image_features(pixel_values=image)))
        assert_close_to_scale(model.encode_text(TEXTS, normalize=False),
                              features(peer.get_text_features(input_ids=ids["input_ids"])))
        out = model(image, ours["input_ids"], ours["attention_mask"])
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T + out["logit_bias"]
        assert_close_to_scale(logits, peer(pixel_values=image, input_ids=ids["input_ids"]).logits_per_image)
    model.export("hf-siglip", tmp_path / "back")
    assert_same_tensors(SiglipModel.from_pretrained(tmp_path / "back").state_dict(), peer.state_dict())
    written = json.loads((tmp_path / "back" / "preprocessor_config.json").read_text())
    assert written["image_processor_type"] == "SiglipImageProcessor" and written["resample"] == 2


# ----------------------------------------------------------------------------- OpenCLIP

OPEN_CLIP_SIZES = {
    # OpenAI-style: QuickGELU, the class token, argmax pooling, OpenCLIP's default tokenizer
    "quickgelu-bpe": dict(embed_dim=24, quick_gelu=True, init_logit_scale=3.5,
                          vision_cfg=dict(layers=2, width=32, head_width=16, patch_size=8, image_size=32,
                                          mlp_ratio=2.5),
                          text_cfg=dict(context_length=16, vocab_size=49408, width=40, heads=4, layers=2,
                                        mlp_ratio=3.0)),
    # SigLIP-style text (no causal mask, last token, projection with bias), mean-pooled image tokens,
    # LayerNorm epsilon 1e-6, tanh GELU in the text tower, a logit bias, a (1,) logit scale, its own tokenizer
    "avgpool-bidirectional": dict(embed_dim=20, init_logit_bias=-6.0, nonscalar_logit_scale=True,
                                  vision_cfg=dict(layers=3, width=24, head_width=12, patch_size=6, image_size=24,
                                                  pool_type="avg", norm_kwargs={"eps": 1e-6}),
                                  text_cfg=dict(context_length=12, vocab_size=0, width=32, heads=2, layers=1,
                                                no_causal_mask=True, pool_type="last", proj_bias=True,
                                                act_kwargs={"approximate": "tanh"}, hf_tokenizer_name="local",
                                                pad_id=0)),
}
OPEN_CLIP_PREPROCESS = {"mean": (0.45, 0.4, 0.35), "std": (0.3, 0.28, 0.26), "interpolation": "bilinear",
                        "resize_mode": "squash"}


def save_open_clip(folder, size: str):
    """A random OpenCLIP model of ``size`` saved by OpenCLIP's own save_for_hf (a local-dir folder)."""
    cfg = json.loads(json.dumps(OPEN_CLIP_SIZES[size]))
    tokenizer = types.SimpleNamespace(save_pretrained=lambda d: None)  # SimpleTokenizer is not saved
    if cfg["text_cfg"]["vocab_size"] == 0:
        hf = wordpiece(cfg["text_cfg"]["context_length"])
        cfg["text_cfg"]["vocab_size"] = len(hf)
        tokenizer = hf
    torch.manual_seed(3)
    peer = open_clip.CLIP(**cfg).eval()
    set_model_preprocess_cfg(peer, {**OPEN_CLIP_PREPROCESS, "size": cfg["vision_cfg"]["image_size"]})
    save_for_hf(peer, tokenizer, cfg, folder, safe_serialization=True)
    return peer, cfg


@pytest.fixture(scope="module", params=sorted(OPEN_CLIP_SIZES))
def open_clip_dir(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("open-clip") / request.param
    peer, cfg = save_open_clip(folder, request.param)
    return folder, peer, cfg


def test_open_clip_to_vlpt_to_open_clip(open_clip_dir, tmp_path):
    folder, peer, cfg = open_clip_dir
    model = load_model(folder)
    assert (model.config.image.mean, model.config.image.interpolation, model.config.image.resize_mode) == \
        (OPEN_CLIP_PREPROCESS["mean"], "bilinear", "squash")
    image = pixels(cfg["vision_cfg"]["image_size"])
    ids = open_clip.get_tokenizer(f"local-dir:{folder}")(TEXTS)  # (B, context), padded with 0 or pad_id
    ours = model.tokenize(TEXTS)
    length = ours["input_ids"].shape[1]
    assert torch.equal(ours["input_ids"] * ours["attention_mask"], ids[:, :length] * ours["attention_mask"])
    with torch.no_grad():
        assert_close_to_scale(model.encode_image(image, normalize=False), peer.encode_image(image))
        assert_close_to_scale(model.encode_text(TEXTS, normalize=False), peer.encode_text(ids))
        out = model(image, ours["input_ids"], ours["attention_mask"])
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        if out["logit_bias"] is not None:
            logits = logits + out["logit_bias"]
        assert_close_to_scale(logits, peer.get_logits(image, ids)[0])
    model.export("open-clip", tmp_path / "back")
    again, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'back'}")
    expected = peer.state_dict()
    if cfg.get("nonscalar_logit_scale"):  # written as the scalar OpenCLIP's default builds; its loader reshapes
        expected = {k: v.reshape(()) if k.startswith("logit_") else v for k, v in expected.items()}
    assert_same_tensors(again.state_dict(), expected)
    written = json.loads((tmp_path / "back" / "open_clip_config.json").read_text())
    for key in ("embed_dim", "quick_gelu", "init_logit_bias"):
        assert written["model_cfg"].get(key) == cfg.get(key), key
    assert written["preprocess_cfg"]["mean"] == pytest.approx(OPEN_CLIP_PREPROCESS["mean"])
    assert written["preprocess_cfg"]["resize_mode"] == "squash"
    assert torch.equal(open_clip.get_tokenizer(f"local-dir:{tmp_path / 'back'}")(TEXTS), ids)


def test_an_open_clip_weights_file_with_its_config_or_model_name(tmp_path):
    folder = tmp_path / "oc"
    peer, cfg = save_open_clip(folder, "quickgelu-bpe")  # OpenCLIP's default tokenizer: no tokenizer files
    torch.save(peer.state_dict(), tmp_path / "weights.pt")  # a plain state dict, as OpenCLIP training writes
    (tmp_path / "arch.json").write_text(json.dumps(cfg))  # a model_configs/*.json
    image = pixels(cfg["vision_cfg"]["image_size"])
    reference = load_model(folder).encode_image(image)
    for model in (load_model(f"{tmp_path / 'arch.json'},{tmp_path / 'weights.pt'}"),
                  load_model(tmp_path / "weights.pt", arch=str(tmp_path / "arch.json"))):
        assert torch.equal(model.encode_image(image), reference)
    open_clip.add_model_config(tmp_path / "arch.json")  # now an OpenCLIP model name, "arch"
    assert torch.equal(load_model("arch," + str(tmp_path / "weights.pt")).encode_image(image), reference)
    with pytest.raises(ModelLoadError, match="needs its architecture"):
        load_model(tmp_path / "weights.pt")


@pytest.mark.parametrize("proj", ["none", "linear"])
def test_an_open_clip_timm_trunk_is_the_same_timm_model(proj, tmp_path):
    """OpenCLIP's SigLIP-style configs: a timm vision trunk (here timm's tiny test_vit) pooled by attention
    (MAP) without projection, or by its class token with a Linear, and a bidirectional text tower."""
    tokenizer = wordpiece(12)
    cfg = dict(embed_dim=64 if proj == "none" else 24, custom_text=True, init_logit_bias=-5.0,
               vision_cfg=dict(timm_model_name="test_vit", timm_model_pretrained=False, image_size=160,
                               timm_pool="map" if proj == "none" else "", timm_proj=proj),
               text_cfg=dict(context_length=12, vocab_size=len(tokenizer), width=32, heads=2, layers=1,
                             no_causal_mask=True, pool_type="last", proj_bias=True, hf_tokenizer_name="local",
                             norm_kwargs={"eps": 1e-6}, act_kwargs={"approximate": "tanh"}))
    torch.manual_seed(8)
    peer = open_clip.CustomTextCLIP(**{k: v for k, v in cfg.items() if k != "custom_text"}).eval()
    set_model_preprocess_cfg(peer, {"mean": (0.5,) * 3, "std": (0.5,) * 3, "size": 160, "resize_mode": "squash"})
    save_for_hf(peer, tokenizer, cfg, tmp_path / "oc", safe_serialization=True)
    model = load_model(tmp_path / "oc")
    assert model.config.image.name == "test_vit" and model.config.image_projection == ("none" if proj == "none"
                                                                                        else "linear")
    image = pixels(160, n=2)
    ids = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")(TEXTS)
    with torch.no_grad():
        assert_close_to_scale(model.encode_image(image, normalize=False), peer.encode_image(image))
        assert_close_to_scale(model.encode_text(TEXTS, normalize=False), peer.encode_text(ids))
    model.export("open-clip", tmp_path / "back")  # written as open_clip.CLIP: the text tensors at the top level
    again = open_clip.create_model(f"local-dir:{tmp_path / 'back'}").eval()
    renamed = {k.removeprefix("text."): v for k, v in peer.state_dict().items()}
    assert_same_tensors(again.state_dict(), renamed)
    with pytest.raises(NotRepresentable, match="cannot hold image tower 'test_vit': no learned position embedding"):
        model.export("hf-siglip", tmp_path / "s")  # timm's test_vit sizes its position embedding dynamically


# ----------------------------------------------------------------------------- vlpt -> peer -> vlpt

def vlpt_clip_config(size: str) -> ModelConfig:
    """A CLIP-shaped vlpt model (clip-vit + CLIP text) of two sizes with non-default settings."""
    if size == "small":
        overrides = ["model.embed_dim=24", "model.image.image_size=32", "model.image.activation=quick_gelu",
                     "model.image.timm_kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
                     "model.image.mean=[0.4, 0.4, 0.4]", "model.image.std=[0.2, 0.3, 0.2]",
                     "model.image.resize_size=36", "model.image.interpolation=bilinear",
                     "model.text.hidden_size=32", "model.text.num_layers=1", "model.text.intermediate_size=64",
                     "model.text.context_length=12", "model.text.activation=quick_gelu"]
    else:
        overrides = ["model.embed_dim=16", "model.image.image_size=24", "model.image.layer_norm_eps=1e-6",
                     "model.image.timm_kwargs={patch_size: 6, embed_dim: 48, depth: 1, num_heads: 4, mlp_ratio: 2}",
                     "model.image.resize_mode=squash", "model.text.hidden_size=40", "model.text.num_layers=2",
                     "model.text.num_heads=5", "model.text.intermediate_size=72", "model.text.context_length=20"]
    return load_config("clip-vit-shapes", overrides).model


@pytest.mark.parametrize("size", ["small", "wide"])
def test_vlpt_to_hf_clip_to_vlpt(size, tmp_path):
    model = create_model(vlpt_clip_config(size), corpus=CORPUS, seed=4).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.3)
    model.export("hf-clip", tmp_path / "hf")
    peer = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    image = pixels(model.config.image.image_size)
    ids = AutoTokenizer.from_pretrained(tmp_path / "hf")(TEXTS, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        assert_close_to_scale(features(peer.get_image_features(pixel_values=image)), model.encode_image(image, False))
        assert_close_to_scale(features(peer.get_text_features(**ids)), model.encode_text(TEXTS, normalize=False))
        out = model(image, ids["input_ids"], ids["attention_mask"])
        assert_close_to_scale(peer(pixel_values=image, **ids).logits_per_image,
                              out["logit_scale"] * out["image_features"] @ out["text_features"].T)
    back = load_model(tmp_path / "hf")
    assert_same_tensors(back.state_dict(), model.state_dict())
    a, b = back.config, model.config
    assert (a.image.image_size, a.image.mean, a.image.std, a.image.interpolation, a.image.resize_mode) == \
        (b.image.image_size, b.image.mean, b.image.std, b.image.interpolation, b.image.resize_mode)
    assert (a.image.resize_size or a.image.image_size) == (b.image.resize_size or b.image.image_size)
    assert (a.text.context_length, a.text.activation or "gelu", a.image.activation) == \
        (b.text.context_length, b.text.activation or "gelu", b.image.activation)
    assert back.tokenize(TEXTS)["input_ids"].tolist() == model.tokenize(TEXTS)["input_ids"].tolist()


@pytest.mark.parametrize("size", ["small", "wide"])
def test_vlpt_to_open_clip_to_vlpt(size, tmp_path):
    config = vlpt_clip_config(size)
    tokenizer = None
    if size == "wide":  # OpenAI CLIP's BPE (OpenCLIP's default tokenizer), QuickGELU in both towers, mean pooling
        tokenizer = Tokenizer(clip_bpe_tokenizer(), config.text.context_length)
        config.image.activation = config.text.activation = "quick_gelu"
        config.image.timm_kwargs["global_pool"] = "avg"
        config.text.hf_config = None
    model = create_model(config, tokenizer, corpus=CORPUS, seed=5).eval()
    model.export("open-clip", tmp_path / "oc")
    written = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())["model_cfg"]
    assert ("hf_tokenizer_name" in written["text_cfg"]) == (size == "small")
    peer, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    ids = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")(TEXTS)
    image = pixels(config.image.image_size)
    with torch.no_grad():
        assert_close_to_scale(peer.eval().encode_image(image), model.encode_image(image, normalize=False))
        assert_close_to_scale(peer.encode_text(ids), model.encode_text(TEXTS, normalize=False))
    back = load_model(tmp_path / "oc")
    assert_same_tensors(back.state_dict(), model.state_dict())
    assert back.tokenize(TEXTS)["input_ids"].tolist() == model.tokenize(TEXTS)["input_ids"].tolist()


def test_a_sigmoid_trained_vlpt_model_exports_to_hf_siglip(tmp_path):
    config = load_config("clip-vit-shapes", [
        "model.image.name=siglip-vit", "model.image.activation=gelu_tanh", "model.image.layer_norm_eps=1e-6",
        "model.image.image_size=32", "model.image.timm_kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
        "model.image_projection=none", "model.embed_dim=32", "model.text_projection=linear_bias",
        "model.init_logit_bias=-10", "model.text.arch=siglip", "model.text.pool=last", "model.text.pad_to_context=true",
        "model.text.mask_padding=false", "model.text.hidden_size=24", "model.text.num_layers=1",
        "model.text.num_heads=2", "model.text.intermediate_size=48", "model.text.context_length=10",
        "model.image.resize_mode=squash"]).model
    model = create_model(config, corpus=CORPUS, seed=6).eval()
    model.export("hf-siglip", tmp_path / "s")
    peer = SiglipModel.from_pretrained(tmp_path / "s").eval()
    ids = AutoTokenizer.from_pretrained(tmp_path / "s")(TEXTS, padding="max_length", truncation=True,
                                                        return_tensors="pt")["input_ids"]
    image = pixels(32)
    with torch.no_grad():
        assert_close_to_scale(features(peer.get_image_features(pixel_values=image)), model.encode_image(image, False))
        assert_close_to_scale(features(peer.get_text_features(input_ids=ids)),
                              model.encode_text(TEXTS, normalize=False))
        assert peer.logit_bias.item() == -10.0
    assert_same_tensors(load_model(tmp_path / "s").state_dict(), model.state_dict())
    with pytest.raises(NotRepresentable, match="needs CLIP's vision transformer"):
        model.export("hf-clip", tmp_path / "c")


# ----------------------------------------------------------------------------- checkpoint details

def test_fused_in_proj_is_q_then_k_then_v():
    w = torch.randn(3 * 8, 8)
    q, k, v = split_qkv(w)
    assert torch.equal(q, w[:8]) and torch.equal(k, w[8:16]) and torch.equal(v, w[16:])
    assert torch.equal(join_qkv(q, k, v), w)
    # an OpenCLIP text layer's nn.MultiheadAttention in_proj -> transformers' q_proj, k_proj, v_proj and back
    layer = {f"transformer.resblocks.0.{n}": torch.randn(s) for n, s in [
        ("attn.in_proj_weight", (24, 8)), ("attn.in_proj_bias", (24,)), ("attn.out_proj.weight", (8, 8)),
        ("attn.out_proj.bias", (8,)), ("ln_1.weight", (8,)), ("ln_1.bias", (8,)), ("ln_2.weight", (8,)),
        ("ln_2.bias", (8,)), ("mlp.c_fc.weight", (16, 8)), ("mlp.c_fc.bias", (16,)), ("mlp.c_proj.weight", (8, 16)),
        ("mlp.c_proj.bias", (8,))]}
    layer |= {"token_embedding.weight": torch.randn(5, 8), "positional_embedding": torch.randn(4, 8),
              "ln_final.weight": torch.randn(8), "ln_final.bias": torch.randn(8)}
    hf = text_to_hf(layer, 1)
    fused = layer["transformer.resblocks.0.attn.in_proj_weight"]
    assert torch.equal(hf["encoder.layers.0.self_attn.k_proj.weight"], fused[8:16])
    assert_same_tensors(text_from_hf(hf, 1), layer)
    # SigLIP's MAP head: in_proj (3C) -> timm's q (C) and kv (2C)
    peer = SiglipModel(SiglipConfig(text_config=dict(hidden_size=8, num_attention_heads=2, num_hidden_layers=1,
                                                     intermediate_size=16, projection_size=8, vocab_size=10),
                                    vision_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                                       num_attention_heads=2, image_size=8, patch_size=4)))
    spec = vision_spec("siglip", peer.config.vision_config)
    state = {k[len("vision_model."):]: v for k, v in peer.state_dict().items() if k.startswith("vision_model.")}
    timm = vision_to_timm(state, spec)
    assert torch.equal(timm["attn_pool.kv.weight"], state["head.attention.in_proj_weight"][8:])
    assert torch.equal(timm["blocks.0.attn.qkv.weight"][16:], state["encoder.layers.0.self_attn.v_proj.weight"])
    assert_same_tensors(vision_from_timm(timm, spec), state)


def test_projections_x_at_proj_are_transposed_linear_weights(open_clip_dir):
    folder, peer, cfg = open_clip_dir
    model = load_model(folder)
    assert torch.equal(model.image_proj.weight, peer.visual.proj.T)  # (E, C) vs (C, E)
    pooled = torch.randn(2, peer.visual.proj.shape[0])
    assert_close_to_scale(model.image_proj(pooled), pooled @ peer.visual.proj)
    if isinstance(peer.text_projection, torch.nn.Linear):  # with a bias: a Linear on both sides, no transpose
        assert torch.equal(model.text_proj.weight, peer.text_projection.weight)
        assert torch.equal(model.text_proj.bias, peer.text_projection.bias)
    else:
        assert torch.equal(model.text_proj.weight, peer.text_projection.T)


def test_quick_gelu_and_gelu_are_kept_apart(tmp_path):
    folder = tmp_path / "oc"
    peer, cfg = save_open_clip(folder, "quickgelu-bpe")
    model = load_model(folder)
    assert model.config.image.activation == model.config.text.activation == "quick_gelu"
    assert type(model.image_tower.backbone.blocks[0].mlp.act).__name__ == "QuickGELU"
    assert model.text_tower.encoder.config.hidden_act == "quick_gelu"
    wrong = model.config_for_saving()
    wrong.image.activation = wrong.text.activation = "gelu"  # the same weights under the other activation
    other = type(model)(wrong, model.tokenizer, load_pretrained_weights=False)
    other.load_state_dict(model.state_dict())
    image = pixels(32)
    assert (other.eval().encode_image(image) - model.encode_image(image)).abs().max() > 1e-3
    mixed = load_config("clip-vit-shapes", ["model.image.activation=quick_gelu", "model.image.image_size=32",
                                            "model.image.timm_kwargs={patch_size: 8, embed_dim: 32, depth: 1, "
                                            "num_heads: 2}", "model.text.hidden_size=32", "model.text.num_layers=1"])
    mixed_model = create_model(mixed.model, corpus=CORPUS)
    with pytest.raises(NotRepresentable, match="QuickGELU in both towers or in neither"):
        mixed_model.export("open-clip", tmp_path / "mixed-oc")
    mixed_model.export("hf-clip", tmp_path / "mixed-hf")  # transformers sets each tower's hidden_act
    written = json.loads((tmp_path / "mixed-hf" / "config.json").read_text())
    assert (written["vision_config"]["hidden_act"], written["text_config"]["hidden_act"]) == ("quick_gelu", "gelu")


def test_text_pooling_at_the_end_of_text_token_or_the_last_position():
    ids = torch.tensor([[5, 7, 3, 0, 0], [5, 3, 3, 3, 3], [5, 6, 7, 8, 3]])
    assert eos_positions(ids, 3).tolist() == [2, 1, 4]  # the first end-of-text token (padding may repeat it)
    assert eos_positions(torch.tensor([[49406, 320, 49407, 0]]), 2).tolist() == [2]  # legacy configs: argmax
    with pytest.raises(ConfigError, match="last needs pad_to_context"):
        load_config("clip-vit-shapes", ["model.text.pool=last"])
    with pytest.raises(ConfigError, match="eos needs a text tower with an end-of-text token"):
        load_config("tiny-shapes", ["model.text.pool=eos"])
    # a text tower pooled at its last position sees the padding: vlpt pads to the full context, as trained
    config = tiny_model_config(arch="siglip", pool="last", pad_to_context=True, mask_padding=False, context_length=9)
    model = create_model(config, corpus=CORPUS).eval()
    assert model.tokenize(["a red circle"])["input_ids"].shape == (1, 9)
    one, batch = model.encode_text(["a red circle"]), model.encode_text(["a red circle", "a " * 20])
    assert_close_to_scale(batch[:1], one)


def test_image_pooling_heads_of_vlpt_and_resnets_are_not_representable(tmp_path):
    resnet = create_model(tiny_model_config(), corpus=CORPUS)  # resnet-tiny with vlpt's attention pooling
    for target in ("hf-clip", "hf-siglip", "open-clip"):
        with pytest.raises(NotRepresentable, match="resnet-tiny"):
            resnet.export(target, tmp_path / target)
    config = tiny_model_config(arch="clip", pool="eos")
    config.image.name = "vit-tiny"  # vlpt's attention pooling head on a ViT
    with pytest.raises(NotRepresentable, match="'attn' pooling head"):
        create_model(config, corpus=CORPUS).export("hf-clip", tmp_path / "vit")
    assert not (tmp_path / "vit").exists()


def test_logit_scale_and_bias_shapes(hf_siglip, open_clip_dir):
    folder, peer = hf_siglip
    model = load_model(folder)
    assert peer.logit_scale.shape == (1,) and model.logit_scale.shape == () and model.logit_bias.shape == ()
    assert model.logit_scale.item() == peer.logit_scale.item() and model.logit_bias.item() == peer.logit_bias.item()
    folder, peer, cfg = open_clip_dir
    model = load_model(folder)
    assert model.logit_scale.shape == () and model.logit_scale.item() == peer.logit_scale.reshape(()).item()
    assert (model.logit_bias is None) == (peer.logit_bias is None)
    sigmoid = create_model(vlpt_clip_config("small"), corpus=CORPUS)
    sigmoid.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))
    with pytest.raises(NotRepresentable, match="HF CLIPModel has no logit_bias"):
        sigmoid.export("hf-clip", "unused")


def test_the_position_embedding_must_fit_the_image_size(tmp_path):
    save_hf_clip(tmp_path / "hf", "wide-wordpiece")
    config = tmp_path / "hf" / "config.json"
    data = json.loads(config.read_text())
    data["vision_config"]["image_size"] = 40  # 5x5 patches: 26 positions, the weights hold 17
    config.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match=f"{tmp_path / 'hf'}.*position_embedding"):
        load_model(tmp_path / "hf")
    save_open_clip(tmp_path / "oc", "quickgelu-bpe")
    config = tmp_path / "oc" / "open_clip_config.json"
    data = json.loads(config.read_text())
    data["model_cfg"]["vision_cfg"]["image_size"] = 48
    config.write_text(json.dumps(data))
    # OpenCLIP's own loading resamples a position embedding to the configured grid (fine-tuning at another
    # resolution); vlpt imports what OpenCLIP builds: 6x6 patches + the class token
    model = load_model(tmp_path / "oc")
    peer = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    assert model.image_tower.backbone.pos_embed.shape == (1, 37, 32) and model.config.image.image_size == 48
    assert_close_to_scale(model.encode_image(pixels(48), normalize=False), peer.encode_image(pixels(48)))
    spec = vision_spec("clip", CLIPConfig().vision_config)
    with pytest.raises(NotRepresentable, match="needs 50 .*7x7 patches \\+ the class token"):
        check_pos_embed(17, spec, "here")


def test_the_tokenizer_and_context_length_come_with_the_model(tmp_path):
    save_open_clip(tmp_path / "oc", "quickgelu-bpe")
    model = load_model(tmp_path / "oc")
    simple = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")
    texts = TEXTS + ["Hello, World! it's 3.14 o'clock", "word " * 40]  # the last one is cut at the context
    ours = model.tokenize(texts)
    theirs = simple(texts)
    assert ours["input_ids"].shape[1] == model.config.text.context_length == 16
    assert torch.equal(ours["input_ids"] * ours["attention_mask"], theirs)
    assert theirs[-1, -1] == 49407 and ours["input_ids"][-1, -1] == 49407  # the end-of-text token is kept
    model.save_pretrained(tmp_path / "vlpt")  # carried over: saved with the model, read back with it
    assert load_model(tmp_path / "vlpt").tokenize(texts)["input_ids"].tolist() == ours["input_ids"].tolist()


def test_preprocessing_matches_the_peers(hf_clip):
    folder, peer = hf_clip
    model = load_model(folder)
    image = Image.fromarray(torch.randint(0, 256, (45, 60, 3), dtype=torch.uint8).numpy())  # not square
    ours = image_transform(model)(image)
    theirs = CLIPImageProcessor.from_pretrained(folder)(image, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape
    # the same resize (torchvision, antialiased) and crop; uint8 rounding of the resized image aside
    assert (ours - theirs).abs().mean() < 0.02 * float(max(model.config.image.std) ** -1)


# ----------------------------------------------------------------------------- vlpt's interface on imports

def test_an_imported_model_is_a_dual_encoder_everywhere(hf_clip, tmp_path, capsys):
    folder, peer = hf_clip
    model = load(folder)
    model.save_pretrained(tmp_path / "vlpt")  # a vlpt folder from then on
    again = load_model(tmp_path / "vlpt")
    image = pixels(peer.config.vision_config.image_size)
    assert torch.equal(again.encode_image(image), model.encode_image(image))
    assert torch.equal(again.encode_text(TEXTS), model.encode_text(TEXTS))
    assert foreign_format(folder) == "hf" and foreign_format(tmp_path / "vlpt") is None
    assert cli.main(["embed", "--model", str(folder), "--text", "a red circle", "-o", str(tmp_path / "e.npy")]) == 0
    assert "wrote 1 embeddings" in capsys.readouterr().out


def test_vlpt_eval_takes_any_model_with_a_configs_data(tmp_path, capsys):
    folder = tmp_path / "hf"
    save_hf_clip(folder, "wide-wordpiece")  # 32 px: the shapes are rendered at the tower's size
    sizes = ["eval.zero_shot_size=24", "eval.compositional_size=8", "eval.retrieval_size=16",
             "eval.probe_train_size=96"]
    argv = ["eval", str(folder), "--output", str(tmp_path / "out")] + [a for s in sizes for a in ("--set", s)]
    assert cli.main(argv) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert 0 <= metrics["zeroshot_top1"] <= 1 and "zeroshot_top1" in capsys.readouterr().out
    assert (tmp_path / "out" / "report.md").exists() and not (folder / "metrics.json").exists()


def test_an_imported_hf_clip_model_trains_resumes_exactly_and_exports_back(tmp_path):
    torch.manual_seed(7)
    tokenizer = wordpiece(16)
    peer = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=16, vocab_size=len(tokenizer), eos_token_id=3, pad_token_id=0,
                         bos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=32))
    peer.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    from vlpt.train.run import fit

    def losses(run_dir):
        rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    config = tiny_run_config(steps=4, **{"model.init_from": str(tmp_path / "hf"), "train.checkpoint_every": 2,
                                         "train.batch_size": 16, "data.train_size": 64})
    fit(config, tmp_path / "full")
    fit(config, tmp_path / "cut", stop_after=3)  # interrupted after step 3; its last checkpoint is step 2
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_0000003")
    status = cli.main(["train", "--resume", "--name", "cut", "--runs-dir", str(tmp_path)])
    assert status == 0
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(cut) == [1, 2, 3, 4] and all(cut[s] == full[s] for s in full), (cut, full)
    trained = load_model(tmp_path / "cut")
    assert_same_tensors(trained.state_dict(), load_model(tmp_path / "full").state_dict())
    start = load_model(tmp_path / "hf")
    assert not torch.equal(trained.image_proj.weight, start.image_proj.weight)  # it trained
    assert cli.main(["export", str(tmp_path / "cut"), "--to", "hf-clip", str(tmp_path / "back")]) == 0
    back = CLIPModel.from_pretrained(tmp_path / "back").eval()
    image = pixels(32)
    assert_close_to_scale(features(back.get_image_features(pixel_values=image)), trained.encode_image(image, False))
    # vlpt finetune from the transformers folder, and its towers exported back
    status = cli.main(["finetune", "--task", "classify", "--from", str(tmp_path / "hf"), "--runs-dir", str(tmp_path),
                       "--name", "ft", "--set", "train.steps=2", "--set", "train.batch_size=16",
                       "--set", "finetune.train_size=32", "--set", "finetune.test_size=32",
                       "--set", "data.image_size=32"])
    assert status == 0
    assert cli.main(["export", str(tmp_path / "ft"), "--to", "open-clip", str(tmp_path / "ft-oc")]) == 0
    assert open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'ft-oc'}")[0] is not None


def test_a_captioner_trains_on_an_imported_open_clip_model(tmp_path):
    """OpenAI CLIP's tokenizer pads with its end-of-text token; the captioner keeps that token a target."""
    from vlpt.models.captioner import load_captioner
    from vlpt.train.run import run

    save_open_clip(tmp_path / "oc", "quickgelu-bpe")
    config = tiny_run_config(steps=2, **{"train.task": "caption", "caption.from_run": str(tmp_path / "oc"),
                                         "caption.freeze_towers": True, "caption.model.width": 32,
                                         "caption.model.layers": 1, "caption.eval_size": 8, "caption.grid_images": 0,
                                         "caption.beam": 2, "data.train_size": 32, "train.batch_size": 16,
                                         "train.checkpoint_every": 0})
    metrics = run(config, tmp_path / "cap")
    assert "bleu4_greedy" in metrics
    captioner = load_captioner(tmp_path / "cap")
    assert (captioner.bos_id, captioner.eos_id, captioner.pad_id) == (49406, 49407, 0)
    assert len(captioner.generate_caption(torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8))) == 2


def test_vlpt_eval_and_clip_benchmark_agree_on_an_image_folder(tmp_path):
    import clip_benchmark  # noqa: F401  (the test extra installs it; compare() runs its command line)

    from vlpt.interop.clip_benchmark import compare
    from vlpt.train.run import fit

    config = load_config("clip-vit-shapes", [
        "model.embed_dim=32", "model.image.image_size=32", "data.image_size=32",
        "model.image.timm_kwargs={patch_size: 8, embed_dim: 64, depth: 2, num_heads: 2}", "model.text.hidden_size=32",
        "model.text.num_layers=1", "model.text.intermediate_size=64", "data.train_size=256", "train.steps=80",
        "train.batch_size=32", "train.warmup_steps=2", "train.lr=0.003", "train.eval_every=0",
        "train.checkpoint_every=0"])
    fit(config, tmp_path / "run")
    result = compare(str(tmp_path / "run"), tmp_path / "cmp", size=96, image_size=32)
    assert result["images"] == 96
    # the same decisions on every image, except near ties (cosines within 1e-4 at the top-k boundary), which two
    # correct implementations may round either way on a barely trained model
    for ours, theirs, ties in (("vlpt", "clip_benchmark", "near_ties_top1"),
                               ("vlpt_top5", "clip_benchmark_top5", "near_ties_top5")):
        assert round(abs(result[ours] - result[theirs]) * 96) <= result[ties], result
    assert result["vlpt_reimported"] == result["vlpt"]  # the exported file, read back by vlpt


# ----------------------------------------------------------------------------- bad input

def one_error_line(capsys, argv) -> str:
    capsys.readouterr()
    status = cli.main(argv)
    err = capsys.readouterr().err.splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("vlpt: error: "), err
    return err[0]


def test_a_folder_of_no_supported_format_is_one_line(tmp_path, capsys):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "weights.bin").write_bytes(b"\0" * 10)
    line = one_error_line(capsys, ["embed", "--text", "a", "--model", str(tmp_path / "stuff")])
    assert str(tmp_path / "stuff") in line and "transformers CLIP / SigLIP folder" in line and "OpenCLIP" in line
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    line = one_error_line(capsys, ["embed", "--text", "a", "--model", str(tmp_path / "bert")])
    assert "a transformers 'bert' model; vlpt imports CLIPModel (clip) and SiglipModel (siglip)" in line


@pytest.mark.parametrize("kind", ["hf", "open-clip"])
def test_a_config_that_does_not_fit_the_weights_is_one_line(kind, tmp_path, capsys):
    if kind == "hf":
        save_hf_clip(tmp_path / "m", "wide-wordpiece")
        config = tmp_path / "m" / "config.json"
        data = json.loads(config.read_text())
        data["text_config"]["hidden_size"] = 64
        data["text_config"]["num_attention_heads"] = 4
    else:
        save_open_clip(tmp_path / "m", "quickgelu-bpe")
        config = tmp_path / "m" / "open_clip_config.json"
        data = json.loads(config.read_text())
        data["model_cfg"]["text_cfg"]["width"] = 64
    config.write_text(json.dumps(data))
    line = one_error_line(capsys, ["embed", "--text", "a", "--model", str(tmp_path / "m")])
    assert str(tmp_path / "m") in line, line
    assert ("do not match" in line or "size mismatch" in line or "not OpenCLIP weights" in line), line


@pytest.mark.parametrize("kind, weights", [("hf", "model.safetensors"), ("open-clip", "open_clip_model.safetensors")])
def test_a_truncated_safetensors_file_is_one_line(kind, weights, tmp_path, capsys):
    if kind == "hf":
        save_hf_clip(tmp_path / "m", "wide-wordpiece")
    else:
        save_open_clip(tmp_path / "m", "quickgelu-bpe")
    path = tmp_path / "m" / weights
    path.write_bytes(path.read_bytes()[:1000])
    line = one_error_line(capsys, ["embed", "--text", "a", "--model", str(tmp_path / "m")])
    assert str(tmp_path / "m") in line, line


def test_an_export_that_cannot_be_represented_is_one_line(tmp_path, capsys):
    create_model(tiny_model_config(), corpus=CORPUS).save_pretrained(tmp_path / "resnet")
    line = one_error_line(capsys, ["export", str(tmp_path / "resnet"), "--to", "hf-clip", str(tmp_path / "out")])
    assert "HF CLIPModel has no counterpart of image tower 'resnet-tiny'" in line, line
    assert not (tmp_path / "out").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "f").write_text("x")
    line = one_error_line(capsys, ["export", str(tmp_path / "resnet"), "--to", "open-clip", str(tmp_path / "taken")])
    assert "already exists; pass --overwrite" in line


def test_export_model_refuses_an_unknown_format():
    with pytest.raises(ValueError, match="hf-clip, hf-siglip, open-clip"):
        export_model(None, "onnx", "x")


def test_text_tower_config_defaults_are_unchanged():
    """A config written before interop loads as it did: BERT text tower, linear projections, no padding."""
    text = TextTowerConfig()
    assert (text.arch, text.pool, text.pad_to_context, text.mask_padding) == ("bert", "mean", False, True)
    assert (ModelConfig().image_projection, ModelConfig().text_projection, ModelConfig().init_from) == \
        ("linear", "linear", None)
