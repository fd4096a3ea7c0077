"""Training scalars where GAN users look for them: a JSONL file always, TensorBoard when installed.

``run.dir/scalars.jsonl`` holds one JSON object per logged step (train.log_every) with flat
keys named like the TensorBoard tags, e.g. ``{"step": 120, "time": 1764495000.1,
"loss/g_total": 3.21, "lr/G": 0.0002, "perf/img_per_s": 41.5}``, plus ``eval/fid``,
``eval/ssim`` on the steps that evaluate (a step that evaluates without logging gets a line
of its own); ``pandas.read_json(path, lines=True)`` reads it as a table, as stylegan2-ada's
``stats.jsonl``. With ``train.tensorboard`` and the ``tensorboard`` package,
``run.dir/tb`` holds the same scalars and every sample grid (``tensorboard --logdir
run.dir/tb``, or the runs' parent directory to compare runs).

Rank 0 writes; the other ranks get the do-nothing base. A run resumed from the checkpoint of
step S drops what the interrupted run logged after S, so every step appears once, with the
values of the run that continued: JSONL lines are dropped, and so are the events of the
existing event files (TensorBoard's purge_step alone is not enough: its fast Rust loader,
the default where tensorboard-data-server is installed, ignores it).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ssgan_dist.files import atomic_write, write_text

log = logging.getLogger(__name__)
JSONL = "scalars.jsonl"
TENSORBOARD_DIR = "tb"


class Scalars:
    """Where the trainer reports scalars and images; this base (ranks other than 0) does nothing."""

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """One record for ``step``: tag -> value (loss/<term>, lr/<net>, perf/..., eval/...)."""

    def image(self, tag: str, step: int, picture: np.ndarray) -> None:
        """A uint8 [H, W, 3] picture (a sample grid) at ``step``."""

    def close(self) -> None:
        """Flush and close (the run finished or stopped)."""


def _kept_lines(path: Path, last_step: int) -> tuple[list[str], int]:
    """The lines of ``path`` up to ``last_step`` and the number dropped (later steps, or a line
    a crash cut short)."""
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            dropped += 1
            continue
        if step <= last_step:
            kept.append(line)
        else:
            dropped += 1
    return kept, dropped


def _prune_events(folder: Path, last_step: int) -> int:
    """Rewrite the event files of ``folder`` without their events after ``last_step`` (atomically,
    file by file); the number of events dropped."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    dropped = 0
    for path in sorted(folder.glob("events.out.tfevents.*")):
        records = list(RawEventFileLoader(str(path)).Load())  # a record cut short by a kill ends the list
        kept = [r for r in records if Event.FromString(r).step <= last_step]
        if len(kept) == len(records):
            continue
        dropped += len(records) - len(kept)
        with atomic_write(path) as f:
            writer = RecordWriter(f)
            for record in kept:
                writer.write(record)
    return dropped


def _tensorboard_writer(folder: Path, resume_step: int) -> Any:
    """torch's SummaryWriter on ``folder`` without the events after ``resume_step``, or None
    (logged once) when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("TensorBoard scalars off: the tensorboard package is not installed (pip install -e '.[tensorboard]'); "
                 "the scalars are in %s", folder.parent / JSONL)
        return None
    if folder.is_dir() and (dropped := _prune_events(folder, resume_step)):
        log.info("TensorBoard: dropped %d event(s) after step %d from %s (the run resumes there)", dropped,
                 resume_step, folder)
    # purge_step: TensorBoard's Python loader hides events of steps >= it that earlier files hold.
    return SummaryWriter(log_dir=str(folder), purge_step=resume_step + 1, flush_secs=10)


class ScalarWriter(Scalars):
    """Rank 0's JSONL file (line-buffered, flushed per record) and TensorBoard writer."""

    def __init__(self, run_dir: Path, *, tensorboard: bool, resume_step: int = 0):
        self.path = Path(run_dir) / JSONL
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept, dropped = _kept_lines(self.path, resume_step)
            if dropped:
                write_text(self.path, "".join(f"{line}\n" for line in kept))
                log.info("scalars: dropped %d line(s) of %s after step %d (the run resumes there)", dropped,
                         self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self.tensorboard = _tensorboard_writer(self.path.parent / TENSORBOARD_DIR, resume_step) if tensorboard else None
        if self.tensorboard is not None:
            log.info("TensorBoard: tensorboard --logdir %s", self.path.parent / TENSORBOARD_DIR)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        record = {"step": step, "time": round(time.time(), 3), **{k: float(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.tensorboard is not None:
            for tag, value in values.items():
                self.tensorboard.add_scalar(tag, float(value), step)

    def image(self, tag: str, step: int, picture: np.ndarray) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_image(tag, picture, step, dataformats="HWC")

    def close(self) -> None:
        self._file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def build_scalars(run_dir: Path, *, main: bool, tensorboard: bool, resume_step: int) -> Scalars:
    """Rank 0's writer, else the do-nothing base."""
    if not main:
        return Scalars()
    return ScalarWriter(run_dir, tensorboard=tensorboard, resume_step=resume_step)
