"""The command shell every entry point runs in: logging, errors -> exit codes, JSON records.

A ``SetupError`` (a bad key, a missing file, an incompatible checkpoint: something the user
fixes by changing an input) ends a command with its message once on stderr and exit code 2,
no traceback; a log file, where the command keeps one, records it too. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ssgan_dist.config import ConfigError
from ssgan_dist.errors import SetupError
from ssgan_dist.files import write_text

PACKAGE = Path(__file__).resolve().parent
log = logging.getLogger("ssgan_dist")
_FILE_ONLY = "file_only"  # a LogRecord attribute: written to log files, kept off stderr
_OURS = "ssgan_shell"  # marks the handlers setup_logging installed


def command_name(module: str) -> str:
    """The command as the user typed it, for --help: a console script (``ssgan-shards``), a
    path wrapper (``python cluster/submit.py``), else ``python -m <module>``."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0).startswith("ssgan-"):
        return os.path.basename(argv0)
    if argv0.endswith(".py") and not Path(argv0).resolve().is_relative_to(PACKAGE):
        return f"python {argv0}"
    return f"python -m {module}"


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (test harnesses swap it)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):  # noqa: ANN201 (logging's own type)
        return sys.stderr


def setup_logging(rank: int | None = None, *, verbose: bool = True, file: Path | None = None) -> None:
    """Root logging on stderr (and into ``file``): INFO when ``verbose`` else WARNING (ranks
    other than 0 are quiet), lines tagged ``[rank R]`` when a rank is given. Called again,
    it replaces what it set up before (not handlers others installed)."""
    tag = f" [rank {rank}]" if rank is not None else ""
    fmt = logging.Formatter(f"%(asctime)s{tag} %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    for handler in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(handler)
        handler.close()
    stream = _Stderr()
    stream.addFilter(lambda record: not getattr(record, _FILE_ONLY, False))
    handlers: list[logging.Handler] = [stream]
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(file))
    for handler in handlers:
        setattr(handler, _OURS, True)
        handler.setFormatter(fmt)
        root.addHandler(handler)


def run_cli(fn: Callable[[], int]) -> int:
    """``fn()``'s exit code, or 2 with the message of a SetupError on stderr."""
    try:
        return fn()
    except SetupError as exc:
        if any(getattr(h, _OURS, False) for h in logging.getLogger().handlers):
            log.error("%s", exc, extra={_FILE_ONLY: True})
        prefix = "config error" if isinstance(exc, ConfigError) else "error"
        print(f"{prefix}: {exc}", file=sys.stderr)
        return 2


def write_record(out: str, record: dict[str, Any]) -> None:
    """A command's results as JSON at ``out`` (nothing when empty), for scripts to read."""
    if out:
        write_text(out, json.dumps(record, indent=1) + "\n")
