"""The engine that owns a task's named networks and their optimizers: DDP or DeepSpeed behind
one interface.

A task names its networks ({"G", "D"} for the GAN, {"S"} for the segmenter) and sees:

* ``module(name)``: the bare network, for state dicts, parameters, evaluation;
* ``wrapped(name)``: the training forward (DDP's or DeepSpeed's wrapper; compiled under
  train.compile);
* ``local(name)``: the forward without gradient sync, for a pass whose gradients are not
  used (the GAN's frozen D in the G step, keeping DDP's reducer and DeepSpeed's engine out
  of it; the regenerated fakes); compiled under train.compile. Train only through these two:
  a compiled network's spectral norms iterate in them (compile.py);
* ``micro_batch(name, last)``: the context of one micro-batch's forward and backward under
  gradient accumulation (train.accum_steps): gradients are all-reduced only in the last
  (DDP's no_sync on the others);
* ``backward(name, loss)``: gradients of ``loss`` added to the network's (the task weights
  each micro-batch's loss), with the loss scaler when fp16 asks for one;
* ``step(name, skip)``: the optimizer step unless ``skip``, a device tensor (1: a non-finite
  loss on some rank), then the gradients are dropped. The DDP engine skips on the device
  (fused Adam's found_inf, as GradScaler drives it), so no host ever waits for the flag;
* ``learning_rates()`` / ``set_learning_rates(lrs)``: the task's schedule sets them per step;
* ``state_dict``/``load_state_dict`` for what rank 0 writes (keys ``<name>``,
  ``opt_<name>``, ``scaler_<name>``, name lower-cased for the last two; loading keeps the
  optimizer's moments and takes its lr, betas and eps from the run's config), and
  ``save_sharded``/``load_sharded`` for state every rank must write itself (ZeRO shards).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from ssgan_dist.compile import CompiledForward, PowerIteration
from ssgan_dist.config import ConfigError, EngineConfig
from ssgan_dist.distributed.env import DistEnv
from ssgan_dist.distributed.optim import NetSpec, adam, apply_settings, fused_adam, load_adam_state, prepare_module

COMPRESSION = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Engine(Protocol):
    sharded: bool  # True: every rank writes part of the checkpoint (save_sharded)

    def module(self, name: str) -> nn.Module: ...
    def wrapped(self, name: str) -> Callable[..., Any]: ...
    def local(self, name: str) -> Callable[..., Any]: ...
    def micro_batch(self, name: str, last: bool) -> contextlib.AbstractContextManager: ...
    def backward(self, name: str, loss: torch.Tensor) -> None: ...
    def step(self, name: str, skip: torch.Tensor) -> None: ...
    def learning_rates(self) -> dict[str, float]: ...
    def set_learning_rates(self, lrs: dict[str, float]) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def save_sharded(self, directory: Path) -> None: ...
    def load_sharded(self, directory: Path) -> None: ...


def blocking_allreduce_hook(dtype: torch.dtype | None) -> Callable:
    """A DDP comm hook that averages a bucket with a blocking all-reduce on the autograd
    thread, in ``dtype`` (engine.grad_compression) or the gradients' own.

    gloo runs DDP's default asynchronous bucket all-reduces on its own worker threads while
    the backward pass goes on and issues the synchronized BatchNorm's collectives; under
    load that overlap was seen to hang 2-rank CPU runs now and then. Done in place and in
    backward order, every collective of a step is issued and finished in one order on every
    rank. Uncompressed: DDP's default hook's values (sum, then divide by the world size);
    compressed: divided first, as torch's fp16 hook does, so that the 16-bit sum cannot overflow.
    """

    def hook(_state, bucket):  # unannotated: DDP rejects string annotations here
        grads = bucket.buffer()
        world = dist.get_world_size()
        if dtype is None:
            dist.all_reduce(grads)
            grads.div_(world)
        else:
            reduced = grads.div(world).to(dtype)
            dist.all_reduce(reduced)
            grads.copy_(reduced)
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(grads)
        return future

    return hook


def wrap_ddp(module: nn.Module, env: DistEnv, engine: EngineConfig) -> nn.Module:
    """DDP around ``module`` when there is a process group, else the module itself; gradient
    buckets of engine.bucket_mb, all-reduced in engine.grad_compression's format."""
    if not env.distributed:
        return module
    ids = [env.device.index] if env.device.type == "cuda" else None
    with warnings.catch_warnings():  # broadcast_buffers= is deprecated-but-needed
        warnings.simplefilter("ignore", FutureWarning)
        # Buffers (BN statistics, spectral-norm vectors) evolve identically on every
        # rank from identical weights; broadcasting them each step would be wasted work.
        wrapped = DDP(module, device_ids=ids, broadcast_buffers=False, bucket_cap_mb=engine.bucket_mb)
    dtype = COMPRESSION[engine.grad_compression]
    if env.backend == "gloo":
        wrapped.register_comm_hook(None, blocking_allreduce_hook(dtype))
    elif dtype is not None:  # NCCL: torch's asynchronous hooks, overlapping the backward
        hook = default_hooks.bf16_compress_hook if dtype == torch.bfloat16 else default_hooks.fp16_compress_hook
        wrapped.register_comm_hook(None, hook)
    return wrapped


class DDPEngine:
    """torch DDP around each network, one Adam and one loss scaler per network (their
    gradients live on different scales)."""

    sharded = False

    def __init__(self, engine: EngineConfig, env: DistEnv, nets: dict[str, NetSpec], *, precision: str,
                 channels_last: bool, compile_mode: str | None = None):
        self.specs = nets
        self.modules = {name: prepare_module(spec, env, channels_last) for name, spec in nets.items()}
        self.wrappers = {name: wrap_ddp(module, env, engine) for name, module in self.modules.items()}
        self.fused = fused_adam(env.device)
        self.opt = {name: adam(nets[name], module.parameters(), fused=self.fused)
                    for name, module in self.modules.items()}
        self.scaler = {name: torch.amp.GradScaler(env.device.type, enabled=precision == "fp16") for name in nets}
        self._train: dict[str, Callable[..., Any]] = dict(self.wrappers)
        self._local: dict[str, Callable[..., Any]] = dict(self.modules)
        if compile_mode is not None:
            for name, module in self.modules.items():
                iteration = PowerIteration(module)
                self._local[name] = CompiledForward(module, module, iteration, compile_mode)
                wrapper = self.wrappers[name]
                self._train[name] = self._local[name] if wrapper is module else \
                    CompiledForward(wrapper, module, iteration, compile_mode)

    def module(self, name: str) -> nn.Module:
        return self.modules[name]

    def wrapped(self, name: str) -> Callable[..., Any]:
        return self._train[name]

    def local(self, name: str) -> Callable[..., Any]:
        return self._local[name]

    def micro_batch(self, name: str, last: bool) -> contextlib.AbstractContextManager:
        wrapper = self.wrappers[name]
        return wrapper.no_sync() if isinstance(wrapper, DDP) and not last else contextlib.nullcontext()

    def backward(self, name: str, loss: torch.Tensor) -> None:
        """Always, on every rank: every rank joins DDP's gradient all-reduce."""
        self.scaler[name].scale(loss).backward()

    def step(self, name: str, skip: torch.Tensor) -> None:
        """The step unless ``skip``, decided on the device: fused Adam skips the update (and its
        step count) where found_inf is non-zero, which is how GradScaler drives it; with fp16
        the flag joins the scaler's own inf check, so a skipped step also backs the scale off."""
        opt, scaler = self.opt[name], self.scaler[name]
        flag = skip.detach().float()
        if scaler.is_enabled():
            scaler.unscale_(opt)
            # The scaler's per-device inf flags (private, stable since torch 1.6): its step and
            # update read these very tensors.
            for found in scaler._found_inf_per_device(opt).values():
                found.add_(flag.to(found.device))
            scaler.step(opt)
            scaler.update()
        elif self.fused:
            opt.grad_scale, opt.found_inf = None, flag
            try:
                opt.step()
            finally:
                del opt.grad_scale, opt.found_inf
        elif not bool(flag):  # no fused Adam on this device: the host reads the flag
            opt.step()
        opt.zero_grad(set_to_none=True)

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
            load_adam_state(opt, state[f"opt_{name.lower()}"], fused=self.fused)
            apply_settings(opt.param_groups, self.specs[name])
        for name, scaler in self.scaler.items():
            scaler.load_state_dict(state[f"scaler_{name.lower()}"])

    def save_sharded(self, directory: Path) -> None:
        """Nothing: DDP's state is whole on every rank and rank 0 writes it."""

    def load_sharded(self, directory: Path) -> None:
        """Nothing: see save_sharded."""


def build_engine(engine: EngineConfig, env: DistEnv, nets: dict[str, NetSpec], *, precision: str,
                 channels_last: bool, batch_size: int, compile_mode: str | None = None) -> Engine:
    """The engine of ``engine.name`` over ``nets`` (built in their order on every rank);
    ``compile_mode``: torch.compile's mode (train.compile), None for eager."""
    if engine.name == "ddp":
        return DDPEngine(engine, env, nets, precision=precision, channels_last=channels_last,
                         compile_mode=compile_mode)
    if engine.name == "deepspeed":
        from ssgan_dist.distributed.deepspeed_engine import DeepSpeedEngine  # imports deepspeed: only when asked

        return DeepSpeedEngine(engine, env, nets, precision=precision, channels_last=channels_last,
                               batch_size=batch_size)
    raise ConfigError(f"engine.name: unknown engine {engine.name!r}")
