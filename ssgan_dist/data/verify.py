"""Check a shard directory end to end before a long run finds its problems for it.

Every sample of every shard goes through ``decode_sample`` (the loaders' own check), so
whatever a loader would skip or stop on is listed here with shard and key (keys that are
not plain relative names included). Against the manifest: each shard's sha256 and sample
count, the totals and the class histogram; tars the manifest does not list; and each DALI
index, which must describe its tar as it is, member by member (the loaders read by it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ssgan_dist.data.schema import BadSample, decode_sample
from ssgan_dist.data.shards import iter_tar
from ssgan_dist.data.tarindex import fresh_index, index_path, scan_tar
from ssgan_dist.data.writer import ManifestError, ordered_map, read_manifest
from ssgan_dist.shell import Progress


@dataclass
class ShardCheck:
    """What one shard holds: its good-sample count and histogram, and what is wrong."""

    file: str
    sha256: str
    keys: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)  # bad samples, "bad sample 'k' in shard s: reason"
    pixels: np.ndarray | None = None
    present: np.ndarray | None = None
    index_ok: bool = False  # a DALI index that lists the tar's members as its headers do


def check_shard(path: Path, num_classes: int, image_size: int) -> ShardCheck:
    data = path.read_bytes()
    check = ShardCheck(path.name, hashlib.sha256(data).hexdigest(),
                       pixels=np.zeros(num_classes, np.int64), present=np.zeros(num_classes, np.int64))
    try:
        raws = list(iter_tar(str(path), data, use_index=False))
    except BadSample as bad:
        check.bad.append(str(bad))
        return check
    for raw in raws:
        check.keys.append(raw["__key__"])
        try:
            label = decode_sample(raw, shard=path.name, num_classes=num_classes, image_size=image_size)["label"]
        except BadSample as bad:
            check.bad.append(str(bad))
            continue
        counts = np.bincount(label.ravel(), minlength=num_classes)
        check.pixels += counts
        check.present += counts > 0
    index = fresh_index(path, data)
    check.index_ok = index is not None and index == scan_tar(path)
    return check


@dataclass
class Report:
    samples: int = 0
    bad: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.bad or self.problems)


def _histogram_problem(manifest: dict[str, Any], checks: list[ShardCheck], num_classes: int) -> str | None:
    pixels = sum((c.pixels for c in checks), np.zeros(num_classes, np.int64))
    present = sum((c.present for c in checks), np.zeros(num_classes, np.int64))
    recorded = manifest.get("class_histogram", [])
    if [h["pixels"] for h in recorded] == pixels.tolist() and [h["samples"] for h in recorded] == present.tolist():
        return None
    return "class histogram of the decoded labels differs from the manifest's"


def verify(shard_dir: str | Path, *, workers: int = 1, num_classes: int | None = None,
           image_size: int | None = None) -> Report:
    """Check a shard directory; ``num_classes``/``image_size`` are needed only when it has no
    readable manifest (they come from the manifest otherwise)."""
    root = Path(shard_dir)
    report = Report()
    try:
        manifest: dict[str, Any] | None = read_manifest(root, check_files=False)
    except ManifestError as exc:
        report.problems.append(str(exc))
        manifest = None
    if manifest is not None:
        num_classes, image_size = int(manifest["num_classes"]), int(manifest["resolution"])
        listed = {s["file"]: s for s in manifest["shards"]}
    else:
        listed = {}
    if num_classes is None or image_size is None:
        raise ManifestError(f"{root}: without a manifest, give the number of classes and the image size to check against")
    tars = sorted(p.name for p in root.glob("*.tar"))
    report.problems += [f"{name}: listed in the manifest but missing" for name in listed if name not in tars]
    if manifest is not None:
        report.problems += [f"{name}: not listed in the manifest (from another build?)" for name in tars if name not in listed]
    job = partial(check_shard, num_classes=num_classes, image_size=image_size)
    paths = [root / name for name in tars]
    checks: list[ShardCheck] = []
    with ordered_map(job, paths, workers) as results, Progress("verify", len(paths), unit="shard") as progress:
        for check in results:
            checks.append(check)
            progress.update()
    for check in checks:
        report.samples += len(check.keys)
        report.bad += check.bad
        entry = listed.get(check.file)
        if entry is None:
            continue
        if check.sha256 != entry["sha256"]:
            report.problems.append(f"{check.file}: sha256 differs from the manifest (changed after the build)")
        if len(check.keys) != entry["samples"]:
            report.problems.append(f"{check.file}: {len(check.keys)} samples, the manifest records {entry['samples']}")
        if "index" in entry and not check.index_ok:
            state = "missing" if not index_path(root / check.file).exists() else "out of date"
            report.problems.append(f"{check.file}: DALI index {entry['index']} is {state} "
                                   f"(rebuild it with: wds2idx {check.file} {entry['index']})")
    if manifest is not None:
        mine = [c for c in checks if c.file in listed]
        found = sum(len(c.keys) for c in mine)
        if found != manifest["samples"]:
            report.problems.append(f"{found} samples in the listed shards, the manifest records {manifest['samples']}")
        elif not report.bad and (problem := _histogram_problem(manifest, mine, num_classes)):
            report.problems.append(problem)  # with bad samples the sums differ anyway
    return report
