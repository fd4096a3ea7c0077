"""``train.compile``: torch.compile of a task's networks, with the compile caches on disk.

The engine compiles each network's training forward (the DDP wrapper itself, so that dynamo's
DDPOptimizer cuts the graph at DDP's bucket boundaries and the gradient all-reduces still
overlap the backward) and its local forward (no gradient sync: the GAN's frozen D in the G
step, the regenerated fakes); the GAN task compiles its VGG loss. ``train.compile_mode`` is
torch.compile's mode.

Spectral norm. torch's hook-based spectral norm runs a power iteration in every training
forward and writes u and v back into buffers before using them for the weight. Compiled with
inductor (torch 2.13, CPU) that gives wrong gradients: weight_orig's gradient off by 9% in a
two-conv network, 26% in the last block of the tiny SSGAN generator, while ``aot_eager`` is
exact and a fixed u, v compiles exactly (measured; the buffer update inside the traced forward
is what breaks it). So a compiled network runs its power iterations outside the graph, just
before each training forward, in a small compiled function of its own (no autograd, so
nothing to recompute), and the hooks inside the graph iterate zero times: u and v enter the
graph as the values the eager hook would have used.

Caches. Inductor's FX graph cache and AOTAutograd's cache (on by default) live under
TORCHINDUCTOR_CACHE_DIR, Triton's kernels inside it. Its default is node-local /tmp, which a
requeue onto another node or a cleaned /tmp loses; here it is ``train.compile_cache`` or
``<cache root>/compile`` (the cache root of data.cache_dir, $SSGAN_CACHE, ~/.cache/ssgan_dist),
so a restart or a SLURM requeue finds the compiled kernels. Dynamo still traces the Python at
every start (seconds); that part has no disk cache.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.spectral_norm import SpectralNorm

from ssgan_dist.cache import cache_root
from ssgan_dist.config import TrainConfig

log = logging.getLogger(__name__)


def compile_cache_dir(compile_cache: str, cache_dir: str) -> Path:
    """train.compile_cache, else <cache root>/compile."""
    return Path(compile_cache) if compile_cache else cache_root(cache_dir) / "compile"


def use_compile_cache(path: Path) -> None:
    """Point inductor's (and Triton's) on-disk caches at ``path``; before the first compile."""
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path.resolve())
    os.environ["TRITON_CACHE_DIR"] = str(path.resolve() / "triton")
    log.info("compile cache: %s", path)


def compile_mode(train: TrainConfig, cache_dir: str) -> str | None:
    """train.compile_mode when train.compile is on (its cache directory and dynamo set up
    first), else None."""
    if not train.compile:
        return None
    use_compile_cache(compile_cache_dir(train.compile_cache, cache_dir))
    # Where dynamo breaks a graph (the CPU synchronized norm's collectives), the code after the
    # break is compiled once per shape it meets: one SPADE norm per width and resolution, more
    # than the default limit of 8, past which dynamo would run the rest eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return train.compile_mode


def _spectral_norms(net: nn.Module) -> list[tuple[nn.Module, SpectralNorm]]:
    return [(m, hook) for m in net.modules() for hook in m._forward_pre_hooks.values()
            if isinstance(hook, SpectralNorm)]


class PowerIteration:
    """The spectral norms' power iterations of one network, taken out of its compiled forward.

    Built once per network: it sets every hook's in-forward iteration count to 0 (so an
    uncompiled training forward of this network no longer iterates: train it only through
    the engine's callables) and keeps the original counts to run them itself.
    """

    def __init__(self, net: nn.Module):
        self.norms = _spectral_norms(net)
        self.iterations = []
        for _, hook in self.norms:
            self.iterations.append(hook.n_power_iterations)
            hook.n_power_iterations = 0
        # Compiled in the default mode whatever train.compile_mode: a few fused kernels instead
        # of ~8 launches per norm, and nothing here for CUDA graphs to gain.
        self._run = torch.compile(self._iterate, dynamic=False) if self.norms else None

    @torch.no_grad()
    def _iterate(self) -> None:
        """torch's SpectralNorm.compute_weight with do_power_iteration, minus the weight."""
        for (module, hook), n in zip(self.norms, self.iterations, strict=True):
            weight_mat = hook.reshape_weight_to_matrix(getattr(module, hook.name + "_orig"))
            u, v = getattr(module, hook.name + "_u"), getattr(module, hook.name + "_v")
            for _ in range(n):
                v.copy_(F.normalize(torch.mv(weight_mat.t(), u), dim=0, eps=hook.eps))
                u.copy_(F.normalize(torch.mv(weight_mat, v), dim=0, eps=hook.eps))

    def __call__(self) -> None:
        if self._run is not None:
            self._run()


class CompiledForward:
    """``torch.compile(call)`` for a network ``net`` (``call`` is the network or its DDP wrapper);
    in training mode the network's power iterations run first (see PowerIteration)."""

    def __init__(self, call: nn.Module, net: nn.Module, iteration: PowerIteration, mode: str):
        self.net, self.iteration = net, iteration
        # Static shapes: a training step's shapes never change, and dynamo's automatic dynamic
        # shapes (after a second shape at one call site) broke inductor here (torch 2.13).
        self.compiled = torch.compile(call, mode=mode, dynamic=False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.net.training:
            self.iteration()
        return self.compiled(*args, **kwargs)


def compile_module(module: nn.Module, mode: str) -> Callable[..., Any]:
    """A network without spectral norm (the VGG loss), compiled; for one with it, see CompiledForward."""
    if _spectral_norms(module):
        raise ValueError(f"{type(module).__name__} has spectral norms: compile it with CompiledForward")
    return torch.compile(module, mode=mode, dynamic=False)
