"""The step's gradient traffic and its device-side skip under torchrun (2 ranks, gloo):
compressed all-reduces equal uncompressed ones within the format's rounding, bucket size
changes nothing but the bucket count, accumulation under DDP's no_sync equals a larger batch,
and a NaN on one rank skips the update on both, with no rank drifting from the other."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY

pytestmark = pytest.mark.slow

PROBE = Path(__file__).parent / "dist_scripts" / "step_probe.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _probe(tmp_path: Path, shards: Path, name: str, steps: int, *args: str, ranks: int = 2) -> list[dict]:
    out = tmp_path / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", str(PROBE),
           str(out), str(steps), *TINY, f"data.shards={shards}", f"run.dir={tmp_path / name}-run", *args]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(f"{out}.rank{r}.pt") for r in range(ranks)]


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


def test_compressed_gradients_equal_uncompressed_within_the_formats_rounding(tmp_path, shards32):
    """One step from the same weights on the same batches: only the all-reduce's format
    differs. Rounding each rank's gradient and the sum to a format with unit roundoff u
    (bf16: 2^-8, fp16: 2^-11) moves the average by at most ~2u of the gradients' size, per
    network; and it moves it (the hook is in use)."""
    plain = _probe(tmp_path, shards32, "none", 1)
    for fmt, u in (("bf16", 2.0**-8), ("fp16", 2.0**-11)):
        packed = _probe(tmp_path, shards32, fmt, 1, f"engine.grad_compression={fmt}")
        for net in ("G", "D"):
            a, b = _flat(plain[0]["steps"][0][net]["grads"]), _flat(packed[0]["steps"][0][net]["grads"])
            rel = float((a - b).norm() / a.norm())
            assert 0 < rel < 2 * u, (fmt, net, rel)
            assert torch.equal(b, _flat(packed[1]["steps"][0][net]["grads"]))  # both ranks got the same


def test_bucket_size_changes_the_buckets_not_the_gradients(tmp_path, shards32):
    """engine.bucket_mb reaches DDP: tiny buckets, more all-reduces (the tiny model's gradients
    fit one 25 MiB bucket per network), the same gradients."""
    one = _probe(tmp_path, shards32, "one-bucket", 2)
    many = _probe(tmp_path, shards32, "many-buckets", 2, "engine.bucket_mb=0.001")
    # Step 2: DDP rebuilds its buckets in backward order after the first step.
    assert many[0]["steps"][1]["all_reduces"] > one[0]["steps"][1]["all_reduces"] + 4
    for net in ("G", "D"):  # 2 ranks: each sum is a + b in any bucketing
        assert torch.equal(_flat(one[0]["steps"][0][net]["grads"]), _flat(many[0]["steps"][0][net]["grads"]))


def test_accumulation_under_no_sync_equals_a_larger_batch(tmp_path, shards32):
    """2 ranks x 2 micro-batches of 1 == 2 ranks x 1 batch of 2 on the same samples: gradients
    all-reduced once, after the last micro-batch (batch statistics switched off, see
    test_step.py)."""
    common = ["--bn-eval", "--fixed-global", "4", "model.spectral_norm=false"]
    large = _probe(tmp_path, shards32, "large", 1, *common, "train.batch_size=2")
    accumulated = _probe(tmp_path, shards32, "accumulated", 1, *common, "train.batch_size=1", "train.accum_steps=2")
    for net in ("G", "D"):
        a, b = large[0]["steps"][0][net]["grads"], accumulated[1]["steps"][0][net]["grads"]
        total = float(_flat(a).norm())
        for x, y in zip(a, b, strict=True):
            assert float((x - y).norm()) <= 1e-3 * (float(x.norm()) + 1e-3 * total), net


def test_nan_on_one_rank_skips_the_update_on_both(tmp_path, shards32):
    """Rank 1's G loss is NaN in step 2: on both ranks G keeps step 1's weights (the flag is
    all-reduced and acted on by the fused optimizer on the device), D, whose loss was finite,
    still steps; step 3 updates G again; the ranks never differ."""
    ranks = _probe(tmp_path, shards32, "nan", 3, "--nan-rank", "1", "--nan-step", "2")
    for rank in ranks:
        s = rank["steps"]
        assert [step["skipped"] for step in s] == [False, True, False]
        assert all(torch.equal(a, b) for a, b in zip(s[0]["G"]["params"], s[1]["G"]["params"]))
        assert not all(torch.equal(a, b) for a, b in zip(s[0]["D"]["params"], s[1]["D"]["params"]))
        assert not all(torch.equal(a, b) for a, b in zip(s[1]["G"]["params"], s[2]["G"]["params"]))
        assert all(torch.isfinite(p).all() for net in ("G", "D") for p in s[2][net]["params"])
    for net in ("G", "D"):
        assert all(torch.equal(a, b) for a, b in zip(ranks[0]["steps"][2][net]["params"],
                                                     ranks[1]["steps"][2][net]["params"]))
