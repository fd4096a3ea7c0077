"""The folder and synthetic builders round-trip; ``verify`` finds every planted problem."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from badsamples import BAD_KEY, KINDS, write_bad_shards
from ssgan_dist.data.build import main
from ssgan_dist.data.schema import decode_sample
from ssgan_dist.data.synthetic import make_scene
from ssgan_dist.data.tarindex import index_path, read_index, scan_tar, write_index
from ssgan_dist.data.verify import verify
from ssgan_dist.data.writer import build_synthetic_shards, read_manifest

SIZE = 32


def write_folder(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Four complete stems (label as grey or palette PNG, photos as JPEG or PNG), one stem
    without a photo and one with an RGB label."""
    for part in ("sketch", "label", "image"):
        (root / part).mkdir(parents=True)
    scenes = {}
    for i, stem in enumerate(["a0", "b1", "c2", "d3"]):
        sketch, label, image, _ = make_scene(i, SIZE)
        Image.fromarray(sketch).save(root / "sketch" / f"{stem}.png")
        label_img = Image.fromarray(label)
        if i % 2:
            label_img = label_img.convert("P")  # palette indices = class ids
            label_img.putpalette(sum(([c, c, c] for c in range(256)), []))
        label_img.save(root / "label" / f"{stem}.png")
        Image.fromarray(image).save(root / "image" / (f"{stem}.jpg" if i % 2 else f"{stem}.png"), quality=98)
        scenes[stem] = (sketch, label, image)
    sketch, label, image, _ = make_scene(9, SIZE)
    Image.fromarray(sketch).save(root / "sketch" / "lonely.png")
    Image.fromarray(label).save(root / "label" / "lonely.png")
    Image.fromarray(sketch).save(root / "sketch" / "rgblabel.png")
    Image.fromarray(np.stack([label] * 3, -1)).save(root / "label" / "rgblabel.png")
    Image.fromarray(image).save(root / "image" / "rgblabel.png")
    return scenes


def folder_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["folder", "--sketch", str(root / "sketch"), "--label", str(root / "label"), "--image", str(root / "image"),
            "--out", str(out), "--size", str(SIZE), "--workers", "1", *extra]


def test_folder_round_trip_and_missing_parts(tmp_path):
    scenes = write_folder(tmp_path / "src")
    assert main(folder_args(tmp_path / "src", tmp_path / "out", "--samples-per-shard", "3")) == 0
    m = read_manifest(tmp_path / "out")
    assert m["source"] == "folder" and m["samples"] == 4
    skipped = "\n".join(m["extra"]["skipped"])
    assert "stem 'lonely': no image file (found " in skipped and "lonely.png" in skipped
    assert "rgblabel.png: label is a PNG image of mode RGB" in skipped
    raws = list(wds.WebDataset([str(tmp_path / "out" / s["file"]) for s in m["shards"]], shardshuffle=False))
    assert sorted(r["__key__"] for r in raws) == sorted(scenes)
    for raw in raws:
        sample = decode_sample(raw, shard="x", num_classes=20, image_size=SIZE)
        sketch, label, image = scenes[raw["__key__"]]
        assert np.array_equal(sample["label"], label)
        assert np.array_equal(sample["sketch"], sketch)
        assert np.abs(sample["image"].astype(float) - image).mean() < 6  # up to two JPEG generations of a scene
    assert verify(tmp_path / "out").ok


def test_folder_raise_mode_and_class_check(tmp_path, capsys):
    write_folder(tmp_path / "src")
    assert main(folder_args(tmp_path / "src", tmp_path / "out", "--on-error", "raise")) == 2
    assert "lonely" in capsys.readouterr().err
    assert main(folder_args(tmp_path / "src", tmp_path / "few", "--num-classes", "19")) == 0
    m = read_manifest(tmp_path / "few")
    assert "a0.png: holds class 19, but --num-classes is 19" in "\n".join(m["extra"]["skipped"])
    assert m["num_classes"] == 19 and 0 < m["samples"] < 4
    assert main(folder_args(tmp_path / "src", tmp_path / "none", "--num-classes", "2")) == 2
    assert "no usable samples" in capsys.readouterr().err


def test_synthetic_command_matches_the_library_and_verifies(tmp_path):
    assert main(["synthetic", "--count", "6", "--out", str(tmp_path / "cli"), "--size", str(SIZE), "--seed", "2",
                 "--samples-per-shard", "4", "--workers", "2"]) == 0
    lib = build_synthetic_shards(tmp_path / "lib", count=6, samples_per_shard=4, size=SIZE, seed=2)
    assert [s["sha256"] for s in read_manifest(tmp_path / "cli")["shards"]] == [s["sha256"] for s in lib["shards"]]
    assert main(["verify", str(tmp_path / "cli"), "--workers", "2"]) == 0


def test_index_is_written_in_dalis_format_with_or_without_dali(tmp_path, monkeypatch):
    build_synthetic_shards(tmp_path, count=5, samples_per_shard=5, size=SIZE, seed=0)
    tar = tmp_path / "shard-000000.tar"
    monkeypatch.setitem(sys.modules, "wds2idx", None)  # as on a machine without DALI
    ours = write_index(tar).read_text()
    assert read_index(index_path(tar)) == scan_tar(tar) and ours.startswith("v1.2 5\n")
    monkeypatch.undo()
    pytest.importorskip("wds2idx")
    assert write_index(tar).read_text() == ours  # DALI's own wds2idx writes the same bytes


@pytest.mark.parametrize("kind", KINDS)
def test_verify_finds_each_kind_of_bad_sample(tmp_path, kind, capsys):
    shard = write_bad_shards(tmp_path, kind)
    report = verify(tmp_path)
    assert report.samples == 4 and report.problems == [] and len(report.bad) == 1
    assert BAD_KEY in report.bad[0] and shard in report.bad[0]
    assert main(["verify", str(tmp_path), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert f"BAD bad sample '{BAD_KEY}' in shard {shard}" in out and "1 bad" in out


def test_verify_checks_the_manifest_index_and_tars(tmp_path, capsys):
    build_synthetic_shards(tmp_path, count=6, samples_per_shard=2, size=SIZE, seed=0)
    assert verify(tmp_path).ok
    (tmp_path / "shard-000001.tar").unlink()
    (tmp_path / "other-000000.tar").write_bytes((tmp_path / "shard-000000.tar").read_bytes())
    index_path(tmp_path / "shard-000000.tar").unlink()
    problems = "\n".join(verify(tmp_path).problems)
    assert "shard-000001.tar: listed in the manifest but missing" in problems
    assert "other-000000.tar: not listed in the manifest" in problems
    assert "shard-000000.tar: DALI index shard-000000.idx is missing" in problems
    assert "4 samples in the listed shards, the manifest records 6" in problems
    truncated = tmp_path / "shard-000002.tar"
    truncated.write_bytes(truncated.read_bytes()[:1500])
    report = verify(tmp_path)
    assert any("shard-000002.tar" in b and "unreadable tar" in b for b in report.bad)
    assert any("shard-000002.tar: sha256 differs" in p for p in report.problems)
    assert main(["verify", str(tmp_path)]) == 1
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    assert main(["verify", str(tmp_path)]) == 2  # no usable manifest and no --size/--num-classes
    assert "without a manifest" in capsys.readouterr().err
    assert main(["verify", str(tmp_path), "--size", str(SIZE), "--num-classes", "20"]) == 1


def test_the_module_command_runs_from_anywhere(tmp_path):
    """``python -m ssgan_dist.data.build`` (exit status: 0 ok, 1 problems), its --help named as typed."""
    write_bad_shards(tmp_path, "class")
    run = subprocess.run([sys.executable, "-m", "ssgan_dist.data.build", "verify", str(tmp_path), "--workers", "1"],
                         capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 1 and f"BAD bad sample '{BAD_KEY}'" in run.stdout, run.stderr
    usage = subprocess.run([sys.executable, "-m", "ssgan_dist.data.build", "--help"], capture_output=True, text=True,
                           cwd=tmp_path, env={"PATH": "/usr/bin:/bin"}).stdout
    assert usage.startswith("usage: python -m ssgan_dist.data.build ")
