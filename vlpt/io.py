"""Small file helpers: atomic writes (nothing half-written is ever left in place of good data) and
image loading that names the file when it fails."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside ``directory``; on success it replaces ``directory`` in one rename.

    On failure the temp folder is removed and any existing ``directory`` is left untouched.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp", dir=directory.parent))
    try:
        yield tmp
        old = None
        if directory.exists():  # keep the old copy until the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old", dir=directory.parent))
            os.replace(directory, old / "d")
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, then rename it over ``path`` in one step:
    a crash leaves the old file (or none), never half a file. Missing parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the final file should read like any other
        os.replace(tmp, path)
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
