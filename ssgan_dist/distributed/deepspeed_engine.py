"""DeepSpeed behind the engine interface (engine.py): one DeepSpeed engine per network.

G and D each get their own engine (their own optimizer, ZeRO partitioning and loss
scaling), built from the same settings (``engine.zero_stage``, ``train.precision``).
The optimizer is a client ``torch.optim.Adam`` with the run's betas, so DeepSpeed does not
JIT-compile FusedAdam and the update rule equals the DDP engine's. ZeRO shards optimizer
state over ranks, so every rank writes its part of a checkpoint (``save_sharded``).
``engine.grad_compression`` and ``engine.bucket_mb`` become DeepSpeed's communication data
type and reduce bucket. DeepSpeed's step is driven from the host, so a skipped step (a
non-finite loss) is read on the host here; config.py refuses train.accum_steps > 1 and
train.compile with this engine.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssgan_dist.config import ConfigError, EngineConfig
from ssgan_dist.distributed.env import DistEnv
from ssgan_dist.distributed.optim import NetSpec, adam, apply_settings, prepare_module


def deepspeed_config(engine: EngineConfig, precision: str, batch_size: int) -> dict[str, Any]:
    bucket = int(engine.bucket_mb * 2**20 / 4)  # DeepSpeed counts bucket sizes in elements
    config = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": engine.zero_stage, "reduce_bucket_size": bucket,
                              "allgather_bucket_size": bucket},
        "zero_allow_untested_optimizer": True,  # the client Adam, see the module docstring
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0},  # 0: dynamic
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if engine.grad_compression != "none":
        config["communication_data_type"] = engine.grad_compression
    return config


class DeepSpeedEngine:
    """One ``deepspeed.DeepSpeedEngine`` per network with the engine interface; a sharded
    checkpoint holds each network's state in a sub-directory named after it."""

    sharded = True

    def __init__(self, engine: EngineConfig, env: DistEnv, nets: dict[str, NetSpec], *, precision: str,
                 channels_last: bool, batch_size: int):
        try:
            import deepspeed
        except ImportError as exc:
            raise ConfigError(
                f"engine.name=deepspeed: DeepSpeed is not installed ({exc}); pip install -e '.[deepspeed]'"
            ) from None
        if engine.zero_stage not in (0, 1, 2):
            raise ConfigError(f"engine.zero_stage: {engine.zero_stage}; the GAN engines support 0, 1 or 2")
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        modules = {name: prepare_module(spec, env, channels_last) for name, spec in nets.items()}
        ds_cfg = deepspeed_config(engine, precision, batch_size)
        self.specs = nets
        self.engines = {}
        for name, module in modules.items():
            self.engines[name], *_ = deepspeed.initialize(model=module, optimizer=adam(nets[name], module.parameters()),
                                                          config=ds_cfg, dist_init_required=False)

    def module(self, name: str) -> nn.Module:
        return self.engines[name].module

    def wrapped(self, name: str) -> nn.Module:
        return self.engines[name]

    def local(self, name: str) -> nn.Module:
        return self.engines[name].module

    def micro_batch(self, name: str, last: bool) -> contextlib.AbstractContextManager:
        """One micro-batch per step here (config.py refuses train.accum_steps > 1)."""
        return contextlib.nullcontext()

    def backward(self, name: str, loss: torch.Tensor) -> None:
        self.engines[name].backward(loss)  # always: every rank joins the gradient reduction

    def step(self, name: str, skip: torch.Tensor) -> None:
        engine = self.engines[name]
        if bool(skip):  # a host read: DeepSpeed decides its step on the host
            engine.zero_grad()
            return
        engine.step()

    def learning_rates(self) -> dict[str, float]:
        return {name: float(engine.get_lr()[0]) for name, engine in self.engines.items()}

    def set_learning_rates(self, lrs: dict[str, float]) -> None:
        for name, lr in lrs.items():
            for group in self.engines[name].optimizer.param_groups:
                group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        """The weights, whole on every rank under ZeRO 1/2, for tools that read ``state.pt``."""
        return {name: engine.module.state_dict() for name, engine in self.engines.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, engine in self.engines.items():
            engine.module.load_state_dict(state[name])

    def save_sharded(self, directory: Path) -> None:
        for name, engine in self.engines.items():
            engine.save_checkpoint(str(directory), tag=name)

    def load_sharded(self, directory: Path) -> None:
        if not Path(directory).is_dir():
            raise ConfigError(f"{directory}: not a DeepSpeed checkpoint directory (engine.name=deepspeed); "
                              "a DDP checkpoint cannot restore ZeRO optimizer state, use a new run.dir")
        for name, engine in self.engines.items():
            path, _ = engine.load_checkpoint(str(directory), tag=name, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
            if path is None:
                raise ConfigError(f"{directory}: no DeepSpeed state for {name} (tag {name})")
            apply_settings(engine.optimizer.param_groups, self.specs[name])
