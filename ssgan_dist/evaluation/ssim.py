"""SSIM as the paper reports it: images in [0, 1], Gaussian window 11x11, sigma 1.5.

This is scikit-image's ``structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1.0, channel_axis=-1)``, the common reference
setting, computed with torch so it runs batched on the evaluation device. scikit-image
filters the whole image with reflection at the borders and then drops a 5-pixel border;
convolving without padding gives exactly the kept values. Colour images: the mean over
channels, as scikit-image's ``channel_axis`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03


def _window(channels: int, device: torch.device) -> torch.Tensor:
    x = torch.arange(WINDOW, dtype=torch.float64, device=device) - WINDOW // 2
    g = torch.exp(-0.5 * (x / SIGMA) ** 2)
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, WINDOW, WINDOW).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM of each image pair: [B,C,H,W] x [B,C,H,W] -> [B] (float64)."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim: expected two [B,C,H,W] batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < WINDOW:
        raise ValueError(f"ssim: images must be at least {WINDOW}x{WINDOW}, got {tuple(x.shape[-2:])}")
    c = x.shape[1]
    w = _window(c, x.device)
    x, y = x.double(), y.double()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3))
