"""SketchyCOCO's scene level as samples for the shard writer.

Layout under ``--root`` (the directory holding ``Scene/``, or ``Scene`` itself)::

    Scene/GT/<split>/<12-digit id>.png                               photo
    Scene/Sketch/paper_version/<split>/<id>.png                      scene sketch
    Scene/Annotation/paper_version/<split>/CLASS_GT/<id>.mat         CLASS_GT, h x w, 0..19

The label stored in the shard is CLASS_GT on the sketch's stroke pixels only (DESIGN: the
semantic sketch M0 holds "labels on the sketch's strokes"). CLASS_GT is a class map of the
scene, so without the mask M0 would be a filled segmentation, which is not what SSGAN is
given. Resizing follows ``ssgan_dist.data.prepare``: classes are taken from the sketch
pixel that survives the resize, then masked to strokes (sketch < 128), so every label
pixel lies on a stroke of the stored sketch.

``.mat`` files are read as MATLAB v5 (scipy) or v7.3 (HDF5, h5py; MATLAB stores arrays
column-major, so h5py sees them transposed).

Splits: the dataset's README names three folders: ``trainInTrain`` (SketchyCOCO train, from
COCO-Stuff train images), ``valInTrain`` (SketchyCOCO val taken from COCO-Stuff *train* images)
and ``val`` (SketchyCOCO val from COCO-Stuff val). The paper trains on 80% and tests on the 20%
held out, 2816 scenes = ``val`` + ``valInTrain``: ``--split test`` builds those two folders as
one set (``train`` = ``trainInTrain``), and a comma list names any folders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from ssgan_dist.data.prepare import open_grey, open_rgb, resize_image, stroke_labels, to_size
from ssgan_dist.data.writer import BadSource, Sample
from ssgan_dist.errors import SetupError
from ssgan_dist.labels import CLASS_NAMES

SPLITS = ("trainInTrain", "valInTrain", "val")
# Named sets of folders: the paper's 80% / 20% (the dataset README: 11265 train + 2816 val).
SPLIT_SETS = {"train": ("trainInTrain",), "test": ("val", "valInTrain")}
NUM_CLASSES = len(CLASS_NAMES)
VARIABLE = "CLASS_GT"
LABEL_RULE = "CLASS_GT on sketch strokes (sketch < 128) after the darkest-pixel resize"


@dataclass(frozen=True)
class Item:
    """The three files of one scene; any of them may be missing (None)."""

    id: str
    split: str
    photo: Path | None
    sketch: Path | None
    classes: Path | None


def mat_readers() -> tuple[ModuleType, ModuleType]:
    """(h5py, scipy.io): the ``sketchycoco`` extra, imported only when .mat files are read."""
    try:
        import h5py
        import scipy.io
    except ImportError as exc:
        raise SetupError(f"SketchyCOCO's .mat annotations need scipy and h5py ({exc}): "
                         "pip install -e '.[sketchycoco]'") from None
    return h5py, scipy.io


def _scene_dir(root: Path) -> Path:
    for scene in (root / "Scene", root):
        if (scene / "GT").is_dir():
            return scene
    raise SetupError(f"--root {root}: no Scene/GT directory there (expected SketchyCOCO's scene-level layout)")


def split_folders(split: str) -> tuple[str, ...]:
    """The folders of ``--split`` (a set name: train, test; a folder; or a comma list of them), in
    the dataset's order, so that every way of naming one set builds the same shards."""
    folders: list[str] = []
    for name in (part.strip() for part in split.split(",")):
        if name not in SPLITS and name not in SPLIT_SETS:
            choices = ", ".join([*SPLIT_SETS, *SPLITS])
            raise SetupError(f"--split {split!r}: {name!r} is not a SketchyCOCO split; expected one of {choices}, "
                             "or a comma list of them")
        folders += SPLIT_SETS.get(name, (name,))
    return tuple(f for f in SPLITS if f in folders)


def scan(root: str | Path, split: str) -> list[Item]:
    """Every id found in any of the three folders of each of the split's folders (see
    ``split_folders``), by folder, then by id. An id found in two folders is refused: shard
    keys are ids, and COCO ids are unique, so it would be a damaged tree."""
    folders = split_folders(split)
    mat_readers()  # a missing extra stops the build here, not as one bad sample per scene
    items = [item for folder in folders for item in _scan_folder(Path(root), folder)]
    seen: dict[str, Item] = {}
    for item in items:
        if item.id in seen:
            raise SetupError(f"--split {split}: id {item.id} is in both {seen[item.id].split} and {item.split} "
                             f"({_any_file(seen[item.id])} and {_any_file(item)}); an id must be in one split only")
        seen[item.id] = item
    return items


def _any_file(item: Item) -> Path:
    return next(p for p in (item.photo, item.sketch, item.classes) if p is not None)


def _scan_folder(root: Path, split: str) -> list[Item]:
    """Every id found in any of one split folder's three folders, sorted by id."""
    scene = _scene_dir(root)
    folders = {
        "photo": (scene / "GT" / split, ".png"),
        "sketch": (scene / "Sketch" / "paper_version" / split, ".png"),
        "classes": (scene / "Annotation" / "paper_version" / split / VARIABLE, ".mat"),
    }
    found: dict[str, dict[str, Path]] = {}
    for part, (folder, ext) in folders.items():
        if not folder.is_dir():
            raise SetupError(f"SketchyCOCO {split}: missing folder {folder}")
        for path in folder.glob(f"*{ext}"):
            found.setdefault(path.stem, {})[part] = path
    return [Item(i, split, *(found[i].get(part) for part in folders)) for i in sorted(found)]


def missing_parts(item: Item) -> BadSource | None:
    """BadSource naming what an item lacks, or None when it is complete."""
    lacking = [part for part in ("photo", "sketch", "classes") if getattr(item, part) is None]
    if not lacking:
        return None
    have = [str(p) for p in (item.photo, item.sketch, item.classes) if p is not None]
    return BadSource(f"SketchyCOCO {item.split} id {item.id}: no {' / '.join(lacking)} file (found {', '.join(have)})")


def load_class_gt(path: Path) -> np.ndarray:
    """CLASS_GT of a v5 or v7.3 .mat file as uint8 [h,w]; BadSource naming the file."""
    h5py, scipy_io = mat_readers()
    try:
        if h5py.is_hdf5(path):
            with h5py.File(path, "r") as f:
                data = np.asarray(f[VARIABLE]).T if VARIABLE in f else None
        else:
            data = scipy_io.loadmat(path, variable_names=[VARIABLE]).get(VARIABLE)
    except Exception as exc:  # scipy and h5py raise many types for damaged files
        raise BadSource(f"{path}: unreadable .mat file: {exc}") from exc
    if data is None:
        raise BadSource(f"{path}: no variable {VARIABLE}")
    if data.ndim != 2 or not np.issubdtype(data.dtype, np.number):
        raise BadSource(f"{path}: {VARIABLE} is {data.dtype} {data.shape}, expected a 2-D numeric array")
    if data.size and (not np.all(np.isfinite(data)) or np.any(data != np.round(data))):
        raise BadSource(f"{path}: {VARIABLE} holds non-integer values")
    if data.size and (data.min() < 0 or data.max() >= NUM_CLASSES):
        raise BadSource(f"{path}: {VARIABLE} holds values {data.min():g}..{data.max():g}, expected classes 0..{NUM_CLASSES - 1}")
    return data.astype(np.uint8)


def load(item: Item, size: int) -> Sample:
    """One scene as a shard sample of ``size`` px; BadSource naming the file on bad input."""
    if (bad := missing_parts(item)) is not None:
        raise bad
    sketch, classes, photo = open_grey(item.sketch), load_class_gt(item.classes), open_rgb(item.photo)
    if not (sketch.shape == classes.shape == photo.shape[:2]):
        raise BadSource(f"SketchyCOCO {item.split} id {item.id}: sizes differ: sketch {sketch.shape[::-1]}, "
                        f"{VARIABLE} {classes.shape[::-1]}, photo {photo.shape[1::-1]} (w, h)")
    sketch, classes = to_size(sketch, classes, size)
    meta = {"source_id": item.id, "split": item.split, "source_size": list(photo.shape[:2])}
    return item.id, sketch, stroke_labels(sketch, classes), resize_image(photo, size), meta
