import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import tiny_run_config
from vlpt.cli import main
from vlpt.config import save_config
from vlpt.data.shapes import ShapesConfig, ShapesDataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    config_path = root / "tiny.yaml"
    save_config(tiny_run_config(steps=4), config_path)
    assert main(["train", "--config", str(config_path), "--name", "t", "--runs-dir", str(root / "runs")]) == 0
    return root, root / "runs" / "t"


def test_train_writes_a_complete_run(trained):
    _, run_dir = trained
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 4 and 0 <= metrics["zeroshot_top1"] <= 1
    for name in ("config.yaml", "log.jsonl", "report.md", "model/model.safetensors", "model/config.json"):
        assert (run_dir / name).exists(), name


def test_eval_rewrites_metrics(trained):
    _, run_dir = trained
    before = json.loads((run_dir / "metrics.json").read_text())
    assert main(["eval", str(run_dir)]) == 0
    after = json.loads((run_dir / "metrics.json").read_text())
    assert after["zeroshot_top1"] == pytest.approx(before["zeroshot_top1"])


def test_classify_and_embed_real_image_files(trained, capsys):
    root, run_dir = trained
    images = ShapesDataset(ShapesConfig(split="test", size=3, image_size=32)).images
    paths = []
    for i, (image, mode) in enumerate(zip(images, ("RGB", "L", "RGBA"))):  # grayscale / RGBA are converted
        path = root / f"img{i}.png"
        Image.fromarray(image).convert(mode).save(path)
        paths.append(str(path))
    palette = root / "pal.gif"
    Image.fromarray(images[0]).convert("P").save(palette)
    paths.append(str(palette))
    capsys.readouterr()
    assert main(["classify", *paths, "--labels", "a red circle,a blue star", "--model", str(run_dir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all("a red circle" in line and "a blue star" in line for line in lines)
    out = root / "emb.npy"
    assert main(["embed", "--text", "a red circle", "a star", "--model", str(run_dir), "-o", str(out)]) == 0
    emb = np.load(out)
    assert emb.shape == (2, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_bad_input_gets_a_clear_error(trained, capsys):
    root, run_dir = trained
    corrupt = root / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    cases = [
        (["classify", str(root / "missing.png"), "--labels", "a,b", "--model", str(run_dir)], "missing.png"),
        (["classify", str(corrupt), "--labels", "a,b", "--model", str(run_dir)], "corrupt.png"),
        (["embed", "--text", " ", "--model", str(run_dir)], "empty"),
        (["train", "--set", "train.stepz=3"], "valid keys"),
        (["train", "--set", "model.image.name=nope-net", "--runs-dir", str(root / "x")], "resnet-tiny"),
        (["train", "--config", "no-such-config"], "tiny-shapes"),
        (["train", "--config", str(root / "tiny.yaml"), "--name", "t", "--runs-dir", str(root / "runs")], "--resume"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        assert needle in capsys.readouterr().err, argv


def test_unknown_key_in_a_config_file_lists_valid_keys(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {steps: 3, learning_rate: 0.1}\n")
    assert main(["train", "--config", str(path), "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and "lr" in err and "warmup_steps" in err


def test_data_shards_command_writes_tar_shards(tmp_path):
    out = tmp_path / "shards"
    assert main(["data", "shards", "digits", str(out), "--shard-size", "200", "--split", "test"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]  # 359 test digits
