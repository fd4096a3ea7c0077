"""Sample grids: one row per input, columns sketch | label | generated | real | SFM mask.

The SFM mask column shows argmax over the classes of the generator's last learned mask
m_i (the paper's Figure 3(c)), upsampled to the image size, so the masks stay inspectable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ssgan_dist.data.schema import colorize


def _rgb(images: torch.Tensor) -> np.ndarray:
    """[B,3,H,W] in [-1,1] -> uint8 [B,H,W,3]."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _grey(sketch: torch.Tensor) -> np.ndarray:
    """[B,1,H,W] in [0,1] -> uint8 [B,H,W,3]."""
    x = (sketch.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.repeat(1, 3, 1, 1).permute(0, 2, 3, 1).cpu().numpy()


def mask_argmax(mask: torch.Tensor, size: int) -> torch.Tensor:
    """A learned mask [B,C,h,w] -> class index map [B,size,size] (nearest upsampling)."""
    return F.interpolate(mask.detach().float(), size=(size, size), mode="nearest").argmax(1)


def make_grid(sketch: torch.Tensor, label: torch.Tensor, fakes: list[torch.Tensor],
              real: torch.Tensor | None = None, mask: torch.Tensor | None = None,
              max_rows: int = 8) -> np.ndarray:
    """Rows of [sketch | label | fake_1 .. fake_K | real | mask]; returns uint8 [H', W', 3]."""
    n = min(sketch.shape[0], max_rows)
    size = sketch.shape[-1]
    columns = [_grey(sketch[:n]), np.stack([colorize(lbl) for lbl in label[:n].cpu().numpy()])]
    columns += [_rgb(f[:n]) for f in fakes]
    if real is not None:
        columns.append(_rgb(real[:n]))
    if mask is not None:
        columns.append(np.stack([colorize(m) for m in mask_argmax(mask[:n], size).cpu().numpy()]))
    rows = [np.concatenate([col[i] for col in columns], axis=1) for i in range(n)]
    return np.concatenate(rows, axis=0)


def save_png(array: np.ndarray, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    tmp.replace(path)
    return path
