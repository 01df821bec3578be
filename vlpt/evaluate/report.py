"""Write a run's evaluation: ``metrics.json`` plus ``report.md`` with PNG plots next to it.

Every file is written to a temporary name and moved into place with ``os.replace``, so a crash
mid-write never leaves half a file and the previous version survives until the new one is whole.
Plots use matplotlib's ``Figure`` directly (Agg canvas, no pyplot): no display, no global state.
"""

from __future__ import annotations

import json
import math
import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from vlpt.io import atomic_write

RetrievalExample = tuple[str, Sequence[np.ndarray], Sequence[bool]]


@dataclass
class EvalResult:
    """What an evaluation gives its run's report: flat metrics and the figures' data."""
    metrics: dict[str, float]
    confusion: np.ndarray | None = None
    class_names: Sequence[str] = ()
    retrieval_examples: list[RetrievalExample] = field(default_factory=list)
    images: dict[str, Path] = field(default_factory=dict)  # report section title -> a figure already written


# Metric-name tokens whose values are fractions, shown as percentages in report.md.
_FRACTION_TOKEN = re.compile(r"^(top\d+|r\d+|acc|accuracy|recall|precision|f1|vqa)$")


def _scalar(value):
    """Unwrap numpy scalars, 0-d arrays and 0-d tensors to plain Python numbers."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def _json_value(value):
    """Plain Python value for JSON; non-finite floats become null."""
    value = _scalar(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/inf; a diverged metric reads as missing
    return value


def write_metrics(path: str | Path, metrics: Mapping[str, object]) -> Path:
    """Write flat metrics as sorted JSON, atomically. Raises (and keeps the old file) if unserialisable."""
    path = Path(path)
    # Serialise fully before touching the disk, so a bad value fails without side effects.
    text = json.dumps({str(k): _json_value(v) for k, v in metrics.items()},
                      sort_keys=True, indent=2, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path


def _is_fraction(key: str, value: object) -> bool:
    if not isinstance(value, float) or not 0.0 <= value <= 1.0:
        return False
    return any(_FRACTION_TOKEN.match(tok) for tok in re.split(r"[_/.\-]", key.lower()))


def _format_value(key: str, value: object) -> str:
    if _is_fraction(key, value):
        return f"{100 * value:.2f}%"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)  # attach the Agg canvas: rendering without any display
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))


def plot_loss(history: Sequence[Mapping[str, float]], path: Path) -> Path:
    """Training loss vs step; learning rate on a twin axis when the rows have ``lr``."""
    rows = [r for r in history if "step" in r and "loss" in r]
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    ax.grid(alpha=0.3)
    lr_rows = [r for r in rows if "lr" in r]
    if lr_rows:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in lr_rows], [r["lr"] for r in lr_rows], color="tab:orange", alpha=0.8)
        ax2.set_ylabel("learning rate", color="tab:orange")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set_title("training loss")
    _save(fig, path)
    return path


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str] | None, path: Path) -> Path:
    """Row-normalised confusion matrix (row = true class), labelled with class names."""
    confusion = np.asarray(confusion, dtype=np.float64)
    n = confusion.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)  # per-class recall rows
    side = max(5.0, 0.22 * n + 2.5)  # 48 classes -> ~13 in, room for a 6 pt label per cell
    fig = Figure(figsize=(side, side))
    ax = fig.add_subplot()
    im = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fontsize = 9 if n <= 12 else 7 if n <= 30 else 6
    ax.set_xticks(range(n), names, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), names, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 12:  # counts are only legible in small matrices
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, f"{int(confusion[i, j])}", ha="center", va="center", fontsize=8,
                            color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set_title(f"confusion ({n} classes, rows normalised)")
    _save(fig, path)
    return path


def plot_retrieval(examples: Sequence[RetrievalExample], path: Path) -> Path:
    """One row per query text with its top-k images; correct ones framed green, wrong ones red."""
    k = max(len(images) for _, images, _ in examples)
    fig = Figure(figsize=(2.0 * k, 2.4 * len(examples)))
    axes = fig.subplots(len(examples), k, squeeze=False)
    for row, (query, images, correct) in enumerate(examples):
        for col in range(k):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(images):
                ax.set_axis_off()
                continue
            ax.imshow(np.asarray(images[col]), interpolation="nearest")
            for spine in ax.spines.values():
                spine.set_edgecolor("limegreen" if correct[col] else "red")
                spine.set_linewidth(5)
            ax.set_xlabel(f"#{col + 1}", fontsize=8)
        # Title over the middle column so the query reads as the row's heading.
        axes[row, k // 2].set_title(textwrap.fill(query, width=18 * k), fontsize=10)
    fig.suptitle("text -> image retrieval: top results (green = correct image)")
    _save(fig, path)
    return path


def plot_captions(images: Sequence[np.ndarray], captions: Sequence[Sequence[str]], path: str | Path,
                  correct: Sequence[bool] | None = None, columns: int = 4,
                  labels: Sequence[str] = ("greedy", "beam")) -> Path:
    """A grid of images, each titled with its generated caption(s) (one line per decoding strategy).
    ``correct`` frames each image green (attributes right) or red."""
    path = Path(path)
    n = len(images)
    rows = max(1, -(-n // columns))
    fig = Figure(figsize=(3.2 * columns, 4.3 * rows))  # room above each image for a few caption lines
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= n:
            ax.set_axis_off()
            continue
        ax.imshow(np.asarray(images[k]), interpolation="nearest")
        lines = [textwrap.fill(f"{label}: {text}", width=38) for label, text in zip(labels, captions[k])]
        ax.set_title("\n".join(lines), fontsize=7, loc="left")
        if correct is not None:
            for spine in ax.spines.values():
                spine.set_edgecolor("limegreen" if correct[k] else "red")
                spine.set_linewidth(4)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))  # written aside and renamed
    return path


def plot_samples(rows: Sequence[np.ndarray], titles: Sequence[str], path: str | Path,
                 column_labels: Sequence[str] | None = None) -> Path:
    """One row per title, its images (S, H, W, 3) side by side; written atomically."""
    columns = max(len(r) for r in rows)
    fig = Figure(figsize=(1.6 * columns + 2.6, 1.7 * len(rows)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for i, (images, title) in enumerate(zip(rows, titles)):
        for j, ax in enumerate(axes[i]):
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(images):
                ax.set_axis_off()
                continue
            ax.imshow(np.asarray(images[j]), interpolation="nearest")
            if i == 0 and column_labels:
                ax.set_title(column_labels[j], fontsize=8)
        axes[i][0].set_ylabel(textwrap.fill(title, 22), fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def image_grid(images: np.ndarray, columns: int, scale: int = 1) -> Image.Image:
    """uint8 (N, H, W, 3) -> one PIL image, ``columns`` per row, each enlarged ``scale`` times (nearest)."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    canvas = np.zeros((rows * h, columns * w, 3), np.uint8)
    for k, image in enumerate(images):
        r, c = divmod(k, columns)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    grid = Image.fromarray(canvas)
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST) if scale > 1 else grid


def _metrics_table(metrics: Mapping[str, object]) -> str:
    lines = ["| metric | value |", "|---|---|"]
    for key in sorted(metrics):
        lines.append(f"| {key} | {_format_value(key, _scalar(metrics[key]))} |")
    return "\n".join(lines)


def write_report(
    run_dir: str | Path,
    metrics: Mapping[str, object],
    history: Sequence[Mapping[str, float]] | None = None,
    confusion: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    retrieval_examples: Sequence[RetrievalExample] | None = None,
    extra_images: Mapping[str, str | Path] | None = None,
    summary: Mapping[str, object] | None = None,
) -> Path:
    """Write ``metrics.json``, ``report.md`` and its plots into ``run_dir``; return the report's path.

    ``summary``: what was run (task, model, data, budget), listed under the title.
    ``history``: JSONL-style rows with ``step`` and ``loss`` (``lr`` optional) -> ``loss.png``.
    ``confusion``: (C, C) counts, row = true class -> ``confusion.png``.
    ``retrieval_examples``: (query text, top-k HxWx3 uint8 images, k is-correct flags) -> ``retrieval.png``.
    ``extra_images``: title -> existing image file, linked from the report.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_metrics(run_dir / "metrics.json", metrics)  # first: a bad metric aborts before any plot

    sections = [f"# Evaluation report: {run_dir.resolve().name}", ""]
    if summary:
        sections += [f"- {key}: {value}" for key, value in summary.items()] + [""]
    sections += ["## Metrics", "", _metrics_table(metrics), ""]
    if history and any("loss" in r and "step" in r for r in history):
        plot_loss(history, run_dir / "loss.png")
        sections += ["## Training loss", "", "![loss](loss.png)", ""]
    if confusion is not None:
        plot_confusion(confusion, class_names, run_dir / "confusion.png")
        sections += ["## Confusion matrix", "", "![confusion](confusion.png)", ""]
    if retrieval_examples:
        plot_retrieval(retrieval_examples, run_dir / "retrieval.png")
        sections += ["## Retrieval examples", "", "![retrieval](retrieval.png)", ""]
    for title, image in (extra_images or {}).items():
        # Link relative to the report so the run folder can be moved as a whole.
        link = Path(os.path.relpath(Path(image).resolve(), run_dir.resolve())).as_posix()
        sections += [f"## {title}", "", f"![{title}]({link})", ""]

    report = run_dir / "report.md"
    text = "\n".join(sections)
    atomic_write(report, lambda tmp: tmp.write_text(text))
    return report


def write_model_card(model_dir: str | Path, title: str, facts: Mapping[str, object],
                     metrics: Mapping[str, object] | None = None, load_as: str = "vlpt.load") -> Path:
    """``README.md`` in a saved model folder: what the model is, what it was trained on and how well it did,
    and how to load it (the model-card habit of the Hugging Face hub)."""
    model_dir = Path(model_dir)
    lines = [f"# {title}", ""] + [f"- {key}: {value}" for key, value in facts.items()] + [""]
    if metrics:
        lines += ["## Metrics (held-out data unless the name says train)", "", _metrics_table(metrics), ""]
    lines += ["## How to load", "", "```python", "import vlpt", "",
              f'model = {load_as}("{model_dir.name}")  # this folder, or the run folder holding it', "```", "",
              "From the command line: `vlpt eval RUN_FOLDER` re-evaluates a run; see `vlpt --help` for the "
              "commands that use a model (classify, embed, caption, generate, ask, match).", ""]
    return atomic_write(model_dir / "README.md", lambda tmp: tmp.write_text("\n".join(lines)))
