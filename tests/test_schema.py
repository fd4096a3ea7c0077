"""The sample schema through real tars: encode -> TarWriter -> webdataset -> decode."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ssgan_dist import labels
from ssgan_dist.data import schema
from ssgan_dist.data.schema import BadSample, decode_sample, encode_sample
from ssgan_dist.data.synthetic import make_scene
from ssgan_dist.labels import colorize, onehot

SIZE = 32


def _arrays(seed: int = 3):
    sketch, label, image, meta = make_scene(seed, SIZE)
    return sketch, label, image, {"source_id": meta["source_id"], "split": "train"}


def _write(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path), encoder=False) as tar:
        for s in samples:
            tar.write(s)
    return path


def _read(path: Path) -> list[dict]:
    return list(wds.WebDataset(str(path), shardshuffle=False))


def _png(array: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    img = Image.fromarray(array)
    buf = io.BytesIO()
    (img.convert(mode) if mode else img).save(buf, format=fmt)
    return buf.getvalue()


def test_roundtrip_through_a_tar(tmp_path):
    sketch, label, image, meta = _arrays()
    raw = _read(_write(tmp_path / "s-000000.tar", [encode_sample("syn000000001", sketch, label, image, meta)]))
    assert len(raw) == 1
    out = decode_sample(raw[0], shard="s-000000.tar", num_classes=20, image_size=SIZE)
    assert out["key"] == "syn000000001"
    assert out["sketch"].dtype == np.uint8 and np.array_equal(out["sketch"], sketch)  # lossless, as stored
    assert out["label"].dtype == np.uint8 and np.array_equal(out["label"], label)
    assert out["image"].dtype == np.uint8 and out["image"].shape == (SIZE, SIZE, 3)
    err = np.abs(out["image"].astype(float) - image)
    assert err.mean() < 3.0 and err.max() < 24  # JPEG q95, 4:4:4, of a grainy 32 px image


def test_encode_members_and_meta():
    sketch, label, image, meta = _arrays()
    enc = encode_sample("k1", sketch, label, image, {**meta, "extra": 5})
    assert set(enc) == {"__key__", *schema.MEMBERS}
    assert enc[schema.IMAGE][:2] == b"\xff\xd8" and enc[schema.LABEL][:4] == b"\x89PNG"
    saved = json.loads(enc[schema.META])
    assert saved["size"] == [SIZE, SIZE] and saved["extra"] == 5 and saved["split"] == "train"
    assert saved["classes"] == sorted(set(np.unique(label).tolist()) - {0})


@pytest.mark.parametrize("change, message", [
    (dict(key="a.b"), "key"),
    (dict(meta={"source_id": "x", "split": "train", "classes": [99]}), "classes"),
    (dict(label=np.zeros((SIZE, SIZE), np.int64)), "label.png"),
    (dict(image=np.zeros((SIZE, SIZE), np.uint8)), "image.jpg"),
    (dict(sketch=np.zeros((SIZE + 1, SIZE), np.uint8)), "sketch.png"),
])
def test_encode_rejects_inconsistent_input(change, message):
    sketch, label, image, meta = _arrays()
    args = {"key": "k", "sketch": sketch, "label": label, "image": image, "meta": meta, **change}
    with pytest.raises(ValueError, match=message):
        encode_sample(**args)


def _bad_samples() -> dict[str, tuple[dict, str]]:
    """key -> (members, expected words of the reason)."""
    sketch, label, image, meta = _arrays()
    good = encode_sample("good", sketch, label, image, meta)

    def variant(key: str, **members) -> dict:
        out = {**good, "__key__": key, **members}
        return {k: v for k, v in out.items() if v is not None}

    big = np.full((SIZE, SIZE), 25, np.uint8)
    small = np.zeros((SIZE // 2, SIZE // 2), np.uint8)
    return {
        "good": (good, ""),
        "noimage": (variant("noimage", **{schema.IMAGE: None}), "missing member(s) image.jpg"),
        "nojson": (variant("nojson", **{schema.META: None}), "missing member(s) json"),
        "corrupt": (variant("corrupt", **{schema.IMAGE: b"\xff\xd8 not a jpeg"}), "image.jpg cannot be decoded"),
        "truncated": (variant("truncated", **{schema.LABEL: good[schema.LABEL][:40]}), "label.png cannot be decoded"),
        "badjson": (variant("badjson", **{schema.META: b"{"}), "not valid JSON"),
        "bigclass": (variant("bigclass", **{schema.LABEL: _png(big)}), "class 25"),
        "smalllabel": (variant("smalllabel", **{schema.LABEL: _png(small)}), "label.png is 16x16"),
        "smallimage": (variant("smallimage", **{schema.IMAGE: _png(np.zeros((16, 16, 3), np.uint8), fmt="JPEG")}),
                       "image.jpg is 16x16"),
        "rgbsketch": (variant("rgbsketch", **{schema.SKETCH: _png(sketch, "RGB")}), "sketch.png has mode RGB"),
        "greyimage": (variant("greyimage", **{schema.IMAGE: _png(image, "L", "JPEG")}), "image.jpg has mode L"),
        "jpeglabel": (variant("jpeglabel", **{schema.LABEL: _png(label, fmt="JPEG")}), "lossless PNG"),
    }


def test_every_bad_sample_kind_names_shard_and_key(tmp_path):
    cases = _bad_samples()
    path = _write(tmp_path / "bad-000003.tar", [members for members, _ in cases.values()])
    raws = _read(path)
    assert [r["__key__"] for r in raws] == list(cases)
    for raw in raws:
        key = raw["__key__"]
        if key == "good":
            decode_sample(raw, shard=path.name, num_classes=20, image_size=SIZE)
            continue
        with pytest.raises(BadSample) as info:
            decode_sample(raw, shard=path.name, num_classes=20, image_size=SIZE)
        bad = info.value
        assert (bad.shard, bad.key) == (path.name, key)
        assert path.name in str(bad) and repr(key) in str(bad)
        assert cases[key][1] in bad.reason, (key, bad.reason)


def test_label_at_the_class_limit():
    sketch, label, image, meta = _arrays()
    raw = encode_sample("k", sketch, label, image, meta)
    top = int(label.max())
    decode_sample(raw, shard="s", num_classes=top + 1, image_size=SIZE)
    with pytest.raises(BadSample, match=f"class {top}"):
        decode_sample(raw, shard="s", num_classes=top, image_size=SIZE)
    with pytest.raises(BadSample, match="expected 64x64"):
        decode_sample(raw, shard="s", num_classes=20, image_size=64)


def test_onehot():
    label = torch.tensor([[[0, 1], [19, 5]], [[2, 2], [0, 19]]])
    oh = onehot(label, 20)
    assert oh.shape == (2, 20, 2, 2) and oh.dtype == torch.float32 and oh.device == label.device
    assert torch.equal(oh.sum(1), torch.ones(2, 2, 2))
    assert torch.equal(oh.argmax(1), label)
    with pytest.raises(ValueError, match="B,H,W"):
        onehot(label[0], 20)


def test_colorize():
    label = np.arange(20, dtype=np.uint8).reshape(4, 5)
    rgb = colorize(label)
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 5, 3)
    assert tuple(rgb[0, 0]) == (255, 255, 255)
    assert len({tuple(c) for c in rgb.reshape(-1, 3)}) == 20  # every class its own colour
    assert np.array_equal(colorize(torch.from_numpy(label).long()), rgb)
    assert len({tuple(c) for c in labels.PALETTE}) == 256
    assert len(labels.CLASS_NAMES) == 20 and labels.CLASS_NAMES[18] == "sky"
