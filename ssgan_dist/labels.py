"""What a label is: SketchyCOCO's classes, the stroke rule, one-hot maps and their colours.

A leaf module (torch and numpy only), so that models, config and evaluation can speak of
classes and strokes without importing the data package.
"""

from __future__ import annotations

import numpy as np
import torch

# SketchyCOCO's scene-level class indices (CLASS_GT); 16..19 are background classes.
CLASS_NAMES = (
    "none", "bicycle", "car", "motorcycle", "airplane", "traffic light", "fire hydrant",
    "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
    "clouds", "grass", "sky", "tree",
)
BACKGROUND_CLASSES = (16, 17, 18, 19)
# Sketch pixels darker than this (8-bit) are strokes: labels live on them, the rest is paper.
STROKE_THRESHOLD = 128


def class_name(index: int) -> str:
    """SketchyCOCO's name, or ``class<i>`` for indices past its 19 classes."""
    return CLASS_NAMES[index] if index < len(CLASS_NAMES) else f"class{index}"


def stroke_mask(sketch: torch.Tensor) -> torch.Tensor:
    """Stroke pixels of sketches in [0, 1] (8-bit value / 255): the same pixels as
    ``uint8 < STROKE_THRESHOLD``, the rule the shard writers label by."""
    return sketch < STROKE_THRESHOLD / 255.0


def onehot(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[B,H,W] int64 -> [B,C,H,W] float on label's device; channel 0 marks unlabelled pixels.
    Built here rather than stored because it is C times larger than the label."""
    if label.dim() != 3:
        raise ValueError(f"onehot: expected a [B,H,W] label batch, got shape {tuple(label.shape)}")
    b, h, w = label.shape
    out = torch.zeros(b, num_classes, h, w, device=label.device)
    return out.scatter_(1, label.long().unsqueeze(1), 1.0)


def _palette() -> np.ndarray:
    """256 fixed colours: white for "none", distinct hand-picked ones for SketchyCOCO's
    classes, and the PASCAL VOC bit pattern for any further index, so every uint8 maps."""
    named = [
        (255, 255, 255), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
        (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60),
        (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200),
        (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128),
    ]
    pal = np.zeros((256, 3), np.uint8)
    pal[: len(named)] = named
    for i in range(len(named), 256):
        c, rgb = i, [0, 0, 0]
        for bit in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - bit)
            c >>= 3
        pal[i] = rgb
    return pal


PALETTE = _palette()


def colorize(label: np.ndarray | torch.Tensor) -> np.ndarray:
    """[H,W] class indices -> uint8 RGB [H,W,3] with PALETTE (0 = white), for sample grids."""
    if isinstance(label, torch.Tensor):
        label = label.detach().cpu().numpy()
    return PALETTE[np.asarray(label, dtype=np.int64)]
