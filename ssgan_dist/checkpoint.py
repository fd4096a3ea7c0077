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
import re
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ssgan_dist.distributed.collectives import barrier
from ssgan_dist.distributed.env import DistEnv
from ssgan_dist.errors import SetupError
from ssgan_dist.files import atomic_dir, atomic_write, remove

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
    """torch.save, whole or not at all (files.atomic_write)."""
    with atomic_write(path) as f:
        torch.save(state, f)


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state of a checkpoint file or of a sharded checkpoint directory."""
    path = Path(path)
    return torch.load(path / STATE_FILE if path.is_dir() else path, map_location=map_location, weights_only=True)


class CheckpointManager:
    """Saves, prunes and finds the newest loadable checkpoint of one run directory."""

    def __init__(self, run_dir: Path, keep: int):
        self.run_dir = Path(run_dir)
        self.keep = keep

    def save(self, step: int, state: dict[str, Any], env: DistEnv,
             save_shards: Callable[[Path], None] | None = None) -> Path:
        """Called on every rank; rank 0 writes ``state``. With ``save_shards`` (state sharded
        over ranks) the checkpoint is a directory into which every rank first writes its part."""
        path = checkpoint_path(self.run_dir, step, sharded=save_shards is not None)
        if save_shards is not None:
            tmp = self.run_dir / f".{path.name}.tmp"  # a fixed name: every rank writes into it
            with atomic_dir(path, temp=tmp) if env.is_main else nullcontext(tmp):
                barrier()  # the directory exists before any rank writes into it
                save_shards(tmp)
                barrier()
                if env.is_main:
                    save_atomic(state, tmp / STATE_FILE)
        elif env.is_main:
            save_atomic(state, path)
        if env.is_main:
            for old in list_checkpoints(self.run_dir)[: -self.keep]:
                remove(old)
        barrier()  # nobody reads or prunes a checkpoint another rank is still writing
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

