"""files.py, the one writer: the user's umask, clear write errors, temporaries of killed writes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY
from ssgan_dist.files import (WriteError, append_jsonl, atomic_dir, ensure_dir, stale_temps, write_bytes,
                              write_text)


@pytest.fixture
def umask():
    """Set the process umask for one test (returns a setter), restored after."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda value: os.umask(value)
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750),
                                                       (0o077, 0o600, 0o700)])
def test_files_and_dirs_get_the_users_umask(tmp_path, umask, mask, file_mode, dir_mode):
    """Issue 11: everything was 0600 (mkstemp), unreadable for teammates and evaluation jobs
    of other accounts on a shared filesystem. Now as open() and mkdir() would make them."""
    umask(mask)
    assert _mode(write_text(tmp_path / "a.txt", "x")) == file_mode
    assert _mode(write_bytes(tmp_path / "b.bin", b"x")) == file_mode
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "inner").write_text("x")
    assert _mode(tmp_path / "d") == dir_mode
    assert _mode(append_jsonl(tmp_path / "h.jsonl", {"a": 1})) == file_mode


def test_a_checkpoint_of_a_run_is_readable_by_the_group(tmp_path, shards32, umask):
    umask(0o022)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "ssgan_dist.train", *TINY, f"data.shards={shards32}", f"run.dir={run}",
                    "train.max_steps=1"], env=env, check=True, capture_output=True, timeout=300)
    for name in ("ckpt-000000001.pt", "config.yaml", "config-history.jsonl", "samples/step-000000001.png"):
        assert _mode(run / name) == 0o644, name


def test_append_jsonl_keeps_whole_lines(tmp_path):
    path = tmp_path / "log.jsonl"
    for i in range(3):
        append_jsonl(path, {"i": i, "text": "a\nb"})
    assert [json.loads(line)["i"] for line in path.read_text().splitlines()] == [0, 1, 2]


def test_unwritable_places_are_write_errors_naming_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(WriteError, match=f"run.dir: cannot write into {blocker / 'run'}"):
        ensure_dir(blocker / "run", "run.dir")
    with pytest.raises(WriteError, match=f"cannot write {blocker / 'x.json'}"):
        write_text(blocker / "x.json", "{}")
    assert ensure_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run" and not list((tmp_path / "new" / "run").iterdir())


def test_stale_temps_match_only_the_names_asked_for(tmp_path):
    for name in (".ckpt-000000001.pt.ab_c12.tmp", ".ckpt-000000002.tmp", ".config.yaml.x1.tmp", "ckpt-000000003.pt",
                 ".ckpt-000000003.pt", ".other.tmp"):
        (tmp_path / name).write_text("x")
    assert [p.name for p in stale_temps(tmp_path, r"ckpt-\d{9}(?:\.pt)?")] == [".ckpt-000000001.pt.ab_c12.tmp",
                                                                            ".ckpt-000000002.tmp"]


def test_cli_unwritable_run_dir_and_bad_config_files_are_clear_errors(tmp_path, shards32):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    blocker = tmp_path / "file"
    blocker.write_text("x")
    binary = tmp_path / "latin1.yaml"
    binary.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    cases = [([f"run.dir={blocker / 'run'}"], f"run.dir: cannot write into {blocker / 'run'}"),
             (["--config", str(binary)], f"--config {binary}: not UTF-8 text"),
             (["--config", str(folder)], f"--config: no such file {folder}")]
    for args, message in cases:
        proc = subprocess.run([sys.executable, "-m", "ssgan_dist.train", *TINY, f"data.shards={shards32}", *args],
                              env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
