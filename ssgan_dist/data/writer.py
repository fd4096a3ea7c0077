"""Write samples to webdataset shards with a manifest; build the synthetic set.

Every file appears complete or not at all (temp name in the same directory, fsync, rename),
so a crash or a concurrent reader never sees a half-written shard. The manifest is written
last: a directory without one is an unfinished build. Tars carry a fixed mtime, so the
same samples give byte-identical shards (and sha256s) on every machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
from webdataset import TarWriter

from ssgan_dist.data.schema import BACKGROUND_CLASSES, MEMBERS, class_name, encode_sample
from ssgan_dist.data.synthetic import make_scene

MANIFEST = "manifest.json"
FORMAT = "ssgan-dist-shards"
VERSION = 1
Sample = tuple[str, np.ndarray, np.ndarray, np.ndarray, Mapping[str, Any]]  # key, sketch, label, image, meta


class ManifestError(ValueError):
    """A shard directory without a usable manifest; the message names the path."""


@contextmanager
def _atomic(path: Path) -> Iterator[Any]:
    """A binary file object whose contents appear at ``path`` only if the block succeeds."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shards(samples: Iterable[Sample], out_dir: str | os.PathLike, *, name: str = "shard",
                 samples_per_shard: int = 1000, num_classes: int, source: str, resolution: int,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``samples`` in the given order to ``<name>-%06d.tar`` and return the manifest.

    Shards of an earlier build with the same name that this one does not overwrite are
    removed, so a directory never mixes builds. ``extra`` is stored as manifest["extra"]
    (e.g. the generator's settings, for cache checks).
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the old manifest would describe a mixed directory
    pixels = np.zeros(num_classes, np.int64)
    present = np.zeros(num_classes, np.int64)
    shards: list[dict[str, Any]] = []
    it = iter(samples)
    sample = next(it, None)
    while sample is not None:
        path = out / f"{name}-{len(shards):06d}.tar"
        count = 0
        with _atomic(path) as f, TarWriter(f, encoder=False, mtime=0) as tar:
            while sample is not None and count < samples_per_shard:
                key, sketch, label, image, meta = sample
                if label.shape != (resolution, resolution):
                    raise ValueError(f"sample {key}: label is {label.shape}, expected {resolution}x{resolution}")
                counts = np.bincount(label.ravel(), minlength=num_classes)
                if len(counts) > num_classes:
                    raise ValueError(f"sample {key}: class {len(counts) - 1} >= num_classes {num_classes}")
                tar.write(encode_sample(key, sketch, label, image, meta))
                pixels += counts
                present += counts > 0
                count += 1
                sample = next(it, None)
        shards.append({"file": path.name, "samples": count, "sha256": _sha256(path), "bytes": path.stat().st_size})
    if not shards:
        raise ValueError(f"no samples to write to {out}")
    written = {s["file"] for s in shards}
    for stale in out.iterdir():
        if re.fullmatch(rf"{re.escape(name)}-\d{{6}}\.tar", stale.name) and stale.name not in written:
            stale.unlink()
    manifest = {
        "format": FORMAT, "version": VERSION, "source": source, "resolution": resolution,
        "num_classes": num_classes, "members": list(MEMBERS),
        "samples": sum(s["samples"] for s in shards), "shards": shards,
        # pixels: labelled (= stroke) pixels per class, index 0 counts unlabelled pixels;
        # samples: how many samples hold the class.
        "class_histogram": [{"class": c, "name": class_name(c), "pixels": int(pixels[c]), "samples": int(present[c])}
                            for c in range(num_classes)],
        "extra": dict(extra or {}),
    }
    with _atomic(out / MANIFEST) as f:
        f.write(json.dumps(manifest, indent=1).encode())
    return manifest


def read_manifest(shard_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a finished build; ManifestError naming the path otherwise."""
    path = Path(shard_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest (not a shard directory, or its build did not finish)") from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: unreadable manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: not an ssgan-dist shard manifest")
    if manifest.get("version") != VERSION:
        raise ManifestError(f"{path}: manifest version {manifest.get('version')!r}, this code reads {VERSION}")
    for shard in manifest["shards"]:
        file = Path(shard_dir) / shard["file"]
        if not file.is_file() or file.stat().st_size != shard["bytes"]:
            raise ManifestError(f"{path}: shard {file} is missing or not the size the manifest records")
    return manifest


def sample_seed(seed: int, index: int) -> int:
    """Independent per-sample seed: numpy's spawn keys, not seed + index (overlapping streams)."""
    return int(np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1, np.uint64)[0])


def build_synthetic_shards(out_dir: str | os.PathLike, *, count: int, samples_per_shard: int, size: int,
                           seed: int, num_classes: int = 20,
                           background_classes: Sequence[int] = BACKGROUND_CLASSES) -> dict[str, Any]:
    """``count`` synthetic scenes, keys ``syn%09d`` by index, shuffled by ``seed``; the manifest."""
    order = np.random.default_rng(seed).permutation(count)

    def samples() -> Iterator[Sample]:
        for index in order.tolist():
            sketch, label, image, meta = make_scene(sample_seed(seed, index), size, num_classes, background_classes)
            yield f"syn{index:09d}", sketch, label, image, meta

    settings = {"generator": "ssgan_dist.data.synthetic", "seed": seed, "count": count, "size": size,
                "background_classes": list(background_classes)}
    return write_shards(samples(), out_dir, samples_per_shard=samples_per_shard, num_classes=num_classes,
                        source="synthetic", resolution=size, extra=settings)
