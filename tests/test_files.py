"""A user's image folder with a captions file (vlpt.data.files), and `vlpt train` on one."""

import json
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.conftest import tiny_run_config
from vlpt.cli import main
from vlpt.config import save_config
from vlpt.data.files import (
    CaptionsFileError,
    FilesDataset,
    UnsafePathError,
    read_captions,
)
from vlpt.data.shapes import CLASS_NAMES, ShapesConfig, ShapesDataset
from vlpt.io import ImageLoadError


def save_png(path, color, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def png_header(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header declares width x height pixels."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    save_png(root / "img" / "a.png", (255, 0, 0))
    save_png(root / "img" / "b.png", (0, 0, 255))
    save_png(root / "c.jpg", (0, 255, 0))
    return root


def test_csv_groups_several_captions_per_image_in_first_seen_order(folder):
    (folder / "captions.csv").write_text(
        'path,caption,label\n'
        'img/b.png,a blue square,blue\n'
        'img/a.png,"a red square, bright",red\n'
        'img/b.png,something   blue\n'  # a short row: no label here, the image's label stands
        '\n'
        './img/a.png,another red one,red\n'
        'c.jpg,green,green\n')
    ds = FilesDataset(folder, image_size=16)
    assert ds.captions == [["a blue square", "something blue"], ["a red square, bright", "another red one"], ["green"]]
    assert ds.class_names == ("blue", "green", "red")
    assert ds.labels.tolist() == [0, 2, 1] and ds.labels.dtype == np.int64
    assert ds.images.shape == (3, 16, 16, 3) and ds.images.dtype == np.uint8
    assert ds.images[0, 8, 8].tolist() == [0, 0, 255] and ds.images[1, 8, 8].tolist() == [255, 0, 0]
    assert ds.paths[0] == (folder / "img" / "b.png").resolve()


def test_jsonl_with_caption_lists_and_numeric_labels(folder):
    rows = [{"path": "img/a.png", "caption": ["red", "a red thing"], "label": 3},
            {"path": "c.jpg", "caption": "green"},
            {"path": "img/a.png", "caption": "more red"}]
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = FilesDataset(folder, image_size=8)
    assert ds.captions == [["red", "a red thing", "more red"], ["green"]]
    assert ds.labels.tolist() == [3, -1] and ds.class_names is None


def test_no_label_column_means_unlabeled(folder):
    (folder / "captions.csv").write_text("caption,path\nred,img/a.png\n")  # any column order
    ds = FilesDataset(folder, image_size=8)
    assert ds.labels.tolist() == [-1] and ds.class_names is None


def test_centre_square_is_kept(tmp_path):
    img = np.zeros((20, 60, 3), np.uint8)
    img[:, 20:40] = 255  # white centre square, black sides
    Image.fromarray(img).save(tmp_path / "wide.png")
    (tmp_path / "captions.csv").write_text("path,caption\nwide.png,a white square\n")
    assert FilesDataset(tmp_path, image_size=10).images.min() > 200


@pytest.mark.parametrize("path,needle", [
    ("../outside.png", "'..'"),
    ("img/../../outside.png", "'..'"),
    ("/etc/passwd", "absolute"),
    ("link.png", "outside the data root"),
])
def test_paths_outside_the_root_are_refused(folder, path, needle):
    save_png(folder.parent / "outside.png", (1, 2, 3))
    os.symlink(folder.parent / "outside.png", folder / "link.png")
    (folder / "captions.csv").write_text(f"path,caption\nimg/a.png,fine\n{path},sneaky\n")
    with pytest.raises(UnsafePathError) as err:
        read_captions(folder)
    assert "captions.csv:3" in str(err.value) and path in str(err.value) and needle in str(err.value)


def test_symlink_inside_the_root_is_fine(folder):
    os.symlink(folder / "img" / "a.png", folder / "alias.png")
    (folder / "captions.csv").write_text("path,caption\nalias.png,red\n")
    assert FilesDataset(folder, image_size=8).images[0, 4, 4].tolist() == [255, 0, 0]


@pytest.mark.parametrize("content,error,needles", [
    (b"file,text\nimg/a.png,red\n", CaptionsFileError, ["captions.csv:1", "path", "caption"]),
    (b"path,caption\nimg/a.png,red\nimg/b.png,  \n", CaptionsFileError, ["captions.csv:3", "empty caption"]),
    (b"path,caption\nimg/a.png,red\nimg/b.png,bl\xffue\n", CaptionsFileError, ["captions.csv:3", "UTF-8"]),
    (b"path,caption\nimg/a.png,red\nimg/zz.png,missing\n", FileNotFoundError, ["captions.csv:3", "img/zz.png"]),
    (b"path,caption\n", CaptionsFileError, ["no rows"]),
])
def test_bad_captions_files_name_file_and_line(folder, content, error, needles):
    (folder / "captions.csv").write_bytes(content)
    with pytest.raises(error) as err:
        FilesDataset(folder)
    for needle in needles:
        assert needle in str(err.value)


def test_bad_jsonl_names_the_line(folder):
    (folder / "captions.jsonl").write_text('{"path": "img/a.png", "caption": "red"}\n{"path": "img/b.png"}\n')
    with pytest.raises(CaptionsFileError, match=r"captions.jsonl:2: missing key\(s\) caption"):
        FilesDataset(folder)
    (folder / "captions.jsonl").write_text('{"path": "img/a.png", "caption": "red"}\n{not json\n')
    with pytest.raises(CaptionsFileError, match="captions.jsonl:2: not valid JSON"):
        FilesDataset(folder)


def test_corrupt_and_oversized_images_name_the_line(folder):
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "bomb.png").write_bytes(png_header(100_000, 100_000))
    (folder / "captions.csv").write_text("path,caption\nimg/a.png,red\nbroken.png,x\n")
    with pytest.raises(ImageLoadError, match=r"captions.csv:3.*broken.png"):
        FilesDataset(folder)
    (folder / "captions.csv").write_text("path,caption\nbomb.png,x\n")
    with pytest.raises(ImageLoadError, match=r"captions.csv:2.*too large"):
        FilesDataset(folder)


def test_no_captions_file(folder):
    with pytest.raises(FileNotFoundError, match="captions.csv"):
        FilesDataset(folder)


def write_shapes_folder(root, split: str, size: int, seed: int = 0) -> None:
    """Single-object shapes scenes as PNG files, two captions each, labelled by class name."""
    ds = ShapesDataset(ShapesConfig(split=split, size=size, image_size=32, max_objects=1, num_captions=2, seed=seed))
    root.mkdir(parents=True, exist_ok=True)
    rows = ["path,caption,label"]
    for i, (image, caps, label) in enumerate(zip(ds.images, ds.captions, ds.labels)):
        Image.fromarray(image).save(root / f"{i:03d}.png")
        rows += [f'{i:03d}.png,"{c}",{CLASS_NAMES[label]}' for c in caps]
    (root / "captions.csv").write_text("\n".join(rows) + "\n")


def test_train_on_a_folder_end_to_end(tmp_path):
    write_shapes_folder(tmp_path / "train", "train", 24)
    write_shapes_folder(tmp_path / "test", "test", 12)
    config = tiny_run_config(steps=3)
    config_path = tmp_path / "files.yaml"
    save_config(config, config_path)
    argv = ["train", "--config", str(config_path), "--name", "f", "--runs-dir", str(tmp_path / "runs"),
            "--set", "data.dataset=files", "--set", f"data.path={tmp_path / 'train'}",
            "--set", f"data.eval_path={tmp_path / 'test'}", "--set", "train.batch_size=8",
            "--set", "train.checkpoint_every=0"]
    assert main(argv) == 0
    run_dir = tmp_path / "runs" / "f"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["retrieval_images"] == 12
    for key in ("retrieval_i2t_r1", "retrieval_t2i_r5", "zeroshot_top1", "linear_probe_top1"):
        assert 0 <= metrics[key] <= 1, key
    assert (run_dir / "model" / "model.safetensors").exists() and (run_dir / "report.md").exists()

    # Without a held-out folder the training images are evaluated, and the keys say so.
    from vlpt.evaluate.suite import evaluate
    from vlpt.factory import load_model
    from vlpt.train.run import read_run_config

    data = read_run_config(run_dir).data
    data.eval_path = None
    result = evaluate(load_model(run_dir), data, config.eval)
    assert set(result.metrics) >= {"train_retrieval_i2t_r1", "train_zeroshot_top1", "train_retrieval_images"}
    assert not any(k.startswith(("retrieval", "zeroshot", "linear_probe")) for k in result.metrics)
