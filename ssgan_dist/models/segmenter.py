"""The sketch segmenter: scene sketch S -> semantic sketch M0 (the paper's step (i)).

A small U-Net over the ink (1 - sketch, so strokes are 1 and the paper 0) plus two
coordinate channels: scenes put sky on top and grass below, a cue plain convolutions see only
through padding. Downsampling is max-pooling, which keeps 1 px strokes where an average
would fade them; dilated residual convs at the coarsest level carry context along strokes.

Labels exist only on stroke pixels, and class 0 there means "unlabelled stroke" (SketchyCOCO
has such pixels; the synthetic scenes have none). Class 0 is not a class of the scene but
missing information, so the segmenter never learns or predicts it: it has C - 1 outputs
(classes 1..C-1), the loss is cross-entropy over the labelled stroke pixels only, and every
stroke pixel gets a class 1..C-1 while every blank pixel gets 0. The stroke rule is
``labels.stroke_mask``, the one the shard writers label by.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssgan_dist.config import SegmenterConfig
from ssgan_dist.labels import stroke_mask

IGNORE = -100  # cross-entropy target of pixels that carry no training signal


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: per-sample statistics, so N ranks x B train like 1 rank x NB
    # without synchronizing, and a lone inference sketch is normalized as in training.
    return nn.GroupNorm(math.gcd(8, channels), channels)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), _norm(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1), _norm(c_out), nn.ReLU(inplace=True))


class DilatedResidual(nn.Module):
    """x + conv(dilated conv(x)): a wider view at the same resolution and cost."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation),
                                  _norm(channels), nn.ReLU(inplace=True),
                                  nn.Conv2d(channels, channels, 3, padding=1), _norm(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class SketchSegmenter(nn.Module):
    """Sketches [B,1,H,W] in [0,1] -> logits [B,C-1,H,W] of classes 1..C-1."""

    def __init__(self, cfg: SegmenterConfig, num_classes: int):
        super().__init__()
        widths = [cfg.width * 2**i for i in range(cfg.levels)]
        self.down = nn.ModuleList(_block(c_in, c) for c_in, c in zip([3, *widths], widths))
        self.context = nn.Sequential(*(DilatedResidual(widths[-1], d) for d in cfg.dilations))
        self.up = nn.ModuleList(_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(cfg.levels - 1)))
        self.head = nn.Conv2d(widths[0], num_classes - 1, 1)

    def forward(self, sketch: torch.Tensor) -> torch.Tensor:
        b, _, h, w = sketch.shape
        ys = torch.linspace(-1, 1, h, device=sketch.device, dtype=sketch.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=sketch.device, dtype=sketch.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
        x = torch.cat([1 - sketch, ys, xs], 1)
        skips = []
        for i, block in enumerate(self.down):
            x = block(F.max_pool2d(x, 2) if i else x)
            skips.append(x)
        x = self.context(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = block(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], 1))
        return self.head(x)


def build_segmenter(cfg: SegmenterConfig, num_classes: int) -> SketchSegmenter:
    return SketchSegmenter(cfg, num_classes)


def stroke_targets(label: torch.Tensor, sketch: torch.Tensor) -> torch.Tensor:
    """[B,H,W] targets for the C - 1 outputs: label - 1 on labelled stroke pixels, IGNORE elsewhere."""
    keep = stroke_mask(sketch[:, 0]) & (label > 0)
    return torch.where(keep, label - 1, torch.full_like(label, IGNORE))


def stroke_cross_entropy(logits: torch.Tensor, label: torch.Tensor, sketch: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled stroke pixels of the batch (0 when there are none)."""
    target = stroke_targets(label, sketch)
    total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="sum")
    return total / (target != IGNORE).sum().clamp(min=1)


def predict_labels(logits: torch.Tensor, sketch: torch.Tensor) -> torch.Tensor:
    """M0 as class indices [B,H,W]: the argmax class (1..C-1) on stroke pixels, 0 on the paper."""
    return torch.where(stroke_mask(sketch[:, 0]), logits.argmax(1) + 1, 0)
