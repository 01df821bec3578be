"""End to end, vlpt vs OpenCLIP, side by side in one run: images/s of training epochs from image files on disk.

The clock starts with the files on disk and stops when the last optimizer step of the last epoch is done:
reading, decoding, resizing / augmenting, tokenizing, batching and the training steps, plus whatever
one-time work each library's data path does first (vlpt's ``data.dataset=files`` decodes the whole
folder into memory once, then serves batches from memory). Model building and tokenizer training are
outside the clock for both.

Data, written once per run to a temp folder from ``--size`` shapes-world scenes rendered at
``--stored-size`` px (larger than the model's 64 px, so resizing is real work, as for users), one
caption per image (as in CC3M / LAION-style data):
- an image folder: ``images/000000.png`` ... + ``captions.csv`` (``path,caption``), the layout vlpt's
  ``data.dataset=files`` reads (vlpt/data/files.py, docs/data.md), and the same images listed in a
  tab-separated ``filepath``/``title`` CSV with absolute paths, OpenCLIP's ``--dataset-type csv`` layout;
- webdataset shards of the same PNG bytes (``vlpt.data.shards.write_shards``: ``KEY.png`` + ``KEY.txt``),
  which both vlpt's ``ShardReader`` and OpenCLIP's ``get_wds_dataset`` read.

vlpt: the data path ``vlpt train --set data.dataset=files|shards --set data.path=DIR`` runs
(``vlpt.train.run.load_train_data`` -> ``FilesDataset`` decode + centre-crop resize, once, then
``train_batches`` -> ``PairBatches``, which tokenizes every caption once and serves uint8 batches from
memory; for shards ``train_batches`` -> ``ShardReader`` + ``ShardBatches``: every epoch streams and
decodes the tars in ``data.num_workers`` DataLoader workers and tokenizes each batch in the main process).
vlpt's files path does no per-epoch augmentation by default (``--augment`` adds a setting with
``data.augment=true``: ``PairBatches``' random shifts).

OpenCLIP: its own training data code, ``open_clip_train.data.get_csv_dataset`` (``CsvDataset``: PIL open
per item, every epoch) and ``get_wds_dataset``, with the ``args`` of ``open_clip_train.params`` (batch,
``--workers``, ``--train-num-samples``), the training transform ``open_clip.image_transform(64,
is_train=True)`` (RandomResizedCrop scale 0.9-1.0, bicubic; to tensor; normalise) and its tokenizer
(``SimpleTokenizer``, 49,408-token BPE, padded to the model's context, as ``open_clip.get_tokenizer``
does for a model with that context). ``open_clip_train.data`` imports pandas only for ``pd.read_csv`` in
``CsvDataset``; if pandas is not installed, a stand-in ``read_csv`` (Python's csv module, same columns)
is put in its place before the import, and the config says so (``openclip_compat``). OpenCLIP's training
extra pins webdataset <= 0.2.86; with webdataset 1.x its ``group_by_keys_nothrow`` fails on the end-of-shard
marker 1.x yields, so ``tar_file_expander`` is called with ``eof_value=None`` (0.2.x behaviour; also recorded).

Text context (``--contexts``, default 77 then 32): 77 is the context of every OpenCLIP model config, what
its users train with (its tokenizer pads every caption to it; vlpt trims each batch to its longest caption,
as ``train_throughput.py``'s captions setting); 32 is the fixed-shape benchmark's context, where padding
costs OpenCLIP little. The first context gives the unsuffixed keys, the others ``*_ctx<N>``.

Model shape and training step: bench/train_throughput.py's ViT (64 px, patch 8, width 256, 4 layers;
text width 256, 4 layers; embedding 256), built with its helpers (``build_vlpt``,
``build_openclip``), and its per-library step (forward, InfoNCE, backward, AdamW as each trainer builds
it, zero_grad; no clipping). vlpt's text tower has its WordPiece vocabulary trained on the captions;
OpenCLIP's has the 49,408 entries its tokenizer needs. The same batch, threads and number of steps
(``--epochs`` x size // batch) for every setting.

Settings: vlpt ``files`` (no workers: batches come from memory), vlpt ``shards`` and OpenCLIP ``csv`` /
``wds`` at each ``--workers`` count (default 0 and 1; on 2 cores a worker competes with the training
threads). Rounds alternate vlpt and OpenCLIP settings, the order reversing every round; each figure is the
median over ``--repeats`` rounds. Keys (bench/results/end_to_end.json):
``end_to_end_ratio_vs_openclip`` = vlpt files images/s / OpenCLIP csv images/s at its best worker count;
``end_to_end_ratio_vs_openclip_shards`` = vlpt shards / OpenCLIP wds, each at its best worker count;
``*_images_per_s`` (all epochs, one-time work included), ``*_epoch<k>_images_per_s`` (epoch k alone;
epoch 1 includes the one-time work), ``*_compute_share`` (share of the time spent in training steps:
the rest is waiting for data), ``*_compute_images_per_s`` (images / seconds in training steps),
``vlpt_files_decode_seconds`` / ``vlpt_files_tokenize_seconds`` (its one-time work), and
``*_data_only_images_per_s``: the same data path over the same epochs with no training step (the input
pipeline's own speed; run right after each timed setting, in the same rounds).

The image files are in the OS page cache (just written), as on a machine that has read them before:
disk speed is not measured.

    .venv/bin/python bench/end_to_end.py [--threads 2] [--size 2048] [--batch 128] [--epochs 2]
                                         [--repeats 2] [--workers 0 1] [--contexts 77 32] [--augment] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import functools
import gc
import inspect
import logging
import statistics
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from itertools import zip_longest
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import write_results
from train_throughput import (
    IMAGE_SIZE,
    build_openclip,
    build_vlpt,
    openclip_loss_step,
    openclip_optimizer,
    vlpt_loss_step,
    vlpt_optimizer,
)

log = logging.getLogger("end_to_end")

CONTEXTS = [77, 32]  # 77: every OpenCLIP model's context, what its users train with; 32: the fixed-shape bench's


# ----------------------------------------------------------------------------- data on disk

def write_data(root: Path, size: int, stored_size: int, shard_size: int) -> tuple[list[str], dict]:
    """Render ``size`` shapes scenes at ``stored_size`` px and write them as a vlpt image folder, an
    OpenCLIP CSV over the same files, and shards of the same PNG bytes. Returns (captions, facts)."""
    from vlpt.data.shapes import ShapesConfig, ShapesDataset
    from vlpt.data.shards import write_shards

    dataset = ShapesDataset(ShapesConfig(split="train", size=size, image_size=stored_size), cache_dir=None)
    folder = root / "files"
    (folder / "images").mkdir(parents=True)
    rows = []
    for i, (image, captions) in enumerate(zip(dataset.images, dataset.captions)):
        rel = f"images/{i:06d}.png"
        Image.fromarray(image).save(folder / rel)
        rows.append((rel, captions[i % len(captions)]))  # one caption per image, varied templates
    with open(folder / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption"])
        writer.writerows(rows)
    with open(root / "openclip.tsv", "w", newline="") as f:  # OpenCLIP's defaults: tab, filepath, title
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["filepath", "title"])
        writer.writerows((str(folder / rel), caption) for rel, caption in rows)
    shards = write_shards(folder, root / "shards", shard_size)
    facts = {"png_mb": sum(p.stat().st_size for p in (folder / "images").glob("*.png")) / 2 ** 20,
             "shards": len(shards)}
    return [caption for _, caption in rows], facts


# ----------------------------------------------------------------------------- OpenCLIP's data code

def import_openclip_data() -> tuple[types.ModuleType, str]:
    """``open_clip_train.data``; if pandas is missing, with a stand-in for the one call it makes
    (``pd.read_csv(path, sep=...)[column].tolist()`` in ``CsvDataset.__init__``)."""
    try:
        import pandas  # noqa: F401
        reader = f"pandas {metadata.version('pandas')}"
    except ImportError:
        class Column(list):
            def tolist(self) -> list:
                return list(self)

        def read_csv(path, sep=","):
            with open(path, newline="") as f:
                rows = list(csv.reader(f, delimiter=sep))
            return {name: Column(row[j] for row in rows[1:]) for j, name in enumerate(rows[0])}

        sys.modules["pandas"] = types.SimpleNamespace(read_csv=read_csv, __name__="pandas")
        reader = "stand-in read_csv (csv module), pandas not installed"
    from open_clip_train import data

    try:
        version = tuple(int(p) for p in metadata.version("webdataset").split(".")[:2])
    except ValueError:
        version = (0, 0)
    if version >= (0, 3) and "eof_value" in inspect.signature(data.tar_file_expander).parameters:
        # webdataset 1.x yields an end-of-shard marker ({}) that OpenCLIP's group_by_keys_nothrow, written for
        # the webdataset <= 0.2.86 its training extra pins, fails on (KeyError 'fname'); no marker = 0.2.x.
        data.tar_file_expander = functools.partial(data.tar_file_expander, eof_value=None)
        reader += f"; webdataset {metadata.version('webdataset')}: tar_file_expander(eof_value=None) as in 0.2.x"
    return data, reader


def openclip_args(train_data: str, kind: str, batch: int, workers: int, num_samples: int):
    """The ``args`` OpenCLIP's ``main.py`` hands its data code: its CLI defaults plus what we set."""
    from open_clip_train.params import parse_args

    args = parse_args([])
    args.train_data, args.dataset_type = train_data, kind
    args.batch_size, args.workers = batch, workers
    args.train_num_samples = num_samples  # --train-num-samples, as its docs ask for shards without sizes.json
    args.distributed, args.world_size, args.rank, args.seed = False, 1, 0, 0
    return args


# ----------------------------------------------------------------------------- one timed run

@dataclass
class Run:
    """One setting's epochs: cumulative seconds at each epoch's end, seconds in training steps, images."""
    epoch_ends: list[float] = field(default_factory=list)
    compute: float = 0.0
    images: int = 0
    parts: dict[str, float] = field(default_factory=dict)  # one-time work, seconds

    def images_per_s(self) -> float:
        return self.images / self.epoch_ends[-1]


def train_epochs(run: Run, start: float, epochs: Iterable[Iterator], step: Callable[[object], int]) -> Run:
    """Drive ``step`` over every batch of every epoch, timing the steps apart from the waits for data."""
    for batches in epochs:
        for batch in batches:
            t = time.perf_counter()
            run.images += step(batch)
            run.compute += time.perf_counter() - t
        run.epoch_ends.append(time.perf_counter() - start)
    return run


class Library:
    """One library's model, optimizer and training step (train_throughput's helpers); without a
    ``loss_step`` (data only) a step just counts the batch's images."""

    def __init__(self, name: str, model: torch.nn.Module, optimizer, loss_step, to_input: Callable):
        self.name, self.model, self.optimizer, self.loss_step, self.to_input = name, model, optimizer, loss_step, to_input
        model.train()

    def step(self, batch) -> int:
        images, text = self.to_input(batch)
        if self.loss_step is None:
            return len(images)
        loss = self.loss_step(self.model, (images, text))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return len(images)


def run_vlpt(lib: Library, kind: str, root: Path, args, workers: int, augment: bool = False) -> Run:
    """vlpt's ``train`` data path for ``data.dataset=files|shards``: the contrastive task's ``load_data`` +
    ``batches``."""
    from vlpt.config import DataConfig, RunConfig, TrainConfig
    from vlpt.tasks.contrastive import Contrastive
    from vlpt.train.distributed import DistributedEnv

    path = root / ("files" if kind == "files" else "shards")
    config = RunConfig(data=DataConfig(dataset=kind, path=str(path), image_size=IMAGE_SIZE, num_workers=workers,
                                       augment=augment),
                       train=TrainConfig(batch_size=args.batch, steps=args.steps, device="cpu", seed=0))
    run = Run()
    start = time.perf_counter()
    data = Contrastive().load_data(config, None)  # files: decode + resize every image, once; shards: streamed
    decoded = time.perf_counter()
    batches = Contrastive().batches(config, data, lib.model, DistributedEnv())  # files: tokenizes every caption
    run.parts = {"decode": decoded - start, "tokenize": time.perf_counter() - decoded} if data is not None else {}
    per_epoch = batches.steps_per_epoch if kind == "shards" else len(data[0]) // args.batch
    epochs = ((batches.batch(e * per_epoch + s) for s in range(per_epoch)) for e in range(args.epochs))
    try:
        return train_epochs(run, start, epochs, lib.step)
    finally:
        if hasattr(batches, "close"):
            batches.close()


def run_openclip(lib: Library, kind: str, root: Path, args, workers: int, oc_data, preprocess, tokenizer) -> Run:
    """OpenCLIP's ``main.py`` data path: ``get_csv_dataset`` / ``get_wds_dataset``, ``set_epoch``, iterate."""
    if kind == "csv":
        train_data, make = str(root / "openclip.tsv"), oc_data.get_csv_dataset
    else:
        pattern = f"shard-{{000000..{args.shards - 1:06d}}}.tar"  # brace notation, as OpenCLIP users pass shards
        train_data, make = str(root / "shards" / pattern), oc_data.get_wds_dataset
    oc_args = openclip_args(train_data, kind, args.batch, workers, args.size)
    run = Run()
    start = time.perf_counter()
    info = make(oc_args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)

    def epoch(e: int):
        info.set_epoch(e)
        return iter(info.dataloader)
    return train_epochs(run, start, (epoch(e) for e in range(args.epochs)), lib.step)


# ----------------------------------------------------------------------------- main

def summarise(runs: dict[str, list[Run]], data_only: dict[str, list[Run]], args) -> dict:
    figures: dict = {}
    for name, rs in runs.items():
        figures[f"{name}_images_per_s"] = statistics.median(r.images_per_s() for r in rs)
        for k in range(args.epochs):
            seconds = [r.epoch_ends[k] - (r.epoch_ends[k - 1] if k else 0.0) for r in rs]
            figures[f"{name}_epoch{k + 1}_images_per_s"] = args.steps_per_epoch * args.batch / statistics.median(seconds)
        figures[f"{name}_compute_share"] = statistics.median(r.compute / r.epoch_ends[-1] for r in rs)
        figures[f"{name}_compute_images_per_s"] = statistics.median(r.images / r.compute for r in rs)
        figures[f"{name}_data_only_images_per_s"] = statistics.median(r.images_per_s() for r in data_only[name])
        for part in rs[0].parts:
            figures[f"{name}_{part}_seconds"] = statistics.median(r.parts[part] for r in rs)
        if any(r.images != args.steps_per_epoch * args.batch * args.epochs for r in rs + data_only[name]):
            raise RuntimeError(f"{name}: {[r.images for r in rs]} images, expected "
                               f"{args.steps_per_epoch * args.batch * args.epochs}")
    return figures


def best(figures: dict, prefix: str, workers: list[int]) -> tuple[float, int]:
    options = {w: figures[f"{prefix}_w{w}_images_per_s"] for w in workers}
    w = max(options, key=options.get)
    return options[w], w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--size", type=int, default=None, help="images on disk (default 2048; --quick 256)")
    parser.add_argument("--stored-size", type=int, default=128, help="side of the stored PNGs (default 128)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 128; --quick 32)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per setting (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds over all settings (default 2; --quick 1)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1],
                        help="DataLoader worker counts to try for vlpt shards and OpenCLIP (default 0 1)")
    parser.add_argument("--shard-size", type=int, default=None, help="samples per shard (default size // 8)")
    parser.add_argument("--contexts", type=int, nargs="+", default=CONTEXTS,
                        help="text contexts to measure; the first gives the unsuffixed keys (default 77 32)")
    parser.add_argument("--augment", action="store_true", help="also run vlpt files with data.augment=true")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 256 images, batch 32, 1 round; writes end_to_end-quick.json")
    args = parser.parse_args()
    args.size = args.size or (256 if args.quick else 2048)
    args.batch = args.batch or (32 if args.quick else 128)
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.shard_size = args.shard_size or max(1, args.size // 8)
    args.shards = -(-args.size // args.shard_size)
    args.steps_per_epoch = args.size // args.batch
    args.steps = args.steps_per_epoch * args.epochs
    if args.steps_per_epoch == 0:
        parser.error(f"--size {args.size} is smaller than one batch of {args.batch}")
    if args.size % (args.batch * max(1, max(args.workers))) or args.size % args.shard_size:
        log.warning("size %d is not a multiple of batch x workers / shard size: the libraries' shard readers "
                    "may run different step counts", args.size)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("vlpt").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    oc_data, openclip_compat = import_openclip_data()
    results: dict = {}
    best_workers: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        log.info("writing %d images (%d px PNG), captions and %d shards to %s", args.size, args.stored_size,
                 args.shards, root)
        start = time.perf_counter()
        captions, facts = write_data(root, args.size, args.stored_size, args.shard_size)
        log.info("written in %.1f s", time.perf_counter() - start)
        for i, context in enumerate(args.contexts):
            log.info("text context %d", context)
            figures, best_workers[context], vocab = measure(args, root, captions, context, oc_data)
            suffix = "" if i == 0 else f"_ctx{context}"
            results.update({k + suffix: v for k, v in figures.items()})

    config = {
        "quick": args.quick, "threads": args.threads, "size": args.size, "stored_size": args.stored_size,
        "model_image_size": IMAGE_SIZE, "contexts": args.contexts,
        "context_keys": f"unsuffixed keys: context {args.contexts[0]}; others suffixed _ctx<N>",
        "batch": args.batch, "epochs": args.epochs,
        "steps_per_epoch": args.steps_per_epoch, "repeats": args.repeats, "workers": args.workers,
        "shard_size": args.shard_size, "shards": facts["shards"], "png_mb": round(facts["png_mb"], 2),
        "best_workers": best_workers,
        "statistic": "median over rounds; rounds alternate vlpt and OpenCLIP settings, order reversed every round",
        "clock": "files on disk -> last optimizer step; model and tokenizer building outside; page cache warm",
        "data": "shapes-world train scenes, PNG, one caption per image",
        "vlpt_data_path": "vlpt.train.run.load_train_data + train_batches (files: FilesDataset decode once, "
                          "PairBatches from memory, each batch trimmed to its longest caption; shards: ShardReader "
                          "with data.num_workers, ShardBatches)",
        "vlpt_augment": "none (data.augment=false, its default)" + ("; vlpt_files_augment: data.augment=true"
                                                                     if args.augment else ""),
        "openclip_data_path": "open_clip_train.data.get_csv_dataset / get_wds_dataset with open_clip_train.params "
                              "defaults; image_transform(64, is_train=True); SimpleTokenizer(context_length=<context>)"
                              ", which pads every caption to the context",
        "openclip_compat": openclip_compat,
        "step": "train_throughput.py's: forward + InfoNCE + backward + AdamW (each trainer's) + zero_grad; no clip",
        "vocab": vocab,
        "open_clip_torch": metadata.version("open_clip_torch"), "webdataset": metadata.version("webdataset"),
        "pillow": metadata.version("pillow"),
    }
    write_results("end_to_end-quick" if args.quick else "end_to_end", results, config)


def measure(args, root: Path, captions: list[str], context: int, oc_data) -> tuple[dict, dict, dict]:
    """Every setting at one text context, in alternating rounds. Returns (figures, best worker counts, vocab)."""
    import open_clip

    tokenizer = open_clip.SimpleTokenizer(context_length=context)
    preprocess = open_clip.image_transform(IMAGE_SIZE, is_train=True)
    vlpt_model = build_vlpt("vit", context, captions)
    oc_model = build_openclip("vit", context, tokenizer.vocab_size)
    step = vlpt_loss_step()
    vlpt = Library("vlpt", vlpt_model, vlpt_optimizer(vlpt_model), step,
                   lambda b: (b["images"], {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}))
    oc = Library("openclip", oc_model, openclip_optimizer(oc_model), openclip_loss_step(), lambda b: b)
    # warm-up: two untimed steps each on a synthetic batch, so no run pays first-step setup
    warm_tokens = vlpt_model.tokenizer(captions[:args.batch])
    warm_vlpt = {"images": torch.randint(0, 256, (args.batch, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8),
                 **warm_tokens}
    warm_oc = (torch.randn(args.batch, 3, IMAGE_SIZE, IMAGE_SIZE), tokenizer(captions[:args.batch]))
    for _ in range(2):
        vlpt.step(warm_vlpt)
        oc.step(warm_oc)

    # a setting runs with a library: its training step, or (data only) none
    settings_vlpt: dict[str, Callable[[bool], Run]] = {
        "vlpt_files": lambda train: run_vlpt(vlpt if train else data_vlpt, "files", root, args, 0)}
    if args.augment:
        settings_vlpt["vlpt_files_augment"] = lambda train: run_vlpt(vlpt if train else data_vlpt, "files", root,
                                                                     args, 0, augment=True)
    settings_oc: dict[str, Callable[[bool], Run]] = {}
    for w in args.workers:
        settings_vlpt[f"vlpt_shards_w{w}"] = lambda train, w=w: run_vlpt(vlpt if train else data_vlpt, "shards",
                                                                         root, args, w)
        for kind in ("csv", "wds"):
            settings_oc[f"openclip_{kind}_w{w}"] = lambda train, w=w, kind=kind: run_openclip(
                oc if train else data_oc, kind, root, args, w, oc_data, preprocess, tokenizer)
    data_vlpt = Library("vlpt", vlpt_model, None, None, vlpt.to_input)
    data_oc = Library("openclip", oc_model, None, None, oc.to_input)
    order = [s for pair in zip_longest(settings_vlpt, settings_oc) for s in pair if s is not None]
    settings = {**settings_vlpt, **settings_oc}
    runs: dict[str, list[Run]] = {name: [] for name in order}
    data_only: dict[str, list[Run]] = {name: [] for name in order}
    for r in range(args.repeats):
        for name in (order if r % 2 == 0 else order[::-1]):
            gc.collect()
            run = settings[name](True)
            runs[name].append(run)
            gc.collect()
            data_only[name].append(settings[name](False))
            log.info("round %d  %-22s %7.1f images/s  (epochs end at %s s; %.0f%% in steps)  data only: %.0f "
                     "images/s", r + 1, name, run.images_per_s(), ", ".join(f"{t:.1f}" for t in run.epoch_ends),
                     100 * run.compute / run.epoch_ends[-1], data_only[name][-1].images_per_s())

    figures = summarise(runs, data_only, args)
    oc_csv, oc_csv_w = best(figures, "openclip_csv", args.workers)
    oc_wds, oc_wds_w = best(figures, "openclip_wds", args.workers)
    vlpt_shards, vlpt_shards_w = best(figures, "vlpt_shards", args.workers)
    last = f"epoch{args.epochs}"
    head = {
        "end_to_end_ratio_vs_openclip": figures["vlpt_files_images_per_s"] / oc_csv,
        "end_to_end_ratio_vs_openclip_shards": vlpt_shards / oc_wds,
        f"end_to_end_ratio_vs_openclip_{last}": figures[f"vlpt_files_{last}_images_per_s"]
        / figures[f"openclip_csv_w{oc_csv_w}_{last}_images_per_s"],
        "vlpt_files_images_per_s_best": figures["vlpt_files_images_per_s"],
        "vlpt_shards_images_per_s_best": vlpt_shards,
        "openclip_csv_images_per_s_best": oc_csv,
        "openclip_wds_images_per_s_best": oc_wds,
    }
    best_workers = {"vlpt_shards": vlpt_shards_w, "openclip_csv": oc_csv_w, "openclip_wds": oc_wds_w}
    vocab = {"vlpt": vlpt_model.tokenizer.vocab_size, "openclip": tokenizer.vocab_size}
    return {**head, **figures}, best_workers, vocab


if __name__ == "__main__":
    main()
