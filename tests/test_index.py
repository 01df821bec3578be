"""`vlpt index`: every source kind on real files (an image folder with and without a captions file, tar shards, a
captions-only text file), corrupt images skipped and listed, resumable parts, --add without rebuilding,
near-duplicate removal, the faiss index types reaching their recall target, and 2 real torchrun processes giving
the same (id, vector) set as 1."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import save_tiny_model
from tests.serving import BROKEN, REPO, add_corrupt_sample, shapes_folder
from vlpt.cli import main
from vlpt.data.shapes import CLASS_NAMES, ShapesConfig, ShapesDataset
from vlpt.data.shards import write_shards
from vlpt.serve import index as index_module
from vlpt.serve.index import (
    IndexOptions,
    IndexReader,
    build_faiss,
    build_index,
    choose_index_type,
    near_duplicates,
    read_manifest,
    recall_at,
    single_threaded_pool,
    tune_search,
)
from vlpt.serve.sources import open_source


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    shapes_folder(root, 40)
    return root


def test_image_folder_with_captions_skips_and_lists_corrupt_images(model_dir, folder, tmp_path):
    out = tmp_path / "index"
    assert main(["index", str(model_dir), str(folder), str(out), "--part-size", "16", "--no-progress"]) == 0
    manifest = read_manifest(out)
    assert manifest["counts"] == {"images": 40, "texts": 80, "failed": 4, "duplicates": 0}
    listed = {f["where"]: f["reason"] for f in manifest["failures"]}
    assert set(listed) == BROKEN  # the job completed; every unreadable file is named with its reason
    assert "too large" in listed["images/bomb.png"] and "not found" in listed["images/missing.png"]
    assert manifest["model"]["embed_dim"] == 32 and manifest["model"]["preprocessing"]["image_size"] == 32
    assert manifest["metric"] == "inner_product" and manifest["indexes"]["image"]["type"] == "flat"
    assert not (out / "parts").exists()  # merged parts are removed

    reader = IndexReader.open(out)
    images, texts = reader.collections["image"], reader.collections["text"]
    assert (images.count, texts.count) == (40, 80)
    row = images.rows([7])[0]
    assert row["path"] == "images/00007.png" and len(row["captions"]) == 2 and row["caption"] == row["captions"][0]
    assert row["label"] and row["row"] > 1  # the captions file's line
    scores, ids = images.search(np.stack([images.vector(i) for i in range(40)]), 1)
    assert (ids[:, 0] == np.arange(40)).all() and np.allclose(scores[:, 0], 1, atol=1e-4)
    text_rows = texts.rows([14, 15])
    assert [t["image_id"] for t in text_rows] == [7, 7] and text_rows[0]["caption"] in row["captions"]


def test_folder_without_captions_text_file_and_shards(model_dir, folder, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(folder / "images", plain / "photos")
    (plain / "photos" / "notes.txt").write_text("not an image, not listed")
    build_index(model_dir, plain, tmp_path / "a", progress=False)
    manifest = read_manifest(tmp_path / "a")
    assert manifest["counts"]["images"] == 40 and manifest["counts"]["failed"] == 3  # no row for the missing file
    assert set(manifest["indexes"]) == {"image"}  # no captions: no text index

    lines = tmp_path / "captions.txt"
    lines.write_text("a red circle\n\na blue star in the top left\nthree green squares\n")
    build_index(model_dir, lines, tmp_path / "t", progress=False)
    reader = IndexReader.open(tmp_path / "t")
    assert set(reader.collections) == {"text"}
    assert [r["caption"] for r in reader.collections["text"].rows([0, 1, 2])] == \
        ["a red circle", "a blue star in the top left", "three green squares"]
    assert [r["row"] for r in reader.collections["text"].rows([0, 1, 2])] == [1, 3, 4]

    shards = tmp_path / "shards"
    write_shards(ShapesDataset(ShapesConfig(split="val", size=30, image_size=32), cache_dir=None), shards, 10,
                 class_names=CLASS_NAMES)
    add_corrupt_sample(shards / "shard-000001.tar")
    build_index(model_dir, shards, tmp_path / "s", IndexOptions(batch_size=8), progress=False)
    manifest = read_manifest(tmp_path / "s")
    assert manifest["counts"]["images"] == 30 and manifest["counts"]["failed"] == 1
    assert manifest["failures"][0]["where"] == "shard-000001.tar:zz-corrupt"
    assert manifest["sources"][0]["root"] == str(shards.resolve())
    row = IndexReader.open(tmp_path / "s").collections["image"].rows([12])[0]
    assert (row["path"], row["key"], row["member"]) == ("shard-000001.tar", "00000012", "00000012.png")
    assert row["label"] and " " in row["label"]  # the class name from the shards' index.json


def test_decoding_ahead_of_the_model_gives_the_same_index(model_dir, folder, tmp_path, monkeypatch):
    """With the model on an accelerator, files are decoded ahead of it; on a CPU a batch is decoded, then
    embedded. Both give the same vectors, rows and failures in the same order (forced here on the CPU)."""
    build_index(model_dir, folder, tmp_path / "cpu", IndexOptions(part_size=16, batch_size=8), progress=False)
    real_init = index_module.Embedder.__init__

    def as_if_on_a_gpu(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        assert not self.decode_ahead  # on this CPU
        self.decode_ahead = True

    monkeypatch.setattr(index_module.Embedder, "__init__", as_if_on_a_gpu)
    build_index(model_dir, folder, tmp_path / "ahead", IndexOptions(part_size=16, batch_size=8), progress=False)
    a, b = IndexReader.open(tmp_path / "cpu"), IndexReader.open(tmp_path / "ahead")
    assert np.array_equal(a.vectors("image")[1], b.vectors("image")[1])
    assert a.collections["image"].rows(range(40)) == b.collections["image"].rows(range(40))
    assert read_manifest(tmp_path / "cpu")["failures"] == read_manifest(tmp_path / "ahead")["failures"]


def test_index_workers_run_on_one_thread_each_and_leave_the_process_setting_alone():
    """On a CPU each index worker embeds on one intra-op thread; the process (and threads started after the
    pool) keep their own setting, so indexing inside a larger program does not slow its other torch work."""
    import concurrent.futures as futures

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pool = single_threaded_pool(2, "test-embed")
        try:
            assert list(pool.map(lambda _: torch.get_num_threads(), range(8))) == [1] * 8
        finally:
            pool.shutdown()
        assert torch.get_num_threads() == 2
        with futures.ThreadPoolExecutor(1) as later:
            assert later.submit(torch.get_num_threads).result() == 2
    finally:
        torch.set_num_threads(before)


def test_folder_listing_order_and_what_it_skips(tmp_path):
    """Without a captions file, a folder lists its image files by name, then its sub-folders in name order, at
    any depth; hidden files and folders, non-images, symlinked folders and links leading outside are skipped,
    and a link to an image inside the root is listed under its own name."""
    root, outside = tmp_path / "photos", tmp_path / "outside"
    for rel in ("b.png", "a.JPG", "notes.txt", "z/1.png", "z/deep/2.png", "c/3.webp", ".hidden/4.png", ".5.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (outside / "6.png").parent.mkdir()
    (outside / "6.png").write_bytes(b"x")
    (root / "out.png").symlink_to(outside / "6.png")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "c" / "same.png").symlink_to(root / "b.png")
    deep = root / "d"
    for level in range(200):  # deeper than any recursion would like to go is fine too
        deep = deep / f"{level}"
    deep.mkdir(parents=True)
    (deep / "7.png").write_bytes(b"x")
    source = open_source(root, part_size=3)
    items = [item for part in source.parts for item in part]
    deepest = "d/" + "/".join(map(str, range(200))) + "/7.png"
    assert [item.ref for item in items] == ["a.JPG", "b.png", "c/3.webp", "c/same.png", deepest, "z/1.png",
                                            "z/deep/2.png"]
    assert items[3].path == (root / "b.png").resolve() and all(item.row == -1 for item in items)
    assert source.sizes == [3, 3, 1]


def test_rerun_resumes_finished_parts_and_an_unchanged_source_is_up_to_date(model_dir, folder, tmp_path, monkeypatch):
    out = tmp_path / "index"
    real_save = index_module.Part.save
    saved = []

    def stop_in_the_third_part(self, path):
        if len(saved) == 2:
            raise KeyboardInterrupt  # the job is stopped in its third part
        saved.append(path.name)
        real_save(self, path)

    monkeypatch.setattr(index_module.Part, "save", stop_in_the_third_part)
    with pytest.raises(KeyboardInterrupt):
        build_index(model_dir, folder, out, IndexOptions(part_size=10), progress=False)
    assert sorted(p.name for p in (out / "parts").rglob("*.npz")) == ["part-000000.npz", "part-000001.npz"]

    computed = []
    monkeypatch.setattr(index_module.Part, "save", lambda self, path: computed.append(path.name) or real_save(self, path))
    result = build_index(model_dir, folder, out, IndexOptions(part_size=10), progress=False)
    assert (result.reused_parts, result.computed_parts) == (2, 3)
    assert computed == ["part-000002.npz", "part-000003.npz", "part-000004.npz"]
    assert result.manifest["counts"]["images"] == 40

    again = build_index(model_dir, folder, out, IndexOptions(part_size=10), progress=False)
    assert again.up_to_date and again.computed_parts == 0 and len(computed) == 3


def test_add_a_source_without_rebuilding(model_dir, folder, tmp_path):
    out = tmp_path / "index"
    build_index(model_dir, folder, out, progress=False)
    first = read_manifest(out)
    stamps = {c["vectors"]: os.stat(out / c["vectors"]).st_mtime_ns for c in first["indexes"]["image"]["chunks"]}
    other = tmp_path / "other"
    shapes_folder(other, 12, broken=False, seed=5)
    assert main(["index", str(model_dir), str(other), str(out), "--no-progress"]) == 2  # not without --add
    assert main(["index", str(model_dir), str(other), str(out), "--add", "--no-progress"]) == 0
    manifest = read_manifest(out)
    assert manifest["counts"]["images"] == 52 and len(manifest["sources"]) == 2
    assert manifest["indexes"]["image"]["file"] == "image-52.faiss" and not (out / "image-40.faiss").exists()
    assert {c: os.stat(out / c).st_mtime_ns for c in stamps} == stamps  # the first chunk is not rewritten
    reader = IndexReader.open(out)
    row = reader.collections["image"].rows([45])[0]
    assert row["source"] == 1 and row["path"] == "images/00005.png"
    _, ids = reader.collections["image"].search(reader.collections["image"].vector(45)[None], 1)
    assert ids[0, 0] == 45
    assert reader.collections["text"].rows([80])[0]["image_id"] == 40  # captions point at the new ids

    other_model = save_tiny_model(tmp_path / "another")
    (other_model / "config.json").write_text((other_model / "config.json").read_text() + " ")
    with pytest.raises(ValueError, match="another fingerprint"):
        build_index(other_model, other, out, add=True, progress=False)


def test_near_duplicates_are_removed_and_listed(model_dir, folder, tmp_path):
    src = tmp_path / "dups"
    shutil.copytree(folder, src)
    for i in range(3):  # three exact copies of image 0, listed after the originals
        shutil.copy(src / "images" / "00000.png", src / "images" / f"copy{i}.png")
    with open(src / "captions.csv", "a") as f:
        f.writelines(f"images/copy{i}.png,a copy of the first scene,\n" for i in range(3))
    # an untrained tiny model maps distinct scenes to cosine ~0.96-0.9995: only the copies are this close
    result = build_index(model_dir, src, tmp_path / "index", IndexOptions(dedup=0.99999), progress=False)
    manifest = result.manifest
    assert manifest["counts"]["duplicates"] == 3 and manifest["counts"]["images"] == 40
    assert [(d["where"], d["duplicate_of"]) for d in manifest["duplicates"]] == \
        [(f"images/copy{i}.png", 0) for i in range(3)]
    texts = IndexReader.open(tmp_path / "index").collections["text"]
    copy_captions = [r for r in texts.rows(range(texts.count)) if r["caption"] == "a copy of the first scene"]
    assert [r["image_id"] for r in copy_captions] == [0, 0, 0]  # a dropped image's captions point at the kept one


def test_near_duplicates_function():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((6, 16)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    vectors = np.concatenate([base, base[[1, 4]], base[[1]]])  # rows 6, 8 copy 1; row 7 copies 4
    assert near_duplicates(vectors, 0.999, block=4).tolist() == [-1] * 6 + [1, 4, 1]
    existing = base[:2]  # ids 0, 1 already indexed; the new rows get ids 2, 3, ...
    assert near_duplicates(base[1:4], 0.999, existing).tolist() == [1, -1, -1]


def clustered(n: int, dim: int = 32, centers: int = 200, seed: int = 0) -> np.ndarray:
    """Points around fixed cluster centres (embeddings cluster); ``seed`` draws the points, not the centres."""
    c = np.random.default_rng(1234).standard_normal((centers, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = c[rng.integers(centers, size=n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def shifted(x: np.ndarray, seed: int = 5) -> np.ndarray:
    """``x`` moved by one fixed offset and re-normalised: queries from another modality (a modality gap)."""
    y = x + 0.6 * np.random.default_rng(seed).standard_normal(x.shape[1]).astype(np.float32) / np.sqrt(x.shape[1])
    return y / np.linalg.norm(y, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_indexes_reach_the_recall_target_on_fresh_queries(kind):
    vectors = clustered(12_000)
    index, info = build_faiss(vectors, kind, IndexOptions())
    assert index.ntotal == len(vectors) and info["type"] == kind
    search = tune_search(index, info, vectors, 0.95, other=shifted(clustered(2000, seed=2)))
    assert search["recall_at_10"] >= 0.95
    assert ("efSearch" in search) if kind == "hnsw" else ({"nprobe", "k_factor"} <= set(search))
    for queries in (clustered(300, seed=1), shifted(clustered(300, seed=3))):  # fresh, of both kinds
        truth = index_module.exact_neighbours(vectors, queries, 10)
        assert recall_at(index, vectors, queries, truth, 10) >= 0.9


def test_recall_counts_an_equally_near_duplicate_as_found():
    """Of two identical vectors only one fits in the top 1: either is a hit (ann-benchmarks' definition)."""
    import faiss

    vectors = clustered(50)
    vectors = np.concatenate([vectors, vectors[:1]])  # id 50 duplicates id 0
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    query = vectors[:1]
    assert recall_at(index, vectors, query, np.array([[50]]), 1) == 1.0  # the index answers 0 (or 50): a hit
    assert recall_at(index, vectors, query, np.array([[50]]), 1, tolerance=-1.0) == 0.0  # sanity of the threshold


def test_index_type_by_size():
    assert [choose_index_type(n) for n in (100, 20_000, 20_001, 500_000, 500_001)] == \
        ["flat", "flat", "hnsw", "hnsw", "ivfpq"]
    assert choose_index_type(100, "ivfpq") == "ivfpq"
    with pytest.raises(ValueError, match="index type"):
        IndexOptions(index_type="lsh")


def test_cli_errors_are_one_line(model_dir, folder, tmp_path, capsys):
    for argv, words in (
            (["index", str(model_dir), str(tmp_path / "nowhere"), str(tmp_path / "o")], "source not found"),
            (["index", str(model_dir), str(folder), str(tmp_path / "o"), "--dedup", "1.5"], "near-duplicate"),
            (["index", str(tmp_path / "no-model"), str(folder), str(tmp_path / "o")], "no vlpt model")):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("vlpt: error:") and words in err[0], err


def test_torchrun_two_processes_give_the_same_ids_and_vectors_as_one(model_dir, folder, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    common = ["index", str(model_dir), str(folder), "--part-size", "7", "--no-progress"]
    one = subprocess.run([sys.executable, "-m", "vlpt", *common[:3], str(tmp_path / "one"), *common[3:]], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "vlpt", *common[:3], str(tmp_path / "two"), *common[3:]], env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1  # rank 0 merges and reports
    a, b = IndexReader.open(tmp_path / "one"), IndexReader.open(tmp_path / "two")
    for modality in ("image", "text"):
        ids_a, vec_a = a.vectors(modality)
        ids_b, vec_b = b.vectors(modality)
        assert (ids_a == ids_b).all()
        np.testing.assert_allclose(vec_a, vec_b, atol=1e-5)
        assert a.collections[modality].table.drop_columns([]).equals(b.collections[modality].table)
    assert a.manifest["failures"] == b.manifest["failures"] and len(a.manifest["failures"]) == 4
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["sources"][0]["parts"] == 7
