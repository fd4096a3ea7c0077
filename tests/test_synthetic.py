"""The synthetic scene generator: deterministic, consistent label/sketch/meta, photo-like."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from ssgan_dist.data.synthetic import generate, make_scene
from ssgan_dist.labels import BACKGROUND_CLASSES


def test_deterministic_by_seed():
    a, b, c = make_scene(7, 48), make_scene(7, 48), make_scene(8, 48)
    for x, y in zip(a[:3], b[:3]):
        assert np.array_equal(x, y)
    assert a[3] == b[3]
    assert not np.array_equal(a[2], c[2]) and not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("size", [32, 61, 128])
def test_shapes_and_types(size):
    sketch, label, image, meta = make_scene(size, size)
    assert sketch.shape == label.shape == (size, size) and image.shape == (size, size, 3)
    assert sketch.dtype == label.dtype == image.dtype == np.uint8
    assert meta["size"] == [size, size] and meta["split"] == "train"


@pytest.mark.parametrize("seed", range(12))
def test_label_lies_on_strokes_and_matches_meta(seed):
    scene = generate(seed, 64)
    stroke = scene.sketch < 128
    assert set(np.unique(scene.sketch[~stroke]).tolist()) == {255}  # white paper
    assert 0.01 < stroke.mean() < 0.3
    assert not (scene.label[~stroke]).any()
    assert np.array_equal(scene.label[stroke], scene.class_map[stroke])
    assert scene.meta["classes"] == sorted(set(np.unique(scene.label).tolist()) - {0})
    regions = scene.meta["regions"]
    assert {r["class"] for r in regions} == set(np.unique(scene.class_map).tolist())
    for r in regions:
        expected = BACKGROUND_CLASSES if r["kind"] != "object" else set(range(1, 20)) - set(BACKGROUND_CLASSES)
        assert r["class"] in expected, r
        if r["kind"] == "object":  # the nearer side of an outline is always drawn
            assert r["class"] in scene.meta["classes"]
    assert 1 <= sum(r["kind"] == "object" for r in regions) <= 3


@pytest.mark.parametrize("num_classes", [2, 5, 17, 18, 40])
def test_classes_stay_below_num_classes(num_classes):
    for seed in range(4):
        scene = generate(seed, 32, num_classes=num_classes)
        assert scene.class_map.max() < num_classes and scene.label.max() < num_classes
        for r in scene.meta["regions"]:
            if r["kind"] == "object":
                assert r["class"] not in BACKGROUND_CLASSES and r["class"] > 0


def test_custom_background_classes():
    scene = generate(2, 64, num_classes=8, background_classes=(6, 7))
    kinds = {r["kind"]: r["class"] for r in scene.meta["regions"]}
    assert kinds["sky"] == 6 and kinds["ground"] == 7
    assert all(r["class"] < 6 for r in scene.meta["regions"] if r["kind"] == "object")


def test_image_is_textured_not_flat():
    for seed in range(3):
        scene = generate(seed, 128)
        grey = scene.image.astype(np.float32).mean(-1)
        for c in np.unique(scene.class_map):
            inside = ndimage.binary_erosion(scene.class_map == c, iterations=3)
            if inside.sum() >= 200:
                assert grey[inside].std() > 2.5, (seed, c)
        # texture, not only a gradient: detail left after removing the smooth part
        detail = grey - ndimage.gaussian_filter(grey, 3)
        assert detail[scene.sketch == 255].std() > 1.5


def test_rejects_tiny_sizes():
    with pytest.raises(ValueError, match="size"):
        make_scene(0, 8)


def test_fast_enough():
    make_scene(0, 256)
    best = min(_timed(lambda i=i: make_scene(i, 256)) for i in range(3))
    assert best < 0.15  # ~12 ms measured; a loose bound on a shared 2-core machine


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
