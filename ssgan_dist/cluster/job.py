"""What every task of a SLURM job runs: one training rank that requeues itself when stopped.

submitit starts one process per task (``srun``), unpickles the :class:`TrainingJob` and
calls it. The job turns submitit's view of the task (``submitit.JobEnvironment``) into the
torchrun variables, so training goes through the same init path as under torchrun
(``ssgan_dist.distributed.env``), then runs ``ssgan_dist.train.run``.

Stopping. SLURM announces a time limit (``--signal``, ahead of the limit), a preemption
and an ``scontrol requeue`` with SIGTERM; the submitter exports
``SUBMITIT_PREEMPT_SIGNAL=TERM`` so that submitit's handler owns SIGTERM. The job stops
through the same :class:`ssgan_dist.signals.StopOnSignal` as torchrun and bare runs: the
handler only records the signal, the ranks agree after the step, all of them write the
checkpoint of that step and leave the loop. Then submitit's own handler runs (``hand_over``),
outside signal context: on rank 0 it calls :meth:`TrainingJob.checkpoint`, dumps the job
again and runs ``scontrol requeue``. The next start resumes from the newest checkpoint in
run.dir; data order and noise are pure functions of (seed, rank, step), so the run continues
exactly. A SIGINT (``scancel --signal=INT``) stops the same way but ends the job (exit 130).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

from ssgan_dist.checkpoint import list_checkpoints
from ssgan_dist.config import config_from_dict
from ssgan_dist.distributed.env import slurm_master_port
from ssgan_dist.signals import StopOnSignal
from ssgan_dist.train import run

log = logging.getLogger(__name__)


def export_rank_env(job: submitit.JobEnvironment) -> None:
    """Set the torchrun variables from submitit's view of this task.

    Set, not defaulted: sbatch hands the submitter's environment to the job, and a stale
    RANK or MASTER_ADDR from the submitting shell must not win over the allocation's. The
    first host of the allocation is the rendezvous.
    """
    os.environ.update({
        "RANK": str(job.global_rank),
        "WORLD_SIZE": str(job.num_tasks),
        "LOCAL_RANK": str(job.local_rank),
        "MASTER_ADDR": job.hostnames[0],
        "MASTER_PORT": str(slurm_master_port(os.environ.get("SLURM_JOB_ID") or job.job_id)),
    })


def _is_loopback(addr: str) -> bool:
    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def node_address() -> str:
    """This node's address as other machines (a cluster's Prometheus) reach it.

    The hostname's address first (what the cluster's DNS or /etc/hosts says); Debian-style
    hosts files map the hostname to 127.0.x.1, and then the address of the interface that
    routes off the node is used (a UDP connect sends nothing, it only picks the route).
    """
    try:
        addr = socket.gethostbyname(socket.gethostname())
        if not _is_loopback(addr):
            return addr
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 9))  # any non-local address: only the route matters
            return s.getsockname()[0]
        except OSError:
            return socket.gethostname()


def bind_metrics_to_node(config: dict[str, Any]) -> None:
    """A loopback metrics.addr (the default) becomes the node's address, so the cluster can scrape it."""
    metrics = config["metrics"]
    if _is_loopback(metrics["addr"]):
        metrics["addr"] = node_address()


class RequeueLimit(RuntimeError):
    """The job was stopped once more after --max-requeues requeues: it ends instead."""


class TrainingJob(Checkpointable):
    """One rank of a training run; submitit pickles it at submission and again at each requeue."""

    def __init__(self, config: dict[str, Any], max_requeues: int):
        self.config = config  # the resolved config: later edits to a preset do not leak into a requeue
        self.max_requeues = max_requeues

    def __call__(self) -> int:
        job = submitit.JobEnvironment()
        requeue = signal.Signals["SIG" + job.USR_SIG]
        stop = StopOnSignal(hand_over=(requeue,))
        try:
            export_rank_env(job)
            config = {section: dict(values) for section, values in self.config.items()}
            bind_metrics_to_node(config)
            code = run(config_from_dict(config), stop)
            if stop.hands_over:
                self._hand_over(stop)
        finally:
            stop.restore()
        if stop.stopped_by:
            sys.exit(code)  # stopped for good (SIGINT): the checkpoint is written, no requeue
        if code != 0:
            raise RuntimeError(f"training failed with exit code {code}; see {config['run']['dir']}/train.log")
        return code

    @staticmethod
    def _hand_over(stop: StopOnSignal) -> NoReturn:
        """submitit's handler now that the checkpoint is written: rank 0 requeues and exits
        (or, past the limit, raises, and the job ends failed); the other ranks exit 0 without
        a result: with KillOnBadExit=1 a failed task would make srun kill rank 0 mid-requeue."""
        try:
            stop.hand_over()
        except subprocess.CalledProcessError:
            # `scontrol requeue` of a job SLURM is already requeueing (preemption with
            # PreemptMode=REQUEUE, or a user's scontrol requeue): that is the outcome wanted.
            log.info("SLURM is already requeueing this job")
        sys.exit(0)

    def checkpoint(self) -> DelayedSubmission:
        """submitit's hook on rank 0 after a stop: the training state is already on disk, so
        requeue this same job, unless it has been requeued ``max_requeues`` times (SLURM's
        count, whoever requeued it); then the job fails with a message saying so."""
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if restarts >= self.max_requeues:
            raise RequeueLimit(
                f"not requeued: already requeued {restarts} times (--max-requeues {self.max_requeues}); "
                f"submit again with --run-dir {self.config['run']['dir']} to continue from its checkpoint")
        return DelayedSubmission(self)


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint the next start of this run (a requeue, a new submission) resumes from."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None
