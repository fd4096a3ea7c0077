"""What a task is: the part of training that differs between the GAN and the segmenter.

The Trainer (train.py) owns the loop, the data, checkpoints and telemetry; a task owns its
networks (in an engine), its step, its sample grid, what a checkpoint of it must match, its
model FLOPs and its metric series, and its evaluation during training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from ssgan_dist.config import Config
from ssgan_dist.distributed.collectives import max_over_ranks
from ssgan_dist.distributed.engine import Engine
from ssgan_dist.distributed.env import DistEnv
from ssgan_dist.telemetry import MetricSeries


@dataclass
class StepOutput:
    """What the loop reads of a step, and what the task's sample grid draws. Device tensors,
    so that a step never waits for the device: the loop reads them when it logs."""

    losses: dict[str, torch.Tensor]  # loss term -> its 0-dim value on this rank
    skipped: torch.Tensor  # 0-dim, non-zero: an update was skipped on every rank for a non-finite loss
    visuals: dict[str, torch.Tensor]  # the task's own, for sample_grid

    def read(self) -> tuple[dict[str, float], bool]:
        """(losses as floats, skipped) with one device synchronisation."""
        values = torch.stack([self.skipped.float(), *(v.detach().float() for v in self.losses.values())]).tolist()
        return dict(zip(self.losses, values[1:])), bool(values[0])


class Task(Protocol):
    """A run.task. Built by the Trainer after its telemetry (the class-level parts, name,
    series and FLOPs, are read before), on every rank alike."""

    name: ClassVar[str]  # the run.task value
    series: ClassVar[MetricSeries]
    progress_terms: ClassVar[dict[str, str]]  # progress-bar label -> loss term
    engine: Engine

    def __init__(self, cfg: Config, env: DistEnv) -> None: ...

    @staticmethod
    def flops_per_image(cfg: Config) -> float:
        """Model FLOPs one trained image costs (forward and backward), for MFU."""
        ...

    @staticmethod
    def signature(config: dict[str, Any]) -> dict[str, Any]:
        """The dotted settings of a (saved) config that a checkpoint must share with its run."""
        ...

    def train_step(self, batch: dict[str, Any], step: int, lap: Callable[[str], None]) -> StepOutput:
        """One optimizer step of every network on this rank's batch; ``lap(phase)`` marks the
        end of each of the series' step phases."""
        ...

    def sample_grid(self, batch: dict[str, Any], out: StepOutput) -> np.ndarray:
        """The uint8 RGB picture of a step's batch and output (grid.make_grid)."""
        ...

    def evaluate(self, step: int) -> dict[str, Any] | None:
        """The evaluation due after ``step`` (on every rank), or None when none is."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What rank 0 writes of the task: its engine's state and the task's own (e.g. an EMA)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...


def nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """1.0 where ``loss`` is not finite, else 0.0 (a 0-dim float on its device)."""
    return (~torch.isfinite(loss.detach())).any().float()


def nonfinite_anywhere(*flags: torch.Tensor) -> torch.Tensor:
    """``flags`` (see nonfinite) of this rank -> the same flags of all ranks (1.0 where any rank
    had one), stacked: one small all-reduce for all of them, read by no host."""
    return max_over_ranks(torch.stack([f.float() for f in flags]))
