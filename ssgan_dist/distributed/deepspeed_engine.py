"""DeepSpeed behind the engine interface: one DeepSpeed engine per network.

G and D each get their own engine (their own optimizer, ZeRO partitioning and loss
scaling), built from the same config section (``engine.zero_stage``, ``train.precision``).
The optimizer is a client ``torch.optim.Adam`` with the run's betas, so DeepSpeed does not
JIT-compile FusedAdam and the update rule equals the DDP engine's. ZeRO shards optimizer
state over ranks, so every rank writes its part of a checkpoint (``save_sharded``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssgan_dist.config import Config, ConfigError
from ssgan_dist.distributed.engines import adam, prepare_modules
from ssgan_dist.distributed.env import DistEnv

TAGS = {"G": "G", "D": "D"}  # sub-directories of a sharded checkpoint


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "zero_allow_untested_optimizer": True,  # the client Adam, see the module docstring
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "fp16": {"enabled": cfg.train.precision == "fp16", "loss_scale": 0},  # 0: dynamic
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """Two ``deepspeed.DeepSpeedEngine``s with the training loop's engine interface."""

    sharded = True

    def __init__(self, cfg: Config, env: DistEnv, g: nn.Module, d: nn.Module):
        try:
            import deepspeed
        except ImportError as exc:
            raise ConfigError(
                f"engine.name=deepspeed: DeepSpeed is not installed ({exc}); pip install 'ssgan-dist[deepspeed]'"
            ) from None
        if cfg.engine.zero_stage not in (0, 1, 2):
            raise ConfigError(f"engine.zero_stage: {cfg.engine.zero_stage}; the GAN engines support 0, 1 or 2")
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        g, d = prepare_modules(cfg, env, g, d)
        ds_cfg = deepspeed_config(cfg)
        self.engines = {}
        for net, module, lr in (("G", g, cfg.optim.lr_g), ("D", d, cfg.optim.lr_d)):
            engine, *_ = deepspeed.initialize(model=module, optimizer=adam(cfg, module.parameters(), lr),
                                              config=ds_cfg, dist_init_required=False)
            self.engines[net] = engine
        self.g, self.d = self.engines["G"], self.engines["D"]
        self.g_module, self.d_module = self.g.module, self.d.module
        self.d_frozen = self.d_module  # the G step goes around D's engine (module docstring of engines)

    def backward_step(self, net: str, loss: torch.Tensor, skip: bool) -> None:
        engine = self.engines[net]
        engine.backward(loss)  # always: every rank joins the gradient reduction
        if skip:
            engine.zero_grad()
            return
        engine.step()

    def learning_rates(self) -> dict[str, float]:
        return {net: float(engine.get_lr()[0]) for net, engine in self.engines.items()}

    def state_dict(self) -> dict[str, Any]:
        """The weights, whole on every rank under ZeRO 1/2, for tools that read ``state.pt``."""
        return {"G": self.g_module.state_dict(), "D": self.d_module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.g_module.load_state_dict(state["G"])
        self.d_module.load_state_dict(state["D"])

    def save_sharded(self, directory: Path) -> None:
        for net, engine in self.engines.items():
            engine.save_checkpoint(str(directory), tag=TAGS[net])

    def load_sharded(self, directory: Path) -> None:
        if not Path(directory).is_dir():
            raise ConfigError(f"{directory}: not a DeepSpeed checkpoint directory (engine.name=deepspeed); "
                              "a DDP checkpoint cannot restore ZeRO optimizer state, use a new run.dir")
        for net, engine in self.engines.items():
            path, _ = engine.load_checkpoint(str(directory), tag=TAGS[net], load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
            if path is None:
                raise ConfigError(f"{directory}: no DeepSpeed state for {net} (tag {TAGS[net]})")
