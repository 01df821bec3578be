import numpy as np
import pytest

from vlpt.data import shapes
from vlpt.data.shapes import (
    CLASS_NAMES,
    COLOR_NAMES,
    COMPOSITIONAL_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesConfig,
    ShapesDataset,
    make_scenes,
    sample_scene,
)


def test_vocabulary_matches_the_spec():
    assert SHAPES == ("circle", "square", "triangle", "star", "hexagon", "cross")
    assert set(COLOR_NAMES) == {"red", "green", "blue", "yellow", "purple", "orange", "white", "cyan"}
    assert SIZES == ("small", "large") and len(POSITIONS) == 9
    assert len(CLASS_NAMES) == 48 and len(set(CLASS_NAMES)) == 48


def test_rendering_is_deterministic_and_independent_of_set_size():
    a = ShapesDataset(ShapesConfig(size=20, seed=3))
    b = ShapesDataset(ShapesConfig(size=40, seed=3))
    np.testing.assert_array_equal(a.images, b.images[:20])
    assert a.captions == b.captions[:20]
    c = ShapesDataset(ShapesConfig(size=20, seed=4))
    assert not np.array_equal(a.images, c.images)


def test_images_are_uint8_of_the_requested_size():
    for size in (32, 64, 96):
        ds = ShapesDataset(ShapesConfig(size=3, image_size=size))
        assert ds.images.shape == (3, size, size, 3) and ds.images.dtype == np.uint8


def test_scene_contents_labels_and_captions():
    ds = ShapesDataset(ShapesConfig(size=300))
    counts = {len(s.objects) for s in ds.scenes}
    assert counts == {1, 2, 3}
    for scene, label, shape_label, color_label, caps in zip(ds.scenes, ds.labels, ds.shape_labels,
                                                           ds.color_labels, ds.captions):
        cells = [o.cell for o in scene.objects]
        assert len(set(cells)) == len(cells)  # one object per grid cell: never overlapping
        p = scene.primary
        assert CLASS_NAMES[label] == f"{p.color} {p.shape}"
        assert SHAPES[shape_label] == p.shape and COLOR_NAMES[color_label] == p.color
        assert len(caps) == 5 and len(set(caps)) >= 3
        for obj in scene.objects:  # every caption names every object's color
            assert all(obj.color in c for c in caps)
    assert any(r in c for caps in ds.captions for c in caps for r in ("above", "below", "left of", "right of"))


def test_caption_openers_frame_the_position_captions_and_keep_their_words():
    """Style 1 (every object's size and position, the second caption) comes bare by default and in the other
    captions' sentence frames with ``caption_openers``; the described objects stay the same."""
    frames = [f.format("") for f in shapes.PLAIN_OPENERS + shapes.SCENE_OPENERS if f != "{}"]
    plain = make_scenes(ShapesConfig(size=200, max_objects=1, num_captions=2))
    framed = make_scenes(ShapesConfig(size=200, max_objects=1, num_captions=2, caption_openers=True))
    for bare_scene, framed_scene in zip(plain, framed):
        assert bare_scene.objects == framed_scene.objects
        obj = framed_scene.primary
        position = shapes.POSITION_PHRASES[obj.cell]
        assert bare_scene.captions[1].endswith(position) and bare_scene.captions[1].startswith(("a ", "an "))
        caption = framed_scene.captions[1]
        assert position in caption and obj.color in caption
    used = {f for s in framed for f in frames if f.strip() and f.strip() in s.captions[1]}
    assert len(used) >= 4  # varied frames, not one
    assert sum(s.captions[1].startswith(("a ", "an ")) and not any(f.strip() in s.captions[1] for f in frames
                                                                   if f.strip()) for s in framed) >= 10  # some bare


def test_relation_captions_are_true():
    for i in range(200):
        scene = sample_scene(0, "train", i, min_objects=2, max_objects=2)
        a, b = scene.objects
        rel = shapes.relation(a, b)
        if rel == "above":
            assert a.row < b.row
        elif rel == "below":
            assert a.row > b.row
        elif rel == "to the left of":
            assert a.row == b.row and a.col < b.col
        else:
            assert a.row == b.row and a.col > b.col


def test_object_is_drawn_where_the_scene_says():
    scene = shapes.Scene(objects=[shapes.ShapeObject("square", "red", "large", 8, 0, 0, 0)], background=(40, 40, 40))
    img = shapes.render_scene(scene, 63, np.random.default_rng(0)).astype(int)
    red = (img[..., 0] > 150) & (img[..., 1] < 100)
    ys, xs = np.nonzero(red)
    assert ys.min() > 42 and xs.min() > 42  # bottom-right cell only


def test_compositional_pairs_never_appear_in_training():
    held = set(COMPOSITIONAL_PAIRS)
    assert len(held) == 8
    ds = ShapesDataset(ShapesConfig(split="train", size=500))
    for scene, caps in zip(ds.scenes, ds.captions):
        assert not any((o.color, o.shape) in held for o in scene.objects)
    corpus = " ".join(c for caps in ds.captions for c in caps)
    for color, shape in held:
        for synonym in shapes.SHAPE_SYNONYMS[shape]:
            assert f"{color} {synonym}" not in corpus
    comp = ShapesDataset(ShapesConfig(split="compositional", size=50, min_objects=1, max_objects=1))
    assert all((s.primary.color, s.primary.shape) in held for s in comp.scenes)


def test_splits_differ():
    a = ShapesDataset(ShapesConfig(split="train", size=10)).images
    b = ShapesDataset(ShapesConfig(split="test", size=10)).images
    assert not np.array_equal(a, b)


def test_cache_round_trip(tmp_path):
    cfg = ShapesConfig(size=8)
    first = ShapesDataset(cfg, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 1
    second = ShapesDataset(cfg, cache_dir=tmp_path)
    np.testing.assert_array_equal(first.images, second.images)
    next(tmp_path.glob("*.npy")).write_bytes(b"garbage")  # a damaged cache is re-rendered
    third = ShapesDataset(cfg, cache_dir=tmp_path)
    np.testing.assert_array_equal(first.images, third.images)


@pytest.mark.parametrize("kwargs", [dict(split="nope"), dict(image_size=16), dict(size=0),
                                    dict(min_objects=2, max_objects=1)])
def test_bad_config_is_rejected(kwargs):
    with pytest.raises(ValueError):
        ShapesConfig(**kwargs)


def test_twins_differ_in_exactly_one_attribute_of_one_object():
    ds = ShapesDataset(ShapesConfig(size=200, twins=True))
    held = set(COMPOSITIONAL_PAIRS)
    for a, b in zip(ds.scenes[0::2], ds.scenes[1::2]):
        assert len(a.objects) == len(b.objects)
        changes = [(f, x, y) for x, y in zip(a.objects, b.objects) for f in ("shape", "color", "size", "cell")
                   if getattr(x, f) != getattr(y, f)]
        assert len(changes) == 1
        assert not any((o.color, o.shape) in held for o in b.objects)
        assert len({o.cell for o in b.objects}) == len(b.objects)
    with pytest.raises(ValueError, match="training"):
        ShapesConfig(split="test", twins=True)


def test_count_weights_shift_the_number_of_objects():
    ds = ShapesDataset(ShapesConfig(size=600, count_weights=(4.0, 1.0, 1.0)))
    single = np.mean([len(s.objects) == 1 for s in ds.scenes])
    assert 0.55 < single < 0.78  # expected 2/3
