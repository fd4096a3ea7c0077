"""Sample grids: one row per input, one named column per picture (sketch | label | generated |
real | learned mask), as the training samples and ``generate --grid`` write them.

Made to be read at a glance: small tiles are upscaled by a whole factor (nearest neighbour,
so pixels stay pixels) to at least MIN_TILE px; tiles sit on a dark background with
GUTTER px between them and around them, so a white sketch never merges with a white label
map beside it; a header row names every column. The learned-mask column shows argmax over
the classes of the generator's last learned mask M_i, the SFM output (the paper's Figure 3(c)), upsampled
to the image size, so the masks stay inspectable.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ssgan_dist.images import rgb_arrays, sketch_arrays
from ssgan_dist.labels import colorize

MIN_TILE = 128  # px: tiles smaller than this are upscaled by the smallest whole factor that reaches it
GUTTER = 4  # px between tiles and around the grid
HEADER = 22  # px: the row of column names
BACKGROUND = (40, 40, 40)
TEXT = (235, 235, 235)


def mask_argmax(mask: torch.Tensor, size: int) -> torch.Tensor:
    """A learned mask [B,C,h,w] -> class index map [B,size,size] (nearest upsampling)."""
    return F.interpolate(mask.detach().float(), size=(size, size), mode="nearest").argmax(1)


@dataclass(frozen=True)
class Layout:
    """Where everything of a grid of ``rows`` x ``cols`` tiles of ``size`` px lies."""

    size: int
    rows: int
    cols: int

    @property
    def scale(self) -> int:
        return max(1, -(-MIN_TILE // self.size))

    @property
    def tile(self) -> int:
        return self.size * self.scale

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the grid in px."""
        return (HEADER + self.rows * self.tile + (self.rows + 1) * GUTTER,
                self.cols * self.tile + (self.cols + 1) * GUTTER)

    def origin(self, row: int, col: int) -> tuple[int, int]:
        """(y, x) of the top left pixel of a tile."""
        return HEADER + GUTTER + row * (self.tile + GUTTER), GUTTER + col * (self.tile + GUTTER)


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=14)  # Pillow's bundled font (FreeType builds)
    except (TypeError, OSError, ImportError):  # a Pillow without FreeType: its bitmap font
        return ImageFont.load_default()


def _header(layout: Layout, names: list[str]) -> np.ndarray:
    """The header row: each name centred over its column, cut to fit the tile width."""
    height, width = layout.shape
    picture = Image.new("RGB", (width, HEADER), BACKGROUND)
    draw, font = ImageDraw.Draw(picture), _font()
    for col, name in enumerate(names):
        while len(name) > 1 and draw.textlength(name, font=font) > layout.tile:
            name = name[:-2] + "."
        left, top, right, bottom = draw.textbbox((0, 0), name, font=font)
        x = layout.origin(0, col)[1] + (layout.tile - (right - left)) // 2 - left
        draw.text((x, (HEADER - (bottom - top)) // 2 - top + 1), name, fill=TEXT, font=font)
    return np.asarray(picture)


def tile_grid(columns: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """Named columns of uint8 tiles [N,h,w,3] (all the same size) -> the grid, uint8 [H,W,3]."""
    rows, size = columns[0][1].shape[0], columns[0][1].shape[1]
    layout = Layout(size, rows, len(columns))
    grid = np.empty((*layout.shape, 3), np.uint8)
    grid[:] = BACKGROUND
    grid[:HEADER] = _header(layout, [name for name, _ in columns])
    k = layout.scale
    for col, (_, tiles) in enumerate(columns):
        for row in range(rows):
            y, x = layout.origin(row, col)
            grid[y:y + layout.tile, x:x + layout.tile] = tiles[row].repeat(k, axis=0).repeat(k, axis=1)
    return grid


def make_grid(sketch: torch.Tensor, label: torch.Tensor, fakes: list[torch.Tensor],
              real: torch.Tensor | None = None, mask: torch.Tensor | None = None, max_rows: int = 8, *,
              label_name: str = "label", fake_names: list[str] | None = None,
              mask_name: str = "learned mask") -> np.ndarray:
    """Rows of [sketch | label | fake_1 .. fake_K | real | mask] under their names; uint8 [H', W', 3].
    One fake is "generated", several are "style 1".."style K" unless ``fake_names`` says."""
    n = min(sketch.shape[0], max_rows)
    size = sketch.shape[-1]
    if fake_names is None:
        fake_names = ["generated"] if len(fakes) == 1 else [f"style {k + 1}" for k in range(len(fakes))]
    columns = [("sketch", sketch_arrays(sketch[:n])),
               (label_name, np.stack([colorize(lbl) for lbl in label[:n].cpu().numpy()]))]
    columns += [(name, rgb_arrays(f[:n])) for name, f in zip(fake_names, fakes)]
    if real is not None:
        columns.append(("real", rgb_arrays(real[:n])))
    if mask is not None:
        columns.append((mask_name, np.stack([colorize(m) for m in mask_argmax(mask[:n], size).cpu().numpy()])))
    return tile_grid(columns)
