"""What every engine does alike with a network before training it: the network's spec, its
module prepared (device, memory format, synchronized BN, recomputation) and its Adam."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ssgan_dist.distributed.env import DistEnv
from ssgan_dist.distributed.sync_bn import convert_sync_batchnorm
from ssgan_dist.precision import memory_format


@dataclass
class NetSpec:
    """One network an engine trains, with its Adam's settings."""

    module: nn.Module
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    sync_bn: bool = False  # synchronize its BatchNorm statistics across ranks
    grad_checkpoint: bool = False  # recompute activations in backward (the module must support it)


def fused_adam(device: torch.device) -> bool:
    """Whether torch has a fused Adam for ``device``: one kernel for every parameter, and the
    found_inf flag that lets a step be skipped on the device without a host read."""
    return device.type in ("cuda", "cpu")


def adam(spec: NetSpec, params: Iterable[torch.Tensor], fused: bool = False) -> torch.optim.Adam:
    """Adam with the spec's settings: fused, or torch's default (foreach on CUDA)."""
    return torch.optim.Adam(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, fused=fused or None)


def load_adam_state(opt: torch.optim.Adam, state: dict[str, Any], fused: bool) -> None:
    """Load a saved Adam state into ``opt`` keeping ``opt``'s implementation: a saved param
    group carries its own ``fused``/``foreach`` flags (a checkpoint of another device or an
    older version), which load_state_dict would otherwise adopt."""
    groups = [{**group, "fused": fused or None, "foreach": None} for group in state["param_groups"]]
    opt.load_state_dict({**state, "param_groups": groups})


def apply_settings(param_groups: list[dict], spec: NetSpec) -> None:
    """The run's lr, betas and eps in every param group, after a checkpoint's optimizer state
    was loaded: the checkpoint restores the optimizer's moments, the run's config its
    settings (a change the resume let through, checkpoint.allow_changes, takes effect here)."""
    for group in param_groups:
        group.update(lr=spec.lr, betas=spec.betas, eps=spec.eps)
        if "initial_lr" in group:  # a torch LR scheduler's base
            group["initial_lr"] = spec.lr


def prepare_module(spec: NetSpec, env: DistEnv, channels_last: bool) -> nn.Module:
    """The network on this rank's device and memory format, its BatchNorms synchronized and
    its recomputation switched on as the spec says."""
    module = spec.module
    if spec.sync_bn and env.distributed:
        module = convert_sync_batchnorm(module, env.device)
    if spec.grad_checkpoint:
        if not hasattr(module, "grad_checkpoint"):
            raise ValueError(f"{type(module).__name__} cannot recompute its activations (no grad_checkpoint switch)")
        module.grad_checkpoint = True
    return module.to(env.device, memory_format=memory_format(channels_last))


def linear_decay(step: int, max_steps: int, decay_steps: int) -> float:
    """The learning-rate factor at ``step`` (0-based): 1 until the last ``decay_steps`` steps of
    ``max_steps``, then linearly down to 1/decay_steps at the last step (SPADE's niter_decay, per
    step instead of per epoch). A pure function of the step, so resuming needs no scheduler state."""
    if decay_steps <= 0:
        return 1.0
    return min(1.0, (max_steps - step) / decay_steps)
