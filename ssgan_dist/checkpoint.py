"""Atomic checkpoints of everything a run needs to continue exactly.

A checkpoint is ``ckpt-<step>.pt``, written by rank 0 to a temporary file in the run
directory, flushed to disk and renamed over its final name; or, for an engine whose state
is sharded over ranks (DeepSpeed ZeRO), a directory ``ckpt-<step>/`` that every rank fills
in a temporary directory before rank 0 writes ``state.pt`` into it and renames it. Either
way a crash mid-write leaves the previous checkpoints intact; the newest K are kept.
Loading uses ``weights_only=True`` (the state holds only tensors and plain Python values)
and falls back to the previous checkpoint, with a warning, when the newest is unreadable.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ssgan_dist.errors import SetupError

if TYPE_CHECKING:
    from ssgan_dist.distributed.engines import Engine
    from ssgan_dist.distributed.env import DistEnv

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d{9})(\.pt)?$")
STATE_FILE = "state.pt"  # inside a sharded checkpoint directory


class CheckpointMismatch(SetupError):
    """A checkpoint made by a different model configuration."""


def checkpoint_path(run_dir: Path, step: int, sharded: bool = False) -> Path:
    return Path(run_dir) / (f"ckpt-{step:09d}" if sharded else f"ckpt-{step:09d}.pt")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run directory, oldest first (temporary files and dirs are ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """torch.save to a temp file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state of a checkpoint file or of a sharded checkpoint directory."""
    path = Path(path)
    return torch.load(path / STATE_FILE if path.is_dir() else path, map_location=map_location, weights_only=True)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    """Saves, prunes and finds the newest loadable checkpoint of one run directory."""

    def __init__(self, run_dir: Path, keep: int):
        self.run_dir = Path(run_dir)
        self.keep = keep

    def save(self, step: int, state: dict[str, Any], env: "DistEnv", engine: "Engine") -> Path:
        """Called on every rank; rank 0 writes the state, every rank its shards if any."""
        path = checkpoint_path(self.run_dir, step, sharded=engine.sharded)
        if engine.sharded:
            tmp = self.run_dir / f".{path.name}.tmp"
            if env.is_main:
                _remove(tmp)
                tmp.mkdir(parents=True)
            _barrier()
            engine.save_sharded(tmp)
            _barrier()
            if env.is_main:
                save_atomic(state, tmp / STATE_FILE)
                _remove(path)
                os.replace(tmp, path)
                _fsync_dir(self.run_dir)
        elif env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_atomic(state, path)
        if env.is_main:
            for old in list_checkpoints(self.run_dir)[: -self.keep]:
                _remove(old)
        _barrier()  # nobody reads or prunes a checkpoint another rank is still writing
        return path

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that loads; broken ones are skipped with a warning."""
        for path in reversed(list_checkpoints(self.run_dir)):
            try:
                return load(path, map_location), path
            except Exception as exc:  # truncated zip, bad pickle, short read: all mean unusable
                log.warning("checkpoint %s is unreadable (%s: %s); trying the previous one",
                            path, type(exc).__name__, exc)
        return None


def check_task(saved_config: dict[str, Any], task: str, source: Path | str) -> None:
    """Refuse a checkpoint of another run.task (GAN vs segmenter) before its keys are looked up."""
    saved = saved_config.get("run", {}).get("task", "gan")  # written before run.task existed: a GAN's
    if saved != task:
        raise CheckpointMismatch(f"{source} is a checkpoint of run.task={saved}, and this run has run.task={task}; "
                                 "give this run its own run.dir")


def check_compatible(saved: dict[str, Any], expected: dict[str, Any], source: Path | str,
                     prefix: str = "model.") -> None:
    """Refuse a checkpoint whose model settings differ, naming every differing key (``prefix`` + key)."""
    diffs = [
        f"{prefix}{k}: checkpoint {saved.get(k)!r}, config {expected.get(k)!r}"
        for k in sorted(set(saved) | set(expected))
        if saved.get(k) != expected.get(k) and k != "sync_bn"
    ]
    if diffs:
        raise CheckpointMismatch(
            f"{source} was made with another model configuration: " + "; ".join(diffs)
        )
