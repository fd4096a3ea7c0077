"""A real few-step training run over a shard with a planted bad sample: with
data.on_error=skip it trains on and counts the sample, with raise it stops naming shard
and key, for the torch loader and the DALI loader (CPU)."""

from __future__ import annotations

import pytest

from badsamples import BAD_KEY, KINDS, write_bad_shards
from conftest import tiny_config
from ssgan_dist.data.dali_loader import dali_available
from ssgan_dist.data.schema import BadSample
from ssgan_dist.distributed.env import setup
from ssgan_dist.errors import SetupError
from ssgan_dist.train import Trainer

LOADERS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="DALI not installed"))]


def _trainer(tmp_path, loader: str, on_error: str) -> Trainer:
    cfg = tiny_config(tmp_path / "run", tmp_path / "shards", "train.max_steps=3", f"data.loader={loader}",
                      f"data.on_error={on_error}", "data.flip=false")
    return Trainer(cfg, setup())


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("kind", KINDS)
def test_skip_trains_on_and_counts(tmp_path, loader, kind):
    if loader == "dali" and kind == "undecodable":
        pytest.skip("DALI cannot skip an undecodable image: see test_undecodable_stops_dali_with_a_pointer")
    write_bad_shards(tmp_path / "shards", kind)
    trainer = _trainer(tmp_path, loader, "skip")
    trainer.fit()
    assert trainer.step == 3 and trainer.skipped_samples >= 1


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("kind", KINDS)
def test_raise_stops_naming_shard_and_key(tmp_path, loader, kind):
    shard = write_bad_shards(tmp_path / "shards", kind)
    expected = SetupError if loader == "dali" and kind == "undecodable" else BadSample
    with pytest.raises(expected) as err:
        _trainer(tmp_path, loader, "raise").fit()
    if expected is BadSample:
        assert BAD_KEY in str(err.value) and shard in str(err.value)
    else:
        assert "ssgan_dist.data.build verify" in str(err.value)
