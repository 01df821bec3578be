"""Judging generated images: an independent attribute classifier, CLIP-score and a Fréchet distance.

- ``Judge``: a small CNN of its own (no weights shared with the generator or vlpt's towers), trained on
  real images only, one head per attribute: color / shape / size / position of a single shapes-world
  object, or the digit of a handwritten digit. Its accuracy on generated images says whether the
  generator drew what the prompt asked for; its accuracy on real test images is the ceiling.
- ``clip_score``: the dual encoder's cosine similarity between each generated image and its prompt.
- ``frechet_distance``: ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) between Gaussians fitted
  to real and generated images' features, the FID formula (Heusel et al. 2017) in the vlpt image
  tower's feature space instead of Inception's (nothing is downloaded).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from vlpt.data import shapes
from vlpt.data.digits import DIGIT_WORDS

# The attributes the judge reads off a single-object shapes scene, with their class names.
SHAPE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": shapes.COLOR_NAMES, "shape": shapes.SHAPES, "size": shapes.SIZES, "position": shapes.POSITIONS,
}
DIGIT_ATTRIBUTES: dict[str, tuple[str, ...]] = {"digit": DIGIT_WORDS}


def shapes_attribute_labels(scenes: Sequence[shapes.Scene]) -> dict[str, np.ndarray]:
    """Each scene's first object as class indices per attribute: {"color": (N,), "shape": ..., ...}."""
    objects = [s.primary for s in scenes]
    return {
        "color": np.array([shapes.COLOR_NAMES.index(o.color) for o in objects]),
        "shape": np.array([shapes.SHAPES.index(o.shape) for o in objects]),
        "size": np.array([shapes.SIZES.index(o.size) for o in objects]),
        "position": np.array([o.cell for o in objects]),
    }


def resize_images(images: torch.Tensor | np.ndarray, size: int) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> uint8 (B, size, size, 3), antialiased bilinear; unchanged if already that size."""
    images = torch.as_tensor(images)
    if images.shape[1] == size and images.shape[2] == size:
        return images
    x = images.permute(0, 3, 1, 2).float()  # (B, 3, H, W)
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# ----------------------------------------------------------------------------- the judge

@dataclass
class JudgeConfig:
    image_size: int = 32  # images are resized to this before judging
    width: int = 32  # channels of the first conv stage (doubled at each of the three stages)
    steps: int = 600
    batch_size: int = 128
    lr: float = 2e-3
    max_shift: int = 1  # training augmentation: random translation by up to this many pixels
    seed: int = 0


class Judge(nn.Module):
    """Three conv stages (conv-BN-ReLU x2, max-pool) and one linear head per attribute. The last stage
    is flattened, not pooled, so the heads see where things are (position is an attribute)."""

    def __init__(self, attributes: dict[str, tuple[str, ...]], config: JudgeConfig | None = None):
        super().__init__()
        self.config = config or JudgeConfig()
        self.attributes = dict(attributes)
        w = self.config.width

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.MaxPool2d(2))

        self.features = nn.Sequential(stage(3, w), stage(w, 2 * w), stage(2 * w, 4 * w), nn.Flatten())
        grid = self.config.image_size // 8
        self.trunk = nn.Sequential(nn.Linear(4 * w * grid * grid, 256), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({name: nn.Linear(256, len(names)) for name, names in self.attributes.items()})

    def hidden(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, H, W, 3) of any size -> the judge's features (B, 256), before the heads."""
        x = resize_images(images, self.config.image_size).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return self.trunk(self.features(x))  # (B, 256)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 images (B, H, W, 3) of any size -> logits per attribute {name: (B, classes)}."""
        hidden = self.hidden(images)  # (B, 256)
        return {name: head(hidden) for name, head in self.heads.items()}

    @torch.inference_mode()
    def embed(self, images: torch.Tensor | np.ndarray, batch_size: int = 500) -> np.ndarray:
        """The judge's features of many images (N, 256): an encoder independent of the generator and of the
        dual encoder that conditions it, for the Fréchet distance."""
        was_training = self.training
        self.eval()
        images = torch.as_tensor(images)
        out = np.concatenate([self.hidden(images[s:s + batch_size]).numpy() for s in range(0, len(images), batch_size)])
        self.train(was_training)
        return out

    @torch.inference_mode()
    def predict(self, images: torch.Tensor | np.ndarray, batch_size: int = 500) -> dict[str, np.ndarray]:
        """Predicted class index per attribute: {name: (B,)}."""
        was_training = self.training
        self.eval()
        images = torch.as_tensor(images)
        out: dict[str, list[np.ndarray]] = {name: [] for name in self.attributes}
        for start in range(0, len(images), batch_size):
            for name, logits in self(images[start:start + batch_size]).items():
                out[name].append(logits.argmax(-1).numpy())
        self.train(was_training)
        return {name: np.concatenate(parts) for name, parts in out.items()}

    def accuracy(self, images: torch.Tensor | np.ndarray, labels: dict[str, np.ndarray]) -> dict[str, float]:
        """Fraction of images whose attribute the judge reads as ``labels`` says, per attribute."""
        predicted = self.predict(images)
        return {name: float((predicted[name] == np.asarray(labels[name])).mean()) for name in self.attributes}


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image (B, H, W, 3) by up to ``max_shift`` pixels, edges replicated."""
    if max_shift <= 0:
        return images
    B, H, W, _ = images.shape
    padded = F.pad(images.permute(0, 3, 1, 2).float(), (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (B, 2), generator=generator)
    out = torch.stack([padded[i, :, dy:dy + H, dx:dx + W] for i, (dy, dx) in enumerate(offsets.tolist())])
    return out.to(torch.uint8).permute(0, 2, 3, 1)


def train_judge(images: np.ndarray | torch.Tensor, labels: dict[str, np.ndarray],
                attributes: dict[str, tuple[str, ...]], config: JudgeConfig | None = None) -> Judge:
    """Fit a Judge on real images (uint8 (N, H, W, 3)) and their attribute labels; seeded, deterministic."""
    config = config or JudgeConfig()
    if set(labels) != set(attributes):
        raise ValueError(f"labels for {sorted(labels)} but attributes {sorted(attributes)}")
    images = torch.as_tensor(images)
    targets = {name: torch.as_tensor(np.asarray(v), dtype=torch.long) for name, v in labels.items()}
    torch.manual_seed(config.seed)
    judge = Judge(attributes, config)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=config.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps,
                                                   pct_start=0.1)
    generator = torch.Generator().manual_seed(config.seed)
    judge.train()
    for _ in range(config.steps):
        index = torch.randint(0, len(images), (config.batch_size,), generator=generator)
        logits = judge(random_shift(images[index], config.max_shift, generator))
        loss = sum(F.cross_entropy(logits[name], targets[name][index]) for name in attributes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return judge.eval()


# ----------------------------------------------------------------------------- distribution metrics

def frechet_distance(real: np.ndarray, generated: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D), in float64."""
    real, generated = np.asarray(real, np.float64), np.asarray(generated, np.float64)
    if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
        raise ValueError(f"need two (N, D) feature arrays with the same D, got {real.shape} and {generated.shape}")
    if len(real) < 2 or len(generated) < 2:
        raise ValueError("need at least 2 samples on each side to fit a covariance")
    mu_r, mu_g = real.mean(0), generated.mean(0)
    cov_r = np.atleast_2d(np.cov(real, rowvar=False))  # (D, D), also for D = 1
    cov_g = np.atleast_2d(np.cov(generated, rowvar=False))
    covmean = scipy.linalg.sqrtm(cov_r @ cov_g)
    if not np.isfinite(covmean).all():  # singular product: nudge both covariances (as pytorch-fid does)
        offset = np.eye(len(mu_r)) * 1e-6
        covmean = scipy.linalg.sqrtm((cov_r + offset) @ (cov_g + offset))
    covmean = covmean.real  # sqrtm of a product of PSD matrices: imaginary parts are rounding noise
    return float(((mu_r - mu_g) ** 2).sum() + np.trace(cov_r) + np.trace(cov_g) - 2 * np.trace(covmean))


def shapes_prompt(obj: shapes.ShapeObject) -> str:
    """The full description of one object: "a large red circle in the top left" (no synonyms)."""
    return f"{'an' if obj.size[0] in 'aeiou' else 'a'} {obj.size} {obj.color} {obj.shape} " \
           f"{shapes.POSITION_PHRASES[obj.cell]}"
