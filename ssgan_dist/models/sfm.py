"""ToMask and the Semantic Fusion Module (SSGAN, eqs. 4-5).

    m_i = ToMask_i(x_i) = sigmoid(conv3x3(x_i))                   C channels
    f0  = F1([Mf, 0]) + AvgPool(F1([M0, m_i]))                     eq. 4
    f   = f0 + F2(f0)                                              eq. 5  -> M_i, fed to block i+1

Our reading of the paper, kept here in one place so it can be revisited:

1. F1 is one small conv net whose input is a 2C-channel pair [label map, intermediate
   mask]; "Mf padded with 0" means F1(Mf) = F1([Mf, 0]). Both terms share F1's weights.
2. F1 = conv3x3(2C -> h) + leaky_relu(0.2) + conv3x3(h -> C) and
   F2 = conv3x3(C -> h) + leaky_relu(0.2) + conv3x3(h -> C), h = ``model.sfm_hidden``;
   no normalization and no spectral norm inside the SFM.
3. AvgPool keeps the resolution: 3x3, stride 1, padding 1, count_include_pad=False (so the
   border is an average of real pixels, not diluted by padding zeros).
4. Mf is M0 with every background class channel zeroed (``model.background_classes``);
   channel 0 (no label) is not background and stays.
5. M0 and Mf are resized (nearest) to m_i's resolution, which is the output resolution of
   block i, before the generator's x2 upsampling; the next block's SPADE norms resize M_i
   (nearest) to their own resolution, as they do with M0.
6. f is used as is (no sigmoid or softmax): it has C channels, so every SPADE norm keeps its
   SPADE input width. The inspectable masks of the paper's Figure 3(c) are the m_i (argmax
   over channels), which the generator returns with ``return_masks=True``.
7. ToMask is applied after every generator block but the last; the first block gets M0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def foreground_only(m0: torch.Tensor, background_classes: Sequence[int]) -> torch.Tensor:
    """Mf: ``m0`` [B, C, H, W] with the background class channels set to zero."""
    keep = torch.ones(m0.shape[1], dtype=m0.dtype, device=m0.device)
    keep[list(background_classes)] = 0
    return m0 * keep.view(1, -1, 1, 1)


def _two_conv(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, hidden, 3, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(hidden, cout, 3, padding=1),
    )


class ToMask(nn.Module):
    """An intermediate semantic mask m_i with C channels, read off a block's features."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(x))


class SFM(nn.Module):
    """Fuses an intermediate mask with the input semantic sketch (eqs. 4-5)."""

    def __init__(self, num_classes: int, hidden: int, background_classes: Sequence[int]):
        super().__init__()
        self.background_classes = tuple(background_classes)
        self.f1 = _two_conv(2 * num_classes, hidden, num_classes)
        self.f2 = _two_conv(num_classes, hidden, num_classes)

    def forward(self, m: torch.Tensor, m0: torch.Tensor) -> torch.Tensor:
        m0 = F.interpolate(m0, size=m.shape[2:], mode="nearest")
        mf = foreground_only(m0, self.background_classes)
        # Both F1 terms in one call on a doubled batch: half the kernel launches, same values.
        pairs = torch.cat([torch.cat([mf, torch.zeros_like(m)], dim=1), torch.cat([m0, m], dim=1)])
        fg, fused = self.f1(pairs).split(m.shape[0])
        f0 = fg + F.avg_pool2d(fused, 3, stride=1, padding=1, count_include_pad=False)
        return f0 + self.f2(f0)
