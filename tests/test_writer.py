"""Shard writing: real tars, manifest contents, atomicity, determinism."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import webdataset as wds

from ssgan_dist.data.schema import decode_sample
from ssgan_dist.data.synthetic import make_scene
from ssgan_dist.data.writer import (ManifestError, build_synthetic_shards, read_manifest, sample_seed,
                                    write_shards)

SIZE = 32


def _read_all(out, manifest) -> list[dict]:
    urls = [str(out / s["file"]) for s in manifest["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False))


def test_synthetic_build_manifest_matches_data(tmp_path):
    m = build_synthetic_shards(tmp_path, count=10, samples_per_shard=4, size=SIZE, seed=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # no temp files; DALI's index beside each tar
        "manifest.json", "shard-000000.idx", "shard-000000.tar", "shard-000001.idx", "shard-000001.tar",
        "shard-000002.idx", "shard-000002.tar"]
    assert read_manifest(tmp_path) == m == json.loads((tmp_path / "manifest.json").read_text())
    assert (m["format"], m["version"], m["source"], m["resolution"], m["num_classes"]) == (
        "ssgan-dist-shards", 1, "synthetic", SIZE, 20)
    assert m["extra"]["seed"] == 5 and m["extra"]["count"] == 10
    assert m["samples"] == 10 and [s["samples"] for s in m["shards"]] == [4, 4, 2]
    for s in m["shards"]:
        data = (tmp_path / s["file"]).read_bytes()
        assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()

    raws = _read_all(tmp_path, m)
    keys = [r["__key__"] for r in raws]
    assert keys == [f"syn{i:09d}" for i in np.random.default_rng(5).permutation(10)]
    assert keys != sorted(keys)
    pixels, present = np.zeros(20, int), np.zeros(20, int)
    for raw in raws:
        out = decode_sample(raw, shard="x", num_classes=20, image_size=SIZE)
        counts = np.bincount(out["label"].ravel(), minlength=20)
        pixels += counts
        present += counts > 0
        index = int(raw["__key__"][3:])
        _, label, _, meta = make_scene(sample_seed(5, index), SIZE)
        assert np.array_equal(out["label"], label)
        assert json.loads(raw["json"]) == meta
    hist = m["class_histogram"]
    assert [h["class"] for h in hist] == list(range(20)) and hist[18]["name"] == "sky"
    assert [h["pixels"] for h in hist] == pixels.tolist()
    assert [h["samples"] for h in hist] == present.tolist()


def test_build_is_reproducible(tmp_path):
    a = build_synthetic_shards(tmp_path / "a", count=3, samples_per_shard=2, size=SIZE, seed=1)
    b = build_synthetic_shards(tmp_path / "b", count=3, samples_per_shard=2, size=SIZE, seed=1)
    c = build_synthetic_shards(tmp_path / "c", count=3, samples_per_shard=2, size=SIZE, seed=2)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert [s["sha256"] for s in a["shards"]] != [s["sha256"] for s in c["shards"]]


def _samples(n: int, bad_at: int = -1):
    for i in range(n):
        sketch, label, image, meta = make_scene(i, SIZE)
        if i == bad_at:
            label = np.full_like(label, 30)
        yield f"k{i:03d}", sketch, label, image, meta


def test_write_keeps_order_and_name(tmp_path):
    m = write_shards(_samples(5), tmp_path, name="train", samples_per_shard=3, num_classes=20,
                     source="test", resolution=SIZE)
    assert [s["file"] for s in m["shards"]] == ["train-000000.tar", "train-000001.tar"]
    assert [r["__key__"] for r in _read_all(tmp_path, m)] == [f"k{i:03d}" for i in range(5)]
    assert m["source"] == "test" and m["extra"] == {}


def test_failed_write_leaves_no_temp_file_and_no_manifest(tmp_path):
    with pytest.raises(ValueError, match="k004: class 30 >= num_classes 20"):
        write_shards(_samples(6, bad_at=4), tmp_path, samples_per_shard=3, num_classes=20,
                     source="test", resolution=SIZE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.idx", "shard-000000.tar"]  # the complete one
    with pytest.raises(ManifestError, match="no manifest"):
        read_manifest(tmp_path)


def test_rewrite_removes_stale_shards(tmp_path):
    build_synthetic_shards(tmp_path, count=6, samples_per_shard=2, size=SIZE, seed=0)
    (tmp_path / "other-000009.tar").write_bytes(b"")  # another name: left alone
    m = build_synthetic_shards(tmp_path, count=2, samples_per_shard=2, size=SIZE, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json", "other-000009.tar", "shard-000000.idx", "shard-000000.tar"]
    assert m["samples"] == 2


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no samples"):
        write_shards([], tmp_path, num_classes=20, source="t", resolution=SIZE)
    with pytest.raises(ValueError, match="expected 64x64"):
        write_shards(_samples(1), tmp_path, num_classes=20, source="t", resolution=64)


def test_read_manifest_errors_name_the_path(tmp_path):
    path = tmp_path / "manifest.json"
    with pytest.raises(ManifestError, match=str(path)):
        read_manifest(tmp_path)
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="unreadable"):
        read_manifest(tmp_path)
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ManifestError, match="not an ssgan-dist"):
        read_manifest(tmp_path)
    build_synthetic_shards(tmp_path, count=2, samples_per_shard=1, size=SIZE, seed=0)
    (tmp_path / "shard-000001.tar").unlink()
    with pytest.raises(ManifestError, match="shard-000001.tar"):
        read_manifest(tmp_path)
