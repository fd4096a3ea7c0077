"""The one way files and directories are written: whole or not at all.

Everything ssgan-dist writes that another process may read while it is written (checkpoints,
shards and their index and manifest, FID statistics, Prometheus targets, sample grids,
results) goes through here: a temporary name in the same directory, synced to disk, renamed
over the final name, the directory entry synced too; on any failure, a KeyboardInterrupt
included, the temporary file or directory is removed. A crash therefore leaves the previous
version, never half of a new one. New files get mkstemp's mode 0600 unless a caller asks
for another (``permissions``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def fsync_path(path: Path) -> None:
    """Make a file's contents, or a directory's entries (a rename into it), durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, *, permissions: int | None = None) -> Iterator[Path]:
    """A temporary name beside ``path`` for writers that want a name, not a file object (DALI's
    index tool); what was written there appears at ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if permissions is not None:
            os.chmod(tmp, permissions)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, permissions: int | None = None) -> Iterator[IO[Any]]:
    """A file object (``mode`` "wb" or "w") whose contents appear at ``path`` only if the block succeeds."""
    with atomic_path(path, permissions=permissions) as tmp, open(tmp, mode) as f:
        yield f


def write_bytes(path: str | os.PathLike, data: bytes, *, permissions: int | None = None) -> Path:
    with atomic_write(path, "wb", permissions=permissions) as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, permissions: int | None = None) -> Path:
    with atomic_write(path, "w", permissions=permissions) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, permissions: int | None = None) -> Path:
    """``obj`` as JSON indented by 1."""
    return write_text(path, json.dumps(obj, indent=1), permissions=permissions)


def remove(path: Path) -> None:
    """Remove a file or a directory tree, if there."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike, *, temp: Path | None = None, keep_existing: bool = False) -> Iterator[Path]:
    """A directory that appears at ``path`` whole: filled under a temporary name beside it,
    renamed over ``path`` when the block succeeds, removed when it fails.

    ``temp``: a fixed temporary name (other processes write into it too, e.g. every rank's
    checkpoint shards); a stale one is cleared first. An existing ``path`` is replaced, or,
    with ``keep_existing``, kept and ours discarded (another process finished the same work).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if temp is None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    else:
        tmp = temp
        remove(tmp)
        tmp.mkdir(parents=True)
    try:
        yield tmp
        if not keep_existing:
            remove(path)
        try:
            os.replace(tmp, path)
        except OSError:
            if not (keep_existing and path.exists()):
                raise
            remove(tmp)  # another process finished first: keep theirs
            return
    except BaseException:
        remove(tmp)
        raise
    fsync_path(path.parent)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_WARNED: set[tuple[str, str]] = set()


def check_sha256(path: str | os.PathLike, expected: str, *, official: str, source: str, log: logging.Logger) -> str:
    """The sha256 of a weights file; a warning naming both hashes when it is not ``expected``,
    the hash of the ``official`` file (from ``source``): a converted or fine-tuned copy may be
    meant, so it is used, but its results are not comparable with the official weights'."""
    digest = sha256_file(path)
    if digest != expected and (str(path), digest) not in _WARNED:
        _WARNED.add((str(path), digest))  # once per process: evaluation during training loads it again
        log.warning("%s is not %s: its sha256 is %s, the official file's is %s (%s). Using it as given; results "
                    "are not comparable with those of the official weights.", path, official, digest, expected, source)
    return digest
