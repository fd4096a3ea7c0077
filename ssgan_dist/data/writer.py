"""Write samples to webdataset shards with a manifest; build the synthetic set.

Every file appears complete or not at all (temp name in the same directory, fsync, rename),
so a crash or a concurrent reader never sees a half-written shard. Each tar gets DALI's
index file beside it. The manifest is written last: a directory without one is an
unfinished build. Tars carry a fixed mtime, so the same samples give byte-identical shards
(and sha256s) on every machine.

Encoding (PNG/JPEG compression) is most of a build's CPU time, so ``parallel_encode`` runs
it in a process pool while one writer appends the results in order: the shards do not
depend on the number of workers.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
from webdataset import TarWriter

from ssgan_dist.data.schema import MEMBERS, encode_sample
from ssgan_dist.data.synthetic import make_scene
from ssgan_dist.data.tarindex import index_path, write_index
from ssgan_dist.errors import SetupError
from ssgan_dist.files import atomic_write, sha256_file, write_json
from ssgan_dist.labels import BACKGROUND_CLASSES, class_name
from ssgan_dist.shell import Progress

MANIFEST = "manifest.json"
FORMAT = "ssgan-dist-shards"
VERSION = 1
Sample = tuple[str, np.ndarray, np.ndarray, np.ndarray, Mapping[str, Any]]  # key, sketch, label, image, meta
Item = TypeVar("Item")


class ManifestError(SetupError):
    """A shard directory without a usable manifest; the message names the path."""


class BadSource(SetupError):
    """A source sample that cannot be written (missing file, bad label, ...); the message
    names its files or key. Builders skip and report it, or stop, as asked."""


@dataclass
class Encoded:
    """One sample's tar members and its label's pixel count per class (for the manifest)."""

    members: dict[str, Any]
    counts: np.ndarray


def encode(sample: Sample, *, num_classes: int, resolution: int) -> Encoded:
    """Check and compress one sample; BadSource naming its key if it cannot be written."""
    key, sketch, label, image, meta = sample
    if label.shape != (resolution, resolution):
        raise BadSource(f"sample {key}: label is {label.shape}, expected {resolution}x{resolution}")
    counts = np.bincount(label.ravel(), minlength=num_classes)
    if len(counts) > num_classes:
        raise BadSource(f"sample {key}: class {len(counts) - 1} >= num_classes {num_classes}")
    try:
        return Encoded(encode_sample(key, sketch, label, image, meta), counts)
    except ValueError as exc:
        raise BadSource(str(exc)) from exc


def _load_and_encode(load: Callable[[Any], Sample], num_classes: int, resolution: int,
                     item: Any) -> Encoded | BadSource:
    try:
        return encode(load(item), num_classes=num_classes, resolution=resolution)
    except BadSource as bad:  # returned, not raised: the caller decides to skip or stop
        return bad


@contextmanager
def ordered_map(job: Callable[[Item], Any], items: Iterable[Item], workers: int) -> Iterator[Iterator[Any]]:
    """``map(job, items)`` in order, over ``workers`` processes (in this process when
    workers <= 1); ``job`` must pickle (a module-level function or a partial of one). A
    context, so that the pool forks before a progress bar starts its monitor thread."""
    if workers <= 1:
        yield map(job, items)
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        yield pool.imap(job, items, chunksize=4)


def parallel_encode(load: Callable[[Item], Sample], items: Sequence[Item], *, workers: int, num_classes: int,
                    resolution: int, desc: str = "encoding") -> Iterator[Encoded | BadSource]:
    """``encode(load(item))`` for every item, in item order, over ``workers`` processes,
    with a progress bar on a terminal; bad items come back as BadSource."""
    job = partial(_load_and_encode, load, num_classes, resolution)
    with ordered_map(job, items, workers) as results, \
            Progress(desc, len(items), unit="sample") as progress:
        for result in results:
            progress.update()
            yield result


def write_shards(samples: Iterable[Sample], out_dir: str | os.PathLike, *, name: str = "shard",
                 samples_per_shard: int = 1000, num_classes: int, source: str, resolution: int,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``samples`` in the given order to ``<name>-%06d.tar``; the manifest. A sample
    that cannot be written stops the build with BadSource naming it."""
    encoded = (encode(s, num_classes=num_classes, resolution=resolution) for s in samples)
    return write_encoded(encoded, out_dir, name=name, samples_per_shard=samples_per_shard, num_classes=num_classes,
                         source=source, resolution=resolution, extra=extra)


def write_encoded(encoded: Iterable[Encoded], out_dir: str | os.PathLike, *, name: str = "shard",
                  samples_per_shard: int = 1000, num_classes: int, source: str, resolution: int,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write encoded samples in the given order to ``<name>-%06d.tar`` (+ ``.idx``) and
    return the manifest.

    Shards of an earlier build with the same name that this one does not overwrite are
    removed, so a directory never mixes builds. ``extra`` is stored as manifest["extra"]
    (e.g. the generator's settings, for cache checks) once every sample is written.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the old manifest would describe a mixed directory
    pixels = np.zeros(num_classes, np.int64)
    present = np.zeros(num_classes, np.int64)
    shards: list[dict[str, Any]] = []
    it = iter(encoded)
    sample = next(it, None)
    while sample is not None:
        path = out / f"{name}-{len(shards):06d}.tar"
        count = 0
        with atomic_write(path) as f, TarWriter(f, encoder=False, mtime=0) as tar:
            while sample is not None and count < samples_per_shard:
                tar.write(sample.members)
                pixels += sample.counts
                present += sample.counts > 0
                count += 1
                sample = next(it, None)
        shards.append({"file": path.name, "samples": count, "sha256": sha256_file(path), "bytes": path.stat().st_size,
                       "index": write_index(path).name})
    if not shards:
        raise ValueError(f"no samples to write to {out}")
    written = {s["file"] for s in shards}
    for stale in out.iterdir():
        if re.fullmatch(rf"{re.escape(name)}-\d{{6}}\.tar", stale.name) and stale.name not in written:
            stale.unlink()
            index_path(stale).unlink(missing_ok=True)
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
    write_json(out / MANIFEST, manifest)
    return manifest


def read_manifest(shard_dir: str | os.PathLike, *, check_files: bool = True) -> dict[str, Any]:
    """The manifest of a finished build; ManifestError naming the path otherwise.
    ``check_files=False`` skips the check that every shard exists with its recorded size
    (``verify`` checks those itself, reporting every problem instead of the first)."""
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
    for shard in manifest["shards"] if check_files else ():
        file = Path(shard_dir) / shard["file"]
        if not file.is_file() or file.stat().st_size != shard["bytes"]:
            raise ManifestError(f"{path}: shard {file} is missing or not the size the manifest records")
    return manifest


def sample_seed(seed: int, index: int) -> int:
    """Independent per-sample seed: numpy's spawn keys, not seed + index (overlapping streams)."""
    return int(np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1, np.uint64)[0])


def _synthetic_sample(seed: int, size: int, num_classes: int, background_classes: Sequence[int], index: int) -> Sample:
    sketch, label, image, meta = make_scene(sample_seed(seed, index), size, num_classes, background_classes)
    return f"syn{index:09d}", sketch, label, image, meta


def build_synthetic_shards(out_dir: str | os.PathLike, *, count: int, samples_per_shard: int, size: int,
                           seed: int, num_classes: int = 20,
                           background_classes: Sequence[int] = BACKGROUND_CLASSES, workers: int = 0) -> dict[str, Any]:
    """``count`` synthetic scenes, keys ``syn%09d`` by index, shuffled by ``seed``; the manifest."""
    order = np.random.default_rng(seed).permutation(count).tolist()
    load = partial(_synthetic_sample, seed, size, num_classes, tuple(background_classes))

    def samples() -> Iterator[Encoded]:
        for result in parallel_encode(load, order, workers=workers, num_classes=num_classes, resolution=size,
                                      desc="synthetic"):
            if isinstance(result, BadSource):
                raise result  # the generator's own output: a bug, never a skip
            yield result

    settings = {"generator": "ssgan_dist.data.synthetic", "seed": seed, "count": count, "size": size,
                "background_classes": list(background_classes)}
    return write_encoded(samples(), out_dir, samples_per_shard=samples_per_shard, num_classes=num_classes,
                         source="synthetic", resolution=size, extra=settings)
