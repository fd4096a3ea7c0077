"""Checkpoints are never lost or ignored: unreadable ones leave the keep window, pruning waits
for a verified write, a used run.dir is not silently restarted, killed writes are cleaned up,
write errors keep the previous checkpoint, and every rank resumes from rank 0's choice."""

from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, tiny_config
from ssgan_dist import checkpoint as ckpt
from ssgan_dist.distributed.env import setup
from ssgan_dist.errors import SetupError
from ssgan_dist.train import Trainer

SCRIPTS = Path(__file__).parent / "dist_scripts"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _trainer(run_dir: Path, shards: Path, *extra: str) -> Trainer:
    return Trainer(tiny_config(run_dir, shards, *extra), setup())


def _names(run_dir: Path) -> list[str]:
    return [p.name for p in ckpt.list_checkpoints(run_dir)]


def _cli(run_dir: Path, shards: Path, *extra: str, script: list[str] | None = None,
         preexec=None, timeout: int = 300) -> subprocess.CompletedProcess:
    args = [*(script or ["-m", "ssgan_dist.train"]), *TINY, f"data.shards={shards}", f"run.dir={run_dir}", *extra]
    return subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec)


def _plant_unreadable(run: Path, trained: Path) -> dict[str, str]:
    """Four files named like newer checkpoints, none usable: what each should be reported as."""
    good = ckpt.load(trained)
    (run / "ckpt-000000005.pt").write_bytes(trained.read_bytes()[: trained.stat().st_size // 2])
    (run / "ckpt-000000006.pt").write_bytes(b"not a zip at all\n" * 100)
    torch.save({"weights": torch.zeros(3)}, run / "ckpt-000000007.pt")
    torch.save({**good, "step": 8, "config": {**good["config"], "run": {**good["config"]["run"], "task": "vae"}}},
               run / "ckpt-000000008.pt")
    return {"ckpt-000000005.pt": "Error", "ckpt-000000006.pt": "Error",
            "ckpt-000000007.pt": "not an ssgan-dist checkpoint", "ckpt-000000008.pt": "run.task='vae'"}


def test_unreadable_newer_checkpoints_move_aside_and_the_keep_window_survives(tmp_path, shards32, caplog):
    """Issue 11: an unreadable newer ckpt made the run resume from an older one, then prune
    its own new checkpoint and keep the broken file. Now: truncated, not-a-zip, a foreign
    torch file and an unknown task are moved to *.corrupt with a warning; the run resumes
    from the newest readable one and keeps its own new checkpoints."""
    run = tmp_path / "run"
    _trainer(run, shards32, "train.max_steps=4", "checkpoint.every=2", "checkpoint.keep=2").fit()
    assert _names(run) == ["ckpt-000000002.pt", "ckpt-000000004.pt"]
    planted = _plant_unreadable(run, run / "ckpt-000000004.pt")
    resumed = _trainer(run, shards32, "train.max_steps=6", "checkpoint.every=1", "checkpoint.keep=2")
    with caplog.at_level(logging.WARNING):
        resumed.fit()
    assert resumed.step == 6
    assert _names(run) == ["ckpt-000000005.pt", "ckpt-000000006.pt"]  # its own new ones, within keep=2
    assert ckpt.read(run / "ckpt-000000006.pt")["step"] == 6
    for name, why in planted.items():
        assert (run / f"{name}.corrupt").is_file(), name
        assert f"{run / name} is unreadable" in caplog.text and why in caplog.text, name


def test_prune_waits_for_a_checkpoint_that_reads_back(tmp_path, shards32):
    """A checkpoint that is written without error but does not read back (storage that lost
    data) is an error naming it; the previous checkpoints stay, none is pruned."""
    run = tmp_path / "run"
    proc = _cli(run, shards32, "train.max_steps=6", "checkpoint.every=2", "checkpoint.keep=1",
                script=[str(SCRIPTS / "faulty_train.py"), "corrupt-save", "0", "4"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"checkpoint {run / 'ckpt-000000004.pt'} was written but does not read back" in proc.stderr
    assert f"the previous checkpoint {run / 'ckpt-000000002.pt'} is kept" in proc.stderr
    assert _names(run) == ["ckpt-000000002.pt"] and ckpt.read(run / "ckpt-000000002.pt")["step"] == 2
    assert (run / "ckpt-000000004.pt.corrupt").is_file()


def test_resume_false_in_a_used_run_dir_refuses_and_deletes_nothing(tmp_path, shards32):
    run = tmp_path / "run"
    _trainer(run, shards32, "train.max_steps=2").fit()
    before = (run / "ckpt-000000002.pt").read_bytes()
    proc = _cli(run, shards32, "train.max_steps=3", "checkpoint.resume=false")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for words in (f"run.dir {run} holds checkpoints", "another run.dir", "checkpoint.resume=true", "move its ckpt-*"):
        assert words in proc.stderr, words
    assert _names(run) == ["ckpt-000000002.pt"] and (run / "ckpt-000000002.pt").read_bytes() == before


def test_resume_false_still_resumes_the_restarts_of_its_own_launch(tmp_path, shards32, monkeypatch):
    """torchrun --max-restarts and SLURM requeues start the same command again: with
    checkpoint.resume=false their restarts continue the launch's own checkpoints."""
    run = tmp_path / "run"
    _trainer(run, shards32, "train.max_steps=2", "checkpoint.resume=false").fit()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    restarted = _trainer(run, shards32, "train.max_steps=3", "checkpoint.resume=false")
    restarted.maybe_resume()
    assert restarted.step == 2


def test_stale_temporaries_of_killed_writes_are_removed_at_start(tmp_path, shards32):
    run = tmp_path / "run"
    run.mkdir()
    (run / "samples").mkdir()
    ours = [run / ".ckpt-000000009.pt.k3j_x8a2.tmp", run / ".ckpt-000000009.tmp", run / ".config.yaml.a1b2c3.tmp",
            run / "samples" / ".step-000000100.png.zz9_1.tmp"]
    ours[0].write_bytes(b"half a checkpoint")
    ours[1].mkdir()
    (ours[1] / "G").mkdir()
    ours[2].write_text("run: {")
    ours[3].write_bytes(b"\x89PNG")
    foreign = [run / ".notes.tmp", run / "ckpt-draft.tmp", run / ".ckpt-12.pt.abc.tmp"]
    for path in foreign:
        path.write_text("not ours")
    _trainer(run, shards32, "train.max_steps=1").fit()
    assert not any(p.exists() for p in ours)
    assert all(p.exists() for p in foreign)
    assert _names(run) == ["ckpt-000000001.pt"]


def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: a write past `limit` bytes fails with EFBIG instead of SIGXFSZ
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_failed_checkpoint_write_is_a_clear_error_and_keeps_the_previous(tmp_path, shards32):
    """A real write failure: RLIMIT_FSIZE (1 MiB, a checkpoint is ~7 MiB) in the training
    process, so the write of ckpt 4 fails with EFBIG as a full disk fails with ENOSPC. Exit
    code 2, the path named, no traceback, no temporary left, ckpt 2 kept and resumable."""
    run = tmp_path / "run"
    _trainer(run, shards32, "train.max_steps=2").fit()
    proc = _cli(run, shards32, "train.max_steps=4", "checkpoint.every=2", preexec=_file_size_limit(1 << 20))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"cannot write {run / 'ckpt-000000004.pt'}: File too large (file size limit)" in proc.stderr
    assert f"the previous checkpoint {run / 'ckpt-000000002.pt'} is kept" in proc.stderr
    assert _names(run) == ["ckpt-000000002.pt"] and not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    again = _cli(run, shards32, "train.max_steps=4", "checkpoint.every=2")
    assert again.returncode == 0 and "at step 2" in again.stderr
    assert _names(run)[-1] == "ckpt-000000004.pt"


def test_direct_load_latest_skips_what_is_not_a_checkpoint(tmp_path, trained_checkpoint):
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt-000000002.pt").write_bytes(trained_checkpoint.read_bytes())
    torch.save([1, 2, 3], run / "ckpt-000000003.pt")
    state, path = ckpt.CheckpointManager(run, keep=3).load_latest()
    assert path.name == "ckpt-000000002.pt" and state["step"] == 2
    assert (run / "ckpt-000000003.pt.corrupt").is_file()


# -- every rank loads rank 0's choice -------------------------------------------------------


def _torchrun(run_dir: Path, shards: Path, *extra: str, script: list[str]) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *script, *TINY,
            f"data.shards={shards}", f"run.dir={run_dir}", *extra]
    return subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_every_rank_resumes_from_the_checkpoint_rank_0_picked(tmp_path, shards32):
    """Rank 1 sees a stale listing of run.dir (only ckpt 2; rank 0 sees ckpt 4). Picking
    alone it would load ckpt 2 and the ranks would train on different weights; it loads
    rank 0's ckpt 4 and the run ends exactly like an uninterrupted one."""
    common = ["checkpoint.every=2", "train.max_steps=6"]
    straight = _torchrun(tmp_path / "straight", shards32, *common, script=["-m", "ssgan_dist.train"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = _torchrun(tmp_path / "run", shards32, "checkpoint.every=2", "train.max_steps=4",
                      script=["-m", "ssgan_dist.train"])
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _torchrun(tmp_path / "run", shards32, *common,
                        script=[str(SCRIPTS / "faulty_train.py"), "stale-listing", "1", "3"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 4" in resumed.stderr
    a, b = ckpt.load(tmp_path / "straight" / "ckpt-000000006.pt"), ckpt.load(tmp_path / "run" / "ckpt-000000006.pt")
    for net in ("G", "D"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
    assert [r["data"] for r in a["ranks"]] == [r["data"] for r in b["ranks"]]


@pytest.mark.slow
def test_a_rank_that_cannot_read_the_chosen_checkpoint_stops_every_rank(tmp_path, shards32):
    """No rank waits in a collective for one that failed: both exit with the reason, fast."""
    first = _torchrun(tmp_path / "run", shards32, "train.max_steps=2", script=["-m", "ssgan_dist.train"])
    assert first.returncode == 0, first.stderr[-3000:]
    proc = _torchrun(tmp_path / "run", shards32, "train.max_steps=4", "dist.timeout_s=600",
                     script=[str(SCRIPTS / "faulty_train.py"), "unreadable", "1", "0"])
    assert proc.returncode != 0
    assert "chosen by rank 0, cannot be read on every rank: rank 1: injected" in proc.stderr
    assert "exitcode  : 2" in proc.stderr or "exitcode: 2" in proc.stderr.replace("  ", " ")


def test_write_error_in_a_read_only_place_names_the_path(tmp_path):
    """files.atomic_write: a directory that cannot hold the file is a WriteError naming it."""
    from ssgan_dist.files import WriteError, write_text

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(WriteError, match=f"cannot write {blocker / 'sub' / 'a.txt'}"):
        write_text(blocker / "sub" / "a.txt", "hello")
    with pytest.raises(SetupError):  # a WriteError is a SetupError: exit code 2 in every command
        write_text(blocker / "a.txt", "hello")
