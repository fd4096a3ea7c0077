"""Sample grids: one row per input, columns sketch | label | generated | real | SFM mask.

The SFM mask column shows argmax over the classes of the generator's last learned mask
m_i (the paper's Figure 3(c)), upsampled to the image size, so the masks stay inspectable.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ssgan_dist.images import rgb_arrays, sketch_arrays
from ssgan_dist.labels import colorize


def mask_argmax(mask: torch.Tensor, size: int) -> torch.Tensor:
    """A learned mask [B,C,h,w] -> class index map [B,size,size] (nearest upsampling)."""
    return F.interpolate(mask.detach().float(), size=(size, size), mode="nearest").argmax(1)


def make_grid(sketch: torch.Tensor, label: torch.Tensor, fakes: list[torch.Tensor],
              real: torch.Tensor | None = None, mask: torch.Tensor | None = None,
              max_rows: int = 8) -> np.ndarray:
    """Rows of [sketch | label | fake_1 .. fake_K | real | mask]; returns uint8 [H', W', 3]."""
    n = min(sketch.shape[0], max_rows)
    size = sketch.shape[-1]
    columns = [sketch_arrays(sketch[:n]), np.stack([colorize(lbl) for lbl in label[:n].cpu().numpy()])]
    columns += [rgb_arrays(f[:n]) for f in fakes]
    if real is not None:
        columns.append(rgb_arrays(real[:n]))
    if mask is not None:
        columns.append(np.stack([colorize(m) for m in mask_argmax(mask[:n], size).cpu().numpy()]))
    rows = [np.concatenate([col[i] for col in columns], axis=1) for i in range(n)]
    return np.concatenate(rows, axis=0)
