import pytest
import torch

from tests.conftest import assert_close_to_scale, tiny_model_config
from vlpt import create_model, get_tokenizer, image_transform, load_model
from vlpt.config import ImageTowerConfig, RunConfig, list_configs, load_config
from vlpt.models.image_towers import ImageTower, list_image_towers
from vlpt.models.text_towers import TextTower

CORPUS = ["a red circle", "a big blue square on the left", "two shapes: a green star and a white cross",
          "a small yellow hexagon above a purple triangle"] * 5


def make_model(**text):
    return create_model(tiny_model_config(**text), corpus=CORPUS, seed=0).eval()


@pytest.mark.parametrize("name", list_image_towers())
def test_every_image_preset_has_the_tower_interface(name):
    tower = ImageTower(ImageTowerConfig(name=name, image_size=32))
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    tokens, pooled = tower.forward_features(images)
    assert tokens.shape[0] == 2 and tokens.shape[1] == tower.num_tokens and tokens.shape[2] == tower.width
    assert pooled.shape == (2, tower.output_dim)


def test_any_timm_model_by_name_and_unknown_names_list_choices():
    tower = ImageTower(ImageTowerConfig(name="resnet10t", image_size=32, pool="avg")).eval()
    assert tower.forward_features(torch.zeros(1, 3, 32, 32))[1].shape == (1, tower.output_dim)
    with pytest.raises(ValueError, match="resnet-tiny"):
        ImageTower(ImageTowerConfig(name="no-such-net"))
    with pytest.raises(ValueError, match="attn"):
        ImageTower(ImageTowerConfig(pool="nope"))


def test_uint8_and_transformed_float_inputs_agree():
    model = make_model()
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    from PIL import Image

    transform = image_transform(model)
    floats = torch.stack([transform(Image.fromarray(im.numpy())) for im in images])
    assert_close_to_scale(model.encode_image(images), model.encode_image(floats))


def test_uint8_pixels_are_normalised_by_the_tower_config_in_either_layout():
    tower = ImageTower(ImageTowerConfig(name="resnet-tiny", image_size=16, mean=(0.4, 0.5, 0.6),
                                        std=(0.2, 0.25, 0.3))).eval()
    hwc = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    original = hwc.clone()
    mean = torch.tensor([0.4, 0.5, 0.6], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3], dtype=torch.float64).view(1, 3, 1, 1)
    expected = (hwc.permute(0, 3, 1, 2).double() / 255 - mean) / std  # the formula, in float64
    for images in (hwc, hwc.permute(0, 3, 1, 2).contiguous()):
        out = tower.preprocess(images)
        assert out.dtype == torch.float32 and out.shape == (2, 3, 16, 16)
        torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-5)
    assert torch.equal(hwc, original)  # the caller's pixels are not normalised in place


def test_embeddings_are_normalised_and_shaped():
    model = make_model()
    img = model.encode_image(torch.zeros(4, 32, 32, 3, dtype=torch.uint8))
    txt = model.encode_text(["a red circle", "a blue star"])
    assert img.shape == (4, 32) and txt.shape == (2, 32)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(2))


def test_logit_scale_starts_at_clip_value_and_is_clamped():
    model = make_model()
    out = model(torch.zeros(2, 32, 32, 3, dtype=torch.uint8), *model.tokenize(["a", "b c"]).values())
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    out = model(torch.zeros(2, 32, 32, 3, dtype=torch.uint8), *model.tokenize(["a", "b c"]).values())
    assert out["logit_scale"].item() == pytest.approx(100.0)


def test_save_load_gives_identical_embeddings(tmp_path):
    model = make_model()
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    texts = ["a red circle", "an unseen zebra word"]
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert torch.equal(model.encode_image(images), loaded.encode_image(images))
    assert torch.equal(model.encode_text(texts), loaded.encode_text(texts))
    assert get_tokenizer(tmp_path / "m")(texts)["input_ids"].tolist() == model.tokenize(texts)["input_ids"].tolist()


def test_tokenizer_truncates_and_rejects_empty_text():
    model = make_model(context_length=8)
    ids = model.tokenize(["a " * 50, "a red circle"])["input_ids"]
    assert ids.shape[1] == 8
    assert ids[0, -1].item() == model.tokenizer.hf.sep_token_id  # [SEP] kept at the end
    with pytest.raises(ValueError, match="empty"):
        model.encode_text(["a red circle", "   "])


def test_locked_towers_get_no_gradient_but_projections_do():
    config = tiny_model_config()
    config.text.locked = True
    model = create_model(config, corpus=CORPUS).train()
    assert not model.text_tower.training  # locked towers stay in eval mode
    out = model(torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8), *model.tokenize(["a red", "b"]).values())
    (out["image_features"] * out["text_features"]).sum().backward()
    assert all(p.grad is None for p in model.text_tower.parameters())
    assert model.text_proj.weight.grad is not None and model.image_proj.weight.grad is not None


def test_minilm_loads_offline_as_a_locked_pretrained_text_tower(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = tiny_model_config(pretrained="minilm", locked=True)
    model = create_model(config).eval()
    assert model.text_tower.output_dim == 384
    a, b, c = model.text_tower.forward_features(**{k: v for k, v in model.tokenize(
        ["a photo of a dog", "a picture of a puppy", "quarterly tax filing deadline"]).items()})[1]
    cos = torch.nn.functional.cosine_similarity
    assert cos(a, b, dim=0) > cos(a, c, dim=0)  # real pretrained weights: similar sentences are close
    model.save_pretrained(tmp_path / "lit")
    loaded = load_model(tmp_path / "lit")  # rebuilt from the saved config, no hub or package path needed
    assert torch.equal(loaded.encode_text(["a dog"]), model.encode_text(["a dog"]))


@pytest.mark.parametrize("name", list_configs())
def test_every_shipped_config_loads_and_builds(name):
    config = load_config(name)
    assert isinstance(config, RunConfig)
    tower = ImageTower(config.model.image).eval()
    assert tower.forward_features(torch.zeros(1, 3, config.model.image.image_size,
                                              config.model.image.image_size))[1].ndim == 2
    if not config.model.text.pretrained:
        TextTower(config.model.text)


def test_attention_pool_equals_projecting_every_token():
    """The attention pool skips projecting each token to a key and a value (one query: the projections can be
    applied to the query and to the weighted mean instead); in float64 it equals the straightforward form,
    values and gradients."""
    import torch.nn.functional as F

    from vlpt.models.image_towers import AttentionPool

    torch.manual_seed(0)
    pool = AttentionPool(width=128, num_tokens=16, num_heads=2).double()
    with torch.no_grad():
        pool.kv.bias.normal_()  # a key bias that is not zero: it must drop out of the softmax
    tokens = torch.randn(5, 16, 128, dtype=torch.float64, requires_grad=True)

    def straightforward(t: torch.Tensor) -> torch.Tensor:
        B, N, C = t.shape
        k, v = pool.kv(pool.norm(t + pool.pos)).chunk(2, dim=-1)
        q = pool.query.expand(B, -1, -1)
        q, k, v = (x.reshape(B, -1, 2, C // 2).transpose(1, 2) for x in (q, k, v))
        return pool.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, C))

    fast, reference = pool(tokens), straightforward(tokens)
    torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-12)
    grads = [torch.autograd.grad(out.square().sum(), [tokens, pool.query, pool.kv.weight]) for out in (fast, reference)]
    for g_fast, g_ref in zip(*grads):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-9, atol=1e-11)
