"""The engine that owns a task's named networks and their optimizers: DDP or DeepSpeed behind
one interface.

A task names its networks ({"G", "D"} for the GAN, {"S"} for the segmenter) and sees:

* ``module(name)``: the bare network (for a pass whose gradients are not used: the GAN's G
  step calls D's bare module, D frozen there, keeping DDP's reducer and DeepSpeed's engine
  out of it; also for evaluation and state dicts);
* ``wrapped(name)``: the network for training (DDP's or DeepSpeed's wrapper);
* ``backward_step(name, loss, skip)``: backward, then the optimizer step unless ``skip``
  (a non-finite loss anywhere), with the loss scaler when fp16 asks for one;
* ``learning_rates()`` / ``set_learning_rates(lrs)``: the task's schedule sets them per step;
* ``state_dict``/``load_state_dict`` for what rank 0 writes (keys ``<name>``,
  ``opt_<name>``, ``scaler_<name>``, name lower-cased for the last two; loading keeps the
  optimizer's moments and takes its lr, betas and eps from the run's config), and
  ``save_sharded``/``load_sharded`` for state every rank must write itself (ZeRO shards).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ssgan_dist.config import ConfigError, EngineConfig
from ssgan_dist.distributed.env import DistEnv
from ssgan_dist.distributed.optim import NetSpec, adam, apply_settings, prepare_module


class Engine(Protocol):
    sharded: bool  # True: every rank writes part of the checkpoint (save_sharded)

    def module(self, name: str) -> nn.Module: ...
    def wrapped(self, name: str) -> nn.Module: ...
    def backward_step(self, name: str, loss: torch.Tensor, skip: bool) -> None: ...
    def learning_rates(self) -> dict[str, float]: ...
    def set_learning_rates(self, lrs: dict[str, float]) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def save_sharded(self, directory: Path) -> None: ...
    def load_sharded(self, directory: Path) -> None: ...


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


class DDPEngine:
    """torch DDP around each network, one Adam and one loss scaler per network (their
    gradients live on different scales)."""

    sharded = False

    def __init__(self, env: DistEnv, nets: dict[str, NetSpec], *, precision: str, channels_last: bool):
        self.specs = nets
        self.modules = {name: prepare_module(spec, env, channels_last) for name, spec in nets.items()}
        self.wrappers = {name: wrap_ddp(module, env) for name, module in self.modules.items()}
        self.opt = {name: adam(nets[name], module.parameters()) for name, module in self.modules.items()}
        self.scaler = {name: torch.amp.GradScaler(env.device.type, enabled=precision == "fp16") for name in nets}

    def module(self, name: str) -> nn.Module:
        return self.modules[name]

    def wrapped(self, name: str) -> nn.Module:
        return self.wrappers[name]

    def backward_step(self, name: str, loss: torch.Tensor, skip: bool) -> None:
        """Backward (always: every rank joins DDP's gradient all-reduce), then the step unless ``skip``."""
        opt, scaler = self.opt[name], self.scaler[name]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if skip:
            opt.zero_grad(set_to_none=True)
            return
        scaler.step(opt)
        scaler.update()

    def learning_rates(self) -> dict[str, float]:
        return {name: float(opt.param_groups[0]["lr"]) for name, opt in self.opt.items()}

    def set_learning_rates(self, lrs: dict[str, float]) -> None:
        for name, lr in lrs.items():
            for group in self.opt[name].param_groups:
                group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        return {
            **{name: module.state_dict() for name, module in self.modules.items()},
            **{f"opt_{name.lower()}": opt.state_dict() for name, opt in self.opt.items()},
            **{f"scaler_{name.lower()}": scaler.state_dict() for name, scaler in self.scaler.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, module in self.modules.items():
            module.load_state_dict(state[name])
        for name, opt in self.opt.items():
            opt.load_state_dict(state[f"opt_{name.lower()}"])
            apply_settings(opt.param_groups, self.specs[name])
        for name, scaler in self.scaler.items():
            scaler.load_state_dict(state[f"scaler_{name.lower()}"])

    def save_sharded(self, directory: Path) -> None:
        """Nothing: DDP's state is whole on every rank and rank 0 writes it."""

    def load_sharded(self, directory: Path) -> None:
        """Nothing: see save_sharded."""


def build_engine(engine: EngineConfig, env: DistEnv, nets: dict[str, NetSpec], *, precision: str,
                 channels_last: bool, batch_size: int) -> Engine:
    """The engine of ``engine.name`` over ``nets`` (built in their order on every rank)."""
    if engine.name == "ddp":
        return DDPEngine(env, nets, precision=precision, channels_last=channels_last)
    if engine.name == "deepspeed":
        from ssgan_dist.distributed.deepspeed_engine import DeepSpeedEngine  # imports deepspeed: only when asked

        return DeepSpeedEngine(engine, env, nets, precision=precision, channels_last=channels_last,
                               batch_size=batch_size)
    raise ConfigError(f"engine.name: unknown engine {engine.name!r}")
