"""The one place that knows what a sample is: its tar members, their encoding and checks.

Writers (synthetic, SketchyCOCO, folders) call ``encode_sample``; every loader calls
``decode_sample``, which either returns tensors that are exactly what the shard holds or
raises ``BadSample`` naming shard and key, so a broken sample is never a silent wrong batch.
"""

from __future__ import annotations

import io
import json
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image

from ssgan_dist.errors import SetupError

SKETCH = "sketch.png"  # 8-bit grey, dark strokes on white (as SketchyCOCO's sketches)
LABEL = "label.png"  # 8-bit class index per pixel, PNG so it stays exact; 0 = no label
IMAGE = "image.jpg"  # RGB photo
META = "json"  # source_id, split, size [h, w], classes present in the label
MEMBERS = (SKETCH, LABEL, IMAGE, META)
JPEG_QUALITY = 95


class BadSample(SetupError):
    """A sample that cannot be used; says where it is so it can be found and fixed."""

    def __init__(self, shard: str, key: str | None = None, reason: str | None = None):
        # torch's DataLoader re-raises a worker's exception as type(exc)(message): then the
        # one argument is the whole message, which already names shard and key.
        super().__init__(shard, key, reason)
        self.shard, self.key, self.reason = shard, key, reason

    def __str__(self) -> str:
        if self.key is None:
            return self.shard
        return f"bad sample {self.key!r} in shard {self.shard}: {self.reason}"


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
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r}: must be non-empty without '.' or '/' (webdataset splits on them)")
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


def _open(raw: Mapping[str, Any], member: str, mode: str, size: int, bad) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(raw[member]))
        img.load()
    except Exception as exc:  # PIL raises many types for corrupt data
        raise bad(f"{member} cannot be decoded: {exc}") from exc
    if img.mode != mode:
        raise bad(f"{member} has mode {img.mode}, expected {mode}")
    if img.size != (size, size):
        raise bad(f"{member} is {img.size[0]}x{img.size[1]}, expected {size}x{size}")
    if member == LABEL and img.format != "PNG":
        raise bad(f"{member} is {img.format}, expected lossless PNG")
    return np.array(img)


def decode_sample(raw: Mapping[str, Any], *, shard: str, num_classes: int, image_size: int) -> dict[str, Any]:
    """Tensors of one raw webdataset sample, checked, or BadSample.

    Returns {"key": str, "sketch": float32 [1,H,W] in [0,1], "label": int64 [H,W],
    "image": float32 [3,H,W] in [-1,1]}.
    """
    key = str(raw.get("__key__", "<no key>"))

    def bad(reason: str) -> BadSample:
        return BadSample(shard, key, reason)

    missing = [m for m in MEMBERS if m not in raw]
    if missing:
        raise bad(f"missing member(s) {', '.join(missing)}")
    try:
        meta = json.loads(raw[META])
    except ValueError as exc:
        raise bad(f"{META} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise bad(f"{META} is not a JSON object")
    sketch = _open(raw, SKETCH, "L", image_size, bad)
    label = _open(raw, LABEL, "L", image_size, bad)
    image = _open(raw, IMAGE, "RGB", image_size, bad)
    top = int(label.max())
    if top >= num_classes:
        raise bad(f"{LABEL} holds class {top}, but num_classes is {num_classes}")
    return {
        "key": key,
        "sketch": torch.from_numpy(sketch).float().div_(255.0).unsqueeze(0),
        "label": torch.from_numpy(label).long(),
        "image": torch.from_numpy(image).permute(2, 0, 1).float().div_(127.5).sub_(1.0),
    }
