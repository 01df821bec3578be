"""Image transforms: PIL -> normalised float tensor for users' images (like OpenCLIP's preprocess)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from vlpt.io import load_image


def image_transform(image_size: int = 64, mean: Sequence[float] = (0.5, 0.5, 0.5),
                    std: Sequence[float] = (0.25, 0.25, 0.25)) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the short side to ``image_size``, centre-crop, scale to [0, 1] and normalise."""
    return T.Compose([
        T.Lambda(lambda img: img.convert("RGB")),
        T.PILToTensor(),
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.CenterCrop(image_size),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean, std),
    ])


def images_as_batch(images, image_size: int = 64, mean: Sequence[float] = (0.5, 0.5, 0.5),
                    std: Sequence[float] = (0.25, 0.25, 0.25)) -> torch.Tensor:
    """A model-ready batch from a tensor or array (returned as is: uint8 (B, H, W, 3) or normalised float
    (B, 3, H, W)) or a sequence of file paths / PIL images (loaded as RGB, resized, normalised); a file that
    cannot be read raises ImageLoadError naming it."""
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
    transform = image_transform(image_size, mean, std)
    return torch.stack([transform(img if isinstance(img, Image.Image) else load_image(img)) for img in images])
