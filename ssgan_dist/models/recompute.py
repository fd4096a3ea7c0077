"""Activation recomputation of one block that leaves its buffers as an unchecked run would.

torch calls this activation checkpointing; in ssgan-dist "checkpoint" means run state only.
Recomputing a block in the backward pass runs its forward a second time. In a SPADE block that
forward has side effects on buffers: BatchNorm running statistics and the spectral-norm
power-iteration vectors ``weight_u``/``weight_v``. Run twice, the statistics would be updated
twice and the recomputed weight would be normalized with a newer ``u`` than the original
forward used, so the gradients would differ. The recomputation therefore starts from the
buffers as they were before the original forward and, once done, puts back the buffers the
original forward left. A synchronized norm's all-reduce runs again in the recomputation; the
backward visits blocks in the same order on every rank, so the collectives stay matched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _snapshot(block: nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for b in block.buffers()]


def _restore(block: nn.Module, values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for buf, value in zip(block.buffers(), values, strict=True):
            buf.copy_(value)


def _contexts(block: nn.Module) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    before: list[torch.Tensor] = []

    @contextlib.contextmanager
    def original() -> Iterator[None]:
        before[:] = _snapshot(block)
        yield

    @contextlib.contextmanager
    def recompute() -> Iterator[None]:
        after = _snapshot(block)
        _restore(block, before)
        try:
            yield
        finally:
            _restore(block, after)

    return original(), recompute()


def recomputed(block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    """``block(*args)`` with its activations recomputed in the backward pass.

    Traced by torch.compile, the buffers need no care (and dynamo takes no context_fn): the
    compiled graph writes them back once, after the forward, and its recomputation reads the
    values the forward started from. A block dynamo cannot trace runs eagerly, with the care.
    """
    if torch.compiler.is_compiling():
        return checkpoint(block, *args, use_reentrant=False)
    return checkpoint(block, *args, use_reentrant=False, context_fn=lambda: _contexts(block))
