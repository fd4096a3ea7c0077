"""``python -m ssgan_dist.train`` with one fault injected, for the recovery tests.

    [torchrun ...] tests/dist_scripts/faulty_train.py MODE RANK STEP key=value...

MODE is one of
  kill-at-step   SIGKILL this process when it is about to run STEP, on the first attempt only
                 (torchrun's restart counter is 0), as a crashed or OOM-killed worker would be;
  kill-in-save   SIGKILL this process halfway through writing the checkpoint of STEP;
  nan-at-step    make this rank's G loss NaN at STEP;
  corrupt-save   write the checkpoint of STEP truncated without any error, as a storage layer
                 that silently loses data would;
  stale-listing  this rank's listing of run.dir shows only checkpoints older than STEP (a
                 stale view of a shared filesystem);
  unreadable     this rank cannot read any checkpoint (STEP unused);
  slow-steps     every step from STEP on takes 2 s more (time to send a second signal).
RANK is the rank that suffers it. Everything else is the real training entry point.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

import ssgan_dist.checkpoint as ckpt
import ssgan_dist.resume as resume
import ssgan_dist.tasks.gan as gan
import ssgan_dist.train as train


def main() -> int:
    mode, rank, step, *overrides = sys.argv[1:]
    rank, step = int(rank), int(step)
    me = int(os.environ.get("RANK", "0"))
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if me == rank and mode == "kill-at-step" and first_attempt:
        original_step = train.Trainer.train_step

        def train_step(self, batch):
            if self.step + 1 == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return original_step(self, batch)

        train.Trainer.train_step = train_step
    elif me == rank and mode == "kill-in-save":
        original_save = torch.save

        def half_save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("step") == step:
                original_save(obj, f, *args, **kwargs)
                f.flush()
                f.truncate(f.tell() // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            return original_save(obj, f, *args, **kwargs)

        ckpt.torch.save = half_save
    elif me == rank and mode == "nan-at-step":
        original_loss = gan.g_hinge_loss
        calls = {"n": 0}

        def g_hinge_loss(pred):
            calls["n"] += 1
            loss = original_loss(pred)
            return loss * float("nan") if calls["n"] == step else loss

        gan.g_hinge_loss = g_hinge_loss
    elif me == rank and mode == "corrupt-save":
        original_save = torch.save

        def lossy_save(obj, f, *args, **kwargs):
            original_save(obj, f, *args, **kwargs)
            if isinstance(obj, dict) and obj.get("step") == step:
                f.flush()
                f.truncate(f.tell() // 2)

        ckpt.torch.save = lossy_save
    elif me == rank and mode == "stale-listing":
        original_list = ckpt.list_checkpoints
        ckpt.list_checkpoints = lambda run_dir: [p for p in original_list(run_dir) if ckpt.step_of(p) < step]
    elif me == rank and mode == "unreadable":
        def unreadable(path, *args, **kwargs):
            raise ckpt.Unreadable("injected: this rank cannot read it")

        ckpt.read = unreadable
        resume.read = unreadable
    elif me == rank and mode == "slow-steps":
        import time

        original_step = train.Trainer.train_step

        def slow_step(self, batch):
            if self.step + 1 >= step:
                time.sleep(2.0)
            return original_step(self, batch)

        train.Trainer.train_step = slow_step
    return train.main(overrides)


if __name__ == "__main__":
    sys.exit(main())
