"""GAN losses with NVlabs SPADE's semantics for a multi-scale discriminator.

Discriminator outputs are lists (per scale) of lists of features whose last entry is the
patch prediction. Each term is unweighted; lambda_fm and lambda_vgg are applied by the
training loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssgan_dist.models.vgg import VGG19Features

VGG_LAYER_WEIGHTS = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)

Pred = list[list[torch.Tensor]]


def _mean_over_scales(pred: Pred, per_scale) -> torch.Tensor:
    return torch.stack([per_scale(scale[-1]) for scale in pred]).mean()


def d_hinge_loss(pred_real: Pred, pred_fake: Pred) -> torch.Tensor:
    """mean(relu(1 - D(x))) + mean(relu(1 + D(G(z)))), each averaged over scales."""
    real = _mean_over_scales(pred_real, lambda p: F.relu(1 - p).mean())
    fake = _mean_over_scales(pred_fake, lambda p: F.relu(1 + p).mean())
    return real + fake


def g_hinge_loss(pred_fake: Pred) -> torch.Tensor:
    """-mean(D(G(z))), averaged over scales."""
    return _mean_over_scales(pred_fake, lambda p: -p.mean())


def feature_matching_loss(feats_fake: Pred, feats_real: Pred) -> torch.Tensor:
    """L1 between fake and detached real intermediate D features (the prediction excluded),
    summed over layers and scales, divided by the number of scales."""
    total = feats_fake[0][0].new_zeros(())
    for fake_scale, real_scale in zip(feats_fake, feats_real, strict=True):
        for fake, real in zip(fake_scale[:-1], real_scale[:-1], strict=True):
            total = total + F.l1_loss(fake, real.detach())
    return total / len(feats_fake)


class VGGLoss(nn.Module):
    """Weighted L1 between VGG19 features of the generated and the (detached) real image."""

    def __init__(self, vgg: VGG19Features):
        super().__init__()
        self.vgg = vgg

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the target: no graph, no stored activations
            feats_real = self.vgg(real)
        total = fake.new_zeros(())
        for weight, f_fake, f_real in zip(VGG_LAYER_WEIGHTS, self.vgg(fake), feats_real, strict=True):
            total = total + weight * F.l1_loss(f_fake, f_real)
        return total
