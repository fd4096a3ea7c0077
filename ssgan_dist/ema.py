"""An exponential moving average of a network's weights (``train.ema``), as stylegan2-ada and
imaginaire keep one of G: the average generalises better than the last iterate of a GAN's
oscillating updates, so samples, evaluation and ``generate`` use it when a checkpoint has one.

The decay ramps up as TensorFlow's ExponentialMovingAverage does with ``num_updates``:
``min(decay, (1 + n) / (10 + n))`` after n updates, so an average started at initialisation
follows the first steps instead of staying near the random weights for ~1/(1 - decay) steps.
Parameters are averaged; buffers (BatchNorm running statistics, spectral-norm vectors) are
copied from the network, since they are statistics of the current weights, not weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """The average of ``net``'s weights, in a frozen eval-mode copy of it (``module``)."""

    def __init__(self, net: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(net).eval().requires_grad_(False)

    def effective_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        """Move the average towards ``net``'s current weights (after its optimizer step)."""
        weight = 1.0 - self.effective_decay()
        mine = [p for p in self.module.parameters()]
        theirs = [p.detach() for p in net.parameters()]
        torch._foreach_lerp_(mine, theirs, weight)  # p_avg += weight * (p - p_avg), one fused kernel per group
        for avg, buf in zip(self.module.buffers(), net.buffers(), strict=True):
            avg.copy_(buf)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
