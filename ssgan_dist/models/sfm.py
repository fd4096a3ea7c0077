"""ToMask and the Semantic Fusion Module (SSGAN, eqs. 4-5).

    m_i = ToMask_i(x_i) = sigmoid(conv3x3(x_i))                   C channels
    f0  = F1([Mf, 0]) + AvgPool(F1([M0, m_i]))                     eq. 4
    f   = f0 + F2(f0)                                              eq. 5
    M_i = f                          (model.sfm_form=paper, shipped)
    M_i = M0 + f                     (model.sfm_form=residual, measured, not better)

M_i conditions block i+1; the first block gets M0 itself. Our reading of the paper, kept here in
one place so it can be revisited (EVIDENCE below; ``bench/learning.py`` measures it):

1. F1 is one small conv net whose input is a 2C-channel pair [label map, intermediate
   mask]; "Mf padded with 0" means F1(Mf) = F1([Mf, 0]). Both terms share F1's weights.
2. F1 = conv3x3(2C -> h) + leaky_relu(0.2) + conv3x3(h -> C) and
   F2 = conv3x3(C -> h) + leaky_relu(0.2) + conv3x3(h -> C), h = ``model.sfm_hidden``;
   no normalization and no spectral norm inside the SFM.
3. AvgPool keeps the resolution: 3x3, stride 1, padding 1, count_include_pad=False (so the
   border is an average of real pixels, not diluted by padding zeros).
4. Mf is M0 with every background class channel (``model.background_classes``) AND channel 0
   (no label) zeroed: it holds the foreground strokes only, no trace of where background
   strokes or empty paper are.
5. Resolution: every block is conditioned at its own resolution, as in SPADE. M_i is made at
   the resolution of block i+1 (after the generator's x2 upsampling, where that block has
   one), so the last block is conditioned at full resolution, where M0's 1-px strokes are.
   ToMask reads x_i at block i's size and its mask is upsampled (nearest) to block i+1's size
   (``model.sfm_tomask=block``; ``upsampled``: ToMask reads the upsampled x_i, 4x the cost).
6. M0 reaches a lower resolution by max-pooling (``model.sfm_resize=maxpool``): a class is
   present at a coarse pixel when any pixel of its window holds it, so a 1-px stroke reaches
   every block. ``nearest`` (SPADE's own resize) keeps one pixel in k^2 and drops most
   strokes below full resolution (a horizon line survives at 8 px only if it lies on a
   sampled row). The first block keeps SPADE's conditioning (M0, resized by its norms).
7. The paper's form, M_i = f (``model.sfm_form=paper``), with PyTorch's default init for
   ToMask and the SFM (``model.sfm_init=default``). SPADE's xavier gain-0.02 init
   (``xavier``) makes every M_i ~1e-4 at step 0, so blocks 2..7 get almost no label signal
   and the SFM's gradients fall under Adam's eps; with the default init the label signal
   reaches every block from step 0 (labelled pixels differ from empty paper by ~0.1-0.2 on a
   map of magnitude ~1; tests/test_sfm.py). The SPADE part of the generator keeps SPADE's
   init, drawn before the SFM's, so its weights are the same with the SFM on or off.
   Measured alternative: the residual form M_i = M0 + f (``residual``), with F1's and F2's last
   convs zeroed (``sfm_init=zero``: SSGAN == SPADE at step 0 with nearest resizing) or not.
8. f is used as is (no sigmoid or softmax): it has C channels, so every SPADE norm keeps its
   SPADE input width. The inspectable masks of the paper's Figure 3(c) are the SFM outputs
   M_i (argmax over channels), which the generator returns with ``return_masks=True``.

EVIDENCE (bench/learning.py; BENCHMARKS.md "Learning: SSGAN vs SPADE" has the command, the
curves and the final comparison with train.ema). Demo preset (64 px, ngf 8, sfm_hidden 16),
512 synthetic scenes, held-out SSIM on 128 scenes of another seed, raw G (no EMA), 1200 steps;
s0/s1/s2 = run.seed. Screening, at steps 200 / 400 / 600 of seed 0 unless said:

    shipped: paper, default init, maxpool, block   .475 .493 .489  (1200: s0 .553 s1 .550 s2 .546)
    SPADE baseline (model.sfm=false)                .462 .478 .519  (1200: s0 .515 s1 .539 s2 .522)
    paper, default init, nearest                    .385 .444 .447
    paper, xavier 0.02 init, nearest (before)       .395 .416 .425
    paper, kaiming init, maxpool (s1; s2)           .421 .522 .498, 800: .560;  .462 .456 .470
    residual, zeroed last convs, maxpool (s0; s1)   .441 .342 .478, 1200: .557;  .435 .481 .506, 1000: .481
    residual, default init, maxpool                 .426 .360 .497
    residual, default init, maxpool, upsampled      .475 .483 .470
    residual, default init, nearest                 .428 .408 .482

Max-pooling M0 beat nearest by .03-.05 in both forms (strokes reach the coarse blocks); the
xavier init was the worst; the residual form was no better than the paper's and less stable
(s0 fell to .342 at 400), so the paper's form ships. Kaiming init looked better early on one
seed and worse on another: kept as an option, not the default. Differences between
neighbouring checkpoints of one run reach .03-.05, so single points decide nothing; the
final comparison averages seeds and uses the EMA of G for both models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

FORMS = ("paper", "residual")
RESIZES = ("maxpool", "nearest")
TOMASK_READS = ("block", "upsampled")


def foreground_only(m0: torch.Tensor, background_classes: Sequence[int]) -> torch.Tensor:
    """Mf: ``m0`` [B, C, H, W] with channel 0 (no label) and the background class channels zeroed."""
    keep = torch.ones(m0.shape[1], dtype=m0.dtype, device=m0.device)
    keep[[0, *background_classes]] = 0
    return m0 * keep.view(1, -1, 1, 1)


def resize_labels(m0: torch.Tensor, size: Sequence[int], mode: str = "maxpool") -> torch.Tensor:
    """A label map [B, C, H, W] at ``size`` (h, w). ``maxpool``: going down, a class is present
    where any pixel of the window holds it (strokes survive); ``nearest``: SPADE's resize.
    Going up, or to non-integer factors' neighbours, both are nearest."""
    size = tuple(int(s) for s in size)
    if tuple(m0.shape[2:]) == size:
        return m0
    if mode == "maxpool" and m0.shape[2] >= size[0] and m0.shape[3] >= size[1]:
        return F.adaptive_max_pool2d(m0, size)
    if mode not in RESIZES:
        raise ValueError(f"resize_labels: mode {mode!r}, expected one of {RESIZES}")
    return F.interpolate(m0, size=size, mode="nearest")


def _two_conv(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, hidden, 3, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(hidden, cout, 3, padding=1),
    )


class ToMask(nn.Module):
    """An intermediate semantic mask m_i with C channels, read off a block's features and
    brought (nearest) to the size of the block that its SFM output conditions.

    ``reads="block"``: the conv reads x_i at block i's size and the mask is upsampled;
    ``"upsampled"``: x_i is upsampled first and the conv reads it at block i+1's size."""

    def __init__(self, in_channels: int, num_classes: int, reads: str = "block"):
        super().__init__()
        if reads not in TOMASK_READS:
            raise ValueError(f"ToMask: reads={reads!r}, expected one of {TOMASK_READS}")
        self.reads = reads
        self.conv = nn.Conv2d(in_channels, num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        size = tuple(x.shape[2:]) if size is None else tuple(size)
        if self.reads == "upsampled" and tuple(x.shape[2:]) != size:
            x = F.interpolate(x, size=size, mode="nearest")
        m = torch.sigmoid(self.conv(x))
        return m if tuple(m.shape[2:]) == size else F.interpolate(m, size=size, mode="nearest")


class SFM(nn.Module):
    """Fuses an intermediate mask m_i with the input semantic sketch M0 (eqs. 4-5), at m_i's size."""

    def __init__(self, num_classes: int, hidden: int, background_classes: Sequence[int],
                 form: str = "paper", resize: str = "maxpool"):
        super().__init__()
        if form not in FORMS or resize not in RESIZES:
            raise ValueError(f"SFM: form={form!r} (one of {FORMS}), resize={resize!r} (one of {RESIZES})")
        self.background_classes = tuple(background_classes)
        self.form, self.resize = form, resize
        self.f1 = _two_conv(2 * num_classes, hidden, num_classes)
        self.f2 = _two_conv(num_classes, hidden, num_classes)

    def kaiming_init(self) -> None:
        """Variance-preserving (He) init of F1 and F2 (``model.sfm_init=kaiming``): gain for
        leaky_relu(0.2) on the first conv, linear on the last, zero biases, so M0's one-hot
        contrast passes through the SFM at step 0 at about its own size."""
        for net in (self.f1, self.f2):
            nn.init.kaiming_normal_(net[0].weight, a=0.2, nonlinearity="leaky_relu")
            nn.init.kaiming_normal_(net[-1].weight, nonlinearity="linear")
            nn.init.zeros_(net[0].bias)
            nn.init.zeros_(net[-1].bias)

    def zero_last_convs(self) -> None:
        """f = 0 until trained (``model.sfm_init=zero``): the residual form then starts as M_i = M0."""
        for net in (self.f1, self.f2):
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias)

    def forward(self, m: torch.Tensor, m0: torch.Tensor) -> torch.Tensor:
        m0 = resize_labels(m0, m.shape[2:], self.resize)
        mf = foreground_only(m0, self.background_classes)
        # Both F1 terms in one call on a doubled batch: half the kernel launches, same values.
        pairs = torch.cat([torch.cat([mf, torch.zeros_like(m)], dim=1), torch.cat([m0, m], dim=1)])
        fg, fused = self.f1(pairs).split(m.shape[0])
        f0 = fg + F.avg_pool2d(fused, 3, stride=1, padding=1, count_include_pad=False)
        f = f0 + self.f2(f0)
        return m0 + f if self.form == "residual" else f
