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
from ssgan_dist.distributed.collectives import any_rank
from ssgan_dist.distributed.engine import Engine
from ssgan_dist.distributed.env import DistEnv
from ssgan_dist.telemetry import MetricSeries


@dataclass
class StepOutput:
    """What the loop reads of a step, and what the task's sample grid draws."""

    losses: dict[str, float]  # loss term -> value on this rank
    skipped: bool  # the update was skipped on every rank for a non-finite loss
    visuals: dict[str, torch.Tensor]  # the task's own, for sample_grid


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


def nonfinite_anywhere(loss: torch.Tensor) -> bool:
    """True on every rank when the loss is not finite on any rank (one tiny all-reduce)."""
    return any_rank(~torch.isfinite(loss.detach().float()))
