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
        self.module = copy.deepcopy(net).eval().requires_grad_(False)
        # On the device, so that an update skipped there (see update) is counted there too.
        self._updates = torch.zeros((), dtype=torch.float64, device=next(net.parameters()).device)

    @property
    def updates(self) -> int:
        """Updates made so far (a host read of a device counter)."""
        return int(self._updates.item())

    @torch.no_grad()
    def update(self, net: nn.Module, skip: torch.Tensor | None = None) -> None:
        """Move the average towards ``net``'s current weights (after its optimizer step).
        ``skip``: a 0-dim device flag; where non-zero (the step was skipped) nothing changes,
        decided on the device like the optimizer's skip, with no host read."""
        keep = torch.ones((), device=self._updates.device) if skip is None else 1.0 - skip.detach().float()
        n = self._updates
        weight = ((1.0 - torch.clamp((1.0 + n) / (10.0 + n), max=self.decay)) * keep).float()
        mine = [p for p in self.module.parameters()]
        theirs = [p.detach() for p in net.parameters()]
        # p_avg += weight * (p - p_avg), one fused kernel per group
        torch._foreach_lerp_(mine, theirs, [weight.to(p.device) for p in mine])
        for avg, buf in zip(self.module.buffers(), net.buffers(), strict=True):
            avg.copy_(torch.where(keep > 0, buf, avg))
        self._updates += keep

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["weights"])
        self._updates.fill_(int(state["updates"]))
