"""Checkpoints of everything a run needs to continue exactly, and the rules that keep them.

A checkpoint is ``ckpt-<step>.pt``, written by rank 0 through files.atomic_write (temporary
file, fsync, rename); or, for an engine whose state is sharded over ranks (DeepSpeed ZeRO),
a directory ``ckpt-<step>/`` that every rank fills under ``.ckpt-<step>.tmp`` before rank 0
writes ``state.pt`` into it and renames it. Loading uses ``weights_only=True`` (the state
holds only tensors and plain Python values).

What keeps a week-long run's state safe:

* A checkpoint counts only once it reads back: after writing, rank 0 checks every byte
  (the zip's CRCs) and the structure (:func:`read`); only then are older checkpoints
  beyond ``checkpoint.keep`` pruned, and never one at or above the new step. A write that
  fails (disk full, quota, file size limit) or does not read back is an error naming the
  path, on every rank; the previous checkpoints stay.
* At start, rank 0 removes the temporaries of killed writes (ours only, by name,
  files.stale_temps) and looks for the newest checkpoint that reads; each unreadable one on
  the way (truncated, not a zip, a torch file that is not a checkpoint of this project, an
  unknown run.task) is renamed ``<name>.corrupt`` with a warning, so it leaves the keep
  window instead of pushing readable ones out of it. Rank 0 decides and broadcasts the
  path; every rank loads that one.
* A readable checkpoint of another task or model is not corrupt: the run refuses it (the
  run.dir belongs to another run) and touches nothing.
"""

from __future__ import annotations

import logging
import os
import re
import typing
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ssgan_dist.config import RunConfig
from ssgan_dist.distributed.collectives import from_main, gather_to_all
from ssgan_dist.distributed.env import DistEnv
from ssgan_dist.errors import SetupError
from ssgan_dist.files import TEMP_SUFFIX, WriteError, atomic_write, publish_dir, remove, stale_temps

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d{9})(\.pt)?$")
STATE_FILE = "state.pt"  # inside a sharded checkpoint directory
CORRUPT_SUFFIX = ".corrupt"
REQUIRED_KEYS = ("step", "config", "world_size", "ranks")
TASKS = typing.get_args(typing.get_type_hints(RunConfig)["task"])


class CheckpointMismatch(SetupError):
    """A checkpoint made by a different model configuration."""


class CheckpointWriteError(WriteError):
    """A checkpoint that could not be written or does not read back; earlier ones are kept."""


class Unreadable(Exception):
    """Why a file named like a checkpoint cannot be used as one."""


def checkpoint_path(run_dir: Path, step: int, sharded: bool = False) -> Path:
    return Path(run_dir) / (f"ckpt-{step:09d}" if sharded else f"ckpt-{step:09d}.pt")


def step_of(path: Path) -> int:
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not named like a checkpoint (ckpt-<9 digits>[.pt])")
    return int(match.group(1))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run directory by name, oldest first (temporaries and .corrupt ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def _state_file(path: Path) -> Path:
    return path / STATE_FILE if path.is_dir() else path


class _Sink:
    """The file torch.save writes to, keeping the OSError of a failed write: torch reports it
    as a RuntimeError ("unexpected pos ...") that no longer says disk full or which errno."""

    def __init__(self, f: Any):
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """torch.save, whole or not at all (files.atomic_write); a failed write is a WriteError naming ``path``."""
    with atomic_write(path) as f:
        sink = _Sink(f)
        try:
            torch.save(state, sink)
        except RuntimeError:
            if sink.error is None:
                raise
            raise sink.error from None  # files.atomic_write turns it into a WriteError naming the path


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state of a checkpoint file or of a sharded checkpoint directory, unchecked."""
    return torch.load(_state_file(Path(path)), map_location=map_location, weights_only=True)


def read(path: Path, map_location: str | torch.device = "cpu", *, check_bytes: bool = False) -> dict[str, Any]:
    """The state of a checkpoint, or :class:`Unreadable` saying why it is not a usable one.

    ``check_bytes``: also check every byte against the zip's CRCs (a full read; torch.load
    itself does not check them), as done once right after writing.
    """
    path = Path(path)
    file = _state_file(path)
    if not file.is_file():
        raise Unreadable(f"no {STATE_FILE} in the directory" if path.is_dir() else "not a file")
    try:
        if check_bytes:
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip()
            if bad is not None:
                raise Unreadable(f"member {bad} fails its CRC check")
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Unreadable:
        raise
    except Exception as exc:  # a truncated zip, a foreign pickle, a short read: all mean unusable
        raise Unreadable(f"{type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or not all(k in state for k in REQUIRED_KEYS):
        keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise Unreadable(f"a torch file, but not an ssgan-dist checkpoint (needs {', '.join(REQUIRED_KEYS)}; "
                         f"holds {keys})")
    config = state["config"]
    task = config.get("run", {}).get("task", "gan") if isinstance(config, dict) else None
    if task not in TASKS:
        raise Unreadable(f"its config names run.task={task!r}, which this version does not know ({', '.join(TASKS)})")
    if _NAME.match(path.name) and int(state["step"]) != step_of(path):
        raise Unreadable(f"it holds step {state['step']}, but its name says step {step_of(path)}")
    return state


def move_aside(path: Path, reason: str) -> Path:
    """Rename an unusable checkpoint to ``<name>.corrupt`` (``.corrupt.1`` ... if taken), with a warning."""
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    n = 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}.{n}")
    os.replace(path, target)
    log.warning("checkpoint %s is unreadable (%s): moved aside to %s", path, reason, target.name)
    return target


def newest_readable(run_dir: Path, *, move_unreadable: bool,
                    map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint of ``run_dir`` that reads, with its state. Unreadable newer ones
    are moved aside (``move_unreadable``: the run's own directory) or skipped with a warning
    (someone else's, e.g. checkpoint.init_from)."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return read(path, map_location), path
        except Unreadable as exc:
            if move_unreadable:
                move_aside(path, str(exc))
            else:
                log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, exc)
    return None


class CheckpointManager:
    """Saves, verifies and prunes the checkpoints of one run directory; finds the one to resume."""

    def __init__(self, run_dir: Path, keep: int):
        self.run_dir = Path(run_dir)
        self.keep = keep

    # -- at start (rank 0) --------------------------------------------------------------
    def clean_stale_temps(self) -> list[Path]:
        """Remove what killed checkpoint writes left; only when no writer runs (at start)."""
        stale = stale_temps(self.run_dir, r"ckpt-\d{9}(?:\.pt)?")
        for path in stale:
            remove(path)
        if stale:
            log.info("removed %d temporary file(s) of interrupted checkpoint writes: %s", len(stale),
                     ", ".join(p.name for p in stale))
        return stale

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path] | None:
        """The newest readable checkpoint with its state; unreadable newer ones moved aside."""
        return newest_readable(self.run_dir, move_unreadable=True, map_location=map_location)

    # -- saving (every rank) ------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any], env: DistEnv,
             save_shards: Callable[[Path], None] | None = None) -> Path:
        """Called on every rank; rank 0 writes ``state``. With ``save_shards`` (state sharded
        over ranks) the checkpoint is a directory into which every rank first writes its part.
        Returns once the checkpoint is verified and older ones pruned, on every rank alike; a
        failure raises CheckpointWriteError on every rank."""
        path = checkpoint_path(self.run_dir, step, sharded=save_shards is not None)
        if save_shards is None:
            return from_main(lambda: self._write_file(path, state))
        tmp = self.run_dir / f".{path.name}{TEMP_SUFFIX}"  # a fixed name: every rank writes into it
        from_main(lambda: self._fresh_dir(tmp, path))  # made before any rank writes into it
        try:
            save_shards(tmp)
            mine = ""
        except Exception as exc:  # noqa: BLE001 (torch reports a failed write as a RuntimeError): tell every rank
            mine = f"rank {env.rank}: {type(exc).__name__}: {exc}"
        failures = [f for f in gather_to_all(mine) if f]
        if failures:
            if env.is_main:
                remove(tmp)
            raise CheckpointWriteError(f"cannot write checkpoint {path}: {'; '.join(failures)}{self._kept()}")
        return from_main(lambda: self._finish_dir(tmp, path, state))

    def _fresh_dir(self, tmp: Path, path: Path) -> None:
        try:
            remove(tmp)
            tmp.mkdir(parents=True)
        except OSError as exc:
            raise CheckpointWriteError(f"cannot write checkpoint {path}: {exc.strerror or exc}{self._kept()}") from None

    def _write_file(self, path: Path, state: dict[str, Any]) -> Path:
        try:
            save_atomic(state, path)
        except WriteError as exc:
            raise CheckpointWriteError(f"{exc}{self._kept()}") from None
        return self._verify_and_prune(path)

    def _finish_dir(self, tmp: Path, path: Path, state: dict[str, Any]) -> Path:
        try:
            save_atomic(state, tmp / STATE_FILE)
            publish_dir(tmp, path)
        except (OSError, WriteError) as exc:
            remove(tmp)
            raise CheckpointWriteError(f"cannot write checkpoint {path}: {exc}{self._kept()}") from None
        return self._verify_and_prune(path)

    def _verify_and_prune(self, path: Path) -> Path:
        """Read the new checkpoint back; only then drop checkpoints older than it beyond the keep window."""
        try:
            read(path, map_location="cpu", check_bytes=True)
        except Unreadable as exc:
            aside = move_aside(path, str(exc))
            raise CheckpointWriteError(f"checkpoint {path} was written but does not read back ({exc}); kept as "
                                       f"{aside.name} for inspection{self._kept()}") from None
        older = [p for p in list_checkpoints(self.run_dir) if step_of(p) < step_of(path)]
        for old in older[: max(len(older) - (self.keep - 1), 0)]:
            remove(old)
        return path

    def _kept(self) -> str:
        previous = list_checkpoints(self.run_dir)
        return f"; the previous checkpoint {previous[-1]} is kept" if previous else "; no earlier checkpoint exists"


def check_task(saved_config: dict[str, Any], task: str, source: Path | str) -> None:
    """Refuse a checkpoint of another run.task (GAN vs segmenter) before its keys are looked up."""
    saved = saved_config.get("run", {}).get("task", "gan")  # written before run.task existed: a GAN's
    if saved != task:
        raise CheckpointMismatch(f"{source} is a checkpoint of run.task={saved}, and this run has run.task={task}; "
                                 "give this run its own run.dir")


def check_compatible(saved: dict[str, Any], expected: dict[str, Any], source: Path | str) -> None:
    """Refuse a checkpoint whose signature (a task's dotted settings, see tasks) differs from
    this run's, naming every differing key."""
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, config {expected.get(k)!r}"
        for k in sorted(set(saved) | set(expected))
        if saved.get(k) != expected.get(k)
    ]
    if diffs:
        raise CheckpointMismatch(
            f"{source} was made with another model configuration: " + "; ".join(diffs)
        )
