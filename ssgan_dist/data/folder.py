"""A generic dataset of three folders whose files match by stem, as samples for the writer.

``--sketch`` holds the scene sketches (any image format, dark strokes on light paper),
``--label`` the semantic sketches as 8-bit PNGs of class indices (grey or palette
indices; 0 = no label), ``--image`` the photos. The label is taken as given (it should
already sit on the strokes) and only resized, by the rule in ``ssgan_dist.data.prepare``.
A stem missing from any folder is reported with the files it does have.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ssgan_dist.data.prepare import open_grey, open_label, open_rgb, resize_image, to_size
from ssgan_dist.data.writer import BadSource, Sample
from ssgan_dist.errors import SetupError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
PARTS = ("sketch", "label", "image")


@dataclass(frozen=True)
class Item:
    """The files of one stem; a part that is missing is None."""

    stem: str
    sketch: Path | None
    label: Path | None
    image: Path | None


def _by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    if not folder.is_dir():
        raise SetupError(f"{folder}: no such directory")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in suffixes or path.name.startswith("."):
            continue
        if path.stem in found:
            raise SetupError(f"{folder}: two files with stem {path.stem!r} ({found[path.stem].name}, {path.name})")
        found[path.stem] = path
    return found


def scan(sketch_dir: str | Path, label_dir: str | Path, image_dir: str | Path) -> list[Item]:
    """One item per stem found in any folder, sorted by stem."""
    files = {
        "sketch": _by_stem(Path(sketch_dir), IMAGE_SUFFIXES),
        "label": _by_stem(Path(label_dir), (".png",)),
        "image": _by_stem(Path(image_dir), IMAGE_SUFFIXES),
    }
    stems = sorted(set().union(*files.values()))
    return [Item(stem, *(files[part].get(stem) for part in PARTS)) for stem in stems]


def missing_parts(item: Item) -> BadSource | None:
    """BadSource naming what a stem lacks, or None when it is complete."""
    lacking = [part for part in PARTS if getattr(item, part) is None]
    if not lacking:
        return None
    have = [str(getattr(item, part)) for part in PARTS if getattr(item, part) is not None]
    return BadSource(f"stem {item.stem!r}: no {' / '.join(lacking)} file (found {', '.join(have)})")


def load(item: Item, size: int, num_classes: int) -> Sample:
    """One stem as a shard sample of ``size`` px; BadSource naming the file on bad input."""
    if (bad := missing_parts(item)) is not None:
        raise bad
    sketch, label, image = open_grey(item.sketch), open_label(item.label), open_rgb(item.image)
    if not (sketch.shape == label.shape == image.shape[:2]):
        raise BadSource(f"stem {item.stem!r}: sizes differ: sketch {sketch.shape[::-1]}, label {label.shape[::-1]}, "
                        f"image {image.shape[1::-1]} (w, h)")
    if int(label.max()) >= num_classes:
        raise BadSource(f"{item.label}: holds class {int(label.max())}, but --num-classes is {num_classes}")
    sketch, label = to_size(sketch, label, size)
    return item.stem, sketch, label, resize_image(image, size), {"source_id": item.stem, "split": "folder"}
