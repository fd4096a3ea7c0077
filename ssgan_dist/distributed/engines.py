"""The engines that own G, D and their optimizers: DDP or DeepSpeed behind one interface.

The training loop sees four callables and a few verbs:

* ``g`` (G for training, wrapped), ``d`` (D for the D step, wrapped) and ``d_frozen``
  (D's bare module for the G step: D's weights are frozen there, and going around the
  wrapper keeps DDP's reducer and DeepSpeed's engine out of a pass whose D gradients are
  never used);
* ``backward_step(net, loss, skip)``: backward, then the optimizer step unless ``skip``
  (a non-finite loss anywhere), with the loss scaler when fp16 asks for one;
* ``state_dict``/``load_state_dict`` for what rank 0 writes, ``save_sharded``/
  ``load_sharded`` for state that every rank must write itself (DeepSpeed's ZeRO shards).

``SegmenterEngine`` offers the same verbs for the sketch segmenter (``run.task=segmenter``),
one network ``s`` instead of G and D.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ssgan_dist.config import Config, ConfigError
from ssgan_dist.distributed.env import DistEnv
from ssgan_dist.distributed.sync_bn import convert_sync_batchnorm


class Engine(Protocol):
    sharded: bool  # True: every rank writes part of the checkpoint (save_sharded)
    g: nn.Module
    d: nn.Module
    d_frozen: nn.Module
    g_module: nn.Module
    d_module: nn.Module

    def backward_step(self, net: str, loss: torch.Tensor, skip: bool) -> None: ...
    def learning_rates(self) -> dict[str, float]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def save_sharded(self, directory: Path) -> None: ...
    def load_sharded(self, directory: Path) -> None: ...


def adam(cfg: Config, params, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)


def prepare_modules(cfg: Config, env: DistEnv, g: nn.Module, d: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Device placement and memory format, synchronized BN, activation checkpointing: the same
    for every engine."""
    if cfg.model.sync_bn and env.distributed:
        g = convert_sync_batchnorm(g, env.device)
    g.grad_checkpoint = cfg.train.grad_checkpoint
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    return g.to(env.device, memory_format=fmt), d.to(env.device, memory_format=fmt)


def _blocking_allreduce_hook(_state, bucket):  # unannotated: DDP rejects string annotations here
    """Average a bucket (a dist.GradBucket) with a blocking all-reduce on the autograd thread.

    gloo runs DDP's default asynchronous bucket all-reduces on its own worker threads while
    the backward pass goes on and issues the synchronized BatchNorm's collectives; under
    load that overlap was seen to hang 2-rank CPU runs now and then. Done in place and in
    backward order, every collective of a step is issued and finished in one order on every
    rank. Same values as DDP's default hook (sum, then divide by the world size).
    """
    grads = bucket.buffer()
    dist.all_reduce(grads)
    grads.div_(dist.get_world_size())
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(grads)
    return future


def wrap_ddp(module: nn.Module, env: DistEnv) -> nn.Module:
    """DDP around ``module`` when there is a process group, else the module itself."""
    if not env.distributed:
        return module
    ids = [env.device.index] if env.device.type == "cuda" else None
    with warnings.catch_warnings():  # broadcast_buffers= is deprecated-but-needed
        warnings.simplefilter("ignore", FutureWarning)
        # Buffers (BN statistics, spectral-norm vectors) evolve identically on every
        # rank from identical weights; broadcasting them each step would be wasted work.
        wrapped = DDP(module, device_ids=ids, broadcast_buffers=False)
    if env.backend == "gloo":
        wrapped.register_comm_hook(None, _blocking_allreduce_hook)
    return wrapped


def optimizer_step(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss: torch.Tensor, skip: bool) -> None:
    """Backward (always: every rank joins DDP's gradient all-reduce), then the step unless ``skip``."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if skip:
        opt.zero_grad(set_to_none=True)
        return
    scaler.step(opt)
    scaler.update()


class DDPEngine:
    """torch DDP around G and around D, one Adam and one loss scaler per network."""

    sharded = False

    def __init__(self, cfg: Config, env: DistEnv, g: nn.Module, d: nn.Module):
        self.g_module, self.d_module = prepare_modules(cfg, env, g, d)
        self.g, self.d = wrap_ddp(self.g_module, env), wrap_ddp(self.d_module, env)
        self.d_frozen = self.d_module
        self.opt = {"G": adam(cfg, self.g_module.parameters(), cfg.optim.lr_g),
                    "D": adam(cfg, self.d_module.parameters(), cfg.optim.lr_d)}
        fp16 = cfg.train.precision == "fp16"
        # G's and D's gradients live on different scales: one scaler each.
        self.scaler = {net: torch.amp.GradScaler(env.device.type, enabled=fp16) for net in ("G", "D")}

    def backward_step(self, net: str, loss: torch.Tensor, skip: bool) -> None:
        optimizer_step(self.opt[net], self.scaler[net], loss, skip)

    def learning_rates(self) -> dict[str, float]:
        return {net: float(opt.param_groups[0]["lr"]) for net, opt in self.opt.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "G": self.g_module.state_dict(), "D": self.d_module.state_dict(),
            "opt_g": self.opt["G"].state_dict(), "opt_d": self.opt["D"].state_dict(),
            "scaler_g": self.scaler["G"].state_dict(), "scaler_d": self.scaler["D"].state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.g_module.load_state_dict(state["G"])
        self.d_module.load_state_dict(state["D"])
        self.opt["G"].load_state_dict(state["opt_g"])
        self.opt["D"].load_state_dict(state["opt_d"])
        self.scaler["G"].load_state_dict(state["scaler_g"])
        self.scaler["D"].load_state_dict(state["scaler_d"])

    def save_sharded(self, directory: Path) -> None:
        """Nothing: DDP's state is whole on every rank and rank 0 writes it."""

    def load_sharded(self, directory: Path) -> None:
        """Nothing: see save_sharded."""


class SegmenterEngine:
    """The same verbs for the sketch segmenter S alone: DDP around it, one Adam, one scaler."""

    sharded = False

    def __init__(self, cfg: Config, env: DistEnv, s: nn.Module):
        fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.s_module = s.to(env.device, memory_format=fmt)
        self.s = wrap_ddp(self.s_module, env)
        self.opt = torch.optim.Adam(self.s_module.parameters(), lr=cfg.segmenter.lr)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.train.precision == "fp16")

    def backward_step(self, net: str, loss: torch.Tensor, skip: bool) -> None:
        optimizer_step(self.opt, self.scaler, loss, skip)

    def learning_rates(self) -> dict[str, float]:
        return {"S": float(self.opt.param_groups[0]["lr"])}

    def state_dict(self) -> dict[str, Any]:
        return {"S": self.s_module.state_dict(), "opt_s": self.opt.state_dict(), "scaler_s": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.s_module.load_state_dict(state["S"])
        self.opt.load_state_dict(state["opt_s"])
        self.scaler.load_state_dict(state["scaler_s"])

    def save_sharded(self, directory: Path) -> None:
        """Nothing: the state is whole on every rank and rank 0 writes it."""

    def load_sharded(self, directory: Path) -> None:
        """Nothing: see save_sharded."""


def build_engine(cfg: Config, env: DistEnv, g: nn.Module, d: nn.Module) -> Engine:
    if cfg.engine.name == "ddp":
        return DDPEngine(cfg, env, g, d)
    if cfg.engine.name == "deepspeed":
        from ssgan_dist.distributed.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, env, g, d)
    raise ConfigError(f"engine.name: unknown engine {cfg.engine.name!r}")
