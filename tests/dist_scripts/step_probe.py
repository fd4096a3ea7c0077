"""Train a few steps through the real Trainer and record, on every rank, what each optimizer
step applied and what it left.

    [torchrun ...] tests/dist_scripts/step_probe.py OUT STEPS [options] key=value...

Options: ``--nan-rank R --nan-step S`` make rank R's G hinge loss NaN in step S (1-based);
``--bn-eval`` puts G's BatchNorms in eval mode (batch-independent: running statistics);
``--fixed-global B`` gives every rank rows [rank*b, (rank+1)*b) of the same global batches of
B samples (a one-rank loader without flips), so runs of any rank count see the same samples.
Each rank writes OUT.rank<r>.pt: per step, per network, the gradients the step applied and
the parameters and buffers after it, the losses, the skipped flag and the all-reduces the step
made.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

import ssgan_dist.tasks.gan as gan
from ssgan_dist.config import load_config
from ssgan_dist.data.shards import resolve_shards
from ssgan_dist.data.torch_loader import build_torch_loader
from ssgan_dist.distributed.env import setup, teardown
from ssgan_dist.train import Trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("steps", type=int)
    parser.add_argument("--nan-rank", type=int, default=-1)
    parser.add_argument("--nan-step", type=int, default=0)
    parser.add_argument("--bn-eval", action="store_true")
    parser.add_argument("--fixed-global", type=int, default=0)
    args, overrides = parser.parse_known_args()
    env = setup()
    torch.set_num_threads(1)
    cfg = load_config("demo", overrides)
    trainer = Trainer(cfg, env)
    task, engine = trainer.task, trainer.task.engine
    if args.bn_eval:
        for m in task.G.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    if env.rank == args.nan_rank:
        original_loss = gan.g_hinge_loss

        def g_hinge_loss(pred):
            loss = original_loss(pred)
            return loss * float("nan") if trainer.step + 1 == args.nan_step else loss

        gan.g_hinge_loss = g_hinge_loss
    source = trainer.data
    if args.fixed_global:
        local = args.fixed_global // env.world_size
        whole = build_torch_loader(
            resolve_shards(cfg.data.shards), seed=0, rank=0, world_size=1, num_workers=0,
            batch_size=args.fixed_global, num_classes=cfg.model.num_classes, image_size=cfg.model.image_size,
            on_error="raise", flip=False)
        source = ({k: b[k][env.rank * local:(env.rank + 1) * local] for k in ("sketch", "label", "image")}
                  for b in whole)

    steps: list[dict] = []
    original_step = engine.step

    def step(name: str, skip: torch.Tensor) -> None:
        grads = [p.grad.detach().clone() for p in engine.module(name).parameters()]
        original_step(name, skip)
        steps[-1][name] = {"grads": grads, "params": [p.detach().clone() for p in engine.module(name).parameters()],
                           "buffers": {k: b.detach().clone() for k, b in engine.module(name).named_buffers()}}

    engine.step = step
    all_reduce, calls = torch.distributed.all_reduce, [0]

    def counted(*a, **k):
        calls[0] += 1
        return all_reduce(*a, **k)

    torch.distributed.all_reduce = counted
    for _ in range(args.steps):
        batch = next(source)
        batch.pop("skipped", None)
        steps.append({})
        calls[0] = 0
        out = trainer.train_step(batch)
        trainer.step += 1
        losses, skipped = out.read()
        steps[-1].update(losses=losses, skipped=skipped, all_reduces=calls[0])
    torch.distributed.all_reduce = all_reduce
    torch.save({"steps": steps}, f"{args.out}.rank{env.rank}.pt")
    if env.distributed:
        torch.distributed.barrier()  # leave together (a lone rank in teardown was seen to hang)
    teardown()


if __name__ == "__main__":
    sys.exit(main())
