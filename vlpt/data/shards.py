"""Webdataset tar shards: a writer, and a streaming reader that trains from them at scale.

A shard is a plain tar file (``shard-000000.tar``, ...) in the webdataset layout: the members of a
sample share a key and differ by extension, e.g. ``00000042.png``, ``00000042.txt`` (its captions,
one per line) and ``00000042.cls`` (its class index, when labeled). ``write_shards`` writes them with
webdataset's ``TarWriter`` plus an ``index.json`` (samples per shard, class names).

``ShardReader`` streams batches from shards, one epoch at a time:

- **Per-rank / per-worker split.** Shards are dealt once, balancing sample counts, into
  ``world_size`` groups, and each group's shards into ``num_workers`` parts: every shard is read by
  exactly one DataLoader worker of one rank per epoch, so no sample is read twice. Rank ``r`` reads
  group ``(r + epoch) % world_size``, so ranks see different shards in different epochs.
- **Equal steps on every rank.** An epoch has ``steps_per_epoch`` batches on every rank (DDP would
  hang otherwise): ``steps_per_epoch = floor(samples in the smallest group / batch_size)``, and
  every group delivers exactly ``steps_per_epoch * batch_size`` samples, the rest being dropped
  (taken from its fullest workers). Workers send chunks of samples and the main process cuts
  batches across them, so a worker's remainder is not lost. With shards of equal size the drop is
  under one shard per rank; dropped samples differ from epoch to epoch (order is reshuffled). If
  corrupt samples leave a worker short, it tops up from a second pass over its own shards (counted
  as ``reread``), so the step count never changes.
- **Shuffling.** Shard order is reshuffled every epoch, and decoded samples pass through a shuffle
  buffer of ``shuffle_buffer`` samples per worker; one caption per image is picked at random. All
  randomness comes from ``(seed, epoch, group, worker)``: an epoch is the same stream every time.
- **Resampling.** With ``resample=True`` every worker draws shards with replacement (webdataset's
  ``ResampledShards`` idea) and an epoch is ``total_samples // (world_size * batch_size)`` batches.
- **Corrupt samples** are skipped and counted by kind (``FAILURE_KINDS``); the counts are logged at
  the end of every epoch and kept in ``ShardReader.failures``. More than
  ``max_consecutive_failures`` failures in a row raise ``ShardReadError`` naming the shard and key.
  Images whose header declares more than ``DecodeLimits`` allows are refused before decoding.
- **Unsafe tar members** (``..`` in the name, absolute names, links, devices) are never read: the
  sample they belong to is skipped and counted as ``unsafe_member``. Nothing is ever extracted to
  disk, so such a name cannot do harm here, but it marks a shard that was not written by a writer
  you should trust; one bad member therefore costs its sample, not the run.

Members are read with ``tarfile`` directly (webdataset's layout, grouping and ``base_plus_ext`` key
rule) rather than through ``webdataset.WebDataset``: the reader checks every member's name, type and
size before reading its data and counts failures per kind, which webdataset's handler-based pipeline
does not expose. Shards written here read fine with ``webdataset.WebDataset`` too.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext
from webdataset.writer import TarWriter

from vlpt.data.files import (
    MAX_IMAGE_PIXELS,
    MAX_IMAGE_SIDE,
    as_rgb,
    encode_labels,
    open_checked,
    read_captions,
    resize_center_crop,
)
from vlpt.io import ImageLoadError, atomic_write_text, load_image

if TYPE_CHECKING:
    from vlpt.tokenization import Tokenizer

log = logging.getLogger(__name__)

SHARD_NAME = "shard-%06d.tar"
INDEX_FILE = "index.json"
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
_SUFFIX_TO_EXT = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp", ".bmp": "bmp", ".gif": "gif",
                  ".tif": "tiff", ".tiff": "tiff"}
FAILURE_KINDS = (
    "unsafe_member",    # a member named with '..' or an absolute path, or a link / device member
    "too_large",        # an image declaring more pixels than DecodeLimits, or a member over max_member_bytes
    "empty_image",      # a zero-byte image member
    "not_an_image",     # image bytes PIL cannot identify
    "truncated_image",  # a valid header, but truncated or corrupt pixel data
    "missing_image",    # no image member in the sample
    "missing_caption",  # no txt/json member, or only empty captions
    "bad_caption",      # captions that are not UTF-8 (or not valid JSON)
    "bad_label",        # a cls member that is not a whole number >= 0
    "bad_tar",          # the tar itself is damaged (e.g. cut short); the rest of that shard is lost
)
# Per-worker bookkeeping sent to the main process with the last item, not counted as failures.
_STATS = "__stats__"
_SHUFFLE_START = 100  # samples in the shuffle buffer before it starts giving any out


class ShardReadError(ValueError):
    """Shards that cannot be read: too many failures in a row, or no readable sample at all."""


class SampleError(Exception):
    """One sample that cannot be used; ``kind`` is one of FAILURE_KINDS."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


@dataclass(frozen=True)
class DecodeLimits:
    max_side: int = MAX_IMAGE_SIDE  # refuse images declaring more pixels than this per side ...
    max_pixels: int = MAX_IMAGE_PIXELS  # ... or more than this in all, before decoding them
    max_member_bytes: int = 64 * 2 ** 20  # refuse tar members larger than this without reading them


# ----------------------------------------------------------------------------- writing

@dataclass
class _Item:
    image: bytes
    ext: str  # png, jpg, ...
    captions: list[str]
    label: int  # -1: unlabeled


def _encode_array(image: np.ndarray, image_format: str) -> bytes:
    buf = io.BytesIO()
    if image_format == "png":
        Image.fromarray(image).save(buf, format="PNG")
    else:
        Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _folder_items(root: Path, captions_file: str | Path | None) -> tuple[list, tuple[str, ...] | None]:
    """Lazy items of an image folder: the original file bytes are copied, never re-encoded (unless
    the format is not one the reader knows, which is converted to PNG)."""
    records = read_captions(root, captions_file)
    labels, class_names = encode_labels([r.label for r in records])

    def item(i: int) -> _Item:
        record = records[i]
        ext = _SUFFIX_TO_EXT.get(record.path.suffix.lower())
        if ext is None:
            data, ext = _encode_array(np.asarray(load_image(record.path)), "png"), "png"
        else:
            data = record.path.read_bytes()
        return _Item(data, ext, record.captions, int(labels[i]))
    return [lambda i=i: item(i) for i in range(len(records))], class_names


def _dataset_items(dataset, image_format: str) -> list:
    """Lazy items of an in-memory data set (ShapesDataset, DigitsDataset, FilesDataset): images are
    encoded as PNG (lossless) or JPEG."""
    if len(dataset.images) != len(dataset.captions):
        raise ValueError(f"{len(dataset.images)} images but {len(dataset.captions)} caption lists")
    labels = getattr(dataset, "labels", None)
    ext = "png" if image_format == "png" else "jpg"

    def item(i: int) -> _Item:
        label = -1 if labels is None else int(labels[i])
        return _Item(_encode_array(np.asarray(dataset.images[i]), image_format), ext, list(dataset.captions[i]), label)
    return [lambda i=i: item(i) for i in range(len(dataset.images))]


def write_shards(source, out_dir: str | Path, shard_size: int = 1000, *, captions_file: str | Path | None = None,
                 image_format: str = "png", class_names: Sequence[str] | None = None,
                 overwrite: bool = False) -> list[Path]:
    """Write ``source`` as webdataset shards ``out_dir/shard-%06d.tar`` of ``shard_size`` samples.

    ``source``: an image folder with a captions file (``vlpt.data.files``; original file bytes are
    copied), or an in-memory data set with ``images``, ``captions`` and optional ``labels``
    (``ShapesDataset``, ``DigitsDataset``, ``FilesDataset``; encoded as ``image_format`` png | jpg).
    Each sample is ``KEY.<png|jpg|...>``, ``KEY.txt`` (captions, one per line) and, when labeled,
    ``KEY.cls``; keys are the sample's index (``00000042``). Every shard is written under a temp name
    and renamed into place, then ``index.json`` records the shards, their sample counts and the class
    names. Existing shards in ``out_dir`` are an error unless ``overwrite`` (then stale ones are
    removed). Returns the shard paths."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be png or jpg, got {image_format!r}")
    if isinstance(source, (str, Path)):
        items, names = _folder_items(Path(source), captions_file)
        class_names = class_names if class_names is not None else names
        described = str(source)
    else:
        items = _dataset_items(source, image_format)
        class_names = class_names if class_names is not None else getattr(source, "class_names", None)
        described = type(source).__name__
    if not items:
        raise ValueError(f"{described}: nothing to write (no samples)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    old = sorted(out_dir.glob("shard-*.tar"))
    if old and not overwrite:
        raise FileExistsError(f"{out_dir} already holds {len(old)} shard(s) ({old[0].name}, ...); "
                              f"pass overwrite (--overwrite) or choose another folder")
    paths, entries = [], []
    for s, start in enumerate(range(0, len(items), shard_size)):
        path = out_dir / (SHARD_NAME % s)
        tmp = out_dir / f".{path.name}.tmp{os.getpid()}"
        count = 0
        try:
            with open(tmp, "wb") as f, TarWriter(f, encoder=False, mtime=0) as writer:  # mtime 0: same bytes every time
                for i in range(start, min(start + shard_size, len(items))):
                    item = items[i]()
                    sample = {"__key__": f"{i:08d}", item.ext: item.image,
                              "txt": "\n".join(item.captions).encode("utf-8")}
                    if item.label >= 0:
                        sample["cls"] = str(item.label).encode()
                    writer.write(sample)
                    count += 1
            os.replace(tmp, path)  # atomic: a reader never sees half a shard
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        paths.append(path)
        entries.append({"name": path.name, "samples": count, "bytes": path.stat().st_size})
    for stale in set(old) - set(paths):
        stale.unlink()
    index = {"format": "webdataset", "writer": "vlpt", "samples": len(items), "shards": entries,
             "class_names": list(class_names) if class_names is not None else None, "source": described}
    atomic_write_text(out_dir / INDEX_FILE, json.dumps(index, indent=1) + "\n")
    return paths


# ----------------------------------------------------------------------------- finding shards

def read_index(directory: Path) -> dict | None:
    """The ``index.json`` that ``write_shards`` leaves beside its shards, or None."""
    path = Path(directory) / INDEX_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable shard index %s: %s", path, err)
        return None


def resolve_shards(shards: str | Path | Sequence[str | Path]) -> list[Path]:
    """Shard files from a folder (its ``index.json``, else every ``*.tar`` in it), a brace pattern
    (``data/shard-{000000..000099}.tar``), a glob (``data/*.tar``), a file, or a list of these."""
    if isinstance(shards, (list, tuple)):
        return [p for s in shards for p in resolve_shards(s)]
    spec = str(shards)
    path = Path(spec)
    if path.is_dir():
        index = read_index(path)
        if index is not None:
            found = [path / e["name"] for e in index["shards"]]
        else:
            found = sorted(path.glob("*.tar"))
        if not found:
            raise FileNotFoundError(f"no shards (*.tar) in {path}")
    elif "{" in spec:
        found = [Path(p) for p in expand_urls(spec)]
    elif any(c in spec for c in "*?["):
        found = sorted(Path(p) for p in glob(spec))
        if not found:
            raise FileNotFoundError(f"no shard matches {spec}")
    else:
        found = [path]
    for p in found:
        if not p.is_file():
            raise FileNotFoundError(f"shard not found: {p}")
    return found


def count_samples(path: Path) -> int:
    """Samples in a shard, from its tar headers alone (member data is skipped, not read)."""
    keys, last = 0, None
    with tarfile.open(path, "r:*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key = base_plus_ext(info.name)[0]
            if key is not None and key != last:
                keys, last = keys + 1, key
    return keys


def shard_sizes(paths: Sequence[Path]) -> list[int]:
    """Samples per shard: from ``index.json`` where it lists the shard with its current byte size,
    else counted from the tar headers."""
    known: dict[Path, int] = {}
    for directory in {p.parent for p in paths}:
        index = read_index(directory) or {}
        for entry in index.get("shards", []):
            p = directory / entry["name"]
            if p.is_file() and p.stat().st_size == entry.get("bytes"):
                known[p] = int(entry["samples"])
    sizes = []
    for p in paths:
        if p not in known:
            try:
                known[p] = count_samples(p)
            except (tarfile.TarError, OSError) as err:
                log.warning("cannot count the samples of %s (%s); treating it as empty", p, err)
                known[p] = 0
        sizes.append(known[p])
    return sizes


def shard_class_names(paths: Sequence[Path]) -> tuple[str, ...] | None:
    """The class names recorded in the shards' ``index.json``, if any."""
    for directory in dict.fromkeys(p.parent for p in paths):
        names = (read_index(directory) or {}).get("class_names")
        if names:
            return tuple(names)
    return None


# ----------------------------------------------------------------------------- reading samples

@dataclass
class RawSample:
    key: str
    shard: Path
    members: dict[str, bytes] = field(default_factory=dict)  # extension -> bytes
    problem: tuple[str, str] | None = None  # (kind, detail) found while reading the tar


@dataclass
class Sample:
    key: str
    image: np.ndarray  # (S, S, 3) uint8
    captions: list[str]
    label: int  # -1: unlabeled


def member_problem(info: tarfile.TarInfo, limits: DecodeLimits) -> tuple[str, str] | None:
    """Why a tar member must not be read, or None."""
    name = info.name
    if not info.isfile():
        return "unsafe_member", f"member {name!r} is a link or device, not a regular file"
    posix = name.replace("\\", "/")
    if posix.startswith("/") or name[1:2] == ":":  # /etc/x, \\server\\x, C:x (cheap: runs per member)
        return "unsafe_member", f"absolute member name {name!r}"
    if ".." in posix.split("/"):
        return "unsafe_member", f"member name {name!r} contains '..'"
    if info.size > limits.max_member_bytes:
        return "too_large", f"member {name!r} is {info.size} bytes (limit {limits.max_member_bytes})"
    return None


def iter_raw_samples(path: Path, limits: DecodeLimits = DecodeLimits()) -> Iterator[RawSample]:
    """A shard's samples, members grouped by key as webdataset does (consecutive members whose names
    agree up to the first dot of the file name). Unsafe or oversized members are not read; their
    sample carries the problem. A damaged tar ends with one sample whose problem is ``bad_tar``."""
    current: RawSample | None = None
    with open(path, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r|*") as stream:
                for info in stream:
                    if info.isdir():
                        continue
                    problem = member_problem(info, limits)
                    key, ext = base_plus_ext(info.name)
                    if key is None:
                        if problem is None:
                            log.debug("%s: ignoring member %r (no extension)", path, info.name)
                            continue
                        key, ext = info.name, ""
                    if current is None or key != current.key:
                        if current is not None:
                            yield current
                        current = RawSample(key, path)
                    if problem is not None:
                        current.problem = current.problem or problem
                    elif current.problem is None:
                        current.members[ext.lower()] = stream.extractfile(info).read()
                    stream.members = []  # a stream never needs old headers; don't let them pile up
        except (tarfile.TarError, OSError, EOFError) as err:
            yield RawSample(current.key if current is not None else "<none>", path,
                            problem=("bad_tar", f"damaged tar ({err}); the rest of the shard is skipped"))
            return
    if current is not None:
        yield current


def decode_captions(members: dict[str, bytes]) -> list[str]:
    """Captions from ``txt`` (one per line) or ``json`` (a string, a list of strings, or an object with
    ``captions`` / ``caption``); raises SampleError."""
    if "txt" in members:
        raw, kind = members["txt"], "txt"
    elif "json" in members:
        raw, kind = members["json"], "json"
    else:
        raise SampleError("missing_caption", "no txt or json member")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SampleError("bad_caption", f"caption is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    if kind == "txt":
        values = text.splitlines()
    else:
        try:
            value = json.loads(text)
        except ValueError as err:
            raise SampleError("bad_caption", f"json member is not valid JSON ({err})") from None
        if isinstance(value, dict):
            value = value.get("captions", value.get("caption"))
        values = value if isinstance(value, list) else [value]
    captions = [" ".join(v.split()) for v in values if isinstance(v, str) and v.strip()]
    if not captions:
        raise SampleError("missing_caption", "empty caption")
    return captions


def decode_label(members: dict[str, bytes]) -> int:
    if "cls" not in members:
        return -1
    try:
        label = int(members["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise SampleError("bad_label", f"cls member {members['cls'][:20]!r} is not a whole number") from None
    if label < 0:
        raise SampleError("bad_label", f"negative class {label}")
    return label


def decode_image(data: bytes, image_size: int, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Image bytes -> (image_size, image_size, 3) uint8 (centre square, resized); the header is
    size-checked before any pixel is decoded. Raises SampleError."""
    if not data:
        raise SampleError("empty_image", "zero-byte image")
    try:
        img = open_checked(io.BytesIO(data), limits.max_side, limits.max_pixels)
    except ImageLoadError as err:
        raise SampleError("too_large", str(err)) from None
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bytes it cannot identify
        raise SampleError("not_an_image", f"not an image ({type(err).__name__}: {err})") from None
    try:
        with img:
            img.draft("RGB", (image_size, image_size))  # JPEG: decode at a reduced scale when it can
            img.load()
            return resize_center_crop(as_rgb(img), image_size)
    except Exception as err:  # noqa: BLE001 - truncated data surfaces as OSError, SyntaxError, ValueError, ...
        raise SampleError("truncated_image", f"truncated or corrupt image data ({type(err).__name__}: {err})") from None


def decode_sample(raw: RawSample, image_size: int, limits: DecodeLimits = DecodeLimits()) -> Sample:
    """A raw sample as (image, captions, label); raises SampleError naming the kind of failure."""
    if raw.problem is not None:
        raise SampleError(*raw.problem)
    captions = decode_captions(raw.members)
    label = decode_label(raw.members)
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw.members), None)
    if ext is None:
        raise SampleError("missing_image", f"no image member among {sorted(raw.members) or 'none'}")
    return Sample(raw.key, decode_image(raw.members[ext], image_size, limits), captions, label)


class _FailureTracker:
    """Counts failures by kind; raises once more than ``limit`` samples in a row have failed."""

    def __init__(self, limit: int):
        self.limit = limit
        self.counts: Counter[str] = Counter()
        self.in_a_row = 0
        self.good = 0
        self.counting = True  # off while rereading: a sample is counted once per epoch

    def ok(self) -> None:
        self.in_a_row = 0
        self.good += 1

    def fail(self, raw: RawSample, err: SampleError) -> None:
        if self.counting:
            self.counts[err.kind] += 1
        self.in_a_row += 1
        log.debug("skipping sample %r of %s: %s", raw.key, raw.shard, err)
        if self.in_a_row > self.limit:
            raise ShardReadError(
                f"{self.in_a_row} samples in a row could not be read (max_consecutive_failures={self.limit}); "
                f"the last was key {raw.key!r} in shard {raw.shard}: {err}. "
                f"Skipped so far: {format_counts(self.counts)}. Are these webdataset shards with images and "
                f"txt/json captions?")


def format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if v) or "none"


def decoded_samples(path: Path, image_size: int, tracker: _FailureTracker,
                    limits: DecodeLimits = DecodeLimits()) -> Iterator[Sample]:
    """A shard's good samples, in shard order; failures go to ``tracker``."""
    for raw in iter_raw_samples(path, limits):
        try:
            sample = decode_sample(raw, image_size, limits)
        except SampleError as err:
            tracker.fail(raw, err)
            continue
        tracker.ok()
        yield sample


@dataclass
class ShardSamples:
    """Samples read into memory (for evaluation), like FilesDataset: ``images`` (N, S, S, 3) uint8,
    ``captions``, ``labels`` (N,) int64 (-1: unlabeled), ``class_names``, ``keys``, ``failures``."""
    images: np.ndarray
    captions: list[list[str]]
    labels: np.ndarray
    class_names: tuple[str, ...] | None
    keys: list[str]
    failures: dict[str, int]

    def __len__(self) -> int:
        return len(self.images)


def read_samples(shards: str | Path | Sequence[str | Path], limit: int, image_size: int = 64,
                 max_consecutive_failures: int = 50, limits: DecodeLimits = DecodeLimits()) -> ShardSamples:
    """The first ``limit`` good samples of the shards, in order, decoded in this process."""
    paths = resolve_shards(shards)
    tracker = _FailureTracker(max_consecutive_failures)
    samples = list(itertools.islice(
        (s for p in paths for s in decoded_samples(p, image_size, tracker, limits)), limit))
    if not samples:
        raise ShardReadError(f"no readable sample in {len(paths)} shard(s) ({paths[0]}, ...); "
                             f"skipped: {format_counts(tracker.counts)}")
    if tracker.counts:
        log.warning("read %d samples from shards, skipped %s", len(samples), format_counts(tracker.counts))
    return ShardSamples(
        images=np.stack([s.image for s in samples]), captions=[s.captions for s in samples],
        labels=np.array([s.label for s in samples], np.int64), class_names=shard_class_names(paths),
        keys=[s.key for s in samples], failures=dict(tracker.counts))


def shard_captions(shards: str | Path | Sequence[str | Path], limit: int | None = 200_000) -> list[str]:
    """Up to ``limit`` captions from the shards' txt/json members, image data skipped (for training a
    tokenizer's vocabulary); unreadable captions and damaged shards are skipped."""
    captions: list[str] = []
    for path in resolve_shards(shards):
        try:
            with tarfile.open(path, "r:*") as tar:
                for info in tar:
                    ext = base_plus_ext(info.name)[1]
                    if ext not in ("txt", "json") or member_problem(info, DecodeLimits()) is not None:
                        continue
                    try:
                        captions += decode_captions({ext: tar.extractfile(info).read()})
                    except SampleError:
                        continue
                    if limit is not None and len(captions) >= limit:
                        return captions[:limit]
        except (tarfile.TarError, OSError) as err:
            log.warning("reading captions of %s stopped: %s", path, err)
    return captions


# ----------------------------------------------------------------------------- the streaming reader

def _balanced_split(sizes: Sequence[int], items: Sequence[int], parts: int) -> list[list[int]]:
    """Deal ``items`` into ``parts`` lists, largest first, each to the part with the fewest samples so
    far (ties: the lower part); deterministic."""
    out: list[list[int]] = [[] for _ in range(parts)]
    totals = [0] * parts
    for i in sorted(items, key=lambda i: (-sizes[i], i)):
        p = min(range(parts), key=lambda p: (totals[p], len(out[p]), p))
        out[p].append(i)
        totals[p] += sizes[i]
    return [sorted(part) for part in out]


@dataclass(frozen=True)
class ShardPlan:
    """Which shards each (group, worker) reads, and how many samples it delivers per epoch."""
    groups: list[list[list[int]]]  # groups[g][w]: shard indices (exact epochs; empty when resampling)
    quotas: list[list[int]]  # quotas[g][w]: samples per epoch; each group's sum to steps * batch_size
    steps: int  # batches per epoch on every rank


def _trim(quotas: list[int], total: int) -> list[int]:
    """Lower the largest quotas first until they sum to ``total``."""
    q = list(quotas)
    excess = sum(q) - total
    while excess > 0:
        top = max(q)
        second = max([v for v in q if v < top], default=0)
        tops = [w for w, v in enumerate(q) if v == top]
        step = max(1, min(top - second, excess // len(tops)))
        for w in reversed(tops):  # the last of equals gives first
            cut = min(step, excess)
            q[w] -= cut
            excess -= cut
    return q


def plan_shards(sizes: Sequence[int], batch_size: int, world_size: int, num_workers: int,
                resample: bool = False) -> ShardPlan:
    """The fixed split of shards over ranks and workers (see the module docstring)."""
    workers = max(1, num_workers)
    total = sum(sizes)
    if resample:
        steps = total // (world_size * batch_size)
        if steps == 0:
            raise ValueError(f"{total} samples are fewer than one batch of {batch_size} per rank ({world_size} ranks)")
        n = steps * batch_size
        quotas = [[n // workers + (w < n % workers) for w in range(workers)] for _ in range(world_size)]
        return ShardPlan([[[] for _ in range(workers)] for _ in range(world_size)], quotas, steps)
    if len(sizes) < world_size:
        raise ValueError(f"{len(sizes)} shard(s) cannot be split over {world_size} ranks without reading a "
                         f"sample twice; write more, smaller shards (shard_size) or use resample")
    if len(sizes) < world_size * workers:
        log.warning("%d shards for %d ranks x %d workers: some workers will have nothing to read",
                    len(sizes), world_size, workers)
    groups = [_balanced_split(sizes, part, workers)
              for part in _balanced_split(sizes, range(len(sizes)), world_size)]
    samples = [[sum(sizes[i] for i in shards) for shards in group] for group in groups]
    steps = min(sum(s) for s in samples) // batch_size  # the smallest group sets the step count
    if steps == 0:
        raise ValueError(f"a rank's shards hold fewer samples than one batch of {batch_size} "
                         f"(shard sizes {list(sizes)[:8]}...); use a smaller batch or more data")
    quotas = [_trim(s, steps * batch_size) for s in samples]  # the rest is dropped, fullest workers first
    return ShardPlan(groups, quotas, steps)


def _cut(chunks: list[dict], n: int) -> tuple[dict, list[dict]]:
    """The first ``n`` samples of a list of chunks as one batch, and the chunks left over."""
    if len(chunks[0]["keys"]) == n:  # the usual case: a worker's full chunk is a batch as it is
        return chunks[0], chunks[1:]
    images = torch.cat([c["images"] for c in chunks])  # (>= n, S, S, 3)
    labels = torch.cat([c["labels"] for c in chunks])
    captions = [t for c in chunks for t in c["captions"]]
    keys = [k for c in chunks for k in c["keys"]]
    batch = {"images": images[:n], "captions": captions[:n], "labels": labels[:n], "keys": keys[:n]}
    rest = {"images": images[n:], "captions": captions[n:], "labels": labels[n:], "keys": keys[n:]}
    return batch, [rest] if rest["keys"] else []


class _EpochStream(torch.utils.data.IterableDataset):
    """One rank's epoch; each DataLoader worker runs its own part of it."""

    def __init__(self, reader: ShardReader, epoch: int):
        super().__init__()
        self.reader, self.epoch = reader, epoch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        return self.reader._worker_batches(self.epoch, 0 if info is None else info.id)


class ShardReader:
    """Streams batches ``{"images": uint8 (B, S, S, 3), "captions": list[str], "labels": int64 (B,),
    "keys": list[str]}`` from webdataset shards, one rank's share of one epoch at a time.

    ``batch_size`` is this rank's batch. ``rank`` / ``world_size`` are passed in (nothing is read from
    torch.distributed). ``num_workers`` DataLoader worker processes decode in parallel (0: decode in
    this process). Every rank gets ``steps_per_epoch`` batches per epoch. See the module docstring."""

    def __init__(self, shards: str | Path | Sequence[str | Path], batch_size: int, image_size: int = 64, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 2,
                 shuffle_buffer: int = 1000, resample: bool = False, max_consecutive_failures: int = 50,
                 limits: DecodeLimits = DecodeLimits()):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.paths = resolve_shards(shards)
        self.sizes = shard_sizes(self.paths)
        self.batch_size, self.image_size = batch_size, image_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.shuffle_buffer, self.resample = num_workers, shuffle_buffer, resample
        self.max_consecutive_failures, self.limits = max_consecutive_failures, limits
        self.plan = plan_shards(self.sizes, batch_size, world_size, num_workers, resample)
        self.class_names = shard_class_names(self.paths)
        self.failures: Counter[str] = Counter()  # skipped samples by kind, over every epoch read here
        self.reread = 0  # samples read a second time in an epoch to top up a worker short of samples

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps

    @property
    def num_samples(self) -> int:
        return sum(self.sizes)

    def group(self, epoch: int) -> int:
        """The shard group this rank reads in ``epoch``."""
        return (self.rank + epoch) % self.world_size

    def epoch(self, epoch: int) -> Iterator[dict]:
        """This rank's ``steps_per_epoch`` batches of ``epoch``; the same stream every time.

        Workers send chunks of up to ``batch_size`` samples (a worker's last chunk may be short);
        batches are cut from the chunks in the order the DataLoader returns them (round robin)."""
        stream = _EpochStream(self, epoch)
        if self.num_workers > 0:
            items = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.num_workers)
        else:
            items = stream
        steps, failures, reread = 0, Counter(), 0
        pending: list[dict] = []
        for item in items:
            if _STATS in item:  # a worker's last item: its counts, not samples
                failures.update(item[_STATS]["failures"])
                reread += item[_STATS]["reread"]
                continue
            pending.append(item)
            while sum(len(c["keys"]) for c in pending) >= self.batch_size:
                batch, pending = _cut(pending, self.batch_size)
                steps += 1
                yield batch
        if steps != self.plan.steps or pending:
            raise RuntimeError(f"internal error: epoch {epoch} gave {steps} batches, planned {self.plan.steps}")
        self.failures.update(failures)
        self.reread += reread
        level = logging.WARNING if failures else logging.INFO
        log.log(level, "shards epoch %d, rank %d/%d: %d batches of %d; skipped samples: %s%s", epoch, self.rank,
                self.world_size, steps, self.batch_size, format_counts(failures),
                f"; {reread} samples reread to keep the step count" if reread else "")

    def summary(self) -> dict[str, int]:
        """Skipped samples per kind (every kind listed) and rereads, over the epochs read so far."""
        return {**{k: self.failures.get(k, 0) for k in FAILURE_KINDS}, "reread": self.reread}

    # ------------------------------------------------------------------ inside a worker
    def _worker_batches(self, epoch: int, worker: int) -> Iterator[dict]:
        group = self.group(epoch)
        quota = self.plan.quotas[group][worker]
        rng = np.random.default_rng([self.seed, epoch, group, worker])
        tracker = _FailureTracker(self.max_consecutive_failures)
        counters = {"reread": 0}
        samples = self._samples(epoch, group, worker, rng, tracker, counters)
        try:
            for start in range(0, quota, self.batch_size):
                chunk = [next(samples) for _ in range(min(self.batch_size, quota - start))]
                yield {
                    "images": torch.from_numpy(np.stack([s.image for s in chunk])),  # (n, S, S, 3) uint8
                    "captions": [s.captions[int(rng.integers(len(s.captions)))] for s in chunk],
                    "labels": torch.tensor([s.label for s in chunk], dtype=torch.int64),  # (n,)
                    "keys": [s.key for s in chunk],
                }
        finally:
            samples.close()
        yield {_STATS: {"failures": dict(tracker.counts), "reread": counters["reread"]}}

    def _shard_order(self, group: int, worker: int, rng: np.random.Generator) -> Iterator[int]:
        if self.resample:  # with replacement, for ever
            while True:
                yield int(rng.integers(len(self.paths)))
        shards = self.plan.groups[group][worker]
        yield from (shards[i] for i in rng.permutation(len(shards)))

    def _samples(self, epoch: int, group: int, worker: int, rng: np.random.Generator,
                 tracker: _FailureTracker, counters: dict[str, int]) -> Iterator[Sample]:
        """Good samples through the shuffle buffer, for ever: a pass over the worker's shards, the
        buffer drained, then (only if the consumer still wants samples) another pass.

        Like webdataset's ``shuffle``, output starts once the buffer holds ``_SHUFFLE_START`` samples
        and the buffer then grows by one every second sample up to ``shuffle_buffer``, so the first
        batch does not wait for a full buffer to decode."""
        buffer: list[Sample] = []
        start = min(self.shuffle_buffer, _SHUFFLE_START)
        grow = False

        def pop_random() -> Sample:
            j = int(rng.integers(len(buffer)))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            return buffer.pop()

        for pass_number in itertools.count():
            good_before = tracker.good
            tracker.counting = pass_number == 0
            for shard in self._shard_order(group, worker, rng):
                for sample in decoded_samples(self.paths[shard], self.image_size, tracker, self.limits):
                    if pass_number:
                        counters["reread"] += 1
                    buffer.append(sample)
                    if len(buffer) < start:
                        continue
                    if len(buffer) < self.shuffle_buffer:
                        grow = not grow
                        if grow:
                            continue
                    yield pop_random()
            while buffer:  # end of the pass: the buffer in random order
                yield pop_random()
            if tracker.good == good_before:
                shards = [str(self.paths[i]) for i in self.plan.groups[group][worker]]
                raise ShardReadError(f"no readable sample in shard(s) {', '.join(shards[:3])}"
                                     f"{', ...' if len(shards) > 3 else ''} (epoch {epoch}); "
                                     f"skipped: {format_counts(tracker.counts)}")
            log.warning("worker %d of group %d ran short of good samples in epoch %d (skipped: %s); "
                        "rereading its shards to keep the step count", worker, group, epoch,
                        format_counts(tracker.counts))


class ShardBatches:
    """The Trainer's interface (``batch(step)``) over a ShardReader: images uint8 (B, S, S, 3),
    ``input_ids`` / ``attention_mask`` of one random caption per image, ``labels`` (-1: unlabeled).

    Streaming is not random access, but an epoch is a pure function of (seed, epoch, shards, ranks,
    workers): step ``s`` is batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``. Asked
    for the next step, the open stream continues; asked for any other step (a resumed run), the
    epoch's stream is restarted and the batches before it are read and discarded. So ``--resume`` is
    exact (same batches as an uninterrupted run) as long as the shards, world size and worker count
    are unchanged, at the cost of re-reading up to one epoch."""

    def __init__(self, reader: ShardReader, tokenizer: Tokenizer):
        self.reader, self.tokenizer = reader, tokenizer
        self.batch_size = reader.batch_size
        self._stream: Iterator[dict] | None = None
        self._next: tuple[int, int] | None = None  # (epoch, offset) the open stream yields next

    @property
    def steps_per_epoch(self) -> int:
        return self.reader.steps_per_epoch

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        epoch, offset = divmod(step, self.steps_per_epoch)
        if self._next != (epoch, offset):
            self.close()
            self._stream = self.reader.epoch(epoch)
            for _ in range(offset):
                next(self._stream)
        raw = next(self._stream)
        if offset + 1 == self.steps_per_epoch:  # finish the epoch: collects and logs the failure counts
            for _ in self._stream:
                pass
            self._stream, self._next = None, None
        else:
            self._next = (epoch, offset + 1)
        return {"images": raw["images"], **self.tokenizer(raw["captions"]), "labels": raw["labels"]}

    def close(self) -> None:
        """Stop the open stream (its DataLoader workers exit)."""
        if self._stream is not None:
            self._stream.close()
        self._stream, self._next = None, None
