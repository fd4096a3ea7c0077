"""DeepSpeed engines (one per network) on CPU with gloo: train, save, resume, and agree with DDP."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import TINY
from ssgan_dist import checkpoint as ckpt
from test_distributed import _run, _torchrun

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

STEP_LINE = re.compile(r"step (\d+)/\d+ .* g_total (\S+)\s+d_hinge (\S+)")


def _train(run_dir, shards, *extra):
    args = ["-m", "ssgan_dist.train", *TINY, f"data.shards={shards}", f"run.dir={run_dir}",
            "train.log_every=1", "checkpoint.every=2", *extra]
    return _run(_torchrun(2, *args))


def _losses(stderr: str) -> dict[int, tuple[float, float]]:
    return {int(m[1]): (float(m[2]), float(m[3])) for m in STEP_LINE.finditer(stderr)}


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_trains_resumes_and_matches_ddp(tmp_path, shards32, stage):
    ds = ["engine.name=deepspeed", f"engine.zero_stage={stage}"]
    straight = _train(tmp_path / "ds", shards32, "train.max_steps=4", *ds)
    ddp = _train(tmp_path / "ddp", shards32, "train.max_steps=4")

    # Same model, data, z and Adam: the first steps' losses agree (the reduction order of the
    # gradients differs, so only loosely after a few Adam steps).
    ds_losses, ddp_losses = _losses(straight.stderr), _losses(ddp.stderr)
    assert sorted(ds_losses) == [1, 2, 3, 4]
    for step in (1, 2, 3):
        for a, b in zip(ds_losses[step], ddp_losses[step]):
            assert a == pytest.approx(b, rel=0.05), (step, ds_losses[step], ddp_losses[step])

    # Sharded checkpoints: every rank's ZeRO state beside a state.pt that tools can read.
    final = tmp_path / "ds" / "ckpt-000000004"
    assert final.is_dir() and (final / ckpt.STATE_FILE).is_file()
    assert (final / "G").is_dir() and (final / "D").is_dir()

    _train(tmp_path / "resumed", shards32, "train.max_steps=2", *ds)
    resumed = _train(tmp_path / "resumed", shards32, "train.max_steps=4", *ds)
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr
    a, b = ckpt.load(final), ckpt.load(tmp_path / "resumed" / "ckpt-000000004")
    for net in ("G", "D"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
    assert _losses(resumed.stderr)[4] == ds_losses[4]
