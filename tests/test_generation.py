"""Judging text -> image generation (Fréchet distance, Min-SNR weights, the independent judge) and the
generator run end to end: `vlpt train` (train.task generate) -> report -> `vlpt generate` -> bad input."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.test_generator import make_generator
from vlpt.cli import main
from vlpt.config import SamplingConfig
from vlpt.data import shapes
from vlpt.evaluate.generation import (
    SHAPE_ATTRIBUTES,
    Judge,
    JudgeConfig,
    frechet_distance,
    random_shift,
    resize_images,
    shapes_attribute_labels,
    shapes_prompt,
    train_judge,
)
from vlpt.evaluate.report import image_grid
from vlpt.models.generator import images_to_pixels, load_generator
from vlpt.tasks.generate import digits_prompts, shapes_prompts

# ----------------------------------------------------------------------------- metrics


def test_frechet_distance_matches_the_gaussian_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # 1-D Gaussians: d = (m1 - m2)^2 + (s1 - s2)^2, here from the samples' own moments
    x, y = rng.normal(0, 1, size=(5000, 1)), rng.normal(2, 3, size=(5000, 1))
    expected = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-6)
    # a shift of the mean by v adds |v|^2
    shift = np.array([1.0, -2.0, 0.5])
    assert frechet_distance(a, a + shift) == pytest.approx((shift ** 2).sum(), rel=1e-6)
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(a, a[:, :2])
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], a)


def test_min_snr_weights_follow_the_formula():
    model = make_generator(snr_gamma=5.0)
    t = torch.tensor([0, 10, 50, 99])
    alpha_bar = model.train_scheduler.alphas_cumprod[t].double()
    snr = alpha_bar / (1 - alpha_bar)
    expected_v = torch.minimum(snr, torch.tensor(5.0, dtype=torch.double)) / (snr + 1)
    torch.testing.assert_close(model.min_snr_weights(t).double(), expected_v, rtol=1e-5, atol=1e-6)
    eps_model = make_generator(snr_gamma=5.0, prediction_type="epsilon")
    expected_eps = torch.minimum(snr, torch.tensor(5.0, dtype=torch.double)) / snr
    torch.testing.assert_close(eps_model.min_snr_weights(t).double(), expected_eps, rtol=1e-5, atol=1e-6)
    tokens = model.tokenizer(["a red circle"] * 2)
    images = torch.full((2, 32, 32, 3), 128, dtype=torch.uint8)
    loss = model.training_loss(images, tokens["input_ids"], tokens["attention_mask"], torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_detail_weights_follow_the_formula_and_weight_the_loss():
    model = make_generator(detail_weight=10.0)
    flat = torch.zeros(2, 3, 16, 16)
    torch.testing.assert_close(model.detail_weights(flat), torch.ones(2, 1, 16, 16))
    x0 = torch.full((1, 3, 16, 16), -1.0)
    x0[:, :, 5:10, 5:10] = 1.0  # a 5x5 square on a flat background
    weights = model.detail_weights(x0)
    box = F.avg_pool2d(x0, 5, stride=1, padding=2, count_include_pad=False)
    contrast = (x0 - box).abs().sum(1, keepdim=True)
    expected = 1 + 10.0 * contrast / contrast.mean()
    torch.testing.assert_close(weights, expected / expected.mean())
    assert weights.mean().item() == pytest.approx(1.0)
    assert weights[0, 0, 5, 5] > 5 * weights[0, 0, 0, 0]  # the square's corner outweighs the far background
    # the loss is the weighted MSE, against the formula with the same draws (no condition dropout)
    model = make_generator(detail_weight=10.0, condition_dropout=0.0)
    tokens = model.tokenizer(["a red circle"])
    images = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    images[:, 10:20, 10:20] = 255
    loss = model.training_loss(images, tokens["input_ids"], tokens["attention_mask"], torch.Generator().manual_seed(0))
    draws = torch.Generator().manual_seed(0)
    x0 = images_to_pixels(images)
    noise = torch.randn(x0.shape, generator=draws)
    t = torch.randint(0, model.config.train_timesteps, (1,), generator=draws)
    with torch.no_grad():
        x_t = model.train_scheduler.add_noise(x0, noise, t)
        v = model.denoise(x_t, t, model.encode_context(tokens["input_ids"], tokens["attention_mask"]),
                          tokens["attention_mask"])
        target = model.train_scheduler.get_velocity(x0, noise, t)
        expected_loss = ((v - target).pow(2) * model.detail_weights(x0)).mean()
        plain_loss = (v - target).pow(2).mean()
    torch.testing.assert_close(loss.detach(), expected_loss, rtol=1e-5, atol=1e-7)
    assert not torch.isclose(expected_loss, plain_loss)
    with pytest.raises(ValueError, match="detail_weight"):
        make_generator(detail_weight=-1.0)


def test_prompts_and_resizing():
    obj = shapes.ShapeObject(shape="circle", color="red", size="large", cell=0, dx=0, dy=0, rotation=0)
    assert shapes_prompt(obj) == "a large red circle in the top left"
    scene = shapes.Scene(objects=[obj], background=(40, 40, 40))
    assert shapes_prompts([scene], "test") == ["an illustration of a large red circle in the top left"]
    assert shapes_prompts([scene, scene], "val")[1] == "a drawing of a large red circle in the top left"
    assert digits_prompts([7], "test") == ["7"] and digits_prompts([7], "val") == ["an image of the number seven"]
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    assert resize_images(images, 32) is images
    big = resize_images(images, 64)
    assert big.shape == (3, 64, 64, 3) and big.dtype == torch.uint8
    flat = torch.full((1, 32, 32, 3), 77, dtype=torch.uint8)
    assert torch.equal(resize_images(flat, 16), torch.full((1, 16, 16, 3), 77, dtype=torch.uint8))
    shifted = random_shift(images, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8


def test_judge_learns_real_shapes_attributes():
    """A small judge trained briefly on real single-object scenes reads held-out ones far above chance."""
    train = shapes.ShapesDataset(shapes.ShapesConfig(split="train", size=1500, image_size=32, min_objects=1,
                                                     max_objects=1, seed=1))
    test = shapes.ShapesDataset(shapes.ShapesConfig(split="test", size=300, image_size=32, min_objects=1,
                                                    max_objects=1))
    judge = train_judge(train.images, shapes_attribute_labels(train.scenes), SHAPE_ATTRIBUTES,
                        JudgeConfig(width=8, steps=200, batch_size=64, lr=3e-3))
    accuracy = judge.accuracy(test.images, shapes_attribute_labels(test.scenes))
    assert accuracy["color"] > 0.6, accuracy  # chance 1/8
    assert accuracy["position"] > 0.5, accuracy  # chance 1/9
    assert accuracy["size"] > 0.7, accuracy  # chance 1/2
    # deterministic given the seed
    again = train_judge(train.images[:200], shapes_attribute_labels(train.scenes[:200]), SHAPE_ATTRIBUTES,
                        JudgeConfig(width=8, steps=3, batch_size=16))
    same = train_judge(train.images[:200], shapes_attribute_labels(train.scenes[:200]), SHAPE_ATTRIBUTES,
                       JudgeConfig(width=8, steps=3, batch_size=16))
    for a, b in zip(again.state_dict().values(), same.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="labels for"):
        train_judge(train.images, {"color": np.zeros(len(train.images))}, SHAPE_ATTRIBUTES)
    assert isinstance(judge, Judge)


def test_image_grid_layout():
    images = np.stack([np.full((4, 4, 3), k * 20, np.uint8) for k in range(5)])
    grid = np.asarray(image_grid(images, columns=3, scale=2))
    assert grid.shape == (2 * 4 * 2, 3 * 4 * 2, 3)
    assert (grid[:8, 8:16] == 20).all() and (grid[8:, 8:16] == 80).all() and (grid[8:, 16:] == 0).all()


# ----------------------------------------------------------------------------- run + command line

TINY = ["model.embed_dim=32", "model.image.image_size=32", "model.text.hidden_size=32", "model.text.num_layers=1",
        "model.text.intermediate_size=64", "model.text.vocab_size=200", "data.train_size=64", "train.steps=4",
        "train.batch_size=8", "train.warmup_steps=1", "train.log_every=1", "train.checkpoint_every=2",
        "generate.from_run=null", "generate.model.block_channels=[16,32]", "generate.model.attention_levels=[false,true]",
        "generate.model.norm_groups=8", "generate.model.cross_attention_dim=32", "generate.model.heads=2",
        "generate.model.freeze_text=false", "generate.model.train_timesteps=50", "generate.eval_size=12",
        "generate.guidance=[1,3]", "generate.sampling_steps=2", "generate.judge_steps=3", "generate.val_size=6",
        "generate.compositional_size=6",
        "generate.judge_train_size=64", "generate.grid_prompts=2"]


@pytest.fixture(scope="module")
def generator_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    args = ["train", "--config", "generate-shapes", "--runs-dir", str(runs), "--name", "gen"]
    assert main(args + sum((["--set", s] for s in TINY), [])) == 0
    return runs / "gen"


def test_the_generator_trains_on_captions_with_nonsense_words_inserted():
    """data.caption_noise applies to text -> image: the prompt's words stay, in order, with 1-3 unknown words
    inserted, so an opening the generator never trained on ("a rendering of ...") passes."""
    from vlpt.config import load_config
    from vlpt.data.splits import Pairs
    from vlpt.factory import create_model
    from vlpt.tasks.generate import TextToImage
    from vlpt.train.distributed import DistributedEnv

    config = load_config("generate-shapes", TINY + ["data.caption_noise=1.0"])
    task = TextToImage()
    assert not [n for n in task.unused_options(config) if "caption_noise" in n]
    captions = [[f"a large red circle in the top left {i}"] for i in range(16)]
    model = create_model(config.model, corpus=[c for cs in captions for c in cs])
    data = Pairs(np.zeros((16, 32, 32, 3), np.uint8), captions, np.zeros(16, np.int64))
    noisy = task.batches(config, data, model, DistributedEnv()).batch(0)
    clean = task.batches(load_config("generate-shapes", TINY + ["data.caption_noise=0"]), data, model,
                         DistributedEnv()).batch(0)
    assert torch.equal(noisy["index"], clean["index"])
    assert (noisy["attention_mask"].sum(1) > clean["attention_mask"].sum(1)).all()


def test_generate_run_trains_evaluates_and_reports(generator_run):
    metrics = json.loads((generator_run / "metrics.json").read_text())
    for key in ("judge_color_acc", "judge_shape_acc", "judge_position_acc", "judge_size_acc", "val_judge_mean_acc_g1",
                "val_judge_mean_acc_g3", "frechet_distance", "frechet_distance_real", "seconds_per_image",
                "judge_real_color_acc", "train_seconds", "best_guidance", "judge_color_acc_compositional",
                "frechet_distance_compositional"):
        assert key in metrics, key
    # the guidance is chosen on the validation prompts; only the chosen one is reported on test
    assert metrics["guidance_selected_on"] == "val"
    assert metrics["best_guidance"] == max((1, 3), key=lambda g: metrics[f"val_judge_mean_acc_g{g}"])
    assert not any(k.startswith("judge_") and "_g" in k for k in metrics)
    assert "clip_score" not in metrics  # no independent scorer given: no CLIP-score
    for name in ("samples.png", "guidance.png", "report.md", "loss.png"):
        assert (generator_run / name).exists(), name
    assert "samples.png" in (generator_run / "report.md").read_text()
    model = load_generator(generator_run)
    assert model.config.block_channels == (16, 32)
    assert len((generator_run / "log.jsonl").read_text().splitlines()) == 4
    # the run's measured best guidance and its sampler become the model's sampling defaults
    assert model.sampling == SamplingConfig(num_inference_steps=2, guidance_scale=metrics["best_guidance"], eta=0.0,
                                            guidance_interval=(0.0, 0.6))


def test_generate_run_resumes_exactly(generator_run, tmp_path):
    """A run stopped at step 2 and resumed ends with the same weights as the uninterrupted run."""
    from vlpt.config import load_config
    from vlpt.train.run import fit as train_generator

    config = load_config("generate-shapes", TINY)
    train_generator(config, tmp_path / "r", stop_after=2)
    resumed, _ = train_generator(config, tmp_path / "r", resume=True)
    straight = load_generator(generator_run)
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_generate_command_writes_a_grid(generator_run, tmp_path, capsys):
    out = tmp_path / "new" / "folder" / "out.png"
    args = ["generate", "a large red circle in the top left", "a small blue square", "--model", str(generator_run),
            "-n", "3", "--steps", "2", "--guidance", "3", "--scale", "2", "--seed", "5", "-o", str(out)]
    assert main(args) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 32 * 2, 3 * 32 * 2, 3)
    assert main(args[:-1] + [str(tmp_path / "again.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), grid)  # same seed, same images
    assert not list(out.parent.glob(".*tmp"))  # no temp file left behind


def test_generate_command_defaults_to_the_runs_best_sampling_settings(generator_run, tmp_path, capsys):
    sampling = load_generator(generator_run).sampling
    prompt_and_model = ["generate", "a small blue square", "--model", str(generator_run), "-n", "2", "--seed", "1"]
    assert main(prompt_and_model + ["-o", str(tmp_path / "default.png")]) == 0
    printed = capsys.readouterr().out
    assert f"guidance {sampling.guidance_scale:g} in [0, 0.6]" in printed and "2 steps" in printed
    explicit = ["--steps", "2", "--guidance", f"{sampling.guidance_scale}", "--guidance-interval", "0", "0.6"]
    assert main(prompt_and_model + explicit + ["-o", str(tmp_path / "explicit.png")]) == 0
    default = np.asarray(Image.open(tmp_path / "default.png"))
    assert np.array_equal(default, np.asarray(Image.open(tmp_path / "explicit.png")))
    other = 1 if sampling.guidance_scale != 1 else 3
    assert main(prompt_and_model + ["--guidance", str(other), "-o", str(tmp_path / "other.png")]) == 0
    assert f"guidance {other:g} in [0, 0.6]" in capsys.readouterr().out
    assert not np.array_equal(default, np.asarray(Image.open(tmp_path / "other.png")))


@pytest.mark.parametrize("change, message", [
    (["", ], "non-empty"),
    (["--steps", "0"], "--steps"),
    (["--guidance", "-1"], "--guidance"),
    (["-n", "0"], "-n"),
    (["--eta", "2"], "--eta"),
    (["--guidance-interval", "0.8", "0.2"], "--guidance-interval"),
])
def test_generate_command_rejects_bad_input_and_keeps_the_old_file(generator_run, tmp_path, capsys, change, message):
    out = tmp_path / "out.png"
    out.write_bytes(b"old picture")
    prompt = [] if change == [""] else ["a red circle"]
    args = ["generate", *prompt, *change, "--model", str(generator_run), "-o", str(out)]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert out.read_bytes() == b"old picture"


def test_generate_command_rejects_bad_output_paths(generator_run, tmp_path, capsys):
    assert main(["generate", "a red circle", "--model", str(generator_run), "-o", str(tmp_path / "out.jpg")]) == 2
    assert ".png" in capsys.readouterr().err
    (tmp_path / "dir.png").mkdir()
    assert main(["generate", "a red circle", "--model", str(generator_run), "-o", str(tmp_path / "dir.png")]) == 2
    assert "folder" in capsys.readouterr().err


def test_generate_run_rejects_mismatched_sizes_and_missing_encoder(tmp_path, capsys):
    args = ["train", "--config", "generate-shapes", "--runs-dir", str(tmp_path), "--set", "data.image_size=64"]
    assert main(args) == 2
    assert "generate.model.image_size" in capsys.readouterr().err
    args = ["train", "--config", "generate-shapes", "--runs-dir", str(tmp_path),
            "--set", f"generate.from_run={tmp_path / 'nowhere'}", "--set", "data.train_size=16"]
    assert main(args) == 2
    assert "vlpt demo" in capsys.readouterr().err
    args = ["train", "--config", "generate-shapes", "--runs-dir", str(tmp_path), "--set", "generate.sampling_eta=1.5"]
    assert main(args) == 2
    assert "generate.sampling_eta" in capsys.readouterr().err
    args[-1] = "generate.guidance_interval=[0.5,2]"
    assert main(args) == 2
    assert "generate.guidance_interval" in capsys.readouterr().err
    assert not (tmp_path / "generate-shapes").exists()  # refused before a run folder is made
