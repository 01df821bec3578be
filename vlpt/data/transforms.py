"""Image transforms: PIL -> normalised float tensor for users' images (like OpenCLIP's preprocess)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from vlpt.io import load_image

INTERPOLATION_MODES = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                       "nearest": T.InterpolationMode.NEAREST}  # the names of vlpt.config.INTERPOLATIONS


def image_transform(image_size: int = 64, mean: Sequence[float] = (0.5, 0.5, 0.5),
                    std: Sequence[float] = (0.25, 0.25, 0.25), interpolation: str = "bicubic",
                    resize_mode: str = "shortest", resize_size: int | None = None
                    ) -> Callable[[Image.Image], torch.Tensor]:
    """Resize, scale to [0, 1] and normalise. ``resize_mode`` shortest: the short side to ``resize_size``
    (default ``image_size``), then the centre ``image_size`` square (CLIP); squash: both sides to
    ``image_size``, the aspect ratio not kept (SigLIP)."""
    if interpolation not in INTERPOLATION_MODES:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose from {', '.join(INTERPOLATION_MODES)}")
    mode = INTERPOLATION_MODES[interpolation]
    if resize_mode == "shortest":
        resize = [T.Resize(resize_size or image_size, interpolation=mode, antialias=True), T.CenterCrop(image_size)]
    elif resize_mode == "squash":
        resize = [T.Resize((image_size, image_size), interpolation=mode, antialias=True)]
    else:
        raise ValueError(f"unknown resize_mode {resize_mode!r}; choose from shortest, squash")
    return T.Compose([
        T.Lambda(lambda img: img.convert("RGB")),
        T.PILToTensor(),
        *resize,
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean, std),
    ])


def tower_transform(config) -> Callable[[Image.Image], torch.Tensor]:
    """``image_transform`` with every preprocessing field of an ``ImageTowerConfig``."""
    return image_transform(config.image_size, config.mean, config.std, config.interpolation, config.resize_mode,
                           config.resize_size)


def images_as_batch(images, image_size: int = 64, mean: Sequence[float] = (0.5, 0.5, 0.5),
                    std: Sequence[float] = (0.25, 0.25, 0.25), transform: Callable | None = None) -> torch.Tensor:
    """A model-ready batch from a tensor or array (returned as is: uint8 (B, H, W, 3) or normalised float
    (B, 3, H, W)) or a sequence of file paths / PIL images (loaded as RGB, resized, normalised); a file that
    cannot be read raises ImageLoadError naming it. ``transform`` (e.g. ``tower_transform(config.image)``)
    replaces the default ``image_transform(image_size, mean, std)``."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"images must be a batch (B, H, W, 3) or (B, 3, H, W), got shape {tuple(images.shape)}")
        return images
    if isinstance(images, (str, Image.Image)) or hasattr(images, "__fspath__"):
        images = [images]
    if not images:
        raise ValueError("no images given")
    transform = transform or image_transform(image_size, mean, std)
    return torch.stack([transform(img if isinstance(img, Image.Image) else load_image(img)) for img in images])
