"""Stopping a run cleanly on a signal, the same way under every launcher.

SIGINT (Ctrl-C) and SIGTERM (``kill``, a cluster manager, torchrun's agent passing a Ctrl-C
or a kill on to its workers, SLURM ahead of a time limit or on preemption) ask the run to
stop. A checkpoint cannot be written from inside a signal handler (the step may be half done
and the other ranks inside a collective), so the handler only records the signal; the
trainer asks :class:`StopOnSignal` after every step, the ranks agree with one one-element
all-reduce (so a signal that reached one rank stops all of them at the same step), every
rank writes the checkpoint of that step and leaves the loop, and the process exits with
128 + the signal's number (130 for SIGINT, 143 for SIGTERM) without a traceback. The next
start resumes from that checkpoint.

* Before the loop runs (``arm``), there is nothing to save: a signal ends the process at
  once (SystemExit, so temporary files are cleaned up), with the same exit code.
* A second SIGINT (a second Ctrl-C) exits at once, without a checkpoint. Any other repeat
  does not: torchrun's agent answers a Ctrl-C or a kill by sending the same signal to each
  worker's process group (torch 2.13: the signal it got; older versions SIGTERM), and a
  launcher may forward a Ctrl-C that the terminal also delivered; a SIGINT within
  ``REPEAT_S`` of the first counts as that same Ctrl-C.
* Loader worker processes forked by the trainer inherit the handler and ignore it (the
  trainer decides); :func:`shield_worker` keeps torch's DataLoader workers alive through a
  SIGTERM to the whole process group until their parent stops them.
* Under torchrun, the agent kills workers ``--shutdown-timeout`` seconds (default 30) after
  passing the signal on: the step and the checkpoint must fit in that time (raise it for
  large models on slow disks).
* SLURM (cluster/job.py): submitit's own handler for its requeue signal is handed the stop
  (``hand_over``) once the checkpoint is written, so the job requeues itself as before.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any, NoReturn

from ssgan_dist.distributed.collectives import max_over_ranks

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_S = 1.0  # a SIGINT this soon after the first is the same Ctrl-C delivered twice


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number."""
    return 128 + signum


def shield_worker(_worker_id: int | None = None) -> None:
    """A DataLoader ``worker_init_fn``: the worker outlives a SIGINT or SIGTERM sent to the
    whole process group (a terminal's Ctrl-C, torchrun's agent, SLURM signalling every
    process of a task), so the rank can finish the step it is fetching a batch for and write
    its checkpoint; the rank stops its workers itself afterwards. A SIGTERM from the parent
    (torch's own shutdown of a stuck worker, multiprocessing at exit) still ends it.

    The signals are blocked and taken by a thread with sigwaitinfo, which, unlike a Python
    handler, sees who sent them."""
    stops = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)

    def take() -> None:
        while True:
            info = signal.sigwaitinfo(stops)
            if info.si_signo == signal.SIGTERM and info.si_pid == os.getppid():
                os._exit(0)

    threading.Thread(target=take, name="stop-signals", daemon=True).start()


def _say(text: str) -> None:
    """A line on stderr from a signal handler: a raw write, no logging lock to wait on."""
    try:
        os.write(2, f"{text}\n".encode())
    except OSError:
        pass


class StopOnSignal:
    """Records stop signals; says, at a step boundary, whether any rank got one (a callable
    for Trainer.fit). Install it before the loader forks its workers, ``arm`` it when the
    loop starts, ``restore`` the previous handlers when done."""

    def __init__(self, signals: Iterable[signal.Signals] = STOP_SIGNALS,
                 hand_over: Iterable[signal.Signals] = ()):
        """``hand_over``: signals whose previous handler (submitit's) runs after the checkpoint."""
        self.pid = os.getpid()
        self.received = 0  # the first stop signal this process got (0: none)
        self.stopped_by = 0  # the signal the ranks agreed to stop on (0: not stopped)
        self.armed = False
        self._first_sigint = 0.0
        self._hand_over = set(hand_over)
        self._previous: dict[int, Any] = {}
        for signum in {*signals, *self._hand_over}:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._record)

    def arm(self) -> None:
        """From now on a signal stops the run at the next step boundary, with a checkpoint."""
        self.armed = True

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self.pid:
            return  # a forked helper process: the rank decides for it
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self._first_sigint and time.monotonic() - self._first_sigint > REPEAT_S:
            _say(f"{name} again: exiting now, without a checkpoint")
            os._exit(exit_code(signum))
        if signum == signal.SIGINT and not self._first_sigint:
            self._first_sigint = time.monotonic()
        if self.received or self.stopped_by:
            return  # already stopping (torchrun's agent passing the stop on, a launcher's repeat)
        self.received = signum
        if not self.armed and signum not in self._hand_over:
            _say(f"{name} before training started: exiting, nothing to save")
            sys.exit(exit_code(signum))
        again = " (Ctrl-C again to exit at once without it)" if signum == signal.SIGINT else ""
        _say(f"{name}: stopping after this step and writing its checkpoint{again}")

    def __call__(self) -> bool:
        """Called by the trainer after every step, on every rank: one all-reduce when distributed."""
        self.stopped_by = int(max_over_ranks(self.received))
        return bool(self.stopped_by)

    @property
    def exit_code(self) -> int:
        """0 when not stopped, else 128 + the agreed signal."""
        return exit_code(self.stopped_by) if self.stopped_by else 0

    @property
    def hands_over(self) -> bool:
        """The stop belongs to a previous handler (SLURM's requeue), see :meth:`hand_over`."""
        return self.stopped_by in self._hand_over

    def hand_over(self) -> NoReturn:
        """Run the previous handler of the agreed signal now that the checkpoint is written
        (submitit's: rank 0 requeues the job), then exit 0."""
        previous: Callable[[int, FrameType | None], Any] = self._previous[self.stopped_by]
        self.restore()
        previous(self.stopped_by, None)
        sys.exit(0)

    def finish(self) -> None:
        """The work is done: a stop signal from now on (torchrun's agent ending the other ranks
        once one has exited) has nothing left to stop, and must not turn the exit code into a
        death by signal while the interpreter shuts down (which drops Python handlers)."""
        for signum in self._previous:
            signal.signal(signum, signal.SIG_IGN)

    def restore(self) -> None:
        """Put the handlers back as they were before this object took them over."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
