"""Training the sketch segmenter (``run.task=segmenter``): the Trainer's loop with its own step.

Everything but the network and the step is the GAN's machinery, unchanged: launcher
environment, shard loader with its exact data position, atomic checkpoints and resume,
non-finite step skipping, logging and telemetry. A checkpoint holds S, its Adam and loss
scaler (``S``, ``opt_s``, ``scaler_s``) beside the step, config, per-rank data position and
RNG, and counters of a GAN checkpoint; ``run.task`` in its config tells the two apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ssgan_dist import checkpoint as ckpt
from ssgan_dist.data.schema import onehot
from ssgan_dist.distributed.engines import SegmenterEngine
from ssgan_dist.grid import make_grid, save_png
from ssgan_dist.models.segmenter import build_segmenter, predict_labels, stroke_cross_entropy
from ssgan_dist.train import Trainer, autocast


@dataclass
class SegmenterStep:
    """What the loop reads of a step (losses, skipped), and the prediction for the sample grid."""

    losses: dict[str, float]
    pred: torch.Tensor  # predicted M0, class indices [B,H,W]
    skipped: bool = False


def segmenter_signature(config: dict[str, Any]) -> dict[str, Any]:
    """The settings of a (saved) config that a segmenter checkpoint must share with its run."""
    model, seg = config["model"], config["segmenter"]
    return {"model.num_classes": model["num_classes"], "model.image_size": model["image_size"],
            **{f"segmenter.{k}": seg[k] for k in ("width", "levels", "dilations")}}


class SegmenterTrainer(Trainer):
    """S trained with cross-entropy on the labelled stroke pixels (see models/segmenter.py)."""

    task = "segmenter"
    progress_terms = {"CE": "s_ce"}

    def build_networks(self) -> None:
        s = build_segmenter(self.cfg.segmenter, self.cfg.model.num_classes)
        self.engine = SegmenterEngine(self.cfg, self.env, s)
        self.S = self.engine.s_module

    def check_compatible(self, saved: dict[str, Any], source: Path) -> None:
        ckpt.check_task(saved, self.task, source)
        ckpt.check_compatible(segmenter_signature(saved), segmenter_signature(self.cfg.to_dict()), source, prefix="")

    def train_step(self, batch: dict[str, Any]) -> SegmenterStep:
        cfg, dev = self.cfg, self.env.device
        fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        sketch = batch["sketch"].to(dev, non_blocking=True).contiguous(memory_format=fmt)
        label = batch["label"].to(dev, non_blocking=True)
        with autocast(cfg.train.precision, dev):
            logits = self.engine.s(sketch)
        loss = stroke_cross_entropy(logits, label, sketch)
        skip = self.nonfinite_anywhere(loss)
        self.engine.backward_step("S", loss, skip)
        self.telemetry.lap("s_step")
        return SegmenterStep({"s_ce": float(loss.detach())}, predict_labels(logits.detach(), sketch), skip)

    def save_samples(self, batch: dict[str, Any], out: SegmenterStep) -> Path:
        """Rows of sketch | true M0 | predicted M0 (make_grid's mask column: the argmax of a one-hot)."""
        pred = onehot(out.pred.cpu(), self.cfg.model.num_classes)
        grid = make_grid(batch["sketch"], batch["label"], [], mask=pred)
        return save_png(grid, self.run_dir / "samples" / f"step-{self.step:09d}.png")
