"""Real multi-process runs under torchrun (gloo): equivalence with one process, synchronized
BatchNorm, exact resume, recovery from a killed worker, non-finite losses."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import EQUIVALENT, TINY, relative_difference
from ssgan_dist import checkpoint as ckpt

pytestmark = pytest.mark.slow

SCRIPTS = Path(__file__).parent / "dist_scripts"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _torchrun(n: int, *args: str, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            f"--max-restarts={restarts}", *args]


def _fixed(tmp_path: Path, shards: Path, name: str, ranks: int, *extra: str, steps: int = 1) -> dict:
    """G and D after ``steps`` steps on fixed global batches of 4, and the last step's gradients."""
    out = tmp_path / f"{name}.pt"
    args = [str(SCRIPTS / "fixed_batches.py"), str(out), "4", str(steps), *TINY, f"data.shards={shards}",
            f"run.dir={tmp_path / name}", *extra]
    _run(_torchrun(ranks, *args) if ranks > 1 else [sys.executable, *args])
    return torch.load(out)


def _stats(state: dict) -> dict:
    """The BatchNorm running statistics' change from their initial values (mean 0, variance 1)."""
    return {k: v - 1 if k.endswith("running_var") else v for k, v in state.items() if "running" in k}


def test_two_ranks_match_one_process_only_with_sync_bn(tmp_path, shards32):
    """2 ranks x batch 2 == 1 rank x batch 4 on the same samples and z, with the SPADE
    BatchNorm synchronized: the same gradients of the first step (DDP's average) and the same
    running statistics after it, within float noise; unsynchronized, the per-rank statistics
    make both differ by far more than that noise (compared relatively, conftest.EQUIVALENT)."""
    one = _fixed(tmp_path, shards32, "one", 1)
    two = _fixed(tmp_path, shards32, "two", 2)
    unsync = _fixed(tmp_path, shards32, "unsync", 2, "model.sync_bn=false")
    for net in ("G", "D"):
        synced = relative_difference(one[f"{net}_grad"], two[f"{net}_grad"])
        apart = relative_difference(one[f"{net}_grad"], unsync[f"{net}_grad"])
        assert synced < EQUIVALENT, (net, synced)
        assert apart > 10 * EQUIVALENT and apart > 100 * synced, (net, synced, apart)
    synced, apart = (relative_difference(_stats(one["G"]), _stats(other["G"])) for other in (two, unsync))
    assert synced < EQUIVALENT and apart > 10 * EQUIVALENT, (synced, apart)  # statistics of the global batch


def test_grad_checkpointing_with_sync_bn_matches(tmp_path, shards32):
    """Recomputed blocks re-run the synchronized norm's all-reduce in the backward pass; the
    step equals the unchecked one: gradients, BatchNorm statistics and spectral-norm vectors."""
    plain = _fixed(tmp_path, shards32, "plain", 2)
    checked = _fixed(tmp_path, shards32, "checked", 2, "train.grad_checkpoint=true")
    for net in ("G", "D"):
        assert relative_difference(plain[f"{net}_grad"], checked[f"{net}_grad"]) < EQUIVALENT, net
        buffers = [k for k in plain[net] if not k.endswith(("weight", "bias", "weight_orig", "num_batches_tracked"))]
        assert relative_difference({k: plain[net][k] for k in buffers}, checked[net]) < EQUIVALENT, net


def _train_cli(n: int, run_dir: Path, shards: Path, *extra: str, restarts: int = 0, script: list[str] | None = None):
    args = [*(script or ["-m", "ssgan_dist.train"]), *TINY, f"data.shards={shards}", f"run.dir={run_dir}", *extra]
    return _run(_torchrun(n, *args, restarts=restarts))


def _final(run_dir: Path) -> dict:
    return ckpt.load(ckpt.list_checkpoints(run_dir)[-1])


def _assert_same_training(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for net in ("G", "D"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
    assert a["ranks"][1]["data"] == b["ranks"][1]["data"]


def test_two_rank_resume_is_exact(tmp_path, shards32):
    common = ["data.num_workers=1", "checkpoint.every=3"]
    _train_cli(2, tmp_path / "straight", shards32, "train.max_steps=8", *common)
    _train_cli(2, tmp_path / "stopped", shards32, "train.max_steps=5", *common)
    proc = _train_cli(2, tmp_path / "stopped", shards32, "train.max_steps=8", *common)
    assert "resumed from" in proc.stderr and "at step 5" in proc.stderr
    _assert_same_training(_final(tmp_path / "straight"), _final(tmp_path / "stopped"))


def test_killed_worker_restarts_and_resumes(tmp_path, shards32):
    """torchrun --max-restarts 1: rank 1 is SIGKILLed before step 6; the job restarts both
    workers, they resume from the step-4 checkpoint and end at step 9 as if never killed."""
    common = ["checkpoint.every=2", "train.max_steps=9"]
    _train_cli(2, tmp_path / "straight", shards32, *common)
    proc = _train_cli(2, tmp_path / "killed", shards32, *common, restarts=1,
                      script=[str(SCRIPTS / "faulty_train.py"), "kill-at-step", "1", "6"])
    assert "resumed from" in proc.stderr and "at step 4" in proc.stderr
    _assert_same_training(_final(tmp_path / "straight"), _final(tmp_path / "killed"))


def test_kill_during_checkpoint_write_keeps_previous(tmp_path, shards32):
    run = tmp_path / "run"
    args = [*TINY, f"data.shards={shards32}", f"run.dir={run}", "checkpoint.every=2", "train.max_steps=6"]
    proc = subprocess.run([sys.executable, str(SCRIPTS / "faulty_train.py"), "kill-in-save", "0", "4", *args],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["ckpt-000000002.pt"]
    assert ckpt.load(run / "ckpt-000000002.pt")["step"] == 2
    assert any(p.name.endswith(".tmp") for p in run.iterdir())  # the half-written file, never a checkpoint
    resumed = _run([sys.executable, "-m", "ssgan_dist.train", *args])
    assert "at step 2" in resumed.stderr
    straight = tmp_path / "straight"
    _run([sys.executable, "-m", "ssgan_dist.train", *args[:-3], f"run.dir={straight}", *args[-2:]])
    a, b = _final(run), _final(straight)
    for k in a["G"]:
        assert torch.equal(a["G"][k], b["G"][k]), k


def test_nan_on_one_rank_skips_the_step_everywhere(tmp_path, shards32):
    proc = _train_cli(2, tmp_path / "nan", shards32, "train.max_steps=5",
                      script=[str(SCRIPTS / "faulty_train.py"), "nan-at-step", "1", "3"])
    for rank in (0, 1):
        assert f"[rank {rank}] WARNING ssgan_dist.train: step 3 skipped on every rank" in proc.stderr
    state = _final(tmp_path / "nan")
    assert state["nonfinite_steps"] == 1 and state["step"] == 5
    assert all(torch.isfinite(v).all() for net in ("G", "D") for v in state[net].values() if v.is_floating_point())


def test_a_stalled_peer_fails_the_collective_after_dist_timeout_s(tmp_path):
    """dist.timeout_s is the process group's timeout: rank 0 waiting on a peer that stalls
    gives up after it (5 s here) instead of hanging for the old fixed 600 s."""
    proc = subprocess.run(_torchrun(2, str(SCRIPTS / "stalled_peer.py"), "dist.timeout_s=5"), env=ENV,
                          capture_output=True, text=True, timeout=110)
    waited = float(re.search(r"gave up after ([\d.]+) s", proc.stdout).group(1))
    assert 4 <= waited < 30, proc.stdout
