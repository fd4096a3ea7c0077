"""Source files -> shard-ready arrays: reading sketches, photos and label PNGs, and bringing
them to the shard resolution without losing strokes or inventing labels.

* The photo is resized with Lanczos, to a square like SPADE's ``resize_and_crop`` with
  load size = crop size (the aspect ratio is not kept).
* The sketch is resized by taking the darkest pixel of each output pixel's footprint (the
  source rows/columns that map onto it). SketchyCOCO's 1-2 px strokes at ~640x480 shrink
  by ~2.5x to 256: an area or bilinear filter fades them to light grey and they would stop
  counting as strokes; the darkest pixel keeps every stroke, 1 px wide.
* The class map is never interpolated: each output pixel takes the class of the source
  pixel the sketch value came from (the darkest of the footprint; among equally dark
  pixels the smallest class other than 0, then 0). So labels stay exact class ids and sit
  on exactly the pixels whose stroke survived, whether the source labels fill regions or
  only the strokes. Growing an image (footprint of one pixel) is nearest-neighbour.

``to_size`` returns the resized sketch and class map; ``stroke_labels`` keeps the classes
only on stroke pixels (SketchyCOCO, whose CLASS_GT is a class map, not stroke labels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ssgan_dist.data.writer import BadSource
from ssgan_dist.labels import STROKE_THRESHOLD


def _starts(n: int, size: int) -> np.ndarray:
    """First source index of each output index's footprint [i*n//size, (i+1)*n//size)."""
    return np.arange(size) * n // size


def to_size(sketch: np.ndarray, classes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(sketch, classes) [H,W] uint8 -> [size,size] uint8 each, by the darkest-pixel rule."""
    if sketch.shape != classes.shape:
        raise ValueError(f"sketch {sketch.shape} and class map {classes.shape} differ in size")
    # One uint16 key orders pixels by darkness, then class (0 mapped last): its minimum
    # over a footprint is the darkest pixel and the class under it, in one pass per axis.
    key = sketch.astype(np.uint16) << 8 | (classes.astype(np.uint16) - 1) & 0xFF
    key = np.minimum.reduceat(key, _starts(key.shape[0], size), axis=0)
    key = np.minimum.reduceat(key, _starts(key.shape[1], size), axis=1)
    return (key >> 8).astype(np.uint8), ((key + 1) & 0xFF).astype(np.uint8)


def stroke_labels(sketch: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Classes on stroke pixels (sketch < STROKE_THRESHOLD), 0 elsewhere."""
    return np.where(sketch < STROKE_THRESHOLD, classes, 0).astype(np.uint8)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 [H,W,3] -> [size,size,3] with Lanczos (unchanged when already that size)."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))


# Sources are resized to the shard resolution, so their own size is free, but bounded: a
# larger one is refused from its header, before decoding (a 110 KB PNG can hold 92 Mpx).
MAX_SOURCE_PIXELS = 64 * 2**20  # 8192 x 8192


def _open(path: Path) -> Image.Image:
    """An image file opened (header only) and checked against MAX_SOURCE_PIXELS; BadSource
    naming the file otherwise."""
    try:
        img = Image.open(path)
    except Exception as exc:  # PIL raises many types for damaged files
        raise BadSource(f"{path}: unreadable image: {exc}") from exc
    if img.width * img.height > MAX_SOURCE_PIXELS:
        img.close()
        raise BadSource(f"{path}: {img.width}x{img.height} pixels, over the {MAX_SOURCE_PIXELS // 2**20} Mpx a source "
                        "image may have (refused before decoding)")
    return img


def open_rgb(path: Path) -> np.ndarray:
    """A photo as RGB uint8 [H,W,3]; BadSource naming the file if it cannot be read."""
    with _open(path) as img:
        try:
            return np.asarray(img.convert("RGB"))
        except Exception as exc:
            raise BadSource(f"{path}: unreadable image: {exc}") from exc


def open_grey(path: Path) -> np.ndarray:
    """A sketch as 8-bit grey; transparent pixels count as white paper, not black ink."""
    with _open(path) as img:
        try:
            img.load()
            if "A" in img.getbands() or "transparency" in img.info:
                paper = Image.new("RGBA", img.size, "white")
                img = Image.alpha_composite(paper, img.convert("RGBA"))
            return np.asarray(img.convert("L"))
        except Exception as exc:
            raise BadSource(f"{path}: unreadable image: {exc}") from exc


def open_label(path: Path) -> np.ndarray:
    """A label PNG of class indices (8-bit grey or palette indices) as uint8 [H,W]."""
    with _open(path) as img:
        try:
            img.load()
            fmt, mode, indices = img.format, img.mode, np.asarray(img)
        except Exception as exc:
            raise BadSource(f"{path}: unreadable image: {exc}") from exc
    if fmt != "PNG" or mode not in ("L", "P"):
        raise BadSource(f"{path}: label is a {fmt} image of mode {mode}, expected an 8-bit PNG of class indices "
                        "(mode L or P)")
    return indices
