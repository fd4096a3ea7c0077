"""Synchronized BatchNorm for the SPADE norms, on CUDA and on CPU.

SPADE normalizes with batch statistics; with a per-rank batch of 1-4 images those are far
noisier than the global batch's, so the statistics are reduced across ranks. On CUDA that is
torch's ``SyncBatchNorm``. torch's refuses CPU tensors in training, so on CPU (gloo) a
``CrossRankBatchNorm2d`` gathers per-rank counts, means and variances with the
differentiable ``torch.distributed.nn.functional.all_gather``: the forward and the gradients
are those of one BatchNorm over the global batch, which is what the CI tests check.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn


class CrossRankBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the batch over all ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        # Per-rank (count, mean, M2) combined with Chan's parallel formula: as stable as one
        # BatchNorm over the global batch (sum / sum-of-squares would cancel catastrophically).
        var_l, mean_l = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
        count_l = torch.full((1,), x.numel() / c, dtype=torch.float32, device=x.device)
        stats = dist_fn.all_gather(torch.cat([count_l, mean_l, var_l]))
        counts = torch.stack([s[0] for s in stats])  # [R]
        means = torch.stack([s[1: c + 1] for s in stats])  # [R, C]
        m2s = torch.stack([s[c + 1:] for s in stats]) * counts[:, None]
        total = counts.sum()
        mean = (counts[:, None] * means).sum(0) / total
        var = (m2s.sum(0) + (counts[:, None] * (means - mean) ** 2).sum(0)) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * total / (total - 1).clamp_min(1)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        out = (xf - mean.view(1, c, 1, 1)) * torch.rsqrt(var.view(1, c, 1, 1) + self.eps)
        if self.affine:
            out = out * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return out.to(x.dtype)


def _replace_batchnorms(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm2d for a CrossRankBatchNorm2d, keeping its buffers and parameters."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, CrossRankBatchNorm2d):
        new = CrossRankBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new.to(next(module.buffers(), torch.empty(0)).device)
    for name, child in module.named_children():
        module.add_module(name, _replace_batchnorms(child))
    return module


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Synchronize every BatchNorm2d of ``module`` across all ranks (collective: every rank
    converts its networks in the same order).

    On CUDA the norms get a process group of their own, i.e. their own NCCL communicator and
    stream: on the default group their small collectives in the backward pass would queue
    behind DDP's gradient buckets (megabytes each) and stall the backward until the link
    drains (bench/scaling.py). On CPU the default group: gloo's blocking gradient hook already
    orders every collective (distributed/engine.py).
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group=dist.new_group())
    return _replace_batchnorms(module)

