"""What ``vlpt index`` reads: an image folder (with or without a captions file), webdataset shards, or a
captions-only text file, split into parts of work; and image decoding shared by the indexer and the server.

Every reader is vlpt's own: captions files through ``vlpt.data.files`` (paths refused outside the root),
shards through ``vlpt.data.shards`` (unsafe members and oversized images refused before decoding), image
files through ``vlpt.io.load_image`` (decompression bombs refused). Unlike training, which stops on a bad
file, indexing skips it: each item that cannot be read becomes a ``Failure`` (where, reason) that the
manifest lists.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlpt.data import files as data_files
from vlpt.data.files import (
    CaptionsFileError,
    as_rgb,
    check_image_size,
    open_checked,
    resize_center_crop,
    resolve_inside,
)
from vlpt.data.shards import (
    IMAGE_EXTENSIONS,
    DecodeLimits,
    SampleError,
    decode_captions,
    decode_label,
    iter_raw_samples,
    resolve_shards,
    shard_class_names,
    shard_sizes,
)
from vlpt.data.transforms import tower_transform
from vlpt.io import ImageLoadError, load_image

SOURCE_KINDS = ("folder", "shards", "text")
TEXT_SUFFIXES = (".txt",)
_IMAGE_SUFFIXES = tuple(f".{e}" for e in IMAGE_EXTENSIONS)


@dataclass
class Failure:
    where: str  # the file (relative to the source root), "shard.tar:KEY", or "captions.csv:12"
    reason: str

    def as_dict(self) -> dict:
        return {"where": self.where, "reason": self.reason}


@dataclass
class FolderItem:
    """One image of a folder source, in source order."""
    ref: str  # path relative to the root, as the captions file wrote it (or as found)
    path: Path  # resolved, inside the root
    row: int  # line of the captions file naming it first; -1 without one
    captions: list[str] = field(default_factory=list)
    label: str | None = None


@dataclass
class Source:
    """A collection to index, split into parts. ``parts[i]``: FolderItems (folder), one shard path (shards),
    or (line, text) pairs (text). ``root``: the folder whose files may be served (resolved)."""
    kind: str
    location: str  # as given on the command line
    root: Path
    parts: list
    part_size: int
    failures: list[Failure] = field(default_factory=list)  # found while listing (bad captions-file rows)
    captions_file: str | None = None
    class_names: tuple[str, ...] | None = None
    sizes: list[int] = field(default_factory=list)  # images (folder, shards) or texts per part
    fingerprints: dict[int, str] = field(default_factory=dict, repr=False)  # part_fingerprint's, once per part

    @property
    def key(self) -> str:
        """A short name of the source for file names: kind + hash of its resolved location."""
        digest = hashlib.sha256(f"{self.kind}:{self.root}:{self.location_resolved}".encode()).hexdigest()[:12]
        return f"{self.kind}-{digest}"

    @property
    def location_resolved(self) -> str:
        path = Path(self.location)
        return str(path.resolve()) if path.exists() else self.location

    def part_fingerprint(self, i: int) -> str:
        """What part ``i`` was computed from: its files' names, sizes and modification times, as when first
        asked (the build asks before embedding the part and again for the manifest: one stat per file)."""
        if i not in self.fingerprints:
            self.fingerprints[i] = self._fingerprint(i)
        return self.fingerprints[i]

    def _fingerprint(self, i: int) -> str:
        h = hashlib.sha256(f"{self.kind}:{self.location_resolved}:{i}:{self.part_size}".encode())
        part = self.parts[i]
        if self.kind == "folder":
            for item in part:
                st = item.path.stat()
                h.update(json.dumps([item.ref, item.row, item.captions, item.label, st.st_size, st.st_mtime_ns]).encode())
        elif self.kind == "shards":
            st = Path(part).stat()
            h.update(json.dumps([Path(part).name, st.st_size, st.st_mtime_ns]).encode())
        else:
            h.update(json.dumps(part).encode())
        return h.hexdigest()

    def describe(self) -> dict:
        return {"kind": self.kind, "location": self.location, "root": str(self.root),
                "captions_file": self.captions_file, "class_names": list(self.class_names or []) or None}


# ----------------------------------------------------------------------------- listing sources

def open_source(location: str | Path, part_size: int = 1024) -> Source:
    """The source at ``location``: a ``.txt`` file (one caption per line: a text-only collection); a ``.tar``
    shard, a shard pattern (``{000..009}``, ``*``) or a folder of ``*.tar`` shards; or an image folder, with a
    captions.csv / captions.jsonl (paths, captions, labels) or without (every image file below it)."""
    if part_size < 1:
        raise ValueError(f"part size must be >= 1, got {part_size}")
    text = str(location)
    path = Path(text)
    if path.is_file() and path.suffix.lower() in TEXT_SUFFIXES:
        return _text_source(text, path, part_size)
    if path.is_file() and path.suffix.lower() == ".tar" or "{" in text or any(c in text for c in "*?["):
        return _shard_source(text, part_size)
    if path.is_dir():
        has_captions = any((path / name).is_file() for name in data_files.CAPTION_FILES)
        if not has_captions and any(path.glob("*.tar")):
            return _shard_source(text, part_size)
        return _folder_source(text, path, part_size)
    if path.exists():
        raise ValueError(f"{location}: not a source vlpt index reads; give an image folder, a .txt file of "
                         f"captions (one per line), or webdataset shards (.tar files, a folder of them, a pattern)")
    raise FileNotFoundError(f"source not found: {location}")


def chunks(items: Sequence, size: int) -> list:
    """``items`` in slices of ``size`` (the last may be shorter)."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def _text_source(location: str, path: Path, part_size: int) -> Source:
    content = data_files._decode_utf8(path)  # a BOM allowed; CaptionsFileError naming the line otherwise
    lines = [(n, " ".join(t.split())) for n, t in enumerate(content.splitlines(), start=1) if t.strip()]
    if not lines:
        raise CaptionsFileError(f"{path}: no captions (expected one caption per line)")
    parts = chunks(lines, part_size)
    return Source("text", location, path.resolve().parent, parts, part_size, sizes=[len(p) for p in parts])


def _shard_source(location: str, part_size: int) -> Source:
    paths = resolve_shards(location)
    roots = {p.resolve().parent for p in paths}
    if len(roots) > 1:
        raise ValueError(f"{location}: shards in {len(roots)} folders; index one folder of shards at a time "
                         f"(each becomes a root its images are served from)")
    return Source("shards", location, roots.pop(), [p.resolve() for p in paths], part_size,
                  class_names=shard_class_names(paths), sizes=shard_sizes(paths))


def _folder_source(location: str, root: Path, part_size: int) -> Source:
    resolved_root = root.resolve()
    captions = [root / name for name in data_files.CAPTION_FILES if (root / name).is_file()]
    if len(captions) > 1:
        raise CaptionsFileError(f"both {captions[0].name} and {captions[1].name} in {root}; keep one")
    if captions:
        items, failures = _captioned_items(root, captions[0])
        captions_file = captions[0].name
    else:
        items, failures = _found_items(root), []
        captions_file = None
    if not items and not failures:
        raise ValueError(f"{root}: no images (files ending {', '.join(_IMAGE_SUFFIXES)}) and no captions file")
    parts = chunks(items, part_size)
    return Source("folder", location, resolved_root, parts, part_size, failures, captions_file,
                  sizes=[len(p) for p in parts])


def _captioned_items(root: Path, path: Path) -> tuple[list[FolderItem], list[Failure]]:
    """The rows of a captions file, grouped by image as ``vlpt.data.files.read_captions`` does; a row whose
    image is missing or outside the root is a failure, not an error (a malformed file still is one)."""
    text = data_files._decode_utf8(path)
    rows = data_files._jsonl_rows(path, text) if path.suffix.lower() == ".jsonl" else data_files._csv_rows(path, text)
    items: dict[Path, FolderItem] = {}
    failures: list[Failure] = []
    for line, row in rows:
        where = f"{path.name}:{line}"
        relpath = row.get("path")
        if not isinstance(relpath, str):
            failures.append(Failure(where, f"path must be text, got {type(relpath).__name__}"))
            continue
        relpath = relpath.strip()
        try:
            resolved = resolve_inside(root, relpath, where)
            captions = data_files._caption_texts(row.get("caption") if row.get("caption") is not None else "", where)
        except (CaptionsFileError, FileNotFoundError) as err:
            failures.append(Failure(relpath or where, str(err)))
            continue
        raw_label = row.get("label")
        label = None if raw_label is None or str(raw_label).strip() == "" else str(raw_label).strip()
        item = items.get(resolved)
        if item is None:
            items[resolved] = FolderItem(relpath, resolved, line, captions, label)
        else:
            item.captions.extend(captions)
            item.label = item.label if item.label is not None else label
    return list(items.values()), failures


def _found_items(root: Path) -> list[FolderItem]:
    """Every image file below ``root`` (a folder's files sorted by name, then its sub-folders in name order;
    hidden folders and files skipped; symlinked folders not entered; symlinked files that lead outside the root
    skipped). One directory read per folder: its entries say file / folder / symlink without a stat per file."""
    found = []
    resolved_root = root.resolve()
    cut = len(os.path.join(resolved_root, ""))  # entry paths start with the root and a separator ("/" has one)
    pending = [str(resolved_root)]  # a stack, not recursion: any depth of folders
    while pending:
        with os.scandir(pending.pop()) as listing:
            entries = sorted((e for e in listing if not e.name.startswith(".")), key=lambda e: e.name)
        for entry in entries:
            if not entry.name.lower().endswith(_IMAGE_SUFFIXES):
                continue
            full = Path(entry.path)
            if entry.is_symlink():  # only a link can lead outside the root
                target = full.resolve()
                if not (target.is_relative_to(resolved_root) and target.is_file()):
                    continue
            elif entry.is_file(follow_symlinks=False):
                target = full
            else:
                continue
            # the path relative to the root by string ops: pathlib's relative_to took 0.1 s per 8,192 files
            found.append(FolderItem(entry.path[cut:].replace(os.sep, "/"), target, -1))
        pending.extend(e.path for e in reversed(entries) if e.is_dir(follow_symlinks=False))  # first name on top
    return found


# ----------------------------------------------------------------------------- images

@dataclass(frozen=True)
class Preprocessing:
    """How images reach the model: the fast path hands it uint8 (S, S, 3) (short side resized, centre crop;
    the model normalises), which is the tower's own preprocessing when it resizes the short side to its
    input size with bicubic interpolation; any other tower preprocessing runs ``tower_transform`` (float)."""
    image_size: int
    uint8: bool
    transform: object = None  # tower_transform(config.image) when not uint8

    @classmethod
    def of(cls, model) -> Preprocessing:
        image = model.config.image
        fast = (image.resize_mode == "shortest" and image.resize_size in (None, image.image_size)
                and image.interpolation == "bicubic")
        return cls(image.image_size, fast, None if fast else tower_transform(image))

    def from_pil(self, img: Image.Image) -> torch.Tensor:
        """(S, S, 3) uint8 or (3, S, S) float, ready to stack into a batch."""
        if img.mode != "RGB":  # as_rgb copies even an RGB image; request images and load_image's are RGB already
            img = as_rgb(img)
        if self.uint8:
            if img.size == (self.image_size, self.image_size):
                return torch.from_numpy(np.array(img, np.uint8))
            return torch.from_numpy(resize_center_crop(img, self.image_size))
        return self.transform(img)


def decode_bytes(data: bytes, prep: Preprocessing, limits: DecodeLimits = DecodeLimits()) -> torch.Tensor:
    """Image bytes -> a model-ready tensor; the header is size-checked before any pixel is decoded.
    Raises ImageLoadError (too large, not an image, truncated)."""
    if not data:
        raise ImageLoadError("empty image (zero bytes)")
    try:
        img = open_checked(io.BytesIO(data), limits.max_side, limits.max_pixels)
    except ImageLoadError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bytes it cannot identify
        raise ImageLoadError(f"not an image of a format PIL knows ({type(err).__name__})") from None
    try:
        with img:
            if prep.uint8:
                img.draft("RGB", (prep.image_size, prep.image_size))  # JPEG: decode at a reduced scale
            img.load()
            return prep.from_pil(img)
    except Exception as err:  # noqa: BLE001 - truncated data surfaces as OSError, SyntaxError, ValueError, ...
        raise ImageLoadError(f"truncated or corrupt image data ({type(err).__name__}: {err})") from None


READ_WHOLE_MAX = 64 * 2 ** 20  # files up to this size are read in one call and decoded from memory


def _read_small_file(path: Path) -> bytes | None:
    """The bytes of a file up to READ_WHOLE_MAX, None for a larger one. One open, fstat and read at the OS
    level: pathlib's stat + read_bytes took twice as long, under Python's lock, in the decoding threads."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ImageLoadError(f"image file not found: {path}") from None
    try:
        size = os.fstat(fd).st_size
        if size > READ_WHOLE_MAX:
            return None
        data = os.read(fd, size + 1)  # a regular file: all of it in one call
        if len(data) != size:  # it changed since, or the read came short: read on to the end
            data += b"".join(iter(lambda: os.read(fd, 2 ** 20), b""))
        return data
    except IsADirectoryError:
        raise ImageLoadError(f"cannot read image {path}: it is a folder, not an image file") from None
    finally:
        os.close(fd)


def decode_file(path: Path, prep: Preprocessing) -> torch.Tensor:
    """An image file -> a model-ready tensor, size-checked from its header before any pixel is decoded. The
    file is read once and decoded from memory (``decode_bytes``: a quarter faster than opening it twice);
    a very large file is opened in place. Raises ImageLoadError (or OSError) naming the problem."""
    data = _read_small_file(path)
    if data is not None:
        return decode_bytes(data, prep)
    try:
        with Image.open(path) as header:
            problem = check_image_size(*header.size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageLoadError(f"image too large: {err}") from None
    except Exception:  # noqa: BLE001 - not an image, unreadable: load_image reports it, naming the file
        problem = None
    if problem:
        raise ImageLoadError(f"image too large: {problem}")
    return prep.from_pil(load_image(path))


@dataclass
class ShardItem:
    """A decoded sample of a shard (or the reason it could not be)."""
    key: str
    row: int  # position of the sample in its shard
    member: str | None  # the image member's name, for serving it
    image: torch.Tensor | None
    captions: list[str]
    label: int
    failure: str | None = None


def shard_items(path: Path, prep: Preprocessing, limits: DecodeLimits = DecodeLimits()) -> Iterator[ShardItem]:
    """A shard's samples, in order; a sample that cannot be used carries its failure (kind: detail)."""
    for row, raw in enumerate(iter_raw_samples(path, limits)):
        try:
            if raw.problem is not None:
                raise SampleError(*raw.problem)
            try:
                captions = decode_captions(raw.members)
            except SampleError as err:  # an image without captions is still indexed (image search)
                if err.kind != "missing_caption":
                    raise
                captions = []
            label = decode_label(raw.members)
            ext = next((e for e in IMAGE_EXTENSIONS if e in raw.members), None)
            if ext is None:
                raise SampleError("missing_image", f"no image member among {sorted(raw.members) or 'none'}")
            try:
                image = decode_bytes(raw.members[ext], prep, limits)
            except ImageLoadError as err:
                kind = "too_large" if "too large" in str(err) else "not_an_image"
                raise SampleError(kind, str(err)) from None
        except SampleError as err:
            yield ShardItem(raw.key, row, None, None, [], -1, f"{err.kind}: {err.detail}")
            continue
        yield ShardItem(raw.key, row, f"{raw.key}.{ext}", image, captions, label)
