"""The one place that decides rank, device and backend for every launcher.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (env://); a SLURM task started by srun or
submitit has SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; a bare ``python -m`` has neither and
runs as rank 0 of 1. All three end in the same process-group init: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ssgan_dist.config import DistConfig


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    node: str
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or "localhost"
    # "node[01-04],other" -> "node01": the first host of the allocation is the rendezvous.
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        head = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


# SLURM rendezvous ports: 15000..28999. Below Linux's ephemeral range (32768-60999, where the
# kernel picks the source ports of outgoing connections, e.g. NCCL's and gloo's own, so a port
# there may be taken by any process at any time), and below torchrun's defaults (29400 c10d
# rendezvous, 29500 MASTER_PORT) so a torchrun on the same node cannot take it.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 14000


def slurm_master_port(job_id: str) -> int:
    """The rendezvous port every task of a SLURM job derives alike from its numeric job id.

    Job ids are consecutive, so any 14000 consecutive jobs get distinct ports: two jobs
    collide only if their ids differ by a multiple of 14000 and both have their first node
    on the same host at the same time. A requeued job keeps its id, hence its port: the
    previous run's processes are gone by then. An array task's own SLURM_JOB_ID is numeric.
    """
    return SLURM_PORT_BASE + int(job_id.split("_")[0]) % SLURM_PORT_SPAN


def launcher_restarts() -> int:
    """How many times a launcher restarted this job: torchrun's --max-restarts, SLURM requeues."""
    return sum(int(os.environ.get(k, "0") or 0) for k in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))


def _launcher_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun, SLURM, or a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        env.setdefault("MASTER_ADDR", _slurm_master_addr())
        env.setdefault("MASTER_PORT", str(slurm_master_port(env.get("SLURM_JOB_ID", "0"))))
        env["RANK"], env["WORLD_SIZE"] = str(rank), str(world)
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        return rank, world, int(env["LOCAL_RANK"])
    return 0, 1, 0


def setup(dist_cfg: DistConfig | None = None) -> DistEnv:
    """Detect the launcher, pick the device and initialise the process group once, with
    ``dist.timeout_s`` as the timeout of the rendezvous and of every collective (a rank
    waiting longer for a dead or stuck peer fails instead of hanging)."""
    timeout_s = (dist_cfg or DistConfig()).timeout_s
    rank, world, local_rank = _launcher_ranks()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        # A worker group restarted by torchrun (--max-restarts) may meet the keys its dead
        # predecessors left in the store (seen with gloo: peers dialing stale addresses);
        # each attempt gets a key space of its own.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend=backend, store=dist.PrefixStore(f"ssgan/attempt_{attempt}", store),
                                rank=rank, world_size=world, timeout=timeout)
    return DistEnv(rank, world, local_rank, socket.gethostname(), device, backend)


def teardown(timeout_s: float = 30.0) -> None:
    """Destroy the process group, waiting at most ``timeout_s``.

    On 2-rank gloo runs under load, a rank whose peer had already destroyed its group and
    exited was seen (rarely) to block in destroy_process_group after finishing all its work.
    The work is saved by then; a stuck destroy is left to its daemon thread and the process
    exits with a warning instead of hanging the launcher.
    """
    if not dist.is_initialized():
        return
    worker = threading.Thread(target=dist.destroy_process_group, daemon=True, name="pg-teardown")
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        logging.getLogger(__name__).warning("process group teardown did not finish in %.0f s; exiting without it",
                                            timeout_s)
