"""Text -> image generator: noise schedule, classifier-free guidance, determinism, validation,
save / load, and a tiny generator that overfits one image's color (all on a tiny 32 px UNet)."""

import dataclasses
import json

import pytest
import torch

from tests.conftest import assert_close_to_scale, tiny_model_config
from vlpt.config import GeneratorConfig, SamplingConfig, TrainConfig, from_dict, to_dict
from vlpt.factory import create_model
from vlpt.models.generator import (
    MODEL_TYPE,
    SAMPLING_NAME,
    TextToImageGenerator,
    classifier_free_guidance,
    images_to_pixels,
    load_generator,
    write_sampling,
)
from vlpt.tasks.generate import GenerateTask
from vlpt.train.trainer import Trainer

CORPUS = ["a red circle", "a blue square", "a green star", "a large red circle in the top left"]
COLOR = (220, 40, 60)


def tiny_generator_config(**changes) -> GeneratorConfig:
    config = GeneratorConfig(image_size=32, block_channels=(16, 32), attention_levels=(False, True),
                             layers_per_block=1, heads=2, norm_groups=8, cross_attention_dim=32,
                             train_timesteps=100)
    return dataclasses.replace(config, **changes)


def make_generator(seed: int = 0, **changes) -> TextToImageGenerator:
    dual = create_model(tiny_model_config(), corpus=CORPUS, seed=seed)
    torch.manual_seed(seed)
    return TextToImageGenerator(tiny_generator_config(**changes), dual)


@pytest.fixture(scope="module")
def generator() -> TextToImageGenerator:
    model = make_generator()
    with torch.no_grad():  # a random UNet predicts ~0; give the text path a visible effect
        for p in model.unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def solid_images(n: int, color=COLOR, size: int = 32) -> torch.Tensor:
    images = torch.empty(n, size, size, 3, dtype=torch.uint8)
    images[...] = torch.tensor(color, dtype=torch.uint8)
    return images  # (n, H, W, 3)


# ----------------------------------------------------------------------------- noise schedule + guidance

def test_add_noise_matches_the_ddpm_forward_process(generator):
    scheduler = generator.train_scheduler
    alpha_bar = torch.cumprod(1 - scheduler.betas, dim=0)
    assert torch.allclose(alpha_bar, scheduler.alphas_cumprod)
    assert alpha_bar[0] > 0.99 and alpha_bar[-1] < 1e-3  # nearly clean -> nearly pure noise
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    eps = torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 50, 99])
    expected = alpha_bar[t].sqrt()[:, None, None, None] * x0 + (1 - alpha_bar[t]).sqrt()[:, None, None, None] * eps
    torch.testing.assert_close(scheduler.add_noise(x0, eps, t), expected)


def test_guidance_formula():
    uncond, cond = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(classifier_free_guidance(uncond, cond, 0.0), uncond)
    torch.testing.assert_close(classifier_free_guidance(uncond, cond, 1.0), cond)
    torch.testing.assert_close(classifier_free_guidance(uncond, cond, 3.0), uncond + 3.0 * (cond - uncond))


def test_guided_noise_combines_conditional_and_unconditional_predictions(generator):
    tokens = generator.tokenizer(["a red circle", "a large red circle in the top left"])
    mask = tokens["attention_mask"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(50)
    with torch.no_grad():
        context = generator.encode_context(tokens["input_ids"], mask)  # (2, L, X)
        cond = generator.denoise(x, t, context, mask)
        uncond = generator.denoise(x, t, generator.unconditional_context(2, 1))
        assert (cond - uncond).abs().max() > 1e-4  # the text changes the prediction
        for g in (0.0, 1.0, 2.5):
            guided = generator.guided_noise(x, t, context, mask, g)
            assert_close_to_scale(guided, uncond + g * (cond - uncond))


def test_condition_dropout_uses_the_unconditional_embedding():
    model = make_generator(condition_dropout=1.0)
    seen = {}
    real_denoise = model.denoise

    def spy(x, t, context, mask=None):
        seen["context"], seen["mask"] = context, mask
        return real_denoise(x, t, context, mask)

    model.denoise = spy
    tokens = model.tokenizer(["a red circle", "a large red circle in the top left"])
    loss = model.training_loss(solid_images(2), tokens["input_ids"], tokens["attention_mask"],
                               torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    torch.testing.assert_close(seen["context"], model.null_context.expand_as(seen["context"]))
    assert bool((seen["mask"] == 1).all())
    loss.backward()
    assert model.null_context.grad is not None and model.null_context.grad.abs().sum() > 0


def test_frozen_text_tower_gets_no_gradients_and_trainable_one_does():
    for freeze in (True, False):
        model = make_generator(freeze_text=freeze)
        tokens = model.tokenizer(["a red circle", "a blue square"])
        model.train()
        model.training_loss(solid_images(2), tokens["input_ids"], tokens["attention_mask"],
                            torch.Generator().manual_seed(0)).backward()
        text_grads = [p.grad for p in model.dual_encoder.text_tower.parameters()]
        assert all(g is None for g in text_grads) == freeze
        assert model.context_proj[1].weight.grad is not None


# ----------------------------------------------------------------------------- sampling

def test_same_seed_same_images_different_seed_different(generator):
    prompts = ["a red circle", "a blue square"]
    a = generator.generate_images(prompts, num_inference_steps=4, seed=3, progress=False)
    b = generator.generate_images(prompts, num_inference_steps=4, seed=3, progress=False)
    c = generator.generate_images(prompts, num_inference_steps=4, seed=4, progress=False)
    assert a.shape == (2, 32, 32, 3) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    many = generator.generate_images("a green star", num_inference_steps=2, progress=False, num_images_per_prompt=3)
    assert many.shape == (3, 32, 32, 3)


def test_ancestral_sampling_is_seeded_and_adds_noise(generator):
    prompts = ["a red circle", "a blue square"]
    options = dict(num_inference_steps=4, progress=False, seed=3)
    ddim = generator.generate_images(prompts, **options)
    a = generator.generate_images(prompts, eta=1.0, **options)
    b = generator.generate_images(prompts, eta=1.0, **options)
    c = generator.generate_images(prompts, eta=1.0, **{**options, "seed": 4})
    assert torch.equal(a, b)  # the seed also draws the per-step noise
    assert not torch.equal(a, c)
    assert not torch.equal(a, ddim)  # same initial noise, but fresh noise at each step
    # eta 0 through the keyword is the deterministic DDIM path itself
    assert torch.equal(generator.generate_images(prompts, eta=0.0, **options), ddim)


def test_guidance_interval_guides_only_the_steps_inside_it(generator, monkeypatch):
    prompts = ["a red circle", "a blue square"]
    options = dict(num_inference_steps=4, progress=False, seed=3)
    plain = generator.generate_images(prompts, guidance_scale=1.0, **options)
    guided = generator.generate_images(prompts, guidance_scale=4.0, **options)
    assert not torch.equal(plain, guided)
    # the whole schedule is the old behaviour; an interval that holds no step is no guidance at all
    assert torch.equal(generator.generate_images(prompts, guidance_scale=4.0, guidance_interval=(0, 1), **options),
                       guided)
    assert torch.equal(generator.generate_images(prompts, guidance_scale=4.0, guidance_interval=(0, 0.1), **options),
                       plain)
    # 4 trailing steps over 100 timesteps: t = 99, 74, 49, 24; (0, 0.6) guides the last two only
    scales = []
    guided_noise = generator.guided_noise

    def spy(x, t, context, mask, guidance_scale):
        scales.append((int(t), guidance_scale))
        return guided_noise(x, t, context, mask, guidance_scale)

    monkeypatch.setattr(generator, "guided_noise", spy)
    partial = generator.generate_images(prompts, guidance_scale=4.0, guidance_interval=(0, 0.6), **options)
    assert scales == [(99, 1.0), (74, 1.0), (49, 4.0), (24, 4.0)]
    assert not torch.equal(partial, plain) and not torch.equal(partial, guided)


@pytest.mark.parametrize("prompts, options, message", [
    ("", {}, "empty"),
    ("   ", {}, "empty"),
    (["a red circle", ""], {}, "prompt 1 is empty"),
    ([], {}, "no prompts"),
    ("a red circle", {"num_inference_steps": 0}, "num_inference_steps"),
    ("a red circle", {"num_inference_steps": 2.5}, "num_inference_steps"),
    ("a red circle", {"guidance_scale": -1.0}, "guidance_scale"),
    ("a red circle", {"guidance_scale": float("nan")}, "guidance_scale"),
    ("a red circle", {"num_images_per_prompt": 0}, "num_images_per_prompt"),
    ("a red circle", {"eta": -0.1}, "eta"),
    ("a red circle", {"guidance_interval": (0.7, 0.2)}, "guidance_interval"),
    ("a red circle", {"guidance_interval": (0.0, 1.5)}, "guidance_interval"),
    ("a red circle", {"guidance_interval": (float("nan"), 1.0)}, "guidance_interval"),
    ("a red circle", {"guidance_interval": (0.5,)}, "guidance_interval"),
    ("a red circle", {"eta": 1.5}, "eta"),
    ("a red circle", {"eta": float("nan")}, "eta"),
])
def test_bad_sampling_inputs_are_rejected(generator, prompts, options, message):
    with pytest.raises(ValueError, match=message):
        generator.generate_images(prompts, progress=False, **options)


def test_bad_configs_and_images_are_rejected(generator):
    dual = generator.dual_encoder
    for changes, message in [({"image_size": 0}, "image_size"), ({"image_size": 33}, "image_size"),
                             ({"attention_levels": (True,)}, "attention_levels"),
                             ({"norm_groups": 5}, "norm_groups"), ({"condition_dropout": 1.5}, "condition_dropout"),
                             ({"prediction_type": "x0"}, "prediction_type")]:
        with pytest.raises(ValueError, match=message):
            TextToImageGenerator(tiny_generator_config(**changes), dual)
    tokens = generator.tokenizer(["a red circle"])
    with pytest.raises(ValueError, match="64x64|32x32"):
        generator.training_loss(solid_images(1, size=64), tokens["input_ids"], tokens["attention_mask"])
    with pytest.raises(ValueError, match="uint8"):
        images_to_pixels(torch.zeros(1, 32, 32, 3))


def test_config_round_trips_through_dicts():
    config = tiny_generator_config(prediction_type="v_prediction")
    assert from_dict(GeneratorConfig, to_dict(config)) == config


def test_save_and_load_give_identical_images(generator, tmp_path):
    generator.save_pretrained(tmp_path / "gen")
    assert (tmp_path / "gen" / "model.safetensors").exists() and (tmp_path / "gen" / "tokenizer").is_dir()
    loaded = load_generator(tmp_path / "gen")
    assert loaded.config == generator.config
    options = dict(num_inference_steps=3, guidance_scale=3.0, seed=7, progress=False)
    assert torch.equal(loaded.generate_images(["a red circle"], **options),
                       generator.generate_images(["a red circle"], **options))
    generator.dual_encoder.save_pretrained(tmp_path / "dual")
    with pytest.raises(ValueError, match=MODEL_TYPE):
        load_generator(tmp_path / "dual")


def test_saved_sampling_settings_are_the_defaults_and_explicit_options_win(generator, tmp_path):
    generator.save_pretrained(tmp_path / "gen")
    assert load_generator(tmp_path / "gen").sampling == SamplingConfig()  # nothing chosen: the library's
    (tmp_path / "gen" / SAMPLING_NAME).unlink()  # a folder saved before sampling.json existed
    assert load_generator(tmp_path / "gen").sampling == SamplingConfig()
    chosen = SamplingConfig(num_inference_steps=3, guidance_scale=2.0, eta=0.0, guidance_interval=(0.0, 0.6))
    write_sampling(tmp_path / "gen", chosen)
    loaded = load_generator(tmp_path / "gen")
    assert loaded.sampling == chosen
    explicit = dict(num_inference_steps=3, guidance_interval=(0.0, 0.6), seed=7, progress=False)
    by_default = loaded.generate_images(["a red circle"], seed=7, progress=False)
    assert torch.equal(by_default, generator.generate_images(["a red circle"], guidance_scale=2.0, **explicit))
    overridden = loaded.generate_images(["a red circle"], guidance_scale=5.0, seed=7, progress=False)
    assert torch.equal(overridden, generator.generate_images(["a red circle"], guidance_scale=5.0, **explicit))
    assert not torch.equal(overridden, by_default)
    loaded.save_pretrained(tmp_path / "again")  # save -> load keeps the settings
    assert load_generator(tmp_path / "again").sampling == chosen


@pytest.mark.parametrize("content, message", [
    ({"guidance_scale": -1.0}, "guidance_scale must be >= 0"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 500}, "at most the 100 training timesteps"),
    ({"guidance_interval": [0.9, 0.1]}, "guidance_interval"),
    ({"eta": 2}, "eta"),
    ({"guidance": 2.0}, "guidance"),  # a misspelt key: the error lists the valid ones
    ("{not json", "not valid JSON"),
])
def test_a_bad_sampling_file_names_itself(generator, tmp_path, content, message):
    generator.save_pretrained(tmp_path / "gen")
    path = tmp_path / "gen" / SAMPLING_NAME
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=message) as error:
        load_generator(tmp_path / "gen")
    assert SAMPLING_NAME in str(error.value)


# ----------------------------------------------------------------------------- learning

def test_tiny_generator_overfits_one_image_color(tmp_path):
    """Trainer + GenerateTask on one solid-color image: the samples come out in that color."""
    model = make_generator(prediction_type="v_prediction", condition_dropout=0.0)
    tokens = model.tokenizer(["a red circle"] * 4)
    images = solid_images(4)

    class Repeat:
        def batch(self, step):
            return {"images": images, **tokens}

    config = TrainConfig(steps=150, batch_size=4, lr=5e-3, weight_decay=0.0, warmup_steps=10, log_every=50,
                         checkpoint_every=0, device="cpu", precision="fp32")
    history = Trainer(GenerateTask(model), Repeat(), config, tmp_path / "run").fit()
    assert history[-1]["loss"] < history[0]["loss"]
    out = model.generate_images(["a red circle"] * 2, num_inference_steps=10, guidance_scale=1.0, progress=False)
    mean = out.float().mean(dim=(0, 1, 2))  # (3,)
    assert (mean - torch.tensor(COLOR, dtype=torch.float)).abs().max() < 20, mean


def test_unet_sees_coordinates_and_the_pooled_prompt():
    """coord_channels: x / y maps join the image (5 input channels); pooled_condition: the masked mean of the
    context tokens is the UNet's class embedding input (added to the timestep embedding)."""
    model = make_generator()
    assert model.unet.conv_in.in_channels == 5
    seen = {}
    real_forward = model.unet.forward

    def spy(x, t, encoder_hidden_states=None, encoder_attention_mask=None, class_labels=None):
        seen["x"], seen["pooled"] = x, class_labels
        return real_forward(x, t, encoder_hidden_states=encoder_hidden_states,
                            encoder_attention_mask=encoder_attention_mask, class_labels=class_labels)

    model.unet.forward = spy
    tokens = model.tokenizer(["a red circle", "a large red circle in the top left"])
    mask = tokens["attention_mask"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        context = model.encode_context(tokens["input_ids"], mask)
        model.denoise(x, torch.tensor(10), context, mask)
    assert torch.equal(seen["x"][:, :3], x)
    assert torch.equal(seen["x"][0, 3, 0], torch.linspace(-1, 1, 32))  # x grows left -> right
    assert torch.equal(seen["x"][0, 4, :, 0], torch.linspace(-1, 1, 32))  # y grows top -> bottom
    short = int(mask[0].sum())
    assert_close_to_scale(seen["pooled"][0], context[0, :short].mean(0))  # padding left out
    plain = make_generator(coord_channels=False, pooled_condition=False)
    assert plain.unet.conv_in.in_channels == 3 and plain.unet.class_embedding is None


def test_spatial_condition_stacks_a_prompt_map_with_the_pixels():
    """spatial_condition S: the pooled prompt -> MLP -> (K, S, S) map, enlarged to the image, joins the
    UNet input after the coordinate maps; different prompts give different maps, the same prompt the same."""
    model = make_generator(spatial_condition=4, spatial_channels=3)
    assert model.unet.conv_in.in_channels == 3 + 2 + 3
    seen = {}
    real_forward = model.unet.forward

    def spy(x, t, **kwargs):
        seen["x"] = x
        return real_forward(x, t, **kwargs)

    model.unet.forward = spy
    tokens = model.tokenizer(["a red circle", "a large red circle in the top left", "a red circle"])
    mask = tokens["attention_mask"]
    with torch.no_grad():
        context = model.encode_context(tokens["input_ids"], mask)
        out = model.denoise(torch.randn(3, 3, 32, 32), torch.tensor(10), context, mask)
        pooled = (context[0, :int(mask[0].sum())]).mean(0)
        expected = model.spatial_proj(pooled).view(1, 3, 4, 4)
    assert out.shape == (3, 3, 32, 32)
    prompt_map = seen["x"][:, 5:]  # (3, K, 32, 32)
    assert_close_to_scale(prompt_map[:1], torch.nn.functional.interpolate(expected, size=(32, 32), mode="bilinear"))
    assert torch.equal(prompt_map[0], prompt_map[2]) and not torch.allclose(prompt_map[0], prompt_map[1])
    with pytest.raises(ValueError, match="spatial_condition"):
        make_generator(spatial_condition=-1)
