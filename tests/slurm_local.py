"""A one-node SLURM on localhost: munged, slurmctld and slurmd in a private directory.

The launcher's tests need a real scheduler (requeue, preemption, signals are the point),
and a developer can try ``cluster/submit.py`` on a workstation with the same thing:

    python tests/slurm_local.py /tmp/slurm     # prints `export SLURM_CONF=...`

Everything lives under one directory (config, state, spool, logs) plus a private munge
key and socket in a short-named temp directory of its own (user munge must reach it, and
a socket path has at most 107 bytes), so nothing touches the machine's munge or SLURM. Needs root
(slurmd runs jobs as their submitting user, munged runs as user ``munge``) and the Debian
packages ``slurm-wlm`` and ``munge``. Two partitions: ``batch`` (the default) and
``urgent``, whose jobs preempt batch jobs by requeueing them, as a busy cluster does.
"""

from __future__ import annotations

import argparse
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NODE = "localhost"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(root: Path, munge_socket: Path, cpus: int, memory_mb: int, ctld_port: int, slurmd_port: int) -> str:
    """The settings that make a single-node SLURM fast and predictable in a container.

    cred_expire=5: a requeued job otherwise waits ~121 s before it may start again.
    proctrack/linuxproc + task/none: no cgroups needed. sched_interval/bf_interval=1: jobs
    start about a second after submission. KillWait=5: SIGKILL 5 s after SIGTERM, which the
    trainer must beat when it checkpoints on preemption.
    """
    return f"""\
ClusterName=ssgan-local
SlurmctldHost={NODE}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5,socket={munge_socket}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
KillWait=5
MinJobAge=600
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=batch Nodes={NODE} Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=urgent Nodes={NODE} MaxTime=INFINITE State=UP PriorityTier=10
"""


def _memory_mb() -> int:
    """Most of the machine's memory; SLURM refuses a node that reports less than configured."""
    with open("/proc/meminfo") as f:
        total_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return int(total_kb / 1024 * 0.9)


class LocalSlurm:
    """Starts the three daemons, waits until the node takes jobs, stops them by PID."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.conf = self.root / "slurm.conf"
        self.cpus = len(os.sched_getaffinity(0))  # what nproc says; slurmd refuses more than it finds
        self.munge_dir: Path | None = None
        self._procs: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        """The environment every slurm command (and the launcher) must run with."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout_s: float = 60.0) -> LocalSlurm:
        missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(b) is None]
        if missing:
            raise RuntimeError(f"missing {', '.join(missing)}: apt-get install slurm-wlm munge")
        if os.geteuid() != 0:
            raise RuntimeError("a local SLURM needs root (slurmd starts jobs as their user)")
        self.munge_dir = Path(tempfile.mkdtemp(prefix="ssgan-munge-"))
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(slurm_conf(self.root, self.munge_dir / "munge.socket", self.cpus,
                                        _memory_mb(), free_port(), free_port()))
        try:
            self._start_munge()
            self._spawn(["slurmctld", "-D", "-c", "-i", "-f", str(self.conf)], "slurmctld.out")
            self._spawn(["slurmd", "-D", "-f", str(self.conf), "-N", NODE], "slurmd.out")
            self._wait_idle(timeout_s)
        except BaseException:
            self.stop()  # no daemon outlives a failed start
            raise
        return self

    def _start_munge(self) -> None:
        """munged as user munge with a fresh key and a socket in our directory."""
        d = self.munge_dir
        assert d is not None
        key = d / "munge.key"
        key.write_bytes(secrets.token_bytes(128))
        munge = pwd.getpwnam("munge")
        for p in (d, key):
            os.chown(p, munge.pw_uid, munge.pw_gid)
        key.chmod(0o400)
        self._spawn(
            ["munged", "--foreground", "--force", f"--socket={d}/munge.socket", f"--key-file={key}",
             f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed"],
            "munged.out", user="munge",
        )
        deadline = time.monotonic() + 10
        while not (d / "munge.socket").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start; see {self.root}/munged.out")
            time.sleep(0.1)

    def _spawn(self, cmd: list[str], log_name: str, user: str | None = None) -> None:
        with open(self.root / log_name, "ab") as out:
            # A new session: pytest's or a terminal's Ctrl-C must not reach the daemons first.
            self._procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, user=user,
                                                start_new_session=True, env=self.env))

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            for p in self._procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}; logs in {self.root}")
            r = subprocess.run(["sinfo", "-h", "-n", NODE, "-o", "%T"], env=self.env, capture_output=True, text=True)
            state = r.stdout.strip()
            if state == "idle":
                return
            time.sleep(0.3)
        raise RuntimeError(f"node {NODE} not idle after {timeout_s:.0f} s (state {state!r}); logs in {self.root}")

    def stop(self) -> None:
        """SIGTERM each daemon we started, one after the other: slurmd, slurmctld, munged last
        (the others authenticate through it while shutting down); SIGKILL what lingers."""
        for p in reversed(self._procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._procs.clear()
        if self.munge_dir is not None:
            shutil.rmtree(self.munge_dir, ignore_errors=True)

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/slurm_local.py", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="a fresh directory for config, state and logs")
    args = parser.parse_args(argv)
    slurm = LocalSlurm(args.dir).start()
    print(f"export SLURM_CONF={slurm.conf}", flush=True)
    print(f"# running; Ctrl-C or SIGTERM stops slurmd, slurmctld and munged (logs in {slurm.root})", file=sys.stderr)
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # after the daemons started: they must not inherit the mask
    try:
        signal.sigwait(stop)
    finally:
        slurm.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
