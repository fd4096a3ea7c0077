"""The SSGAN generator: NVlabs SPADE's generator, refined by Semantic Fusion Modules.

With ``model.sfm=false`` this is exactly SPADE's ``SPADEGenerator`` (same blocks, names,
parameters and upsampling schedule): the paper's "GauGAN - semantic sketch" baseline.
With ``model.sfm=true`` block i+1 is conditioned on M_i = SFM_i(ToMask_i(x_i), M0) instead
of M0, made at block i+1's own resolution (see ``sfm.py`` for how we read the paper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssgan_dist.config import NUM_UPSAMPLING, ModelConfig
from ssgan_dist.models.recompute import recomputed
from ssgan_dist.models.sfm import SFM, ToMask
from ssgan_dist.models.spade import SPADEResBlock, init_weights


def block_schedule(num_upsampling: str) -> list[tuple[str, bool]]:
    """(block name, upsample x2 before it) in forward order, as SPADE's forward has it."""
    more = num_upsampling in ("more", "most")
    schedule = [
        ("head_0", False), ("G_middle_0", True), ("G_middle_1", more),
        ("up_0", True), ("up_1", True), ("up_2", True), ("up_3", True),
    ]
    if num_upsampling == "most":
        schedule.append(("up_4", True))
    return schedule


class SSGANGenerator(nn.Module):
    """Semantic sketch M0 (one-hot, C channels) and z -> image in [-1, 1]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        nf, c = cfg.ngf, cfg.num_classes
        self.use_z, self.z_dim, self.nf = cfg.use_z, cfg.z_dim, nf
        self.grad_checkpoint = False  # recompute each block's activations in backward (train.grad_checkpoint)
        self.start_size = cfg.image_size // 2 ** NUM_UPSAMPLING[cfg.num_upsampling]
        self.schedule = block_schedule(cfg.num_upsampling)

        s = self.start_size
        self.fc = nn.Linear(cfg.z_dim, 16 * nf * s * s) if cfg.use_z else nn.Conv2d(c, 16 * nf, 3, padding=1)
        widths = {
            "head_0": (16 * nf, 16 * nf), "G_middle_0": (16 * nf, 16 * nf),
            "G_middle_1": (16 * nf, 16 * nf), "up_0": (16 * nf, 8 * nf), "up_1": (8 * nf, 4 * nf),
            "up_2": (4 * nf, 2 * nf), "up_3": (2 * nf, nf), "up_4": (nf, nf // 2),
        }
        for name, _ in self.schedule:
            fin, fout = widths[name]
            self.add_module(name, SPADEResBlock(fin, fout, c, cfg.spade_hidden, cfg.spectral_norm))
        final_nc = widths[self.schedule[-1][0]][1]
        self.conv_img = nn.Conv2d(final_nc, 3, 3, padding=1)

        self.to_masks = nn.ModuleList()
        self.sfms = nn.ModuleList()
        init_weights(self)  # SPADE's init, drawn before the SFM's: the same SPADE weights with the SFM on or off
        # Block i's output resolution: M_i (made for block i+1) is made at sizes[i + 1].
        self.sizes, r = [], s
        for _, upsample in self.schedule:
            r *= 2 if upsample else 1
            self.sizes.append(r)
        if cfg.sfm:
            for name, _ in self.schedule[:-1]:
                self.to_masks.append(ToMask(widths[name][1], c, cfg.sfm_tomask))
                self.sfms.append(SFM(c, cfg.sfm_hidden, cfg.background_classes, cfg.sfm_form, cfg.sfm_resize))
            if cfg.sfm_init == "xavier":  # SPADE's gain 0.02 for ToMask and the SFM too (measured worse)
                init_weights(self.to_masks)
                init_weights(self.sfms)
            elif cfg.sfm_init == "kaiming":  # F1, F2 variance-preserving: M0's contrast survives the SFM
                for sfm in self.sfms:
                    sfm.kaiming_init()
            elif cfg.sfm_init == "zero":  # SFM output 0 at step 0 (residual form: M_i = M0)
                for sfm in self.sfms:
                    sfm.zero_last_convs()

    def forward(self, m0: torch.Tensor, z: torch.Tensor | None = None, return_masks: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        s = self.start_size
        if self.use_z:
            if z is None:
                z = torch.randn(m0.shape[0], self.z_dim, device=m0.device)
            x = self.fc(z).view(-1, 16 * self.nf, s, s)
        else:
            x = self.fc(F.interpolate(m0, size=(s, s), mode="nearest"))

        seg, masks = m0, []
        for i, (name, upsample) in enumerate(self.schedule):
            if upsample:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            block = getattr(self, name)
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = recomputed(block, x, seg)
            else:
                x = block(x, seg)
            if i < len(self.sfms):
                size = (self.sizes[i + 1], self.sizes[i + 1])  # block i+1's own resolution
                seg = self.sfms[i](self.to_masks[i](x, size), m0)
                masks.append(seg)  # M_i, the SFM's learned mask (paper Fig. 3(c))

        image = torch.tanh(self.conv_img(F.leaky_relu(x, 0.2)))
        return (image, masks) if return_masks else image
