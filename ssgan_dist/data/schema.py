"""The one place that knows what a sample is: its tar members, their encoding and checks.

Writers (synthetic, SketchyCOCO, folders) call ``encode_sample``; every loader calls
``decode_sample``, which either returns the arrays the shard holds (uint8, exactly as
stored) or raises ``BadSample`` naming shard, key and the kind of problem, so a broken
sample is never a silent wrong batch. Images are opened header first: a picture of the
wrong size is refused before a byte of it is decoded (a 9600x9600 PNG of 110 KB costs a
header read, not 92 MB). A key must be a plain relative name (``key_problem``): keys
become file names (``generate --shards`` writes ``<key>.png``) and log lines.
"""

from __future__ import annotations

import io
import json
import re
import unicodedata
from typing import Any, Callable, Mapping

import numpy as np
from PIL import Image

from ssgan_dist.errors import SetupError

SKETCH = "sketch.png"  # 8-bit grey, dark strokes on white (as SketchyCOCO's sketches)
LABEL = "label.png"  # 8-bit class index per pixel, PNG so it stays exact; 0 = no label
IMAGE = "image.jpg"  # RGB photo
META = "json"  # source_id, split, size [h, w], classes present in the label
MEMBERS = (SKETCH, LABEL, IMAGE, META)
JPEG_QUALITY = 95
MAX_KEY_BYTES = 200  # keys name files (<key>.mask.png, -style<k>): well inside a 255-byte name
_PLAIN_ASCII = re.compile(r"[^./\\\x00-\x1f\x7f]+")
_CONTROL = ("Cc", "Cf", "Cs", "Zl", "Zp")  # control, format (bidi overrides), surrogates, line breaks


class BadSample(SetupError):
    """A sample that cannot be used; says where it is so it can be found and fixed, and its
    ``kind`` so that many of them can be summed up (``data.skips``): tar, key, missing, json,
    undecodable, size, mode, format or class."""

    def __init__(self, shard: str, key: str | None = None, reason: str | None = None, kind: str = ""):
        # Also built from one argument, the whole message, by whoever re-raises an error as
        # type(exc)(message) (torch's DataLoader does for its workers' exceptions).
        super().__init__(shard, key, reason, kind)
        self.shard, self.key, self.reason, self.kind = shard, key, reason, kind

    def __str__(self) -> str:
        if self.key is None:
            return self.shard
        return f"bad sample {self.key!r} in shard {self.shard}: {self.reason}"


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot name a sample, or None: the one rule for writers and readers. A key
    is a plain relative name: not empty, no '/', '\\' or '.' (so no '..' and nothing
    absolute; webdataset and DALI split member names at the first dot), no control or
    format characters, at most MAX_KEY_BYTES bytes of UTF-8."""
    if not (key.isascii() and _PLAIN_ASCII.fullmatch(key)):
        if not key:
            return "empty key"
        for char in ("/", "\\", "."):
            if char in key:
                return f"key {key!r} holds {char!r}: a key is a plain relative name, not a path" + (
                    " (and webdataset and DALI split member names at the first dot)" if char == "." else "")
        for char in key:
            if unicodedata.category(char) in _CONTROL:
                return f"key {key!r} holds the control character U+{ord(char):04X}"
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        return f"key of {len(key.encode('utf-8', 'surrogatepass'))} bytes, at most {MAX_KEY_BYTES} (it names files)"
    return None


def label_classes(label: np.ndarray) -> list[int]:
    """Sorted class indices (excluding 0) present in a label map."""
    return [int(c) for c in np.flatnonzero(np.bincount(label.ravel(), minlength=1)) if c]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def encode_sample(key: str, sketch: np.ndarray, label: np.ndarray, image: np.ndarray,
                  meta: Mapping[str, Any]) -> dict[str, Any]:
    """Members of one sample for ``webdataset.TarWriter``. ``meta`` should give source_id
    and split (provenance, not checked); size and classes are filled in from the arrays,
    so they cannot disagree with them."""
    if (problem := key_problem(key)) is not None:
        raise ValueError(f"sample key: {problem}")
    h, w = label.shape[:2]
    for name, arr, shape in ((SKETCH, sketch, (h, w)), (LABEL, label, (h, w)), (IMAGE, image, (h, w, 3))):
        if arr.dtype != np.uint8 or arr.shape != shape:
            raise ValueError(f"sample {key}: {name} must be uint8 {shape}, got {arr.dtype} {arr.shape}")
    derived = {"size": [h, w], "classes": label_classes(label)}
    for field, value in derived.items():
        if field in meta and list(meta[field]) != value:
            raise ValueError(f"sample {key}: meta {field}={meta[field]!r} but the arrays give {value}")
    jpeg = io.BytesIO()
    # 4:4:4 chroma keeps colour edges at object boundaries sharp at small sizes.
    Image.fromarray(image).save(jpeg, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return {
        "__key__": key,
        SKETCH: _png(sketch),
        LABEL: _png(label),
        IMAGE: jpeg.getvalue(),
        META: json.dumps({**meta, **derived}, sort_keys=True).encode(),
    }


def _decode(raw: Mapping[str, Any], member: str, mode: str, size: int,
            bad: Callable[[str, str], BadSample]) -> np.ndarray:
    """One image member as the uint8 array it holds; its size, mode and (for the label) format
    are checked from the header, before it is decoded."""
    try:
        img = Image.open(io.BytesIO(raw[member]))  # reads the header only
    except Exception as exc:  # PIL raises many types for corrupt data
        raise bad("undecodable", f"{member} cannot be decoded: {exc}") from exc
    if img.size != (size, size):
        raise bad("size", f"{member} is {img.size[0]}x{img.size[1]}, expected {size}x{size}")
    if img.mode != mode:
        raise bad("mode", f"{member} has mode {img.mode}, expected {mode}")
    if member == LABEL and img.format != "PNG":
        raise bad("format", f"{member} is {img.format}, expected lossless PNG")
    try:
        img.load()
    except Exception as exc:
        raise bad("undecodable", f"{member} cannot be decoded: {exc}") from exc
    return np.asarray(img)


def decode_sample(raw: Mapping[str, Any], *, shard: str, num_classes: int, image_size: int) -> dict[str, Any]:
    """The checked arrays of one raw sample (members grouped by key), or BadSample.

    Returns {"key": str, "sketch": uint8 [H,W], "label": uint8 [H,W] (class indices),
    "image": uint8 [H,W,3]}: the bytes the shard holds, read-only; ``data.batch`` turns
    batches of them into what a step trains on.
    """
    key = str(raw.get("__key__", "<no key>"))

    def bad(kind: str, reason: str) -> BadSample:
        return BadSample(shard, key, reason, kind)

    if (problem := key_problem(key)) is not None:
        raise bad("key", problem)
    missing = [m for m in MEMBERS if m not in raw]
    if missing:
        raise bad("missing", f"missing member(s) {', '.join(missing)}")
    try:
        meta = json.loads(raw[META])
    except ValueError as exc:
        raise bad("json", f"{META} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise bad("json", f"{META} is not a JSON object")
    sketch = _decode(raw, SKETCH, "L", image_size, bad)
    label = _decode(raw, LABEL, "L", image_size, bad)
    image = _decode(raw, IMAGE, "RGB", image_size, bad)
    top = int(label.max())
    if top >= num_classes:
        raise bad("class", f"{LABEL} holds class {top}, but num_classes is {num_classes}")
    return {"key": key, "sketch": sketch, "label": label, "image": image}
