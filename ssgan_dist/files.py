"""The one way files and directories are written: whole or not at all, with the user's umask.

Everything ssgan-dist writes that another process may read while it is written (checkpoints,
shards and their index and manifest, FID statistics, Prometheus targets, sample grids,
results) goes through here: a temporary name in the same directory, synced to disk, renamed
over the final name, the directory entry synced too; on any failure, a KeyboardInterrupt
included, the temporary file or directory is removed. A crash therefore leaves the previous
version, never half of a new one; a process killed mid-write leaves a temporary named
``.<final name>.<random>.tmp`` (or the caller's fixed ``temp``), which :func:`stale_temps`
finds by that pattern.

Modes: new files get ``0o666 & ~umask`` and directories ``0o777 & ~umask``, as ``open`` and
``mkdir`` would give them (mkstemp's 0600 would hide shards, checkpoints and FID caches from
teammates and evaluation jobs of other accounts on a shared filesystem).

A write that fails (disk full, quota, file size limit, read-only or unwritable directory)
raises :class:`WriteError` naming the path, a SetupError: the user frees space or points the
output elsewhere; no traceback.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from ssgan_dist.errors import SetupError

TEMP_SUFFIX = ".tmp"


class WriteError(SetupError):
    """A file or directory could not be written; the message names the path and the reason."""


def umask() -> int:
    """The process's umask, read without changing it (os.umask sets it, racing other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)  # no /proc: the set-and-restore read, once per write
    os.umask(old)
    return old


def file_mode() -> int:
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def _write_error(exc: OSError, path: Path, tmp: Path | None) -> WriteError | None:
    """``exc`` as a WriteError naming ``path``, if it came from writing there (not from reading
    some other file inside the caller's block)."""
    ours = {str(path), str(path.parent), *((str(tmp),) if tmp is not None else ())}
    if exc.filename is not None and str(exc.filename) not in ours:
        return None
    hint = {errno.ENOSPC: " (disk full)", errno.EDQUOT: " (disk quota exceeded)",
            errno.EFBIG: " (file size limit)", errno.EROFS: " (read-only filesystem)"}.get(exc.errno or 0, "")
    return WriteError(f"cannot write {path}: {exc.strerror or exc}{hint}")


def ensure_dir(path: str | os.PathLike, what: str = "") -> Path:
    """Create ``path`` (and parents) if needed and check a file can be made in it; ``what``
    (e.g. "run.dir") names the setting in the error."""
    path = Path(path)
    label = f"{what}: " if what else ""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=TEMP_SUFFIX, dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise WriteError(f"{label}cannot write into {path}: {exc.strerror or exc}") from None
    return path


def fsync_path(path: Path) -> None:
    """Make a file's contents, or a directory's entries (a rename into it), durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside ``path`` for writers that want a name, not a file object (DALI's
    index tool); what was written there appears at ``path`` only if the block succeeds."""
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, file_mode())
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise (_write_error(exc, path, tmp) or exc) from None
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """A file object (``mode`` "wb" or "w") whose contents appear at ``path`` only if the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as JSON indented by 1."""
    return write_text(path, json.dumps(obj, indent=1))


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> Path:
    """One JSON line appended to ``path`` (a log kept across restarts). A single ``write`` of an
    O_APPEND file: a crash leaves whole lines, at worst a torn last one that readers skip."""
    path = Path(path)
    line = (json.dumps(record, default=str) + "\n").encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # open() applies the umask
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise (_write_error(exc, path, None) or exc) from None
    return path


def remove(path: Path) -> None:
    """Remove a file or a directory tree, if there."""
    if path.is_dir() and not path.is_symlink():
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
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if temp is None:
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
            os.chmod(tmp, dir_mode())
        else:
            tmp = temp
            remove(tmp)
            tmp.mkdir(parents=True)
        yield tmp
        publish_dir(tmp, path, keep_existing=keep_existing)
    except OSError as exc:
        if tmp is not None:
            remove(tmp)
        raise (_write_error(exc, path, tmp) or exc) from None
    except BaseException:
        if tmp is not None:
            remove(tmp)
        raise


def publish_dir(tmp: Path, path: Path, *, keep_existing: bool = False) -> None:
    """Rename the filled temporary directory ``tmp`` over ``path`` (durably), the last move of
    :func:`atomic_dir`; for directories that several processes fill (sharded checkpoints)."""
    if not keep_existing:
        remove(path)
    try:
        os.replace(tmp, path)
    except OSError:
        if not (keep_existing and path.exists()):
            raise
        remove(tmp)  # another process finished first: keep theirs
        return
    fsync_path(path.parent)


def stale_temps(directory: str | os.PathLike, final_names: str) -> list[Path]:
    """Temporaries that killed writes of this module left in ``directory`` for final names
    matching the regex ``final_names``: ``.<name>.<random>.tmp`` files and directories, and
    fixed ``temp`` names of the form ``.<name>.tmp``. Only call when no writer can be running."""
    pattern = re.compile(rf"^\.(?:{final_names})(?:\.[A-Za-z0-9_]+)?{re.escape(TEMP_SUFFIX)}$")
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if pattern.match(p.name))


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
