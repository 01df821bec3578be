"""Issue 6: streaming from webdataset shards vs. reading a folder of image files.

Renders N shapes scenes (64 px), writes them as a PNG folder with captions.csv and, from that folder
(the same PNG bytes), as shards; then times one epoch through (a) vlpt's ShardReader and (b) a plain
folder reader (a torch Dataset over the files), both with the same decode + resize
(``vlpt.data.shards.decode_image``), the same batch size and the same number of DataLoader workers.
Writes bench/results/shards.json (--quick: shards-quick.json, so a check never replaces real figures).

    .venv/bin/python bench/shards.py [--quick] [--size N] [--workers 2] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import write_results

from vlpt.data.files import read_captions
from vlpt.data.shapes import ShapesConfig, ShapesDataset
from vlpt.data.shards import ShardReader, decode_image, write_shards


class FolderDataset(torch.utils.data.Dataset):
    """The plain alternative: one file read and decoded per item, captions from captions.csv."""

    def __init__(self, root: Path, image_size: int, seed: int = 0):
        self.records = read_captions(root)
        self.image_size = image_size
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        record = self.records[i]
        image = decode_image(record.path.read_bytes(), self.image_size)  # (S, S, 3) uint8
        caption = record.captions[int(np.random.default_rng([self.seed, i]).integers(len(record.captions)))]
        return image, caption


def write_folder(dataset: ShapesDataset, root: Path) -> None:
    root.mkdir(parents=True)
    rows = ["path,caption"]
    for i, (image, captions) in enumerate(zip(dataset.images, dataset.captions)):
        Image.fromarray(image).save(root / f"{i:06d}.png")
        rows += [f'{i:06d}.png,"{c}"' for c in captions]
    (root / "captions.csv").write_text("\n".join(rows) + "\n")


def time_shards(shards: Path, batch_size: int, image_size: int, workers: int) -> tuple[int, float]:
    reader = ShardReader(shards, batch_size, image_size, num_workers=workers, shuffle_buffer=1000)
    start = time.perf_counter()
    images = sum(len(batch["images"]) for batch in reader.epoch(0))
    return images, time.perf_counter() - start


def time_folder(root: Path, batch_size: int, image_size: int, workers: int) -> tuple[int, float]:
    loader = torch.utils.data.DataLoader(FolderDataset(root, image_size), batch_size=batch_size, shuffle=True,
                                         drop_last=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    images = sum(len(images) for images, _ in loader)
    return images, time.perf_counter() - start


def folder_bytes(root: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in root.glob(pattern))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="500 images: checks the script, not the machine")
    parser.add_argument("--size", type=int, default=5000, help="images (default 5000; --quick: 500)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=250, help="samples per shard (--quick: 50)")
    args = parser.parse_args()
    size = 500 if args.quick else args.size
    shard_size = 50 if args.quick else args.shard_size
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset = ShapesDataset(ShapesConfig(split="train", size=size, image_size=args.image_size), cache_dir=None)
        write_folder(dataset, tmp / "folder")
        start = time.perf_counter()
        paths = write_shards(tmp / "folder", tmp / "shards", shard_size)
        write_seconds = time.perf_counter() - start
        shard_images, shard_seconds = time_shards(tmp / "shards", args.batch_size, args.image_size, args.workers)
        folder_images, folder_seconds = time_folder(tmp / "folder", args.batch_size, args.image_size, args.workers)
        figures = {
            "images": size,
            "shard_images_per_s": shard_images / shard_seconds,
            "folder_images_per_s": folder_images / folder_seconds,
            "shard_vs_folder_ratio": (shard_images / shard_seconds) / (folder_images / folder_seconds),
            "shard_epoch_seconds": shard_seconds,
            "folder_epoch_seconds": folder_seconds,
            "shard_epoch_images": shard_images,
            "folder_epoch_images": folder_images,
            "shard_count": len(paths),
            "shards_mb": folder_bytes(tmp / "shards", "*.tar") / 2 ** 20,
            "folder_mb": folder_bytes(tmp / "folder", "*.png") / 2 ** 20,
            "shard_write_seconds": write_seconds,
        }
    config = {"quick": args.quick, "image_size": args.image_size, "batch_size": args.batch_size,
              "workers": args.workers, "shard_size": shard_size, "shuffle_buffer": 1000,
              "data": "shapes train scenes, PNG"}
    write_results("shards-quick" if args.quick else "shards", figures, config)


if __name__ == "__main__":
    main()
