"""A vlpt model scored by CLIP_benchmark, the community's evaluation tool, next to vlpt's own evaluation: the
same images, class names and prompts, the model exported to OpenCLIP for CLIP_benchmark.

    python -m vlpt.interop.clip_benchmark MODEL OUT [--size 1000] [--image-size 64]

writes into OUT the shapes test split (single-object scenes, 48 (color, shape) classes) twice, as vlpt's
image folder (``images/*.png`` + ``captions.csv`` with labels: ``data.dataset=files``) and as CLIP_benchmark's
local webdataset (``wds/test/0.tar`` + ``classnames.txt``, the same PNG bytes), the model as an OpenCLIP
folder (``open_clip/``), and the per-class prompts vlpt uses (``USER_TEMPLATES`` with their articles fixed:
"an orange star", less those that are training captions) as a CLIP_benchmark ``--custom_template_file``; then
runs ``vlpt eval`` on the model and ``clip_benchmark eval`` on the export and prints both zero-shot accuracies.
Needs ``pip install clip-benchmark``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

DATASET = "wds/vlpt_shapes"  # CLIP_benchmark's name for a local webdataset (its --dataset); keys the prompts
# CLIP_benchmark's command line, with one repair: its zero-shot ``accuracy`` (1.6.2) ends with
# ``float(np.array([x]))``, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python
# scalars"); the same count is taken with ``.item()``. Its classifier, logits and top-k are its own code.
RUN_CLIP_BENCHMARK = """
import sys
import clip_benchmark.metrics.zeroshot_classification as zs

def accuracy(output, target, topk=(1,)):
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [correct[:k].reshape(-1).float().sum().item() / n for k in topk]

zs.accuracy = accuracy
from clip_benchmark.cli import main
sys.exit(main())
"""


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_image_folder(images: np.ndarray, captions: Sequence[Sequence[str]], names: Sequence[str],
                       out: str | Path) -> Path:
    """vlpt's image folder (``data.dataset=files``): ``images/00000.png`` ... and ``captions.csv`` (path,
    caption, label: the class name) with every caption of every image."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(out / "captions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption", "label"])
        for i, (image, texts, name) in enumerate(zip(images, captions, names)):
            path = f"images/{i:05d}.png"
            (out / path).write_bytes(png_bytes(image))
            for text in texts:
                writer.writerow([path, text, name])
    return out


def write_wds_dataset(folder: str | Path, class_names: Sequence[str], prompts: dict[str, list[str]],
                      out: str | Path) -> Path:
    """CLIP_benchmark's local webdataset layout (``build_wds_dataset``) of a vlpt image folder, the same PNG
    bytes: ``test/0.tar`` (``KEY.png``, ``KEY.cls``), ``test/nshards.txt``, ``classnames.txt``, and
    ``templates.json`` (per-class prompts for ``--custom_template_file``)."""
    folder, out = Path(folder), Path(out)
    (out / "test").mkdir(parents=True, exist_ok=True)
    with open(folder / "captions.csv", newline="", encoding="utf-8") as f:
        rows = {row["path"]: row["label"] for row in csv.DictReader(f)}  # one entry per image, in file order
    with tarfile.open(out / "test" / "0.tar", "w") as tar:
        for i, (path, label) in enumerate(rows.items()):
            for ext, data in (("png", (folder / path).read_bytes()), ("cls", str(class_names.index(label)).encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (out / "test" / "nshards.txt").write_text("1\n")
    (out / "classnames.txt").write_text("\n".join(class_names) + "\n")
    (out / "templates.json").write_text(json.dumps({DATASET: prompts}, indent=1))
    return out


def vlpt_prompts(class_names: Sequence[str], training_captions: Sequence[Sequence[str]] = ()) -> dict[str, list[str]]:
    """The prompts ``vlpt eval`` builds for a labeled image folder's class names: ``USER_TEMPLATES``, less any
    that is word for word one of the training captions (``zeroshot_prompts_dropped``)."""
    from vlpt.evaluate.suite import USER_TEMPLATES, held_out_prompts

    prompts, _ = held_out_prompts(class_names, USER_TEMPLATES, training_captions)
    return dict(zip(class_names, prompts))


def run_clip_benchmark(model_dir: str | Path, dataset_dir: str | Path, out_json: str | Path, amp: bool = False,
                       batch_size: int = 64) -> dict:
    """``clip_benchmark eval`` of an OpenCLIP ``local-dir`` folder on ``write_wds_dataset``'s data set; its
    metrics (acc1, acc5, mean_per_class_recall)."""
    model_dir, dataset_dir = Path(model_dir).resolve(), Path(dataset_dir).resolve()
    command = [sys.executable, "-c", RUN_CLIP_BENCHMARK, "eval",
               "--model", f"local-dir:{model_dir}", "--pretrained", str(model_dir / "open_clip_model.safetensors"),
               "--dataset", DATASET, "--dataset_root", str(dataset_dir), "--task", "zeroshot_classification",
               "--custom_template_file", str(dataset_dir / "templates.json"), "--batch_size", str(batch_size),
               "--num_workers", "0", "--output", str(out_json)]
    if not amp:
        command.append("--no_amp")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(_threads()))}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"clip_benchmark failed ({result.returncode}): {result.stderr[-3000:]}")
    return json.loads(Path(out_json).read_text())["metrics"]


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def shapes_split(size: int, image_size: int, cache_dir=None):
    from vlpt.config import DataConfig
    from vlpt.data.splits import load_split

    return load_split(DataConfig(dataset="shapes", image_size=image_size), "test", size, single=True,
                      cache_dir=cache_dir)


def near_ties(model, images: np.ndarray, prompts: dict[str, list[str]], topk: Sequence[int] = (1, 5),
               tolerance: float = 1e-4) -> dict[int, int]:
    """Images whose zero-shot decision at top-k is a near tie: the k-th and (k+1)-th class similarities (cosines)
    closer than ``tolerance``. Two correct implementations may rank these differently (their float rounding
    differs), so their accuracies may differ by up to this many images and no more."""

    from vlpt.evaluate.scoring import embed_images, embed_texts
    from vlpt.evaluate.zero_shot import build_prompt_classifier

    classifier = build_prompt_classifier(lambda texts: embed_texts(model, texts), list(prompts.values()))
    similarity = embed_images(model, images) @ classifier.float()
    ranked = similarity.sort(dim=1, descending=True).values
    return {k: int((ranked[:, k - 1] - ranked[:, k] < tolerance).sum()) for k in topk if k < ranked.shape[1]}


def compare(model_ref: str, out: str | Path, size: int = 1000, image_size: int = 64, amp: bool = False,
            cache_dir=None) -> dict:
    """Write the data, export the model, run both evaluations: {"vlpt": zeroshot_top1, "clip_benchmark": acc1,
    ...} (fractions)."""
    from vlpt.config import load_config
    from vlpt.data.shapes import CLASS_NAMES
    from vlpt.factory import load_dual_encoder
    from vlpt.train.run import evaluate_model

    out = Path(out)
    scenes = shapes_split(size, image_size, cache_dir)
    names = [CLASS_NAMES[label] for label in scenes.labels]
    folder = write_image_folder(scenes.images, scenes.captions, names, out / "images")
    class_names = sorted(set(names))  # vlpt's files data set numbers text labels in sorted order
    # the folder is also the training data vlpt eval reads, so it drops the prompts that are training captions
    prompts = vlpt_prompts(class_names, scenes.captions)
    wds = write_wds_dataset(folder, class_names, prompts, out / "wds")
    model = load_dual_encoder(model_ref)
    model.export("open-clip", out / "open_clip")
    config = load_config("tiny-shapes", [
        "data.dataset=files", f"data.path={folder}", f"data.eval_path={folder}", f"data.image_size={image_size}",
        f"eval.zero_shot_size={size}", f"eval.retrieval_size={size}", f"eval.probe_train_size={size}"])
    ours = evaluate_model(model, config, out / "vlpt_eval", cache_dir=cache_dir, source=str(model_ref))
    imported = load_dual_encoder(out / "open_clip")  # the exported file, read back by vlpt
    again = evaluate_model(imported, config, None, cache_dir=cache_dir)
    theirs = run_clip_benchmark(out / "open_clip", wds, out / "clip_benchmark.json", amp=amp)
    ties = near_ties(model, scenes.images, prompts)
    return {"near_ties_top1": ties[1], "near_ties_top5": ties[5], "images": len(names), "classes": len(class_names),
            "vlpt": ours["zeroshot_top1"], "vlpt_top5": ours["zeroshot_top5"],
            "vlpt_reimported": again["zeroshot_top1"], "clip_benchmark": theirs["acc1"],
            "clip_benchmark_top5": theirs["acc5"], "amp": amp}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlpt.interop.clip_benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a vlpt run or model folder (or any model vlpt imports)")
    parser.add_argument("out", type=Path, help="a folder for the data, the export and the results")
    parser.add_argument("--size", type=int, default=1000, help="single-object test scenes")
    parser.add_argument("--image-size", type=int, default=64, help="pixels per side (the model's image size)")
    parser.add_argument("--amp", action="store_true", help="let CLIP_benchmark autocast (bf16 on a CPU)")
    args = parser.parse_args(argv)
    result = compare(args.model, args.out, args.size, args.image_size, args.amp)
    (args.out / "comparison.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
