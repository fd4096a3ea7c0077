"""Before the first batch: does the shard set fit the model, and does it hold anything usable?

* The manifest (``writer.read_manifest``) of every directory the shards lie in: its
  resolution must be model.image_size and the classes its histogram counts must be below
  model.num_classes, or the run stops at once naming data.shards, the manifest and both
  values. A directory without one is said at INFO; the per-sample checks then decide.
* The shards in order until one sample passes ``decode_sample``: at once for a good set;
  a set without one usable sample stops after one pass with ``NoUsableSample``, the reasons
  summed up by kind (in ``data.on_error=raise`` the first bad sample stops it, as it would
  in training). The loaders keep their own guard for data that goes bad later.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ssgan_dist.data.schema import BadSample, decode_sample
from ssgan_dist.data.shards import iter_tar
from ssgan_dist.data.skips import NoUsableSample, Tally, hints
from ssgan_dist.data.writer import MANIFEST, ManifestError, read_manifest
from ssgan_dist.errors import SetupError
from ssgan_dist.labels import class_name

log = logging.getLogger(__name__)


def check_manifests(spec: str, shards: list[str], *, image_size: int, num_classes: int) -> None:
    """The manifests of the shards' directories against the model (see the module doc)."""
    for directory in sorted({Path(p).parent for p in shards}):
        if not (directory / MANIFEST).is_file():
            log.info("data.shards: no %s in %s: the samples' sizes and classes are checked one by one as they are read",
                     MANIFEST, directory)
            continue
        try:
            manifest = read_manifest(directory, check_files=False)
        except ManifestError as exc:
            log.warning("data.shards: %s; the samples are checked one by one as they are read", exc)
            continue
        where = f"data.shards={spec}: {directory / MANIFEST}"
        if manifest.get("resolution") != image_size:
            raise SetupError(f"{where} records shards of {manifest.get('resolution')} px, but model.image_size is "
                             f"{image_size}: set model.image_size={manifest.get('resolution')} or build shards of "
                             f"{image_size} px (python -m ssgan_dist.data.build ... --resolution {image_size})")
        present = [h for h in manifest.get("class_histogram", []) if h.get("samples") and h.get("class")]
        top = max(present, key=lambda h: h["class"], default=None)
        if top is not None and top["class"] >= num_classes:
            raise SetupError(f"{where} records {top['samples']} samples holding class {top['class']} "
                             f"({class_name(top['class'])}) in its class_histogram, but model.num_classes is "
                             f"{num_classes} (classes 0..{num_classes - 1}): set model.num_classes={top['class'] + 1} "
                             "or more, or rebuild the shards with fewer classes")


def first_usable(spec: str, shards: list[str], *, image_size: int, num_classes: int, on_error: str) -> None:
    """Return at the first usable sample of ``shards``; NoUsableSample after a pass without one."""
    tally = Tally()
    for n, path in enumerate(shards):
        name = os.path.basename(path)
        samples = 0
        try:
            for raw in iter_tar(path):
                samples += 1
                try:
                    decode_sample(raw, shard=name, num_classes=num_classes, image_size=image_size)
                    return
                except BadSample as bad:
                    if on_error == "raise":
                        raise
                    tally.add(bad)
            if not samples:
                tally.add(BadSample(name, "<tar>", "the tar holds no sample", "empty"))
        except BadSample as bad:
            if on_error == "raise":
                raise
            tally.add(bad)
        if n == 0 and len(shards) > 1:
            log.warning("data.shards: no usable sample in %s (%s); looking through the other %d shards before "
                        "training", name, "; ".join(tally.lines(hints(image_size, num_classes))), len(shards) - 1)
    raise NoUsableSample.after(f"the {len(shards)} shards of data.shards={spec}", tally,
                               hints(image_size, num_classes))


def preflight(spec: str, shards: list[str], *, image_size: int, num_classes: int, on_error: str) -> None:
    """Both checks, the cheap one first."""
    check_manifests(spec, shards, image_size=image_size, num_classes=num_classes)
    first_usable(spec, shards, image_size=image_size, num_classes=num_classes, on_error=on_error)
