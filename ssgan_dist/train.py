"""Train SSGAN (or its sketch segmenter) from a preset or YAML config and key=value overrides.

``python -m ssgan_dist.train [--config NAME|PATH] [key=value ...]`` (console script
``ssgan-train``); under ``torchrun`` on every rank. Outputs go to run.dir: checkpoints,
samples/, train.log, scalars.jsonl, tb/ (TensorBoard) and config.yaml.

The Trainer owns what every task shares, each part built by one function: telemetry, the
task (its networks in their engine, see tasks/), the data loader and the checkpoint
manager. ``fit`` reads top to bottom: wait for the batch, the task's step, then logging,
samples, checkpoints and the task's evaluation. ``run.task`` picks the task.

A step's batch holds train.accum_steps micro-batches (the task splits it), so the data
position and the loader are those of one batch per optimizer step. The loop reads what a
step leaves on the device (losses, the skipped flag) only when it logs or checkpoints,
all steps since the last read at once: on a GPU the host runs ahead of the device between.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ssgan_dist import checkpoint as ckpt
from ssgan_dist.config import Config, ConfigError, load_config, require_training_data, save_config
from ssgan_dist.data.loaders import ShardLoader, build_training_loader
from ssgan_dist.data.skips import Skipped
from ssgan_dist.distributed.collectives import gather_to_all
from ssgan_dist.distributed.env import DistEnv, setup, teardown
from ssgan_dist.errors import SetupError
from ssgan_dist.images import save_png
from ssgan_dist.precision import check_precision
from ssgan_dist.scalars import Scalars, build_scalars
from ssgan_dist.shell import Progress, command_parser, format_duration, print_config, run_cli, setup_logging
from ssgan_dist.tasks import TASKS
from ssgan_dist.tasks.base import StepOutput, Task
from ssgan_dist.telemetry import Telemetry, build_telemetry

log = logging.getLogger("ssgan_dist.train")


class Trainer:
    """Owns the parts of one run and the loop over steps."""

    def __init__(self, cfg: Config, env: DistEnv, task: type[Task] | None = None):
        """``task``: the task to train, by default run.task's (tests pass a variant)."""
        kind = task or TASKS[cfg.run.task]
        if kind.name != cfg.run.task:
            raise ConfigError(f"run.task={cfg.run.task}, but the task given trains run.task={kind.name}")
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.run.dir)
        check_precision(cfg.train.precision, env.device)
        # First: a taken metrics port fails before heavy work.
        self.telemetry: Telemetry = build_telemetry(cfg.metrics, env, job=cfg.run.name, series=kind.series,
                                                    flops_per_image=lambda: kind.flops_per_image(cfg),
                                                    precision=cfg.train.precision)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        self.task: Task = kind(cfg, env)
        self.data: ShardLoader = build_training_loader(
            cfg.data, env, seed=cfg.run.seed, batch_size=cfg.train.batch_size * cfg.train.accum_steps,
            image_size=cfg.model.image_size,
            num_classes=cfg.model.num_classes, background_classes=cfg.model.background_classes)
        self.ckpt = ckpt.CheckpointManager(self.run_dir, cfg.checkpoint.keep)
        self.step = 0
        self.skipped_samples = 0
        self.nonfinite_steps = 0
        self.last_eval: dict[str, Any] | None = None
        self._unread: list[tuple[int, StepOutput]] = []  # (step number, output) not yet read on the host
        self.scalars: Scalars = Scalars()  # rank 0's JSONL/TensorBoard writer once fit() has resumed

    # -- state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything to continue exactly; per-rank parts (data position, RNG) of every rank."""
        per_rank = gather_to_all({"data": self.data.state_dict(), "rng": torch.get_rng_state()})
        return {
            "step": self.step,
            "world_size": self.env.world_size,
            "config": self.cfg.to_dict(),
            **self.task.state_dict(),
            "ranks": per_rank,
            "skipped_samples": self.skipped_samples,
            "nonfinite_steps": self.nonfinite_steps,
            "telemetry": self.telemetry.state_dict(),
        }

    def check_compatible(self, saved: dict[str, Any], source: Path) -> None:
        """Refuse a checkpoint of another task or of other settings (``saved``: its config)."""
        ckpt.check_task(saved, self.task.name, source)
        ckpt.check_compatible(self.task.signature(saved), self.task.signature(self.cfg.to_dict()), source)

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        self.check_compatible(state["config"], source)
        if state["world_size"] != self.env.world_size:
            raise SetupError(
                f"{source} was written by {state['world_size']} ranks and this run has "
                f"{self.env.world_size}: the data position cannot be carried over exactly; "
                f"run with {state['world_size']} ranks or a new run.dir"
            )
        self.task.load_state_dict(state)
        mine = state["ranks"][self.env.rank]
        self.data.load_state_dict(mine["data"])
        torch.set_rng_state(mine["rng"])
        self.step = int(state["step"])
        self.skipped_samples = int(state["skipped_samples"])
        self.nonfinite_steps = int(state["nonfinite_steps"])
        self.telemetry.load_state_dict(state.get("telemetry", {}))

    def maybe_resume(self) -> None:
        if not self.cfg.checkpoint.resume:
            return
        found = self.ckpt.load_latest(map_location="cpu")
        if found is not None:
            state, path = found
            self.load_state_dict(state, path)
            self.task.engine.load_sharded(path)
            log.info("resumed from %s at step %d", path, self.step)

    def save_checkpoint(self) -> Path:
        self.read_steps()  # the counters it writes
        engine = self.task.engine
        path = self.ckpt.save(self.step, self.state_dict(), self.env,
                              save_shards=engine.save_sharded if engine.sharded else None)
        self.telemetry.checkpoint_saved()
        log.info("checkpoint %s", path)
        return path

    # -- one step --------------------------------------------------------------------
    def train_step(self, batch: dict[str, Any]) -> StepOutput:
        return self.task.train_step(batch, self.step, self.telemetry.lap)

    def read_steps(self) -> tuple[dict[str, float], int]:
        """Read the unread steps' outputs with one device synchronisation: warn of and count
        the skipped ones; (the last step's losses, how many were skipped)."""
        if not self._unread:
            return {}, 0
        flags = torch.stack([out.skipped.float() for _, out in self._unread]).tolist()
        losses, _ = self._unread[-1][1].read()
        skipped = [step for (step, _), flag in zip(self._unread, flags) if flag]
        for step in skipped:
            log.warning("step %d skipped on every rank: non-finite loss%s", step,
                        f" {losses}" if step == self._unread[-1][0] else "")
        self.nonfinite_steps += len(skipped)
        self._unread.clear()
        return losses, len(skipped)

    def save_samples(self, batch: dict[str, Any], out: StepOutput) -> Path:
        grid = self.task.sample_grid(batch, out)
        self.scalars.image("samples", self.step, grid)
        return save_png(grid, self.run_dir / "samples" / f"step-{self.step:09d}.png")

    # -- reporting -------------------------------------------------------------------
    def report(self, losses: Mapping[str, float], images_per_s: float, eta_s: float | None) -> dict[str, float]:
        """The log line of a logged step (step/total, img/s, ETA, losses, learning rates) and
        its scalars for scalars.jsonl and TensorBoard."""
        lrs = self.task.engine.learning_rates()
        total = self.cfg.train.max_steps
        eta = format_duration(eta_s) if eta_s is not None else "-"
        log.info("step %d/%d (%.0f%%)  %.1f img/s  ETA %s  %s  lr %s", self.step, total, 100.0 * self.step / total,
                 images_per_s, eta, "  ".join(f"{k} {v:.4f}" for k, v in losses.items()),
                 " ".join(f"{net} {lr:.3g}" for net, lr in lrs.items()))
        return {**{f"loss/{k}": v for k, v in losses.items()}, **{f"lr/{net}": lr for net, lr in lrs.items()},
                "perf/img_per_s": images_per_s}

    def evaluated(self, result: dict[str, Any]) -> dict[str, float]:
        """An evaluation's scores (the task's series.scores) to telemetry; its scalars."""
        self.last_eval = result
        scores = {k: float(result[k]) for k in self.task.series.scores if k in result}
        self.telemetry.evaluated(self.step, scores)
        return {f"eval/{k}": v for k, v in scores.items()}

    # -- the loop --------------------------------------------------------------------
    def fit(self, stop_requested: Callable[[], bool] | None = None) -> dict[str, float]:
        """Train to train.max_steps, or until ``stop_requested`` (asked after every step, on
        every rank alike, so it may hold a collective) says to stop: then checkpoint and return.
        Such a collective should not block the step (issue 15): all-reduce the flag with
        async_op=True on a CPU (gloo) group and act on the previous step's result, which every
        rank reads at the same step, so all ranks still stop together, one step later."""
        cfg = self.cfg
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.maybe_resume()
        global_batch = cfg.train.batch_size * cfg.train.accum_steps * self.env.world_size
        self.scalars = build_scalars(self.run_dir, main=self.env.is_main, tensorboard=cfg.train.tensorboard,
                                     resume_step=self.step)
        # On a terminal a bar; off one, the log_every lines below are the periodic lines.
        progress = Progress("train", cfg.train.max_steps, unit="step", initial=self.step,
                            enabled=self.env.is_main and cfg.train.progress, lines=False)
        self.telemetry.at_step(self.step, cfg.train.max_steps)
        losses: dict[str, float] = {}
        t_window, n_window = time.perf_counter(), 0
        t_first, first_step = None, self.step  # the ETA's rate leaves out the first step (warm-up)
        while self.step < cfg.train.max_steps:
            self.telemetry.begin_step()
            batch = next(self.data)
            self.telemetry.lap("data_wait")
            self._count_skipped(batch.pop("skipped"))
            out = self.train_step(batch)
            self.step += 1
            progress.update(1)
            self.telemetry.at_step(self.step, cfg.train.max_steps)
            n_window += 1
            self._unread.append((self.step, out))
            scalars: dict[str, float] = {}
            if t_first is None:
                t_first, first_step = time.perf_counter(), self.step
            log_now = self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps
            checkpoint_now = self.step % cfg.checkpoint.every == 0 or self.step == cfg.train.max_steps
            # Read before a checkpoint too, so that telemetry counts what the checkpoint counts.
            read, skipped = self.read_steps() if log_now or checkpoint_now else ({}, 0)
            losses = read or losses
            self.telemetry.end_step(len(batch["image"]), read, self.task.engine.learning_rates(), skipped)
            if log_now:
                now = time.perf_counter()
                ips = n_window * global_batch / max(now - t_window, 1e-9)
                done = self.step - first_step
                eta = (cfg.train.max_steps - self.step) * (now - t_first) / done if done else None
                scalars |= self.report(losses, ips, eta)
                progress.set_postfix({"img/s": f"{ips:.1f}",
                                      **{k: f"{losses[t]:.3f}" for k, t in self.task.progress_terms.items()}})
                t_window, n_window = time.perf_counter(), 0
            if self.env.is_main and (self.step % cfg.train.sample_every == 0 or self.step == cfg.train.max_steps):
                self.save_samples(batch, out)
            if checkpoint_now:
                self.save_checkpoint()
            if (result := self.task.evaluate(self.step)) is not None:
                scalars |= self.evaluated(result)
            if scalars:
                self.scalars.log(self.step, scalars)
            if self.step < cfg.train.max_steps and stop_requested is not None and stop_requested():
                self.read_steps()
                if self.step % cfg.checkpoint.every:
                    self.save_checkpoint()
                log.info("stop requested: leaving at step %d, the next start resumes there", self.step)
                break
        progress.close()
        self.scalars.close()
        self.telemetry.close()
        return losses

    def _count_skipped(self, skipped: Skipped) -> None:
        """Count what the loader skipped (it logs the skips as it meets them, see data/skips.py)."""
        self.skipped_samples += skipped.count
        self.telemetry.samples_skipped(skipped.count)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("ssgan_dist.train", "\n\n".join(__doc__.split("\n\n")[:2]), config=True)
    args = parser.parse_intermixed_args(argv)

    def command() -> int:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            return print_config(cfg, [parser.prog, *(sys.argv[1:] if argv is None else argv)])
        return _train(cfg, None)

    return run_cli(command)


def run(cfg: Config, stop_requested: Callable[[], bool] | None = None) -> int:
    """Train ``cfg`` as this process's rank (torchrun, SLURM or alone): 0 when done or
    stopped on request, 2 on a setup error. Launchers that stop runs early (SLURM
    preemption) pass ``stop_requested``, see Trainer.fit."""
    return run_cli(lambda: _train(cfg, stop_requested))


def _train(cfg: Config, stop_requested: Callable[[], bool] | None) -> int:
    require_training_data(cfg)  # before the process group or any file: a paper preset without shards
    env = setup()
    try:
        setup_logging(env.rank, verbose=env.is_main, file=Path(cfg.run.dir) / "train.log" if env.is_main else None)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        log.info("rank %d of %d on %s (%s, %s)", env.rank, env.world_size, env.node, env.device, env.backend)
        trainer = Trainer(cfg, env)
        trainer.fit(stop_requested)
        if env.is_main:
            last = ckpt.list_checkpoints(trainer.run_dir)
            log.info("%s at step %d; checkpoint: %s; samples: %s",
                     "done" if trainer.step >= cfg.train.max_steps else "stopped", trainer.step,
                     last[-1] if last else "none", trainer.run_dir / "samples")
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
