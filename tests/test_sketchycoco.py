"""SketchyCOCO -> shards: a small tree in the dataset's layout, .mat files in MATLAB v5 and
v7.3 (HDF5) form, labels checked pixel for pixel against an independent reference."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import webdataset as wds
from PIL import Image, ImageFilter

from ssgan_dist.data.build import main
from ssgan_dist.data.prepare import resize_image, to_size
from ssgan_dist.data.schema import decode_sample
from ssgan_dist.data.writer import read_manifest

SIZE = 32
SPLIT = "trainInTrain"


def savemat73(path: Path, name: str, array: np.ndarray) -> None:
    """A .mat file laid out as MATLAB -v7.3 writes it: HDF5 behind a 512-byte user block
    holding the MAT header, arrays stored column-major (so HDF5 sees them transposed)."""
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset(name, data=array.T).attrs["MATLAB_class"] = np.bytes_(
            "uint8" if array.dtype == np.uint8 else "double")
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    with open(path, "r+b") as f:
        f.write(header.ljust(116) + b"\0" * 8 + b"\x00\x02" + b"IM")


def scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sketch, CLASS_GT, photo): a region class map, 1-2 px dark strokes with grey
    anti-aliasing on white, and a smooth photo coloured by region."""
    classes = np.full((h, w), 18, np.uint8)  # sky over grass, some unlabelled (0) and object boxes
    classes[h // 2:] = 17
    for value in (0, *rng.integers(1, 16, 4)):
        y, x = rng.integers(0, h), rng.integers(0, w)
        classes[y:y + rng.integers(3, h), x:x + rng.integers(3, w)] = value
    sketch = np.full((h, w), 255, np.uint8)
    for _ in range(6):
        if rng.random() < 0.5:
            sketch[rng.integers(0, h), :] = rng.choice([0, 40, 150])
        else:
            sketch[:, rng.integers(0, w)] = rng.choice([0, 40, 150])
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    photo = np.stack([120 + 60 * np.sin(3 * yy), 100 + 80 * xx, 90 + classes * 4.0], -1)
    return sketch, classes, np.asarray(Image.fromarray(photo.astype(np.uint8)).filter(ImageFilter.GaussianBlur(1)))


def reference_label(sketch: np.ndarray, classes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The documented rule, written out pixel by pixel: each output pixel's footprint is
    rows [i*h//S, max((i+1)*h//S, i*h//S+1)) (columns alike); the sketch value is its darkest
    pixel, the class is the smallest non-zero class among the darkest pixels (else 0); the
    label keeps it on strokes (< 128)."""
    h, w = sketch.shape
    out_s = np.zeros((size, size), np.uint8)
    out_c = np.zeros((size, size), np.uint8)
    for i in range(size):
        r0 = i * h // size
        r1 = max((i + 1) * h // size, r0 + 1)
        for j in range(size):
            c0 = j * w // size
            c1 = max((j + 1) * w // size, c0 + 1)
            block_s, block_c = sketch[r0:r1, c0:c1], classes[r0:r1, c0:c1]
            darkest = block_c[block_s == block_s.min()]
            out_s[i, j] = block_s.min()
            out_c[i, j] = darkest[darkest > 0].min() if (darkest > 0).any() else 0
    return out_s, np.where(out_s < 128, out_c, 0)


# id -> (h, w, .mat format, CLASS_GT dtype): down-, un- and up-scaled scenes, both formats.
SCENES = {
    "000000000139": (40, 48, "v5", np.uint8),
    "000000000285": (32, 32, "v7.3", np.float64),
    "000000000632": (20, 24, "v5", np.float64),
    "000000000724": (64, 64, "v7.3", np.uint8),
}


def write_tree(root: Path, extra_bad: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    scene_dir = root / "Scene"
    gt = scene_dir / "GT" / SPLIT
    sk = scene_dir / "Sketch" / "paper_version" / SPLIT
    ann = scene_dir / "Annotation" / "paper_version" / SPLIT / "CLASS_GT"
    for d in (gt, sk, ann):
        d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sources = {}
    for sid, (h, w, fmt, dtype) in SCENES.items():
        sketch, classes, photo = scene(rng, h, w)
        Image.fromarray(photo).save(gt / f"{sid}.png")
        Image.fromarray(sketch).save(sk / f"{sid}.png")
        if fmt == "v5":
            scipy.io.savemat(ann / f"{sid}.mat", {"CLASS_GT": classes.astype(dtype), "INSTANCE_GT": classes * 0})
        else:
            savemat73(ann / f"{sid}.mat", "CLASS_GT", classes.astype(dtype))
        sources[sid] = (sketch, classes, photo)
    Image.fromarray(sketch).save(sk / "000000000999.png")  # a sketch without photo and CLASS_GT
    if extra_bad:
        sketch, classes, photo = scene(rng, 32, 32)
        for sid in ("000000001000", "000000001001", "000000001002"):
            Image.fromarray(photo).save(gt / f"{sid}.png")
            Image.fromarray(sketch).save(sk / f"{sid}.png")
        scipy.io.savemat(ann / "000000001000.mat", {"CLASS_GT": np.full((32, 32), 25.0)})  # class >= 20
        (ann / "000000001001.mat").write_bytes(b"not a mat file")
        scipy.io.savemat(ann / "000000001002.mat", {"CLASS_GT": classes[:16]})  # wrong size
    return sources


def build(root: Path, out: Path, *extra: str) -> int:
    return main(["sketchycoco", "--root", str(root), "--split", SPLIT, "--out", str(out), "--size", str(SIZE),
                 "--samples-per-shard", "3", "--workers", "1", *extra])


def test_the_v73_file_is_what_scipy_calls_matlab_73(tmp_path):
    savemat73(tmp_path / "a.mat", "CLASS_GT", np.zeros((3, 4), np.uint8))
    with pytest.raises(NotImplementedError, match="7.3"):
        scipy.io.loadmat(tmp_path / "a.mat")


def test_to_size_keeps_classes_exact_and_never_interpolates():
    rng = np.random.default_rng(1)
    sketch, classes, _ = scene(rng, 50, 70)
    s, c = to_size(sketch, classes, 32)
    assert set(np.unique(c)) <= set(np.unique(classes))
    ref_s, ref_label = reference_label(sketch, classes, 32)
    assert np.array_equal(s, ref_s) and np.array_equal(np.where(s < 128, c, 0), ref_label)
    # the same size is the identity; growing is nearest-neighbour
    same_s, same_c = to_size(sketch[:, :50], classes[:, :50], 50)
    assert np.array_equal(same_s, sketch[:, :50]) and np.array_equal(same_c, classes[:, :50])
    grown_s, grown_c = to_size(sketch[:10, :10], classes[:10, :10], 30)
    assert np.array_equal(grown_c, np.repeat(np.repeat(classes[:10, :10], 3, 0), 3, 1))
    assert np.array_equal(grown_s, np.repeat(np.repeat(sketch[:10, :10], 3, 0), 3, 1))


def test_sketchycoco_tree_to_shards(tmp_path):
    sources = write_tree(tmp_path / "src")
    out = tmp_path / "out"
    assert build(tmp_path / "src", out) == 0
    m = read_manifest(out)
    assert m["source"] == "sketchycoco" and m["samples"] == 4 and [s["samples"] for s in m["shards"]] == [3, 1]
    assert m["extra"]["split"] == SPLIT and len(m["extra"]["skipped"]) == 1
    assert "000000000999" in m["extra"]["skipped"][0] and "photo / classes" in m["extra"]["skipped"][0]
    assert all((out / s["index"]).is_file() for s in m["shards"])

    raws = list(wds.WebDataset([str(out / s["file"]) for s in m["shards"]], shardshuffle=False))
    assert sorted(r["__key__"] for r in raws) == sorted(SCENES)
    pixels, present = np.zeros(20, int), np.zeros(20, int)
    for raw in raws:
        sid = raw["__key__"]
        sample = decode_sample(raw, shard="x", num_classes=20, image_size=SIZE)
        sketch, classes, photo = sources[sid]
        ref_sketch, ref_label = reference_label(sketch, classes, SIZE)
        label, stored_sketch = sample["label"], sample["sketch"]
        assert np.array_equal(stored_sketch, ref_sketch), sid
        assert np.array_equal(label, ref_label), sid
        assert (stored_sketch[label > 0] < 128).all()  # every label pixel is on a stroke
        if sketch.shape == (SIZE, SIZE):  # no resize: exactly CLASS_GT on the strokes
            assert np.array_equal(label, np.where(sketch < 128, classes, 0))
        diff = np.abs(sample["image"].astype(float) - resize_image(photo, SIZE).astype(float))
        assert diff.mean() < 1.5 and diff.max() <= 24, (sid, diff.mean(), diff.max())  # JPEG q95
        meta = json.loads(raw["json"])
        assert meta["source_id"] == sid and meta["split"] == SPLIT and meta["source_size"] == list(sketch.shape)
        counts = np.bincount(label.ravel(), minlength=20)
        pixels += counts
        present += counts > 0
    assert [h["pixels"] for h in m["class_histogram"]] == pixels.tolist()
    assert [h["samples"] for h in m["class_histogram"]] == present.tolist()


def test_shuffle_is_seeded_and_workers_do_not_change_the_shards(tmp_path):
    write_tree(tmp_path / "src")
    assert build(tmp_path / "src", tmp_path / "a", "--seed", "3") == 0
    assert main(["sketchycoco", "--root", str(tmp_path / "src" / "Scene"), "--split", SPLIT, "--out",
                 str(tmp_path / "b"), "--size", str(SIZE), "--samples-per-shard", "3", "--workers", "2",
                 "--seed", "3"]) == 0
    assert build(tmp_path / "src", tmp_path / "c", "--seed", "4") == 0
    sha = {d: [s["sha256"] for s in read_manifest(tmp_path / d)["shards"]] for d in "abc"}
    assert sha["a"] == sha["b"] != sha["c"]


def test_bad_sources_are_skipped_or_stop_the_build(tmp_path, capsys):
    write_tree(tmp_path / "src", extra_bad=True)
    assert build(tmp_path / "src", tmp_path / "out") == 0
    skipped = read_manifest(tmp_path / "out")["extra"]["skipped"]
    assert read_manifest(tmp_path / "out")["samples"] == 4 and len(skipped) == 4
    text = "\n".join(skipped)
    for expected in ("000000000999", "000000001000.mat: CLASS_GT holds values 25..25",
                     "000000001001.mat: unreadable .mat", "000000001002: sizes differ"):
        assert expected in text
    assert build(tmp_path / "src", tmp_path / "strict", "--on-error", "raise") == 2
    assert "000000000999" in capsys.readouterr().err  # an incomplete scene stops it before any work
    (tmp_path / "src" / "Scene" / "Sketch" / "paper_version" / SPLIT / "000000000999.png").unlink()
    assert build(tmp_path / "src", tmp_path / "strict", "--on-error", "raise") == 2
    assert ".mat" in capsys.readouterr().err


def test_layout_errors_name_the_path(tmp_path, capsys):
    assert build(tmp_path, tmp_path / "out") == 2
    assert "Scene/GT" in capsys.readouterr().err
    (tmp_path / "Scene" / "GT" / SPLIT).mkdir(parents=True)
    assert build(tmp_path, tmp_path / "out") == 2
    assert "Sketch/paper_version/trainInTrain" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# The paper's test set: the 20% held out = val + valInTrain (the dataset README), one set


def write_split(root: Path, split: str, ids: list[str], seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Complete 32x32 scenes (v5 .mat) in one split folder; returns id -> (sketch, CLASS_GT)."""
    scene_dir = root / "Scene"
    gt, sk = scene_dir / "GT" / split, scene_dir / "Sketch" / "paper_version" / split
    ann = scene_dir / "Annotation" / "paper_version" / split / "CLASS_GT"
    for d in (gt, sk, ann):
        d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for sid in ids:
        sketch, classes, photo = scene(rng, SIZE, SIZE)
        Image.fromarray(photo).save(gt / f"{sid}.png")
        Image.fromarray(sketch).save(sk / f"{sid}.png")
        scipy.io.savemat(ann / f"{sid}.mat", {"CLASS_GT": classes})
        written[sid] = (sketch, classes)
    return written


VAL = ["000000100001", "000000100002"]
VAL_IN_TRAIN = ["000000200001", "000000200002", "000000200003"]


def build_split(root: Path, out: Path, split: str) -> int:
    return main(["sketchycoco", "--root", str(root), "--split", split, "--out", str(out), "--size", str(SIZE),
                 "--samples-per-shard", "2", "--workers", "1"])


def test_test_split_is_val_and_val_in_train_as_one_set(tmp_path):
    root = tmp_path / "src"
    write_tree(root)  # trainInTrain: 4 scenes (and one incomplete)
    sources = {**write_split(root, "val", VAL, 1), **write_split(root, "valInTrain", VAL_IN_TRAIN, 2)}
    folder_of = {**{sid: "val" for sid in VAL}, **{sid: "valInTrain" for sid in VAL_IN_TRAIN}}
    assert build_split(root, tmp_path / "test", "test") == 0
    m = read_manifest(tmp_path / "test")
    assert m["samples"] == 5 and m["extra"]["split"] == "test" and m["extra"]["folders"] == ["valInTrain", "val"]
    assert m["extra"]["skipped"] == []  # trainInTrain's incomplete scene is not part of the test set
    raws = list(wds.WebDataset([str(tmp_path / "test" / s["file"]) for s in m["shards"]], shardshuffle=False))
    assert sorted(r["__key__"] for r in raws) == sorted(VAL + VAL_IN_TRAIN)
    for raw in raws:
        sid = raw["__key__"]
        assert json.loads(raw["json"])["split"] == folder_of[sid]  # each sample keeps its folder
        sketch, classes = sources[sid]
        label = decode_sample(raw, shard="x", num_classes=20, image_size=SIZE)["label"]
        assert np.array_equal(label, np.where(sketch < 128, classes, 0)), sid

    # every way of naming the same folders builds the same shards
    sha = lambda d: [s["sha256"] for s in read_manifest(tmp_path / d)["shards"]]  # noqa: E731
    assert build_split(root, tmp_path / "list", "val,valInTrain") == 0
    assert build_split(root, tmp_path / "reversed", " valInTrain , val") == 0
    assert sha("test") == sha("list") == sha("reversed")
    # train = trainInTrain
    assert build_split(root, tmp_path / "train", "train") == 0
    assert build_split(root, tmp_path / "trainInTrain", SPLIT) == 0
    assert sha("train") == sha("trainInTrain") and read_manifest(tmp_path / "train")["samples"] == 4


def test_an_id_in_two_splits_is_refused_naming_both(tmp_path, capsys):
    root = tmp_path / "src"
    write_split(root, "val", VAL, 1)
    write_split(root, "valInTrain", [VAL[1]], 2)
    assert build_split(root, tmp_path / "out", "test") == 2
    err = capsys.readouterr().err
    assert VAL[1] in err and "valInTrain" in err and "/val/" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_unknown_split_lists_the_choices(tmp_path, capsys):
    write_split(tmp_path / "src", "val", VAL, 1)
    assert build_split(tmp_path / "src", tmp_path / "out", "val,tests") == 2
    err = capsys.readouterr().err
    assert "'tests'" in err and "test" in err and "valInTrain" in err and "Traceback" not in err
