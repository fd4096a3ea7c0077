"""SIGINT and SIGTERM stop a bare or torchrun run like SLURM's path: the step finishes, the
ranks agree, the checkpoint of that step is written, the exit code is 128 + the signal and
no traceback is printed; a second Ctrl-C exits at once; the next start resumes there."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY
from ssgan_dist import checkpoint as ckpt
from ssgan_dist.signals import REPEAT_S, StopOnSignal

SCRIPTS = Path(__file__).parent / "dist_scripts"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LONG = ["train.max_steps=100000", "train.log_every=1", "checkpoint.every=100000"]


# -- the handler itself ---------------------------------------------------------------------


def test_a_signal_is_only_recorded_once_armed():
    stop = StopOnSignal((signal.SIGUSR1,))
    try:
        stop.arm()
        assert stop() is False and stop.exit_code == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == signal.SIGUSR1
        assert stop() is True and stop.exit_code == 128 + signal.SIGUSR1
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_before_the_loop_a_signal_exits_at_once_without_a_traceback():
    stop = StopOnSignal((signal.SIGUSR1,))
    try:
        with pytest.raises(SystemExit) as exited:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(1)  # the handler runs between bytecodes
        assert exited.value.code == 128 + signal.SIGUSR1
    finally:
        stop.restore()


def test_a_repeat_is_not_a_second_ctrl_c():
    """torchrun's agent passes the stop on (SIGINT again, or SIGTERM in older torch), and a
    launcher may forward the Ctrl-C the terminal delivered too: none of these exits at once."""
    stop = StopOnSignal()
    try:
        stop.arm()
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # within REPEAT_S of the first: the same Ctrl-C
        assert stop() is True and stop.exit_code == 130
    finally:
        stop.restore()
    assert REPEAT_S <= 1.0


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def test_loader_workers_outlive_a_stop_signal_to_the_process_group(shards32):
    """A terminal's Ctrl-C, torchrun's agent and SLURM signal every process of the group: the
    torch loader's worker must keep serving the batch the rank is waiting for. Its parent's
    own SIGTERM (torch's shutdown of a stuck worker) still ends it."""
    from ssgan_dist.data.shards import resolve_shards
    from ssgan_dist.data.torch_loader import build_torch_loader

    loader = build_torch_loader(resolve_shards(str(shards32)), seed=0, rank=0, world_size=1, num_workers=1,
                                batch_size=2, num_classes=20, image_size=32, on_error="raise", flip=False)
    next(loader)
    (worker,) = _children(os.getpid())
    for signum in (signal.SIGINT, signal.SIGTERM):  # sent by another process, as the group's signal is
        subprocess.run(["kill", f"-{signal.Signals(signum).name[3:]}", str(worker)], check=True)
    time.sleep(0.5)
    for _ in range(8):
        next(loader)
    assert Path(f"/proc/{worker}").exists() and worker in _children(os.getpid())
    os.kill(worker, signal.SIGTERM)  # from the parent
    deadline = time.monotonic() + 10
    while worker in _children(os.getpid()) and time.monotonic() < deadline:
        os.waitpid(worker, os.WNOHANG)
        time.sleep(0.05)
    assert worker not in _children(os.getpid())


# -- real processes -------------------------------------------------------------------------


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen, timeout_s: float = 180) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file() and (m := re.search(pattern, path.read_text())):
            return m
        assert proc.poll() is None, f"exited early: {proc.communicate()[1][-3000:]}"
        time.sleep(0.05)
    _kill_tree(proc.pid)
    raise AssertionError(f"{pattern!r} not in {path} after {timeout_s} s")


def _kill_tree(pid: int) -> None:
    """A failed test leaves no trainer behind (torchrun's workers run in their own sessions)."""
    try:
        for child in _children(pid):
            _kill_tree(child)
        os.kill(pid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        pass


def _start(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _train_args(run: Path, shards: Path, *extra: str, script: list[str] | None = None) -> list[str]:
    return [*(script or ["-m", "ssgan_dist.train"]), *TINY, f"data.shards={shards}", f"run.dir={run}", *extra]


def _stopped_at(run: Path) -> int:
    return int(re.search(r"stop requested: leaving at step (\d+)", (run / "train.log").read_text()).group(1))


def _assert_same_weights(a: Path, b: Path) -> None:
    x, y = ckpt.load(a), ckpt.load(b)
    assert x["step"] == y["step"]
    for net in ("G", "D"):
        for k in x[net]:
            assert torch.equal(x[net][k], y[net][k]), (net, k)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_bare_process_stops_with_a_checkpoint_and_resumes(tmp_path, shards32, signum):
    """The signal goes to the whole process group, as a terminal's Ctrl-C does: the rank and
    its loader worker get it."""
    run = tmp_path / "run"
    proc = _start([sys.executable, *_train_args(run, shards32, *LONG, "data.num_workers=1")], start_new_session=True)
    _wait_for(run / "train.log", r"step 3/", proc)
    os.killpg(proc.pid, signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err
    assert f"{signal.Signals(signum).name}: stopping after this step and writing its checkpoint" in err
    step = _stopped_at(run)
    assert step >= 3 and [p.name for p in ckpt.list_checkpoints(run)] == [f"ckpt-{step:09d}.pt"]
    total = step + 2
    resumed = subprocess.run([sys.executable, *_train_args(run, shards32, f"train.max_steps={total}",
                                                             "data.num_workers=1")],
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and f"at step {step}" in resumed.stderr, resumed.stderr[-3000:]
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, *_train_args(straight, shards32, f"train.max_steps={total}",
                                                 "data.num_workers=1")], env=ENV, check=True, capture_output=True,
                   timeout=300)
    _assert_same_weights(run / f"ckpt-{total:09d}.pt", straight / f"ckpt-{total:09d}.pt")


def test_a_second_ctrl_c_exits_at_once(tmp_path, shards32):
    """Steps take 2 s from step 3 on: the first SIGINT waits for the step, the second (after
    REPEAT_S) ends the process at once, without a checkpoint and without a traceback."""
    run = tmp_path / "run"
    proc = _start([sys.executable, *_train_args(run, shards32, *LONG,
                                                script=[str(SCRIPTS / "faulty_train.py"), "slow-steps", "0", "3"])])
    _wait_for(run / "train.log", r"step 3/", proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(REPEAT_S + 0.3)
    assert proc.poll() is None  # still finishing its step
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.monotonic() - sent < 1.5, err[-3000:]
    assert "SIGINT again: exiting now, without a checkpoint" in err and "Traceback" not in err
    assert ckpt.list_checkpoints(run) == [] and not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


def _worker_logs(log_dir: Path) -> dict[int, str]:
    """torchrun --redirects 3: each worker's stderr in its own file."""
    return {int(p.parent.name): p.read_text() for p in log_dir.rglob("stderr.log")}


def _rank_pid(agent: int, rank: int, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in Path(f"/proc/{agent}/task/{agent}/children").read_text().split():
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b"".join(environ):
                return int(child)
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} under {agent}")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_torchrun_group_signal_checkpoints_the_step_on_every_rank(tmp_path, shards32, signum):
    """A terminal's Ctrl-C (SIGINT) or a ``kill`` of the launch (SIGTERM) to torchrun's process
    group. The agent passes it on to each worker (their own sessions), as the same signal or
    as SIGTERM after a SIGINT, which is not a second Ctrl-C: both ranks finish the step, agree,
    write its checkpoint and exit without a traceback (torchrun itself then reports the
    signal, its own way)."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    proc = _start(_torchrun("--log-dir", str(logs), "--redirects", "3", *_train_args(run, shards32, *LONG)),
                  start_new_session=True)
    _wait_for(run / "train.log", r"step 3/", proc)
    os.killpg(proc.pid, signum)
    proc.communicate(timeout=120)
    workers = _worker_logs(logs)
    assert sorted(workers) == [0, 1]
    name = signal.Signals(signum).name
    for rank, text in workers.items():
        assert "Traceback" not in text and "again: exiting now" not in text, (rank, text[-3000:])
        assert f"{name}: stopping after this step and writing its checkpoint" in text, rank
    step = _stopped_at(run)
    assert [p.name for p in ckpt.list_checkpoints(run)] == [f"ckpt-{step:09d}.pt"]
    state = ckpt.load(run / f"ckpt-{step:09d}.pt")
    assert state["step"] == step and len(state["ranks"]) == 2
    resumed = subprocess.run(_torchrun(*_train_args(run, shards32, f"train.max_steps={step + 1}")), env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and f"at step {step}" in resumed.stderr, resumed.stderr[-3000:]


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path, shards32):
    """A kill of rank 1 alone (a node agent, an OOM watcher asking politely): the all-reduce
    after the step tells rank 0, both write the checkpoint of that step and exit 143."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    proc = _start(_torchrun("--log-dir", str(logs), "--redirects", "3", *_train_args(run, shards32, *LONG)))
    _wait_for(run / "train.log", r"step 3/", proc)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert re.findall(r"exitcode\s*:\s*(-?\d+)", err) and set(re.findall(r"exitcode\s*:\s*(-?\d+)", err)) == {"143"}, \
        err[-3000:]
    workers = _worker_logs(logs)
    assert all("Traceback" not in text for text in workers.values()), workers
    step = _stopped_at(run)
    assert [p.name for p in ckpt.list_checkpoints(run)] == [f"ckpt-{step:09d}.pt"]
