"""Tensors to 8-bit pictures and PNG files, rounded one way everywhere: what grids and
generated images show is what the metrics measure."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ssgan_dist.files import write_bytes


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 in [0, 255]."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def rgb_arrays(images: torch.Tensor) -> np.ndarray:
    """[B,3,H,W] in [-1,1] -> uint8 [B,H,W,3] on the CPU."""
    return to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


def sketch_arrays(sketch: torch.Tensor) -> np.ndarray:
    """[B,1,H,W] sketches in [0,1] -> uint8 grey as RGB [B,H,W,3] on the CPU."""
    x = (sketch.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.repeat(1, 3, 1, 1).permute(0, 2, 3, 1).cpu().numpy()


def sketch_tensor(sketch: np.ndarray) -> torch.Tensor:
    """An 8-bit grey sketch [H,W] -> a batch of one [1,1,H,W] in [0, 1], as the loaders give it."""
    return torch.from_numpy(sketch).float().div(255.0)[None, None]


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """uint8 [H,W] or [H,W,3] as a PNG at ``path``, written atomically (mode 0644: pictures to look at)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return write_bytes(path, buf.getvalue())
