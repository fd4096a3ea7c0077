"""Real shards with one planted bad sample of each kind the loaders and ``verify`` must catch.

The bad sample is appended to a shard written by the real writer, and the manifest entry
and DALI index are refreshed, so the bad sample is the directory's only problem.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from ssgan_dist.data.schema import encode_sample
from ssgan_dist.data.synthetic import make_scene
from ssgan_dist.data.tarindex import write_index
from ssgan_dist.data.writer import MANIFEST, write_shards

KINDS = ("missing", "undecodable", "class", "size", "image_mode", "label_mode")
BAD_KEY = "badkey"


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def bad_members(kind: str, size: int) -> dict[str, bytes]:
    """Tar members (name -> bytes) of one bad sample keyed BAD_KEY."""
    sketch, label, image, _ = make_scene(99, size)
    members = encode_sample(BAD_KEY, sketch, label, image, {"i": 99})
    if kind == "missing":
        members.pop("image.jpg")
    elif kind == "undecodable":
        members["image.jpg"] = b"not a jpeg at all"
    elif kind == "class":
        big = label.copy()
        big[0, 0] = 25
        members["label.png"] = _png(big)
    elif kind == "size":
        members = encode_sample(BAD_KEY, *make_scene(99, 2 * size)[:3], {"i": 99})
    elif kind == "image_mode":  # a grey JPEG where RGB belongs
        buf = io.BytesIO()
        Image.fromarray(image[..., 1]).save(buf, format="JPEG")
        members["image.jpg"] = buf.getvalue()
    elif kind == "label_mode":  # 16-bit label PNG (same class values)
        members["label.png"] = _png(label.astype(np.uint16))
    else:
        raise ValueError(kind)
    return {name: data for name, data in members.items() if not name.startswith("__")}


def write_bad_shards(directory: Path, kind: str, *, size: int = 32, good: int = 3) -> str:
    """``good`` good samples then one bad one in ``bad-000000.tar``; returns the shard name."""
    samples = [(f"good{i:03d}", *make_scene(i, size)[:3], {"i": i}) for i in range(good)]
    write_shards(samples, directory, name="bad", samples_per_shard=good + 1, num_classes=20, source="test",
                 resolution=size)
    tar_path = directory / "bad-000000.tar"
    with tarfile.open(tar_path, "a") as tar:
        for name, data in bad_members(kind, size).items():
            info = tarfile.TarInfo(f"{BAD_KEY}.{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    write_index(tar_path)
    manifest_path = directory / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    data = tar_path.read_bytes()
    manifest["shards"][0].update(samples=good + 1, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest["samples"] = good + 1
    manifest_path.write_text(json.dumps(manifest))
    return tar_path.name
