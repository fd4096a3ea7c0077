"""Train K steps on fixed global batches, each rank taking its slice; rank 0 saves G and D,
and their gradients of the last step (``G_grad``, ``D_grad``: DDP's averages over ranks).

    torchrun --nproc_per_node N tests/dist_scripts/fixed_batches.py OUT GLOBAL_BATCH STEPS key=value...

Every rank reads the same global batches (a one-rank loader without flips) and takes rows
[rank*B, (rank+1)*B), so N ranks x B and 1 rank x N*B train on exactly the same samples; z is
already a per-step function of the global batch (tasks.gan.GANTask.step_noise).
"""

from __future__ import annotations

import sys

import torch

from ssgan_dist.config import load_config
from ssgan_dist.data.shards import resolve_shards
from ssgan_dist.data.torch_loader import build_torch_loader
from ssgan_dist.distributed.env import setup, teardown
from ssgan_dist.train import Trainer


def main() -> None:
    out, global_batch, steps, *overrides = sys.argv[1:]
    global_batch, steps = int(global_batch), int(steps)
    env = setup()
    local = global_batch // env.world_size
    cfg = load_config("demo", [*overrides, f"train.batch_size={local}"])
    torch.set_num_threads(1)
    trainer = Trainer(cfg, env)
    source = build_torch_loader(
        resolve_shards(cfg.data.shards), seed=0, rank=0, world_size=1, num_workers=0, batch_size=global_batch,
        num_classes=cfg.model.num_classes, image_size=cfg.model.image_size, on_error="raise", flip=False,
    )
    applied: dict[str, dict[str, torch.Tensor]] = {}  # the gradients of each network's last step
    step = trainer.task.engine.step

    def capture(name: str, skip: torch.Tensor) -> None:
        module = trainer.task.engine.module(name)
        applied[name] = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        step(name, skip)

    trainer.task.engine.step = capture  # the engine drops gradients after its step
    losses = []
    for _ in range(steps):
        batch = next(source)
        mine = {k: batch[k][env.rank * local:(env.rank + 1) * local] for k in ("sketch", "label", "image")}
        losses.append(trainer.train_step(mine).losses)
        trainer.step += 1
    if env.is_main:
        torch.save({"G": trainer.task.G.state_dict(), "D": trainer.task.D.state_dict(), "losses": losses,
                    "G_grad": applied["G"], "D_grad": applied["D"]}, out)
    if env.distributed:
        torch.distributed.barrier()  # leave together (a lone rank in teardown was seen to hang)
    teardown()


if __name__ == "__main__":
    main()
