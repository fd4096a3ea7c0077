"""The command shell every entry point runs in: its parser, logging and progress, errors ->
exit codes, JSON records.

Parsers (``command_parser``): plain-text descriptions, every option's default in its help,
``--version``; commands that take a config add ``--config``, ``--print-config`` and the
``key=value`` overrides, and list every preset and config key (from config.py's
``setting(...)`` metadata) below their options.

Logging and progress cooperate with tqdm: on a terminal, log lines are written above the
progress bar (``tqdm.write``), never into it. Off a terminal (a SLURM ``.err`` file, CI)
there is no bar and no carriage return at all: ``Progress`` writes a plain log line every
``every_s`` seconds and one at the end.

A ``SetupError`` (a bad key, a missing file, an incompatible checkpoint: something the user
fixes by changing an input) ends a command with its message on stderr and exit code 2, no
traceback; a log file, where the command keeps one, records it too. Under a launcher every
rank usually fails alike: the message is printed by the first rank of a node to reach it,
once. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from ssgan_dist import __version__
from ssgan_dist.config import DEFAULT_PRESET, Config, ConfigError, describe_keys, describe_presets, dump_config
from ssgan_dist.errors import SetupError
from ssgan_dist.files import write_text

PACKAGE = Path(__file__).resolve().parent
log = logging.getLogger("ssgan_dist")
_progress_log = logging.getLogger("ssgan_dist.progress")
_FILE_ONLY = "file_only"  # a LogRecord attribute: written to log files, kept off stderr
_OURS = "ssgan_shell"  # marks the handlers setup_logging installed
T = TypeVar("T")


# -- the terminal ------------------------------------------------------------------------


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal (progress bars) rather than a file or pipe (plain lines)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed by a harness
        return False


_bar_process: int | None = None  # the process that shows a progress bar (not a forked data worker)


def write_stderr(text: str) -> None:
    """One line on stderr, above a progress bar if this process shows one (tqdm clears and
    redraws it; a forked worker only writes its line, it does not redraw its parent's bar)."""
    if getattr(tqdm, "_instances", None) and _bar_process == os.getpid():
        tqdm.write(text, file=sys.stderr)
    else:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


def format_duration(seconds: float) -> str:
    """0:07, 12:03, 1:02:03 (as tqdm shows times)."""
    total = int(max(seconds, 0) + 0.5)
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _Stderr(logging.Handler):
    """Writes to whatever sys.stderr is when a record comes (test harnesses swap it), above
    any progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write_stderr(self.format(record))
        except Exception:  # logging's contract: a failing handler reports, never raises
            self.handleError(record)


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


# -- progress ----------------------------------------------------------------------------


class Progress:
    """Items done out of ``total``: a tqdm bar on a terminal; elsewhere no bar and no '\\r',
    but a log line (``desc: n/total unit (p%), rate, ETA, postfix``) every ``every_s``
    seconds and a last one at ``close``. ``lines=False`` leaves the periodic lines to the
    caller (training writes its own every train.log_every steps). Disabled (other ranks,
    train.progress=false), it only counts."""

    def __init__(self, desc: str, total: int | None = None, *, unit: str = "it", initial: int = 0,
                 enabled: bool = True, lines: bool = True, every_s: float = 30.0, leave: bool = True):
        self.desc, self.total, self.unit, self.n = desc, total, unit, initial
        self.every_s = every_s
        self.postfix: dict[str, str] = {}
        self._bar: tqdm | None = None
        self._lines = enabled and lines and not stderr_is_terminal()
        if enabled and stderr_is_terminal():
            global _bar_process
            _bar_process = os.getpid()
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr,
                             leave=leave)
        self._start_n, self._t0 = initial, time.monotonic()
        self._last_line = self._t0
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._lines and time.monotonic() - self._last_line >= self.every_s:
            self._line()

    def set_postfix(self, values: Mapping[str, str]) -> None:
        """Short key/value pairs shown after the count (a bar's postfix, or the end of each line)."""
        self.postfix = dict(values)
        if self._bar is not None:
            self._bar.set_postfix(self.postfix, refresh=False)

    def rate(self) -> float:
        """Items per second since this Progress started."""
        return (self.n - self._start_n) / max(time.monotonic() - self._t0, 1e-9)

    def eta(self) -> float | None:
        """Seconds left at the rate so far; None without a total or a rate."""
        rate = self.rate()
        if self.total is None or rate <= 0:
            return None
        return max(self.total - self.n, 0) / rate

    def status(self) -> str:
        """``n/total unit (p%), rate unit/s, ETA m:ss`` (what a periodic line says after ``desc:``)."""
        elapsed = time.monotonic() - self._t0
        units = self.unit if self.unit.endswith("s") else f"{self.unit}s"
        parts = [f"{self.n}/{self.total} {units} ({100.0 * self.n / max(self.total, 1):.0f}%)"
                 if self.total is not None else f"{self.n} {units}"]
        if self.n > self._start_n:
            parts.append(f"{self.rate():.3g} {self.unit}/s")
        eta = self.eta()
        if self._closed or (eta is not None and eta == 0):
            parts.append(f"in {format_duration(elapsed)}")
        elif eta is not None and self.n > self._start_n:
            parts.append(f"ETA {format_duration(eta)}")
        return ", ".join(parts) + "".join(f"  {k} {v}" for k, v in self.postfix.items())

    def _line(self) -> None:
        self._last_line = time.monotonic()
        _progress_log.info("%s: %s", self.desc, self.status())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._lines:
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Iterable[T], desc: str, total: int | None = None, *, unit: str = "it",
          size: Callable[[T], int] = lambda _: 1, enabled: bool = True, every_s: float = 30.0,
          leave: bool = True) -> Iterator[T]:
    """``items`` with a Progress counting ``size(item)`` per item once it has been handled."""
    with Progress(desc, total, unit=unit, enabled=enabled, every_s=every_s, leave=leave) as progress:
        for item in items:
            yield item
            progress.update(size(item))


# -- parsers -----------------------------------------------------------------------------


def command_name(module: str) -> str:
    """The command as the user typed it, for --help: a console script (``ssgan-shards``), a
    path wrapper (``python cluster/submit.py``), else ``python -m <module>``."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0).startswith("ssgan-"):
        return os.path.basename(argv0)
    if argv0.endswith(".py") and not Path(argv0).resolve().is_relative_to(PACKAGE):
        return f"python {argv0}"
    return f"python -m {module}"


def plain(doc: str) -> str:
    """A docstring as help text: reST literals (````x````, ```x```) and ``::`` made plain."""
    text = re.sub(r"``([^`]*)``", r"\1", doc)
    text = re.sub(r"`([^`]*)`", r"\1", text)
    return textwrap.dedent(text.replace("::\n", ":\n")).strip()


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (paragraphs, command examples, the key list);
    every option's help ends with its default unless it already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.required or action.default is argparse.SUPPRESS
                or "default" in text or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        default = action.default
        if isinstance(action, argparse._StoreTrueAction):
            shown = "off"
        elif default is None or default == "":
            shown = "not set"
        else:
            shown = str(default).replace("%", "%%")
        return f"{text} (default: {shown})"


def command_parser(module: str, doc: str, *, config: bool = False, epilog: str | None = None) -> argparse.ArgumentParser:
    """A command's parser: plain-text description from ``doc`` (a module docstring), defaults
    shown, ``--version``; ``config=True`` adds the config options (see add_config_options)."""
    p = argparse.ArgumentParser(prog=command_name(module), description=plain(doc), formatter_class=HelpFormatter,
                                epilog=epilog)
    p.add_argument("--version", action="version", version=f"ssgan-dist {__version__}",
                   help="print the ssgan-dist version and exit")
    if config:
        add_config_options(p)
    return p


def add_config_options(p: argparse.ArgumentParser) -> None:
    """--config, --print-config and key=value overrides; the presets and every key below the options."""
    p.add_argument("--config", default=None, metavar="NAME|PATH",
                   help=f"a preset (listed below) or a YAML file (e.g. one --print-config wrote); "
                        f"default: {DEFAULT_PRESET}")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML (a file --config reads) and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, section.key=value with a YAML value, e.g. train.max_steps=100")
    p.epilog = config_help()


def config_help() -> str:
    """The presets and every config key with its type, default and doc (the --help epilog)."""
    return "\n".join([
        "presets (--config NAME):",
        describe_presets(),
        "",
        "config keys (override as section.key=VALUE; the defaults are the built-in ones, a preset sets some",
        f"of them, and without --config the {DEFAULT_PRESET} preset applies: --print-config shows what a run uses):",
        describe_keys(),
    ])


def print_config(cfg: Config, args: list[str]) -> int:
    """The resolved config as YAML on stdout (--print-config); 0."""
    command = " ".join(a for a in args if a != "--print-config")
    sys.stdout.write(dump_config(cfg, f"ssgan-dist {__version__}, resolved from: {command}"))
    return 0


# -- errors and results ------------------------------------------------------------------


def _first_on_node(message: str) -> bool:
    """False when another rank of this launch on this node already printed ``message``.

    The ranks of one torchrun (or one SLURM step) on a node share their parent process (the
    agent, slurmstepd); a marker file named by (that launch, its restart, the message) is
    created exclusively, so the first rank to fail prints and the others stay quiet. A
    message that only one rank has is printed by it. Without a launcher: always True.
    """
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return True
    parent = os.getppid()
    try:  # the parent's start time (clock ticks since boot) tells a reused pid apart
        started = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = ""
    launch = "/".join(os.environ.get(k, "") for k in ("SLURM_JOB_ID", "SLURM_STEP_ID", "TORCHELASTIC_RUN_ID",
                                                       "TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))
    digest = hashlib.sha256(f"{parent}/{started}/{launch}/{message}".encode()).hexdigest()[:24]
    try:
        folder = Path(tempfile.gettempdir()) / f"ssgan-errors-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
        os.close(os.open(folder / digest, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    except OSError:  # no writable temp dir: rather twice than never
        return True
    return True


def run_cli(fn: Callable[[], int]) -> int:
    """``fn()``'s exit code, or 2 with the message of a SetupError on stderr (once per node)."""
    try:
        return fn()
    except SetupError as exc:
        if any(getattr(h, _OURS, False) for h in logging.getLogger().handlers):
            log.error("%s", exc, extra={_FILE_ONLY: True})
        prefix = "config error" if isinstance(exc, ConfigError) else "error"
        text = f"{prefix}: {exc}"
        if _first_on_node(text):
            write_stderr(text)
        return 2


def write_record(out: str, record: dict[str, Any]) -> None:
    """A command's results as JSON at ``out`` (nothing when empty), for scripts to read."""
    if out:
        write_text(out, json.dumps(record, indent=1) + "\n")
