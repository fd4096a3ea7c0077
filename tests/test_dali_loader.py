"""The DALI loader on CPU: the torch loader's samples and layout, aligned flips, disjoint and
endless rank streams, exact resume, bad samples; and how ``data.loader`` is chosen."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch

from badsamples import BAD_KEY, KINDS, write_bad_shards
from ssgan_dist.data import dali_loader, loaders
from ssgan_dist.data.batch import step_tensors
from ssgan_dist.data.schema import BadSample, encode_sample
from ssgan_dist.data.shards import resolve_shards
from ssgan_dist.data.skips import Skipped
from ssgan_dist.data.synthetic import make_scene
from ssgan_dist.data.torch_loader import build_torch_loader
from ssgan_dist.data.writer import build_synthetic_shards
from ssgan_dist.errors import SetupError

needs_dali = pytest.mark.skipif(not dali_loader.dali_available(), reason="NVIDIA DALI is not installed")
CPU = torch.device("cpu")


def _dali(shards, *, rank=0, world=1, batch=4, flip=False, on_error="skip", seed=3):
    return dali_loader.build_dali_loader(
        resolve_shards(str(shards)), seed=seed, rank=rank, world_size=world, num_workers=1, batch_size=batch,
        num_classes=20, image_size=32, on_error=on_error, flip=flip, device=CPU)


def _torch(shards, *, batch=4, flip=False):
    return build_torch_loader(resolve_shards(str(shards)), seed=3, rank=0, world_size=1, num_workers=0,
                              batch_size=batch, num_classes=20, image_size=32, on_error="skip", flip=flip)


def _samples(loader, batches):
    """key -> (sketch, label, image) as a step takes them, over ``batches`` batches."""
    out = {}
    for _ in range(batches):
        b = next(loader)
        x = step_tensors(b, CPU)
        for i, key in enumerate(b["key"]):
            out[key] = (x["sketch"][i], x["label"][i], x["image"][i])
    return out


@needs_dali
def test_same_samples_and_layout_as_the_torch_loader(shards32):
    loader = _dali(shards32)
    batch = next(loader)
    reference = next(_torch(shards32))
    for part in ("sketch", "label", "image"):  # one batch layout: uint8, same shapes and strides
        assert batch[part].dtype == torch.uint8 and batch[part].shape == reference[part].shape, part
        assert batch[part].stride() == reference[part].stride(), part
    assert batch["skipped"] == Skipped() and len(batch["key"]) == 4
    x = step_tensors(batch, CPU)
    dali = _samples(loader, 5)  # with the first: one epoch of 24
    dali.update({k: (x["sketch"][i], x["label"][i], x["image"][i]) for i, k in enumerate(batch["key"])})
    ref = _samples(_torch(shards32), 6)
    assert set(dali) == set(ref) and len(ref) == 24
    for key, (sketch, label, image) in ref.items():
        assert torch.equal(dali[key][0], sketch) and torch.equal(dali[key][1], label), key
        assert (dali[key][2] - image).abs().max() <= 2 / 127.5, key  # JPEG decoders may differ by a level


@needs_dali
def test_flips_are_identical_for_sketch_label_and_image(shards32):
    ref = _samples(_torch(shards32), 6)
    flipped = _samples(_dali(shards32, flip=True), 6)
    mirrored = 0
    for key, parts in flipped.items():
        same = all(torch.equal(a, b) for a, b in zip(parts[:2], ref[key][:2]))
        flip = all(torch.equal(a, b.flip(-1)) for a, b in zip(parts[:2], ref[key][:2]))
        assert same or flip, key
        assert (parts[2] - (ref[key][2].flip(-1) if flip else ref[key][2])).abs().max() <= 2 / 127.5
        mirrored += flip and not same
    assert 0 < mirrored < len(flipped)


@needs_dali
@pytest.mark.parametrize("count", [24, 25])
def test_ranks_get_disjoint_samples_and_equal_endless_batches(tmp_path, count):
    """24 or 25 samples over 2 ranks: within the first pass no sample is on both ranks, and
    each rank serves full batches for many more steps than it has samples."""
    build_synthetic_shards(tmp_path, count=count, samples_per_shard=8, size=32, seed=1)
    per_rank = []
    for rank in range(2):
        loader = _dali(tmp_path, rank=rank, world=2, batch=4)
        batches = [next(loader) for _ in range(10)]
        assert all(len(b["key"]) == 4 and b["image"].shape[0] == 4 for b in batches)
        per_rank.append([k for b in batches for k in b["key"]])
    first_pass = [set(keys[:12]) for keys in per_rank]
    assert all(len(s) == 12 for s in first_pass) and not first_pass[0] & first_pass[1]
    assert set(per_rank[0]) | set(per_rank[1]) == {f"syn{i:09d}" for i in range(count)}


@needs_dali
def test_resume_continues_the_same_sequence(shards32):
    """Stopped after k batches and rebuilt from its state (reader position and flip
    coins), the loader yields what an uninterrupted one yields next, across epochs."""
    uninterrupted = _dali(shards32, batch=5, flip=True)
    full = [next(uninterrupted) for _ in range(12)]
    for k in (0, 3, 7):
        first = _dali(shards32, batch=5, flip=True)
        for _ in range(k):
            next(first)
        resumed = _dali(shards32, batch=5, flip=True)
        resumed.load_state_dict(first.state_dict())
        for want in full[k:]:
            got = next(resumed)
            assert got["key"] == want["key"]
            assert torch.equal(got["image"], want["image"]) and torch.equal(got["label"], want["label"])


@needs_dali
def test_resume_refuses_another_layout_or_loader(shards32):
    first = _dali(shards32)
    next(first)
    with pytest.raises(SetupError, match="batch_size=4"):
        _dali(shards32, batch=2).load_state_dict(first.state_dict())
    with pytest.raises(SetupError, match="saved by the torch loader"):
        _dali(shards32).load_state_dict(_torch(shards32).state_dict())
    with pytest.raises(SetupError, match="data.loader=dali"):
        _torch(shards32).load_state_dict(first.state_dict())


@needs_dali
def test_a_stale_index_is_not_used(tmp_path):
    """A sample appended to a tar after its index was written is still read."""
    build_synthetic_shards(tmp_path, count=3, samples_per_shard=3, size=32, seed=0)
    sketch, label, image, _ = make_scene(7, 32)
    with tarfile.open(tmp_path / "shard-000000.tar", "a") as tar:
        for name, data in encode_sample("late", sketch, label, image, {}).items():
            if not name.startswith("__"):
                info = tarfile.TarInfo(f"late.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert "late" in _samples(_dali(tmp_path, batch=2), 2)


@needs_dali
@pytest.mark.parametrize("kind", [k for k in KINDS if k != "undecodable"])
def test_bad_samples_are_skipped_or_raised_with_shard_and_key(tmp_path, kind):
    shard = write_bad_shards(tmp_path, kind)
    loader = _dali(tmp_path, batch=2)
    batches = [next(loader) for _ in range(4)]  # two passes over 3 good + 1 bad
    assert all(len(b["key"]) == 2 for b in batches) and BAD_KEY not in {k for b in batches for k in b["key"]}
    skipped = [s for b in batches for s in b["skipped"].reasons]
    assert skipped and all(BAD_KEY in s and shard in s for s in skipped)
    assert sum(b["skipped"].count for b in batches) == len(skipped)
    with pytest.raises(BadSample) as err:  # "missing" already when the loader is built
        strict = _dali(tmp_path, batch=2, on_error="raise")
        for _ in range(4):
            next(strict)
    assert BAD_KEY in str(err.value) and shard in str(err.value)


@needs_dali
@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_undecodable_image_stops_with_a_pointer_to_verify(tmp_path, on_error):
    write_bad_shards(tmp_path, "undecodable")
    loader = _dali(tmp_path, batch=2, on_error=on_error)
    with pytest.raises(SetupError, match="ssgan_dist.data.build verify") as err:
        for _ in range(4):
            next(loader)
    assert "data.loader=torch" in str(err.value)


def test_missing_dali_says_how_to_install(shards32, monkeypatch):
    monkeypatch.setattr(dali_loader, "dali_available", lambda: False)
    with pytest.raises(SetupError, match=r"pip install -e '\.\[dali-cuda12\]'"):
        _dali(shards32)


@pytest.mark.parametrize("choice, device, installed, want", [
    ("auto", "cpu", True, "torch"), ("auto", "cuda", True, "dali"), ("auto", "cuda", False, "torch"),
    ("torch", "cuda", True, "torch"), ("dali", "cpu", True, "dali"),
])
def test_choose_loader(monkeypatch, choice, device, installed, want):
    monkeypatch.setattr(loaders, "dali_available", lambda: installed)
    kind, why = loaders.choose_loader(choice, torch.device(device))
    assert kind == want and why.startswith(f"data.loader={choice}")



@needs_dali
def test_training_resumes_exactly_with_dali(tmp_path, shards32):
    """Trainer over the DALI loader: 4 steps, stop, resume to 6 = 6 steps straight."""
    from conftest import tiny_config
    from ssgan_dist.distributed.env import setup
    from ssgan_dist.train import Trainer

    def trainer(run, steps):
        cfg = tiny_config(tmp_path / run, shards32, f"train.max_steps={steps}", "train.batch_size=3",
                          "data.loader=dali", "data.flip=true")
        return Trainer(cfg, setup())

    straight = trainer("a", 6)
    straight.fit()
    trainer("b", 4).fit()
    resumed = trainer("b", 6)
    resumed.fit()
    assert resumed.step == 6
    for name, a, b in [("G", straight.task.G, resumed.task.G), ("D", straight.task.D, resumed.task.D)]:
        for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), f"{name}.{key}"
