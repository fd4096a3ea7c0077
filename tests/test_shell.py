"""The command shell: progress on a terminal and off one, log lines and the bar, errors printed once.

Real processes: stderr a pipe (what a SLURM .err file or CI sees) or a pseudo-terminal
(what a user's terminal is), and a real 2-rank torchrun for the error that every rank hits.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from conftest import TINY
from ssgan_dist.shell import Progress, format_duration, plain, track

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def _on_terminal(cmd: list[str], cwd: Path, timeout: float = 300) -> tuple[int, str]:
    """Run with stdout and stderr on a 120x24 pseudo-terminal; (exit code, everything it wrote)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    out, deadline = b"", time.time() + timeout
    try:
        while time.time() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the terminal closes when the process exits
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        else:
            raise AssertionError(f"still running after {timeout} s: {out[-2000:]!r}")
    finally:
        os.close(master)
        proc.kill()
    return proc.wait(), out.decode(errors="replace")


def _train(tmp_path: Path, shards: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ssgan_dist.train", *TINY, f"run.dir={tmp_path / 'run'}", f"data.shards={shards}",
            "train.progress=true", *extra]


def test_off_a_terminal_training_writes_plain_lines_with_step_eta_losses_and_lr(tmp_path, shards32):
    out = subprocess.run(_train(tmp_path, shards32, "train.max_steps=4", "train.log_every=2"), cwd=tmp_path,
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "\r" not in out.stderr and "\r" not in out.stdout  # no bar frames in a .err file
    lines = [ln for ln in out.stderr.splitlines() if "ssgan_dist.train: step " in ln]
    assert len(lines) == 2, out.stderr
    for line, step in zip(lines, (2, 4)):
        assert STAMP.match(line)
        assert re.search(rf"step {step}/4 \({50 * step // 2}%\)  [\d.]+ img/s  ETA \d+:\d\d  ", line), line
        for term in ("g_gan", "g_fm", "g_total", "d_hinge"):
            assert re.search(rf"{term} -?\d+\.\d{{4}}", line), (term, line)
        assert re.search(r"lr G 0\.0002 D 0\.0002$", line), line


def test_on_a_terminal_log_lines_go_above_the_bar_never_into_it(tmp_path, shards32):
    code, out = _on_terminal(_train(tmp_path, shards32, "train.max_steps=6", "train.log_every=2"), tmp_path)
    assert code == 0, out[-3000:]
    assert re.search(r"train: +\d+%\|", out), "no progress bar on the terminal"
    # Each log record starts on a clean line: at most the bar's clearing (carriage returns and
    # blanks) before it, and nothing of the bar after it on its line.
    records = [ln for ln in out.split("\n") if " INFO " in ln or " WARNING " in ln]
    assert len([r for r in records if "ssgan_dist.train: step " in r]) == 3, out
    for record in records:
        shown = _rendered(record)
        assert STAMP.match(shown) and not re.search(r"\d+%\|", shown), repr(record)


def _rendered(line: str) -> str:
    """What a terminal shows of one line: every carriage return writes over it from column 0."""
    cells: list[str] = []
    for part in line.split("\r"):
        cells[: len(part)] = part
    return "".join(cells).rstrip()


def test_progress_off_a_terminal_logs_periodic_lines_and_a_last_one(caplog):
    with caplog.at_level(logging.INFO, logger="ssgan_dist.progress"):
        with Progress("evaluate", 4, unit="sample", every_s=0.0) as progress:
            for _ in range(2):
                progress.update(2)
            progress.set_postfix({"fid": "12.3"})
    messages = [r.getMessage() for r in caplog.records if r.name == "ssgan_dist.progress"]
    assert messages[0].startswith("evaluate: 2/4 samples (50%), ") and "ETA" in messages[0], messages
    assert messages[-1].startswith("evaluate: 4/4 samples (100%), ") and " in 0:00" in messages[-1], messages
    assert messages[-1].endswith("  fid 12.3")


def test_track_counts_items_as_they_are_done_and_nothing_when_disabled(caplog):
    with caplog.at_level(logging.INFO, logger="ssgan_dist.progress"):
        assert list(track([[1, 2], [3]], "generate", 3, unit="input", size=len, every_s=1e9)) == [[1, 2], [3]]
        assert list(track([1], "quiet", 1, enabled=False)) == [1]
    messages = [r.getMessage() for r in caplog.records if r.name == "ssgan_dist.progress"]
    assert len(messages) == 1 and messages[0].startswith("generate: 3/3 inputs (100%)"), messages


def test_format_duration_and_plain_text():
    assert [format_duration(s) for s in (0, 7.4, 723, 3723)] == ["0:00", "0:07", "12:03", "1:02:03"]
    assert plain("Run ``python -m x``::\n\n    a `b`") == "Run python -m x:\n\n    a b"


def test_shard_builds_and_generation_report_progress_off_a_terminal(tmp_path, trained_checkpoint, shards32):
    build = subprocess.run([sys.executable, "-m", "ssgan_dist.data.build", "synthetic", "--count", "6", "--size", "32",
                            "--samples-per-shard", "3", "--workers", "1", "--out", str(tmp_path / "s")],
                           cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    assert "\r" not in build.stderr and re.search(r"synthetic: 6/6 samples \(100%\)", build.stderr), build.stderr
    verify = subprocess.run([sys.executable, "-m", "ssgan_dist.data.build", "verify", str(tmp_path / "s"),
                             "--workers", "1"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0 and re.search(r"verify: 2/2 shards \(100%\)", verify.stderr), verify.stderr
    gen = subprocess.run([sys.executable, "-m", "ssgan_dist.evaluation.generate", "--checkpoint",
                          str(trained_checkpoint), "--shards", str(shards32), "--out", str(tmp_path / "g"),
                          "--max-samples", "5", "--batch-size", "2"],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr
    assert "\r" not in gen.stderr and re.search(r"generate: 5/5 samples \(100%\)", gen.stderr), gen.stderr


@pytest.mark.slow
def test_an_error_every_rank_hits_is_printed_once(tmp_path, shards32):
    """A bad data.shards under a 2-rank torchrun: every rank fails alike, the message shows once."""
    missing = tmp_path / "no-such-shard.tar"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(_free_port()), "-m", "ssgan_dist.train", *TINY,
                          f"run.dir={tmp_path / 'run'}", f"data.shards={missing}"],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert out.stderr.count(f"error: data.shards: no such shard {missing}") == 1, out.stderr[-4000:]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
