"""Sample grids read at a glance: a header row naming the columns, gutters between tiles (a white
sketch never merges with a white label map), small tiles upscaled by a whole factor."""

from __future__ import annotations

import numpy as np
import torch

from ssgan_dist.grid import BACKGROUND, GUTTER, HEADER, MIN_TILE, TEXT, Layout, make_grid, tile_grid

NAMES = ["sketch", "label", "generated", "real", "learned mask"]


def _inputs(n: int, size: int, classes: int = 20) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "sketch": torch.ones(n, 1, size, size),  # blank white paper
        "label": torch.zeros(n, size, size, dtype=torch.long),  # "none" everywhere: white too
        "fake": torch.rand(n, 3, size, size, generator=g) * 2 - 1,
        "real": torch.rand(n, 3, size, size, generator=g) * 2 - 1,
        "mask": torch.rand(n, classes, size // 4, size // 4, generator=g),
    }


def _grid(n: int = 3, size: int = 32) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    x = _inputs(n, size)
    return make_grid(x["sketch"], x["label"], [x["fake"]], x["real"], x["mask"]), x


def test_grid_has_gutters_between_and_around_every_tile():
    grid, _ = _grid()
    layout = Layout(32, 3, 5)
    assert grid.shape == (*layout.shape, 3) and grid.dtype == np.uint8
    body = grid[HEADER:]
    is_background = (body == BACKGROUND).all(axis=2)
    for col in range(layout.cols + 1):  # vertical gutters, the outer ones included
        x = col * (layout.tile + GUTTER)
        assert is_background[:, x:x + GUTTER].all(), f"vertical gutter {col}"
    for row in range(layout.rows + 1):
        y = row * (layout.tile + GUTTER)
        assert is_background[y:y + GUTTER].all(), f"horizontal gutter {row}"
    # The white sketch and the white label map stay apart: a dark band between them.
    y, x_sketch = layout.origin(0, 0)
    _, x_label = layout.origin(0, 1)
    assert (grid[y, x_sketch:x_sketch + layout.tile] == 255).all() and (grid[y, x_label:x_label + layout.tile] == 255).all()
    band = grid[y, x_sketch + layout.tile:x_label].astype(int)
    assert band.shape[0] == GUTTER and (255 - band.mean(axis=1) > 150).all()


def test_header_row_names_every_column_above_it():
    grid, x = _grid()
    layout = Layout(32, 3, 5)
    header = grid[:HEADER]
    for col in range(layout.cols):
        _, x0 = layout.origin(0, col)
        over = header[:, x0:x0 + layout.tile]
        ink = (np.abs(over.astype(int) - BACKGROUND).sum(axis=2) > 200)
        assert ink.sum() > 20, f"no name over column {col}"
        assert over[ink].max() == max(TEXT) and (over[ink] > max(BACKGROUND)).all()  # light text (anti-aliased)
        xs = np.nonzero(ink.any(axis=0))[0]
        assert abs((xs.min() + xs.max()) / 2 - layout.tile / 2) <= 3  # centred over its column
    # The names are those of the columns, in order: the same header as a grid named so by hand.
    tiles = np.zeros((3, 32, 32, 3), np.uint8)
    assert np.array_equal(header, tile_grid([(name, tiles) for name in NAMES])[:HEADER])
    assert not np.array_equal(header, tile_grid([(name, tiles) for name in reversed(NAMES)])[:HEADER])


def test_small_tiles_are_upscaled_by_a_whole_factor_nearest():
    grid, x = _grid(n=2, size=32)
    layout = Layout(32, 2, 5)
    assert layout.scale == MIN_TILE // 32 == 4 and layout.tile == 128
    fake = ((x["fake"][1].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    y, x0 = layout.origin(1, 2)
    tile = grid[y:y + layout.tile, x0:x0 + layout.tile]
    assert np.array_equal(tile, np.kron(fake, np.ones((4, 4, 1), np.uint8)))  # every pixel a 4x4 block
    assert Layout(64, 1, 1).scale == 2 and Layout(48, 1, 1).tile == 144 and Layout(256, 1, 1).scale == 1


def test_styles_and_segmenter_columns_are_named_for_what_they_show():
    x = _inputs(2, 64)
    tiles = np.zeros((2, 64, 64, 3), np.uint8)
    styles = make_grid(x["sketch"], x["label"], [x["fake"], x["real"]], x["real"], x["mask"])
    named = ["sketch", "label", "style 1", "style 2", "real", "learned mask"]
    assert np.array_equal(styles[:HEADER], tile_grid([(n, tiles) for n in named])[:HEADER])
    seg = make_grid(x["sketch"], x["label"], [], mask=x["mask"], label_name="true M0", mask_name="predicted M0")
    assert np.array_equal(seg[:HEADER], tile_grid([(n, tiles) for n in ["sketch", "true M0", "predicted M0"]])[:HEADER])


def test_a_name_wider_than_its_tile_is_cut_to_fit():
    tiles = np.zeros((1, 8, 8, 3), np.uint8)
    grid = tile_grid([("a very long column name indeed", tiles), ("x", tiles)])
    layout = Layout(8, 1, 2)
    ink = np.abs(grid[:HEADER].astype(int) - BACKGROUND).sum(axis=2) > 200
    _, x1 = layout.origin(0, 1)
    assert not ink[:, x1 - GUTTER:x1].any()  # the first name stops before the gutter of the second column
