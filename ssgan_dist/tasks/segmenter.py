"""The sketch segmenter task (``run.task=segmenter``): S, trained with cross-entropy on the
labelled stroke pixels (models/segmenter.py), through the Trainer's loop like the GAN.

A checkpoint holds S, its Adam and loss scaler (``S``, ``opt_s``, ``scaler_s``) beside what
every checkpoint holds; ``run.task`` in its config tells the two tasks apart. What the
segmenter cannot do (DeepSpeed, recomputation, evaluation during training) config.py
refuses before any work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ssgan_dist.compile import compile_mode
from ssgan_dist.config import Config
from ssgan_dist.data.batch import step_tensors
from ssgan_dist.distributed.engine import Engine, build_engine
from ssgan_dist.distributed.env import DistEnv
from ssgan_dist.distributed.optim import NetSpec
from ssgan_dist.grid import make_grid
from ssgan_dist.labels import onehot
from ssgan_dist.models.segmenter import IGNORE, build_segmenter, predict_labels, stroke_cross_entropy, stroke_targets
from ssgan_dist.precision import autocast, memory_format
from ssgan_dist.summary import count_segmenter_flops
from ssgan_dist.tasks.base import StepOutput, nonfinite, nonfinite_anywhere
from ssgan_dist.telemetry import MetricSeries

# One network, so one step phase, one loss term and one learning rate.
SERIES = MetricSeries(step_phases=("s_step",), terms=("s_ce",), nets=("S",))


class SegmenterTask:
    """The sketch segmenter S in a DDP engine, Adam (0.9, 0.999) at segmenter.lr."""

    name: ClassVar[str] = "segmenter"
    series: ClassVar[MetricSeries] = SERIES
    progress_terms: ClassVar[dict[str, str]] = {"CE": "s_ce"}

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        t = cfg.train
        nets = {"S": NetSpec(build_segmenter(cfg.segmenter, cfg.model.num_classes), cfg.segmenter.lr)}
        self.engine: Engine = build_engine(cfg.engine, env, nets, precision=t.precision,
                                           channels_last=t.channels_last, batch_size=t.batch_size,
                                           compile_mode=compile_mode(t, cfg.data.cache_dir))

    @property
    def S(self) -> nn.Module:
        return self.engine.module("S")

    @staticmethod
    def flops_per_image(cfg: Config) -> float:
        """Forward and backward: 3 forwards of the segmenter."""
        return 3.0 * count_segmenter_flops(cfg.segmenter, cfg.model.num_classes, cfg.model.image_size)["flops"]

    @staticmethod
    def signature(config: dict[str, Any]) -> dict[str, Any]:
        """The settings that fix S's parameters: its classes, input size and architecture."""
        model, seg = config["model"], config["segmenter"]
        return {"model.num_classes": model["num_classes"], "model.image_size": model["image_size"],
                **{f"segmenter.{k}": seg[k] for k in ("width", "levels", "dilations")}}

    def train_step(self, batch: dict[str, Any], step: int, lap: Callable[[str], None]) -> StepOutput:
        """One optimizer step over train.accum_steps micro-batches (see tasks/gan.py), each
        micro-batch's loss weighted by its share of the step's labelled stroke pixels: with
        per-sample GroupNorms that is exactly one larger batch."""
        cfg, dev, k = self.cfg, self.env.device, self.cfg.train.accum_steps
        fmt = memory_format(cfg.train.channels_last)
        x = step_tensors(batch, dev, ("sketch", "label"))  # the loader's uint8 batch as floats, on the device
        sketches, labels = x["sketch"].contiguous(memory_format=fmt), x["label"]
        counts = [(stroke_targets(lb, sk) != IGNORE).sum().float() for sk, lb in zip(sketches.chunk(k), labels.chunk(k))]
        total = torch.stack(counts).sum().clamp(min=1)
        loss_sum, bad = torch.zeros((), device=dev), torch.zeros((), device=dev)
        preds = []
        for i, (sketch, label) in enumerate(zip(sketches.chunk(k), labels.chunk(k))):
            with self.engine.micro_batch("S", last=i == k - 1):
                with autocast(cfg.train.precision, dev):
                    logits = self.engine.wrapped("S")(sketch)
                loss = stroke_cross_entropy(logits, label, sketch)
                self.engine.backward("S", loss * (counts[i] / total) if k > 1 else loss)
            loss_sum += loss.detach().float() * (counts[i] / total)
            bad = torch.maximum(bad, nonfinite(loss))
            preds.append(predict_labels(logits.detach(), sketch))
            lap("s_step")
        (skip,) = nonfinite_anywhere(bad)
        self.engine.step("S", skip)
        lap("s_step")
        return StepOutput({"s_ce": loss_sum}, skip, {"pred": torch.cat(preds) if k > 1 else preds[0]})

    def sample_grid(self, batch: dict[str, Any], out: StepOutput) -> np.ndarray:
        """Rows of sketch | true M0 | predicted M0 (make_grid's mask column: the argmax of a one-hot)."""
        pred = onehot(out.visuals["pred"].cpu(), self.cfg.model.num_classes)
        x = step_tensors(batch, pred.device, ("sketch", "label"))
        return make_grid(x["sketch"], x["label"], [], mask=pred, label_name="true M0", mask_name="predicted M0")

    def evaluate(self, step: int) -> dict[str, Any] | None:
        """Nothing during training: evaluation.evaluate_segmenter scores its checkpoints."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state)
