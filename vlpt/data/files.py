"""A user's own images with captions: an image folder plus a captions file.

Layout::

    my-data/
      captions.csv        # or captions.jsonl
      images/cat-01.jpg   # any layout below the root; paths in the captions file are relative to it
      ...

``captions.csv`` has a header with the columns ``path`` and ``caption`` and optionally ``label``;
``captions.jsonl`` has one object per line with the same keys (``caption`` may also be a list of
strings there). Several rows with the same path give one image several captions, grouped in the
order the paths first appear. Labels are optional: whole numbers are used as class indices, any
other text is a class name (class indices follow the sorted names); an empty label means unlabeled.

Every path must stay inside the data root: ``..`` components, absolute paths and symlinks whose
target lies outside the root are refused, with the captions file's line and the path in the message.
"""

from __future__ import annotations

import csv
import io
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image

from vlpt.io import ImageLoadError, load_image

CAPTION_FILES = ("captions.csv", "captions.jsonl")
REQUIRED_COLUMNS = ("path", "caption")
# Images whose header declares more than this are refused before any pixel is decoded: a few
# hundred bytes of PNG can declare a 100000 x 100000 image (a "decompression bomb").
MAX_IMAGE_SIDE = 10_000
MAX_IMAGE_PIXELS = 50_000_000
_INT_LABEL = re.compile(r"^\d+$")


class CaptionsFileError(ValueError):
    """A captions file that cannot be used; the message names the file and line."""


class UnsafePathError(CaptionsFileError):
    """A path in a captions file that points outside the data root."""


@dataclass
class FileRecord:
    """One image of a captions file: its captions in file order and its (raw text) label."""
    path: Path  # resolved, inside the root
    relpath: str  # as written in the captions file (first occurrence)
    line: int  # line of the first row naming this image
    where: str  # "captions.csv:12", for error messages
    captions: list[str] = field(default_factory=list)
    label: str | None = None


# ----------------------------------------------------------------------------- captions file

def find_captions_file(root: str | Path) -> Path:
    """``captions.csv`` or ``captions.jsonl`` inside ``root`` (exactly one of them)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    found = [root / name for name in CAPTION_FILES if (root / name).is_file()]
    if not found:
        raise FileNotFoundError(f"no captions file in {root}: expected one of {', '.join(CAPTION_FILES)}")
    if len(found) > 1:
        raise CaptionsFileError(f"both {found[0].name} and {found[1].name} in {root}; keep one or pass captions_file")
    return found[0]


def _decode_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a BOM (as spreadsheet programs write) is allowed
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise CaptionsFileError(f"{path}:{line}: not valid UTF-8 ({err.reason} at byte {err.start})") from None


def _csv_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise CaptionsFileError(f"{path}:1: missing column(s) {', '.join(missing)}; the header must name "
                                f"path, caption (and optionally label), found: {', '.join(columns) or 'nothing'}")
    reader.fieldnames = columns
    rows = []
    try:
        for row in reader:
            if not any((v or "").strip() for k, v in row.items() if k is not None):
                continue  # a blank line
            rows.append((reader.line_num, row))
    except csv.Error as err:
        raise CaptionsFileError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
    return rows


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise CaptionsFileError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise CaptionsFileError(f"{path}:{number}: expected a JSON object with path and caption, "
                                    f"got {type(row).__name__}")
        missing = [k for k in REQUIRED_COLUMNS if k not in row]
        if missing:
            raise CaptionsFileError(f"{path}:{number}: missing key(s) {', '.join(missing)}")
        rows.append((number, row))
    return rows


def resolve_inside(root: Path, relpath: str, where: str) -> Path:
    """``root / relpath`` resolved, refusing anything that leads outside ``root``.

    ``where`` ("captions.csv:12") starts every error message."""
    if not relpath or not relpath.strip():
        raise CaptionsFileError(f"{where}: empty path")
    if PurePosixPath(relpath).is_absolute() or PureWindowsPath(relpath).is_absolute() or PureWindowsPath(relpath).drive:
        raise UnsafePathError(f"{where}: absolute path {relpath!r} refused; paths must be relative to the data root")
    if ".." in PurePosixPath(relpath.replace("\\", "/")).parts:
        raise UnsafePathError(f"{where}: path {relpath!r} contains '..'; paths must stay inside the data root")
    resolved = (root / relpath).resolve()  # follows symlinks
    if not resolved.is_relative_to(root.resolve()):
        raise UnsafePathError(f"{where}: path {relpath!r} leads outside the data root (to {resolved}); "
                              f"symlinks must point inside {root}")
    if not resolved.is_file():
        raise FileNotFoundError(f"{where}: image file not found: {relpath!r} (looked for {root / relpath})")
    return resolved


def _caption_texts(value, where: str) -> list[str]:
    values = value if isinstance(value, list) else [value]
    texts = []
    for v in values:
        if not isinstance(v, str):
            raise CaptionsFileError(f"{where}: caption must be text, got {type(v).__name__}")
        if not v.strip():
            raise CaptionsFileError(f"{where}: empty caption")
        texts.append(" ".join(v.split()))  # newlines and runs of spaces become single spaces
    if not texts:
        raise CaptionsFileError(f"{where}: empty caption")
    return texts


def read_captions(root: str | Path, captions_file: str | Path | None = None) -> list[FileRecord]:
    """The images of a captions file, in the order their paths first appear, with all their captions.

    ``captions_file`` defaults to ``captions.csv`` / ``captions.jsonl`` in ``root``; a relative name is
    looked up inside ``root``. Raises CaptionsFileError / UnsafePathError / FileNotFoundError naming
    the file and line at fault."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    if captions_file is None:
        path = find_captions_file(root)
    else:
        path = Path(captions_file)
        if not path.is_absolute() and not path.exists():
            path = root / path
        if not path.is_file():
            raise FileNotFoundError(f"captions file not found: {captions_file}")
    text = _decode_utf8(path)
    if path.suffix.lower() == ".jsonl":
        rows = _jsonl_rows(path, text)
    elif path.suffix.lower() == ".csv":
        rows = _csv_rows(path, text)
    else:
        raise CaptionsFileError(f"{path}: unknown captions file type; use .csv (with a header) or .jsonl")
    records: dict[Path, FileRecord] = {}
    for line, row in rows:
        where = f"{path}:{line}"
        relpath = row.get("path")
        if not isinstance(relpath, str):
            raise CaptionsFileError(f"{where}: path must be text, got {type(relpath).__name__}")
        relpath = relpath.strip()
        resolved = resolve_inside(root, relpath, where)
        captions = _caption_texts(row.get("caption") if row.get("caption") is not None else "", where)
        raw_label = row.get("label")
        label = None if raw_label is None or str(raw_label).strip() == "" else str(raw_label).strip()
        record = records.get(resolved)
        if record is None:
            records[resolved] = FileRecord(resolved, relpath, line, where, captions, label)
            continue
        if label is not None and record.label is not None and label != record.label:
            raise CaptionsFileError(f"{where}: label {label!r} for {relpath!r} differs from label "
                                    f"{record.label!r} on line {record.line}")
        record.captions.extend(captions)
        record.label = record.label if record.label is not None else label
    if not records:
        raise CaptionsFileError(f"{path}: no rows; expected a header and at least one path,caption row")
    return list(records.values())


def encode_labels(raw: Sequence[str | None], class_names: Sequence[str] | None = None
                  ) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """Raw label texts -> (int64 labels, class names). Whole numbers are class indices (no names);
    anything else maps to its index among the sorted distinct names (or ``class_names`` if given).
    Missing labels are -1."""
    present = [r for r in raw if r is not None]
    if class_names is None and all(_INT_LABEL.match(r) for r in present):
        return np.array([-1 if r is None else int(r) for r in raw], np.int64), None
    names = tuple(class_names) if class_names is not None else tuple(sorted(set(present)))
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(present) - set(index))
    if unknown:
        raise ValueError(f"label(s) {', '.join(map(repr, unknown[:5]))} not among the class names")
    return np.array([-1 if r is None else index[r] for r in raw], np.int64), names


# ----------------------------------------------------------------------------- images

def as_rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparent pixels on white (the conversion ``vlpt.io.load_image`` applies)."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, image_size: int) -> np.ndarray:
    """The centre square of ``img``, resized (bicubic) to (image_size, image_size, 3) uint8.

    The geometry of ``vlpt.data.transforms.image_transform`` (short side to size, centre crop) in a
    single resize of the cropped square, which is cheaper and differs only in edge-pixel filtering."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    out = img.resize((image_size, image_size), Image.BICUBIC, box=(left, top, left + side, top + side),
                     reducing_gap=3.0)
    return np.array(out, np.uint8)  # (S, S, 3), writable (asarray of a PIL image is read-only)


def check_image_size(width: int, height: int, max_side: int = MAX_IMAGE_SIDE,
                     max_pixels: int = MAX_IMAGE_PIXELS) -> str | None:
    """Why an image of this declared size is refused, or None when it is acceptable."""
    if width > max_side or height > max_side:
        return f"declared size {width}x{height} exceeds {max_side} pixels per side"
    if width * height > max_pixels:
        return f"declared size {width}x{height} exceeds {max_pixels} pixels"
    return None


def open_checked(source, max_side: int = MAX_IMAGE_SIDE, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """``Image.open`` (header only) that refuses oversized images before any pixel is decoded.

    Raises ImageLoadError for an oversized image (PIL's own decompression-bomb check included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL warns first, raises at 2x
        try:
            img = Image.open(source)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageLoadError(f"image too large: {err}") from None
    problem = check_image_size(*img.size, max_side=max_side, max_pixels=max_pixels)
    if problem:
        img.close()
        raise ImageLoadError(f"image too large: {problem}")
    return img


def load_file_image(path: Path, image_size: int) -> np.ndarray:
    """One image file as (image_size, image_size, 3) uint8, size-checked before decoding."""
    try:
        open_checked(path).close()  # header only; load_image then decodes
    except ImageLoadError as err:
        raise ImageLoadError(f"cannot read image {path}: {err}") from None
    except OSError:
        pass  # not an image, or unreadable: load_image reports it, naming the file
    return resize_center_crop(load_image(path), image_size)


# ----------------------------------------------------------------------------- data set

class FilesDataset:
    """A user's image folder with a captions file, loaded into memory.

    Attributes (like ``ShapesDataset``): ``images`` (N, H, W, 3) uint8 (centre square, resized),
    ``captions`` N lists of strings, ``labels`` (N,) int64 (-1: no label), ``class_names`` (the
    sorted label names when labels are text, else None), ``paths`` (N,) resolved image files.
    Everything is held in memory; for more images than that allows, write shards (vlpt.data.shards).
    """

    def __init__(self, root: str | Path, captions_file: str | Path | None = None, image_size: int = 64,
                 class_names: Sequence[str] | None = None):
        if not 8 <= image_size <= 1024:
            raise ValueError(f"image_size must be in 8..1024, got {image_size}")
        self.root = Path(root)
        self.records = read_captions(self.root, captions_file)
        self.paths = [r.path for r in self.records]
        self.captions = [r.captions for r in self.records]
        try:
            self.labels, self.class_names = encode_labels([r.label for r in self.records], class_names)
        except ValueError as err:
            raise CaptionsFileError(f"{self.root}: {err}") from None
        images = np.empty((len(self.records), image_size, image_size, 3), np.uint8)
        for i, record in enumerate(self.records):
            try:
                images[i] = load_file_image(record.path, image_size)
            except ImageLoadError as err:
                raise ImageLoadError(f"{record.where} ({record.relpath!r}): {err}") from None
        self.images = images  # (N, S, S, 3)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[np.ndarray, list[str], int]:
        return self.images[i], self.captions[i], int(self.labels[i])
