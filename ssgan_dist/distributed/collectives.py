"""The rank collectives everything else uses; each is a no-op (or the obvious value) without a
process group, so one code path serves one process and N ranks.

Each is called on every rank in the same order, as every collective must be.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ssgan_dist.errors import SetupError

T = TypeVar("T")


def _ranks() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _device() -> torch.device:
    """Where a collective's tensor must live: NCCL reduces on the GPU, gloo on the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank gets here."""
    if _ranks() > 1:
        dist.barrier()


def gather_to_all(obj: T) -> list[T]:
    """``obj`` of every rank, in rank order, on every rank (a list of one without a process group)."""
    if _ranks() == 1:
        return [obj]
    out: list[Any] = [None] * _ranks()
    dist.all_gather_object(out, obj)
    return out


def from_main(fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 only, its value handed to every rank.

    A SetupError that ``fn`` raises on rank 0 is raised on every rank (with rank 0's message),
    so that a decision only rank 0 makes (which checkpoint, may this run start) fails every
    rank at once instead of leaving the others waiting in their next collective.
    """
    if _ranks() == 1:
        return fn()
    value: list[Any] = [None]
    error: SetupError | None = None
    if dist.get_rank() == 0:
        try:
            value = [("ok", fn())]
        except SetupError as exc:
            error = exc
            value = [("error", str(exc))]
    dist.broadcast_object_list(value, src=0)
    kind, payload = value[0]
    if error is not None:
        raise error
    if kind == "error":
        raise SetupError(payload)
    return payload


def max_over_ranks(value: torch.Tensor | float) -> torch.Tensor | float:
    """The element-wise maximum of ``value`` over ranks, e.g. flags. A tensor is reduced in
    place and returned, nothing read on the host (on a GPU no host waits for it: NCCL orders
    it on the streams); a number comes back as a float, the host waiting for the answer."""
    if not isinstance(value, torch.Tensor):
        if _ranks() == 1:
            return float(value)
        return float(max_over_ranks(torch.tensor([float(value)], device=_device())).item())
    if _ranks() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over ranks (in place), e.g. counts each rank made."""
    if _ranks() > 1:
        dist.all_reduce(tensor)
    return tensor
