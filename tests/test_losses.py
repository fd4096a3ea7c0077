"""Hinge, feature-matching and VGG losses against values worked out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssgan_dist.losses import VGGLoss, d_hinge_loss, feature_matching_loss, g_hinge_loss
from ssgan_dist.models.vgg import VGG19Features

t = torch.tensor


def test_d_hinge_loss_by_hand() -> None:
    # scale 0 real [0.5, 2, -1, 0]: relu(1 - p) = [0.5, 0, 2, 1] -> 0.875
    # scale 1 real [3, 0.5]:        relu(1 - p) = [0, 0.5]       -> 0.25
    # scale 0 fake [-2, 0, 1, -0.5]: relu(1 + p) = [0, 1, 2, 0.5] -> 0.875
    # scale 1 fake [-1.5, 0.25]:     relu(1 + p) = [0, 1.25]     -> 0.625
    # (0.875 + 0.25) / 2 + (0.875 + 0.625) / 2 = 0.5625 + 0.75 = 1.3125
    ignored = t([100.0])  # intermediate features play no part
    real = [[ignored, t([[0.5, 2.0], [-1.0, 0.0]])], [ignored, t([3.0, 0.5])]]
    fake = [[ignored, t([[-2.0, 0.0], [1.0, -0.5]])], [ignored, t([-1.5, 0.25])]]
    assert d_hinge_loss(real, fake).item() == pytest.approx(1.3125)


def test_g_hinge_loss_by_hand() -> None:
    # -mean per scale: -(-2 + 0 + 1 - 0.5)/4 = 0.375 and -(-1.5 + 0.25)/2 = 0.625 -> mean 0.5
    fake = [[t([7.0]), t([[-2.0, 0.0], [1.0, -0.5]])], [t([7.0]), t([-1.5, 0.25])]]
    assert g_hinge_loss(fake).item() == pytest.approx(0.5)


def test_feature_matching_by_hand_with_real_detached() -> None:
    # scale 0: |[1,2]-[0,4]| mean = 1.5 ; |[3]-[0]| = 3      (prediction 9 vs -9 ignored)
    # scale 1: |[-1,1]-[1,1]| mean = 1  ; |[0.5]-[0]| = 0.5 (prediction ignored)
    # (1.5 + 3 + 1 + 0.5) / 2 scales = 3.0
    fake = [[t([1.0, 2.0]), t([3.0]), t([9.0])], [t([-1.0, 1.0]), t([0.5]), t([9.0])]]
    real = [[t([0.0, 4.0]), t([0.0]), t([-9.0])], [t([1.0, 1.0]), t([0.0]), t([-9.0])]]
    for f in fake[0] + fake[1] + real[0] + real[1]:
        f.requires_grad_(True)
    loss = feature_matching_loss(fake, real)
    assert loss.item() == pytest.approx(3.0)
    loss.backward()
    assert all(r.grad is None for r in real[0] + real[1])
    # d/dx mean|x - y| = sign(x - y) / n, over 2 scales: scale 0, first feature [-1, 1]/2/2
    torch.testing.assert_close(fake[0][0].grad, t([0.25, -0.25]))
    assert fake[0][2].grad is None  # the prediction is not a feature


class ScaledCopies(nn.Module):
    """Stands in for VGG19: five 'features' x * 1, x * 2, ... x * 5."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x * (i + 1) for i in range(5)]


def test_vgg_loss_by_hand() -> None:
    fake = t([[[[0.5, -0.5], [1.0, 0.0]]]], requires_grad=True)
    real = t([[[[0.0, 0.5], [0.0, 0.0]]]], requires_grad=True)
    # mean|fake - real| = (0.5 + 1 + 1 + 0) / 4 = 0.625; feature i scales it by (i + 1)
    # 0.625 * (1/32 * 1 + 1/16 * 2 + 1/8 * 3 + 1/4 * 4 + 1 * 5) = 0.625 * 6.53125
    loss = VGGLoss(ScaledCopies())(fake, real)
    assert loss.item() == pytest.approx(0.625 * 6.53125)
    loss.backward()
    assert real.grad is None and fake.grad is not None


def test_vgg_loss_with_vgg19_features() -> None:
    torch.manual_seed(0)
    vgg = VGG19Features()  # random weights: the loss arithmetic, not the features, is tested
    a, b = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    fa, fb = vgg(a), vgg(b)
    weights = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1]
    expected = sum(w * (x - y).abs().mean() for w, x, y in zip(weights, fa, fb))
    loss = VGGLoss(vgg)
    torch.testing.assert_close(loss(a, b), expected)
    assert loss(a, a).item() == 0
