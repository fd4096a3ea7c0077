"""The tasks a run trains, by ``run.task``: ``gan`` (SSGAN, or SPADE with model.sfm=false) and
``segmenter`` (sketch -> M0). What a task is: ``tasks.base``."""

from __future__ import annotations

from ssgan_dist.tasks.base import Task
from ssgan_dist.tasks.gan import GANTask
from ssgan_dist.tasks.segmenter import SegmenterTask

TASKS: dict[str, type[Task]] = {GANTask.name: GANTask, SegmenterTask.name: SegmenterTask}
