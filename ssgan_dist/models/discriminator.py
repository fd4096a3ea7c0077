"""Multi-scale PatchGAN discriminator, as NVlabs SPADE's ``MultiscaleDiscriminator``.

Module names (``discriminator_<i>.model<j>``) and nesting follow SPADE so state dicts and
parameter counts line up with the reference. Real and fake images go through it in one
concatenated batch (the training loop's job): instance norm is per sample, so that is
exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from ssgan_dist.config import ConfigError, ModelConfig
from ssgan_dist.models.spade import init_weights

KERNEL = 4
PADDING = 2  # ceil((KERNEL - 1) / 2), as SPADE


def _normed_conv(cin: int, cout: int, stride: int, use_spectral_norm: bool) -> nn.Sequential:
    """Conv (no bias: instance norm cancels it) -> InstanceNorm; SPADE's 'spectralinstance'."""
    conv = nn.Conv2d(cin, cout, KERNEL, stride=stride, padding=PADDING, bias=False)
    return nn.Sequential(spectral_norm(conv) if use_spectral_norm else conv,
                         nn.InstanceNorm2d(cout, affine=False))


class NLayerDiscriminator(nn.Module):
    """PatchGAN; returns every layer group's output, the last being the patch logits."""

    def __init__(self, in_channels: int, ndf: int, n_layers: int, use_spectral_norm: bool):
        super().__init__()
        nf = ndf
        groups = [nn.Sequential(nn.Conv2d(in_channels, nf, KERNEL, stride=2, padding=PADDING),
                                nn.LeakyReLU(0.2))]
        for n in range(1, n_layers):
            nf_prev, nf = nf, min(nf * 2, 512)
            stride = 1 if n == n_layers - 1 else 2
            groups.append(nn.Sequential(_normed_conv(nf_prev, nf, stride, use_spectral_norm),
                                        nn.LeakyReLU(0.2)))
        groups.append(nn.Sequential(nn.Conv2d(nf, 1, KERNEL, stride=1, padding=PADDING)))
        for j, group in enumerate(groups):
            self.add_module(f"model{j}", group)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for group in self.children():
            x = group(x)
            features.append(x)
        return features


def smallest_normed_map(image_size: int, d_scales: int, d_layers: int) -> int:
    """The side of the smallest map an instance norm sees (at the last scale): it needs more
    than one pixel, so image_size bounds how many scales and layers D can have."""
    side = image_size
    for _ in range(d_scales - 1):
        side = (side - 1) // 2 + 1  # avg_pool2d(3, stride 2, padding 1)
    smallest = image_size
    side = side // 2 + 1  # the first conv (stride 2), not normed
    for n in range(1, d_layers):
        side = side + 1 if n == d_layers - 1 else side // 2 + 1
        smallest = min(smallest, side)
    return smallest


class MultiscaleDiscriminator(nn.Module):
    """``d_scales`` PatchGANs on concat(M0, image), each at half the previous resolution."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.d_layers > 1 and smallest_normed_map(cfg.image_size, cfg.d_scales, cfg.d_layers) < 2:
            raise ConfigError(f"model.d_scales={cfg.d_scales}: the last scale of a {cfg.image_size} px image is too "
                              f"small for {cfg.d_layers} layers (an instance norm would see one pixel); use fewer "
                              "scales or layers")
        for i in range(cfg.d_scales):
            self.add_module(f"discriminator_{i}", NLayerDiscriminator(
                cfg.num_classes + 3, cfg.ndf, cfg.d_layers, cfg.spectral_norm))
        init_weights(self)

    def forward(self, m0: torch.Tensor, image: torch.Tensor) -> list[list[torch.Tensor]]:
        x = torch.cat([m0, image], dim=1)
        results = []
        for i, d in enumerate(self.children()):
            if i > 0:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            results.append(d(x))
        return results
