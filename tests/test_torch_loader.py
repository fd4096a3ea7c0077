"""The torch shard loader: exact resume, equal and disjoint rank streams, bad samples, bad specs."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from ssgan_dist.data.batch import step_tensors
from ssgan_dist.data.schema import BadSample
from ssgan_dist.data.skips import Skipped
from ssgan_dist.data.shards import ShardSpecError, resolve_shards
from ssgan_dist.data.torch_loader import build_torch_loader
from badsamples import KINDS, write_bad_shards


def _loader(shards, *, rank=0, world=1, workers=0, batch=2, on_error="skip", seed=3, flip=True):
    return build_torch_loader(
        resolve_shards(str(shards)), seed=seed, rank=rank, world_size=world, num_workers=workers,
        batch_size=batch, num_classes=20, image_size=32, on_error=on_error, flip=flip,
    )


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batch_layout(shards32):
    batch = next(_loader(shards32))
    assert batch["sketch"].shape == (2, 1, 32, 32) and batch["sketch"].dtype == torch.uint8
    assert batch["label"].shape == (2, 32, 32) and batch["label"].dtype == torch.uint8
    assert batch["image"].shape == (2, 3, 32, 32) and batch["image"].dtype == torch.uint8
    assert len(batch["key"]) == 2 and batch["skipped"] == Skipped()
    x = step_tensors(batch, torch.device("cpu"))
    assert x["sketch"].dtype == torch.float32 and 0 <= x["sketch"].min() and x["sketch"].max() <= 1
    assert x["label"].dtype == torch.int64 and x["label"].shape == (2, 32, 32)
    assert x["image"].dtype == torch.float32 and -1 <= x["image"].min() and x["image"].max() <= 1


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_same_sequence(shards32, workers):
    """Stopped after k batches and rebuilt from its state, the loader yields what an
    uninterrupted one yields next, across shard and epoch boundaries."""
    full = _take(_loader(shards32, workers=workers, batch=3), 20)
    for k in (5, 7):
        first = _loader(shards32, workers=workers, batch=3)
        _take(first, k)
        state = first.state_dict()
        resumed = _loader(shards32, workers=workers, batch=3)
        resumed.load_state_dict(state)
        rest = _take(resumed, 20 - k)
        for a, b in zip(full[k:], rest):
            assert a["key"] == b["key"]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_order_depends_on_seed_and_covers_epochs(shards32):
    keys = lambda loader: [k for b in _take(loader, 12) for k in b["key"]]  # noqa: E731
    a, b = keys(_loader(shards32, seed=1)), keys(_loader(shards32, seed=2))
    assert a != b
    assert len(set(a[:24])) == 24  # one epoch: every sample once
    assert set(a[24:]) <= set(a[:24])  # the second epoch repeats the same samples


def test_resume_refuses_other_worker_count(shards32):
    first = _loader(shards32, workers=2)
    _take(first, 1)
    other = _loader(shards32, workers=1)
    with pytest.raises(ValueError, match="data.num_workers"):
        other.load_state_dict(first.state_dict())


@pytest.mark.parametrize("world, workers", [(2, 1), (4, 1), (2, 2)])
def test_ranks_get_disjoint_samples_and_never_run_dry(shards32, world, workers):
    """3 shards over 2-4 ranks: every rank keeps producing batches (no DDP hang) and, within
    the first pass over the shards, no two ranks see the same sample."""
    per_rank = []
    for rank in range(world):
        loader = _loader(shards32, rank=rank, world=world, workers=workers, batch=2)
        per_rank.append([k for b in _take(loader, 8) for k in b["key"]])
    assert all(len(keys) == 16 for keys in per_rank)
    first_pass = [set(keys[:4]) for keys in per_rank]
    for a, b in itertools.combinations(first_pass, 2):
        assert not a & b


@pytest.mark.parametrize("kind", KINDS)
def test_bad_sample_skip_and_raise(tmp_path, kind):
    d = tmp_path / kind
    d.mkdir()
    shard = write_bad_shards(d, kind)
    batches = _take(_loader(d, batch=3, flip=False), 2)  # one pass: 3 good samples + the bad one
    keys = [k for b in batches for k in b["key"]]
    skipped = [s for b in batches for s in b["skipped"].reasons]
    assert "badkey" not in keys and len(keys) == 6
    assert skipped and all("badkey" in s and shard in s for s in skipped)
    for workers in (0, 1):  # a worker's BadSample reaches the main process as a BadSample
        with pytest.raises(BadSample) as err:
            _take(_loader(d, batch=3, on_error="raise", workers=workers), 2)
        assert "badkey" in str(err.value) and shard in str(err.value)


def test_truncated_tar_is_reported(tmp_path, shards32):
    src = sorted(Path(shards32).glob("*.tar"))[0]
    broken = tmp_path / "broken.tar"
    broken.write_bytes(src.read_bytes()[:3000])
    with pytest.raises(BadSample, match="broken.tar"):
        next(_loader(broken, on_error="raise"))


def test_shard_spec_errors(tmp_path):
    with pytest.raises(ShardSpecError, match="data.shards"):
        resolve_shards("")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardSpecError, match="holds no .tar"):
        resolve_shards(str(tmp_path / "empty"))
    with pytest.raises(ShardSpecError, match="no such shard"):
        resolve_shards(str(tmp_path / "x-{000000..000001}.tar"))
    with pytest.raises(ShardSpecError, match="matches no file"):
        resolve_shards(str(tmp_path / "*.tar"))


def test_flip_is_applied_to_all_parts_alike(shards32):
    plain = _take(_loader(shards32, flip=False, batch=4), 6)
    flipped = _take(_loader(shards32, flip=True, batch=4), 6)
    n_flipped = 0
    for a, b in zip(plain, flipped):
        assert a["key"] == b["key"]
        for i in range(4):
            same = torch.equal(a["image"][i], b["image"][i])
            mirrored = torch.equal(a["image"][i].flip(-1), b["image"][i])
            assert same or mirrored
            if not same:
                n_flipped += 1
                assert torch.equal(a["label"][i].flip(-1), b["label"][i])
                assert torch.equal(a["sketch"][i].flip(-1), b["sketch"][i])
    assert 0 < n_flipped < 24
