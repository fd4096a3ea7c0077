"""SPADE normalization and residual block, as in NVlabs SPADE (GauGAN).

Layer names follow NVlabs SPADE (``param_free_norm``, ``mlp_shared``, ``conv_0``,
``norm_s`` ...) so that state dicts line up with the reference and parameter counts can be
checked against it. Spectral norm is torch's hook-based ``spectral_norm`` for the same
reason: it keeps SPADE's ``weight_orig`` / ``weight_u`` / ``weight_v`` keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm


class SPADENorm(nn.Module):
    """Parameter-free BatchNorm, then a per-pixel scale and shift predicted from the segmap.

    The BatchNorm is a plain ``nn.BatchNorm2d``; synchronizing it across ranks is the
    distributed engine's job (``nn.SyncBatchNorm.convert_sync_batchnorm``).
    """

    def __init__(self, norm_nc: int, label_nc: int, hidden: int = 128, kernel_size: int = 3):
        super().__init__()
        pad = kernel_size // 2
        self.param_free_norm = nn.BatchNorm2d(norm_nc, affine=False)
        self.mlp_shared = nn.Sequential(
            nn.Conv2d(label_nc, hidden, kernel_size, padding=pad), nn.ReLU()
        )
        self.mlp_gamma = nn.Conv2d(hidden, norm_nc, kernel_size, padding=pad)
        self.mlp_beta = nn.Conv2d(hidden, norm_nc, kernel_size, padding=pad)

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        normalized = self.param_free_norm(x)
        segmap = F.interpolate(segmap, size=x.shape[2:], mode="nearest")
        actv = self.mlp_shared(segmap)
        return normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class SPADEResBlock(nn.Module):
    """SPADE's residual block: (norm -> lrelu -> conv) twice, plus a learned 1x1 shortcut
    with its own SPADE norm when the width changes."""

    def __init__(self, fin: int, fout: int, label_nc: int, hidden: int = 128,
                 use_spectral_norm: bool = True):
        super().__init__()
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)
        sn = spectral_norm if use_spectral_norm else (lambda m: m)
        self.conv_0 = sn(nn.Conv2d(fin, fmiddle, 3, padding=1))
        self.conv_1 = sn(nn.Conv2d(fmiddle, fout, 3, padding=1))
        if self.learned_shortcut:
            self.conv_s = sn(nn.Conv2d(fin, fout, 1, bias=False))
        self.norm_0 = SPADENorm(fin, label_nc, hidden)
        self.norm_1 = SPADENorm(fmiddle, label_nc, hidden)
        if self.learned_shortcut:
            self.norm_s = SPADENorm(fin, label_nc, hidden)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        x_s = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 0.2))
        return x_s + dx


def init_weights(net: nn.Module, gain: float = 0.02) -> None:
    """SPADE's ``BaseNetwork.init_weights`` defaults (xavier normal, gain 0.02, zero biases).

    A spectral-normed layer's trainable weight is ``weight_orig``; SPADE reaches it through
    the storage it shares with ``weight`` before the first forward, we name it directly.
    """
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            if m.weight is not None:
                nn.init.normal_(m.weight, 1.0, gain)
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(getattr(m, "weight_orig", m.weight), gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
