"""What a user sees when something is wrong: one line ``vlpt: error: ...`` on stderr, exit status 2, naming
the file or key at fault; ``--debug`` adds the traceback; bugs still raise."""

import shutil
import struct
import zlib

import pytest
import yaml
from PIL import Image

from tests.conftest import save_tiny_model
from vlpt import cli
from vlpt.cli import main
from vlpt.config import load_config, to_dict
from vlpt.io import ImageLoadError, ModelLoadError, load_image


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels, with a few bytes of image data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "model")


def run(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlpt: error: "), err
    return lines[0]


# ----------------------------------------------------------------------------- configs

def test_a_bad_override_is_one_line_with_exit_status_2(capsys):
    status, out, err = run(["train", "--set", "train.steps=abc", "--set", "train.batch_size=0"], capsys)
    assert status == 2 and out == ""
    assert one_error_line(err) == ("vlpt: error: 2 config problems: train.steps: expected an integer, got 'abc'; "
                                   "train.batch_size: must be >= 1, got 0")


def test_a_yaml_syntax_error_names_the_line(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text("name: x\ntrain:\n  steps: 3\n   batch_size: 4\n")
    status, _, err = run(["train", "--config", str(path)], capsys)
    assert status == 2 and one_error_line(err).startswith(f"vlpt: error: {path} line 4, column 14: ")


def test_debug_shows_the_traceback(capsys):
    status, _, err = run(["--debug", "train", "--dry-run", "--set", "train.steps=abc"], capsys)
    assert status == 2 and err.startswith("Traceback (most recent call last):")
    assert "ConfigError" in err and err.splitlines()[-1] == "vlpt: error: train.steps: expected an integer, got 'abc'"


def test_a_bug_still_raises(monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("a bug")
    monkeypatch.setattr(cli, "load_config", broken)
    with pytest.raises(KeyError):
        main(["train", "--dry-run"])


def test_usage_errors_stay_argparse_errors(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--no-such-option"])
    assert exit_.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_dry_run_prints_the_checked_config_and_starts_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, out, err = run(["train", "--dry-run", "--set", "train.steps=7", "--runs-dir", "runs"], capsys)
    assert status == 0 and err == ""
    assert yaml.safe_load(out) == to_dict(load_config("tiny-shapes", ["train.steps=7"]))
    assert not (tmp_path / "runs").exists()
    status, _, err = run(["train", "--dry-run", "--set", "train.task=captions", "--set", "data.dataset=files",
                          "--set", "data.path=missing"], capsys)
    assert status == 2 and one_error_line(err) == (
        "vlpt: error: train.task: choose from contrastive | caption | coca | generate | classify | match | vqa, "
        "got 'captions' "
        "(did you mean 'caption'?)")  # paths are checked once the values are right
    status, _, err = run(["train", "--dry-run", "--set", "data.dataset=files", "--set", "data.path=missing"], capsys)
    assert status == 2 and "data.path: must be an existing image folder" in one_error_line(err)
    status, out, _ = run(["finetune", "--task", "match", "--fusion", "sum", "--dry-run"], capsys)
    assert status == 0 and yaml.safe_load(out)["finetune"]["fusion"] == "sum"


# ----------------------------------------------------------------------------- model folders

def broken_copy(model_dir, tmp_path, name):
    target = tmp_path / name
    shutil.copytree(model_dir, target)
    return target


@pytest.mark.parametrize("name, damage, message", [
    ("truncated", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:500]),
     "model.safetensors: not a readable safetensors file, corrupt or truncated"),
    ("garbage", lambda d: (d / "model.safetensors").write_bytes(b"\x07" * 64),
     "model.safetensors: not a readable safetensors file, corrupt or truncated"),
    ("no-weights", lambda d: (d / "model.safetensors").unlink(), "has no model.safetensors"),
    ("bad-json", lambda d: (d / "config.json").write_text("{"), "config.json: not valid JSON"),
    ("list-json", lambda d: (d / "config.json").write_text("[]"), "config.json: expected a JSON object"),
    ("no-config", lambda d: (d / "config.json").unlink(), "no vlpt model in"),
    ("bad-value", lambda d: (d / "config.json").write_text((d / "config.json").read_text().replace(
        '"embed_dim": 32', '"embed_dim": "wide"')), "config.json: embed_dim: expected an integer, got 'wide'"),
    ("other-shape", lambda d: (d / "config.json").write_text((d / "config.json").read_text().replace(
        '"embed_dim": 32', '"embed_dim": 16')), "model.safetensors: the weights do not match the model its "
                                               "config.json describes: 2 of another shape"),
    ("bad-tokenizer", lambda d: (d / "tokenizer" / "tokenizer.json").write_text("{not json"),
     "tokenizer: not a readable tokenizer"),
])
def test_a_broken_model_folder_is_one_line_naming_the_file(model_dir, tmp_path, capsys, name, damage, message):
    folder = broken_copy(model_dir, tmp_path, name)
    damage(folder)
    status, _, err = run(["embed", "--text", "a red circle", "--model", str(folder)], capsys)
    line = one_error_line(err)
    assert status == 2 and str(folder) in line and message in line, line


def test_a_folder_holding_another_kind_of_model_says_so(model_dir, tmp_path):
    folder = broken_copy(model_dir, tmp_path, "task")
    config = folder / "config.json"
    config.write_text(config.read_text().replace("{", '{"model_type": "vlpt-task", ', 1))
    from vlpt.factory import load_model

    with pytest.raises(ModelLoadError, match="holds a TaskModel, not a dual encoder: load it with vlpt.load"):
        load_model(folder)


# ----------------------------------------------------------------------------- images

@pytest.mark.parametrize("name, content, message", [
    ("empty.png", b"", "not an image file of a format PIL knows"),
    ("text.png", b"a caption, not an image\n", "not an image file of a format PIL knows"),
    ("bomb.png", png_header(100_000, 100_000), "10,000,000,000 pixels is over PIL's limit"),  # PIL refuses (> 2x)
    ("big.png", png_header(10_000, 10_000), "100,000,000 pixels is over PIL's limit"),  # PIL only warns (1x - 2x)
])
def test_an_unreadable_image_is_one_line_naming_the_file(model_dir, tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    status, _, err = run(["classify", str(path), "--labels", "a,b", "--model", str(model_dir)], capsys)
    line = one_error_line(err)
    assert status == 2 and line.startswith(f"vlpt: error: cannot read image {path}: {message}"), line


def test_truncated_image_and_folder_raise_image_load_error(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (48, 48), "red").save(good)
    assert load_image(good).size == (48, 48)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:-30])
    with pytest.raises(ImageLoadError, match=f"cannot read image {truncated}: image file is truncated"):
        load_image(truncated)
    with pytest.raises(ImageLoadError, match=f"cannot read image {tmp_path}: it is a folder, not an image file"):
        load_image(tmp_path)
    with pytest.raises(ImageLoadError, match="image file not found"):
        load_image(tmp_path / "missing.png")


def test_a_folder_given_as_an_image_on_the_command_line(model_dir, tmp_path, capsys):
    status, _, err = run(["embed", "--image", str(tmp_path), "--model", str(model_dir)], capsys)
    assert status == 2 and one_error_line(err) == f"vlpt: error: cannot read image {tmp_path}: it is a folder, not " \
                                                  f"an image file"
