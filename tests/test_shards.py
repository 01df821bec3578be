"""Webdataset shards (vlpt.data.shards): writer, per-rank/per-worker streaming, corrupt samples,
the Trainer adapter, and `vlpt train` from shards."""

import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from tests.conftest import tiny_run_config
from tests.test_files import png_header, write_shapes_folder
from vlpt.cli import cmd_data_shards, main
from vlpt.config import save_config
from vlpt.data.shapes import ShapesConfig, ShapesDataset
from vlpt.data.shards import (
    FAILURE_KINDS,
    ShardBatches,
    ShardReader,
    ShardReadError,
    plan_shards,
    read_samples,
    shard_captions,
    write_shards,
)
from vlpt.tokenization import Tokenizer, train_wordpiece


@pytest.fixture(scope="module")
def shapes():
    return ShapesDataset(ShapesConfig(split="train", size=64, image_size=32, num_captions=3))


@pytest.fixture(scope="module")
def shard_dir(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_shards(shapes, out, shard_size=8, class_names=[f"c{i}" for i in range(48)])
    return out


def png_bytes(color=(200, 30, 30), size=(24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path, members) -> None:
    """A tar from (name, bytes) pairs, written with tarfile (no vlpt code involved)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def read_epoch(path, rank, world_size, epoch=0, **kwargs):
    reader = ShardReader(path, kwargs.pop("batch_size", 4), 32, rank=rank, world_size=world_size, **kwargs)
    batches = list(reader.epoch(epoch))
    return reader, batches


def test_writer_layout_index_and_webdataset_compatibility(shard_dir, shapes):
    paths = sorted(shard_dir.glob("shard-*.tar"))
    assert [p.name for p in paths] == [f"shard-{i:06d}.tar" for i in range(8)]
    assert not list(shard_dir.glob(".*tmp*"))  # temp names renamed away
    index = json.loads((shard_dir / "index.json").read_text())
    assert index["samples"] == 64 and [e["samples"] for e in index["shards"]] == [8] * 8
    with tarfile.open(paths[0]) as tar:
        assert tar.getnames()[:3] == ["00000000.cls", "00000000.png", "00000000.txt"]
    sample = next(iter(wds.WebDataset(str(paths[1]), shardshuffle=False).decode("rgb8")))
    assert sample["__key__"] == "00000008" and sample["txt"].split("\n") == shapes.captions[8]
    assert np.array_equal(sample["png"], shapes.images[8]) and int(sample["cls"]) == shapes.labels[8]
    with pytest.raises(FileExistsError, match="overwrite"):
        write_shards(shapes, shard_dir, shard_size=8)


def test_every_sample_once_per_epoch_over_two_ranks_and_two_workers(shard_dir, shapes):
    for epoch in (0, 1):
        keys, steps = [], []
        for rank in (0, 1):
            reader, batches = read_epoch(shard_dir, rank, 2, epoch, num_workers=2, shuffle_buffer=10)
            steps.append(len(batches))
            assert reader.steps_per_epoch == 8 and reader.summary()["reread"] == 0
            for b in batches:
                assert b["images"].shape == (4, 32, 32, 3) and str(b["images"].dtype) == "torch.uint8"
                assert len(b["captions"]) == 4 and b["labels"].tolist() == [shapes.labels[int(k)] for k in b["keys"]]
                for key, image, caption in zip(b["keys"], b["images"], b["captions"]):
                    assert np.array_equal(image.numpy(), shapes.images[int(key)])
                    assert caption in shapes.captions[int(key)]
                keys += b["keys"]
        assert steps == [8, 8]
        assert len(keys) == len(set(keys)) == 64  # the union is every sample, none twice


def test_an_epoch_is_the_same_stream_every_time_and_epochs_differ(shard_dir):
    def order(epoch):
        return [k for b in read_epoch(shard_dir, 0, 1, epoch, num_workers=2, shuffle_buffer=16)[1] for k in b["keys"]]
    first = order(0)
    assert order(0) == first and order(1) != first and sorted(order(1)) == sorted(first)


def test_uneven_shards_still_give_every_rank_the_same_steps(tmp_path, shapes):
    sizes = [11, 3, 7, 9, 5, 2, 13, 6]
    start = 0
    for i, n in enumerate(sizes):
        write_tar(tmp_path / f"s{i}.tar", [(f"{k:04d}.{ext}", data) for k in range(start, start + n)
                                           for ext, data in (("png", png_bytes()), ("txt", b"a red square"))])
        start += n
    plan = plan_shards(sizes, 4, world_size=2, num_workers=2)
    assert all(sum(q) == plan.steps * 4 for q in plan.quotas)
    keys, steps = [], []
    for rank in (0, 1):
        _, batches = read_epoch(str(tmp_path / "s*.tar"), rank, 2, num_workers=2)
        steps.append(len(batches))
        keys += [k for b in batches for k in b["keys"]]
    assert steps[0] == steps[1] == plan.steps and len(keys) == len(set(keys)) == 4 * 2 * plan.steps
    resampled = [len(read_epoch(tmp_path, rank, 2, num_workers=0, resample=True)[1]) for rank in (0, 1)]
    assert resampled == [sum(sizes) // 8] * 2


CORRUPT = {
    "truncated_image": [("png", png_bytes()[:60]), ("txt", b"cut short")],
    "empty_image": [("png", b""), ("txt", b"nothing")],
    "not_an_image": [("png", b"this is not a picture"), ("txt", b"text")],
    "missing_caption": [("png", png_bytes())],
    "bad_caption": [("png", png_bytes()), ("txt", b"caf\xe9 au lait")],
    "too_large": [("png", png_header(100_000, 100_000)), ("txt", b"a bomb")],
    "bad_label": [("png", png_bytes()), ("txt", b"ok"), ("cls", b"seven")],
}


def corrupt_shard(path):
    """Good samples (g*) with one sample of each corrupt kind between them, plus unsafe member names."""
    members, good = [], []
    for i, (kind, parts) in enumerate(CORRUPT.items()):
        good.append(f"g{i}")
        members += [(f"g{i}.png", png_bytes((10 * i, 100, 100))), (f"g{i}.txt", f"good {i}\nalso {i}".encode())]
        members += [(f"{kind}.{ext}", data) for ext, data in parts]
    members += [("wide.png", png_header(20_000, 10)), ("wide.txt", b"very wide")]  # per-side limit
    members += [("../evil.png", png_bytes()), ("../evil.txt", b"escape"), ("/abs.png", png_bytes()),
                ("/abs.txt", b"absolute"), ("glast.jpg", _jpeg()), ("glast.json", b'["a jpeg", "in json"]')]
    write_tar(path, members)
    return good + ["glast"]


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (50, 40), (0, 90, 200)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_samples_are_skipped_and_counted_by_kind(tmp_path, num_workers):
    good = corrupt_shard(tmp_path / "bad.tar")
    reader = ShardReader(tmp_path / "bad.tar", 1, 32, num_workers=num_workers, shuffle_buffer=0)
    keys = [k for b in reader.epoch(0) for k in b["keys"]]
    assert set(keys) == set(good) and keys[:len(good)] == good  # shard order, no buffer
    summary = reader.summary()
    expected = {kind: 1 for kind in CORRUPT} | {"too_large": 2, "unsafe_member": 2}
    assert {k: v for k, v in summary.items() if v and k != "reread"} == expected
    assert set(summary) == set(FAILURE_KINDS) | {"reread"}
    assert summary["reread"] == len(keys) - len(good)  # the step count was kept by rereading good ones
    assert "../evil" not in keys and "/abs" not in keys


def test_read_samples_and_captions_skip_the_same_samples(tmp_path):
    good = corrupt_shard(tmp_path / "bad.tar")
    samples = read_samples(tmp_path / "bad.tar", limit=100, image_size=16)
    assert samples.keys == good and samples.images.shape == (len(good), 16, 16, 3)
    assert samples.captions[-1] == ["a jpeg", "in json"] and samples.failures["unsafe_member"] == 2
    assert "escape" not in shard_captions(tmp_path / "bad.tar") and "good 0" in shard_captions(tmp_path / "bad.tar")


def test_a_damaged_tar_keeps_the_samples_before_the_damage(tmp_path, shapes):
    path = write_shards(shapes, tmp_path / "s", shard_size=64)[0]
    with tarfile.open(path) as tar:
        cut = tar.getmember("00000030.png").offset_data + 100  # inside sample 30's image data
    (tmp_path / "cut.tar").write_bytes(path.read_bytes()[:cut])
    samples = read_samples(tmp_path / "cut.tar", limit=100, image_size=32)
    assert samples.keys == [f"{i:08d}" for i in range(30)] and samples.failures == {"bad_tar": 1}


def test_an_all_bad_shard_stops_with_a_clear_error(tmp_path):
    write_tar(tmp_path / "junk.tar", [(f"{k:03d}.{ext}", b"junk") for k in range(60) for ext in ("png", "txt")])
    reader = ShardReader(tmp_path / "junk.tar", 2, 32, num_workers=1, max_consecutive_failures=50)
    with pytest.raises(ShardReadError) as err:
        list(reader.epoch(0))
    assert "51 samples in a row" in str(err.value) and "junk.tar" in str(err.value) and "'050'" in str(err.value)
    write_tar(tmp_path / "few.tar", [(f"{k}.png", b"junk") for k in range(4)] + [("4.txt", b"text only")])
    with pytest.raises(ShardReadError, match="no readable sample.*few.tar"):
        list(ShardReader(tmp_path / "few.tar", 1, 32, num_workers=0).epoch(0))


def test_too_few_shards_for_the_ranks_is_an_error(shard_dir):
    with pytest.raises(ValueError, match="8 shard.*16 ranks"):
        ShardReader(shard_dir, 1, 32, rank=0, world_size=16)


def test_shard_batches_resume_replays_the_same_batches(shard_dir, shapes):
    tokenizer = Tokenizer(train_wordpiece([c for caps in shapes.captions for c in caps], 200), 32)

    def batches(steps, start=0):
        source = ShardBatches(ShardReader(shard_dir, 8, 32, num_workers=2, shuffle_buffer=16, seed=3), tokenizer)
        out = [source.batch(s) for s in range(start, steps)]
        source.close()
        return out
    straight = batches(11)  # 8 steps per epoch: crosses into epoch 1
    resumed = batches(11, start=6)
    assert set(straight[0]) == {"images", "input_ids", "attention_mask", "labels"}
    assert straight[0]["images"].shape == (8, 32, 32, 3) and straight[0]["input_ids"].shape[0] == 8
    for a, b in zip(straight[6:], resumed):
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_cmd_data_shards_from_a_folder_copies_the_file_bytes(tmp_path, capsys):
    write_shapes_folder(tmp_path / "pics", "test", 10)
    paths = cmd_data_shards(str(tmp_path / "pics"), tmp_path / "out", 4, "train", 0, 64)
    assert len(paths) == 3 and "wrote 10 samples" in capsys.readouterr().out
    names = json.loads((tmp_path / "out" / "index.json").read_text())["class_names"]
    assert names == sorted(names)
    with tarfile.open(paths[0]) as tar:
        assert tar.extractfile("00000001.png").read() == (tmp_path / "pics" / "001.png").read_bytes()
        label = names[int(tar.extractfile("00000001.cls").read())]
    assert any(line.startswith("001.png,") and line.endswith("," + label)
               for line in (tmp_path / "pics" / "captions.csv").read_text().splitlines())
    with pytest.raises(FileNotFoundError, match="not a folder"):
        cmd_data_shards(str(tmp_path / "nope"), tmp_path / "o2", 4, "train", 0, 64)


def test_train_from_shards_end_to_end(tmp_path, shard_dir):
    config_path = tmp_path / "shards.yaml"
    save_config(tiny_run_config(steps=3), config_path)
    argv = ["train", "--config", str(config_path), "--name", "s", "--runs-dir", str(tmp_path / "runs"),
            "--set", "data.dataset=shards", "--set", f"data.path={shard_dir}", "--set", "train.batch_size=8",
            "--set", "data.num_workers=1", "--set", "train.checkpoint_every=0", "--set", "eval.retrieval_size=32"]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "runs" / "s" / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["train_retrieval_images"] == 32
    assert 0 <= metrics["train_retrieval_i2t_r1"] <= 1 and 0 <= metrics["train_zeroshot_top1"] <= 1
