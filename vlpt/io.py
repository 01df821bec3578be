"""Small file helpers: atomic, durable writes (nothing half-written is ever left in place of good data,
even after a power loss) and image loading that names the file when it fails."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import struct
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from PIL import Image, UnidentifiedImageError


def fsync_file(path: str | Path) -> None:
    """Flush a written file's data to the disk (a rename alone may reach the disk before the data does)."""
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows commits writable handles only
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: str | Path) -> None:
    """Flush a folder's entries (the names created or renamed in it) to the disk. A no-op on Windows and
    on file systems that cannot sync a folder."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """``fsync_file`` every file under ``root`` and ``fsync_directory`` every folder, ``root`` included."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_file(os.path.join(folder, name))
        fsync_directory(folder)


@contextlib.contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside ``directory``; on success it replaces ``directory`` in one rename.

    On failure the temp folder is removed and any existing ``directory`` is left untouched. Durable: the
    files are synced to the disk before the rename and the parent folder after it, so a power loss leaves
    the old folder or the complete new one, never a renamed folder of empty files.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp", dir=directory.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if directory.exists():  # keep the old copy until the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old", dir=directory.parent))
            os.replace(directory, old / "d")
        os.replace(tmp, directory)
        fsync_directory(directory.parent)  # the rename itself reaches the disk
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, then rename it over ``path`` in one step:
    a crash (or a power loss: the file is synced before the rename, the folder after) leaves the old file
    (or none), never half a file. Missing parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        fsync_file(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the final file should read like any other
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


class ImageLoadError(ValueError):
    """An image file that is missing or cannot be decoded; the message names the file."""


class ModelLoadError(ValueError):
    """A model folder that cannot be loaded (corrupt weights, an unreadable config.json, another kind of
    model); the message names the file."""


# What PIL raises on a file that is not a well-formed image of a format it knows: UnidentifiedImageError
# and truncated data are OSErrors, and malformed headers surface as these others.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error,
                  Image.DecompressionBombError, Image.DecompressionBombWarning)


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB (grayscale, RGBA and palette images are converted).

    ImageLoadError, naming the file, for a missing file, a folder, a file that is not an image or is
    truncated, and an image larger than ``PIL.Image.MAX_IMAGE_PIXELS`` (a "decompression bomb": PIL warns
    above the limit and refuses above twice it; both are refused here)."""
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(f"image file not found: {path}")
    if path.is_dir():
        raise ImageLoadError(f"cannot read image {path}: it is a folder, not an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                    img = img.convert("RGBA")
                    background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                    img = Image.alpha_composite(background, img)  # transparent pixels become white
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        pixels = re.search(r"\((\d+) pixels\)", str(err))  # PIL: "Image size (N pixels) exceeds limit of ..."
        size = f"{int(pixels[1]):,} pixels" if pixels else "its size"
        raise ImageLoadError(f"cannot read image {path}: {size} is over PIL's limit of {Image.MAX_IMAGE_PIXELS:,} "
                             f"(PIL.Image.MAX_IMAGE_PIXELS), a possible decompression bomb; raise the limit if "
                             f"you trust the file") from err
    except UnidentifiedImageError as err:
        raise ImageLoadError(f"cannot read image {path}: not an image file of a format PIL knows") from err
    except _DECODE_ERRORS as err:
        raise ImageLoadError(f"cannot read image {path}: {' '.join(str(err).split()) or type(err).__name__}") from err
