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

import gc
import logging
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ssgan_dist import checkpoint as ckpt
from ssgan_dist import resume
from ssgan_dist.config import Config, ConfigError, load_config, require_training_data
from ssgan_dist.data.loaders import ShardLoader, build_training_loader
from ssgan_dist.data.skips import Skipped
from ssgan_dist.distributed.collectives import from_main, gather_to_all
from ssgan_dist.distributed.env import DistEnv, setup, teardown
from ssgan_dist.errors import SetupError
from ssgan_dist.files import ensure_dir
from ssgan_dist.images import save_png
from ssgan_dist.precision import check_precision
from ssgan_dist.scalars import Scalars, build_scalars
from ssgan_dist.shell import Progress, command_parser, format_duration, print_config, run_cli, setup_logging
from ssgan_dist.signals import StopOnSignal
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
        """Start the run: resume from run.dir's newest readable checkpoint (rank 0 picks it,
        every rank loads it), else from checkpoint.init_from's weights, else fresh; then write
        config.yaml and the history. Every refusal comes before anything is written (resume.py)."""
        picked: list[tuple[dict[str, Any], Path] | None] = []  # rank 0 keeps the state it has read

        def choose() -> str | None:
            picked.append(resume.pick(self.ckpt, self.cfg.checkpoint.resume))
            return str(picked[0][1]) if picked[0] else None

        chosen = from_main(choose)
        changes: list[resume.Change] = []
        source: Path | None = None
        if chosen is not None:
            source = Path(chosen)
            state = resume.read_on_every_rank(source, picked[0][0] if picked and picked[0] else None, self.env.rank)
            ckpt.check_task(state["config"], self.task.name, source)
            changes = resume.compare(state["config"], self.cfg, set(self.task.signature(self.cfg.to_dict())))
            resume.check(changes, source)
            self.load_state_dict(resume.adapt_state(state, self.task.state_dict(), changes), source)
            self.task.engine.load_sharded(source)
            log.info("resumed from %s at step %d", source, self.step)
            resume.log_changes(changes)
            if self.cfg.checkpoint.init_from:
                log.info("checkpoint.init_from=%s ignored: %s holds checkpoints, resuming its own",
                         self.cfg.checkpoint.init_from, self.run_dir)
        elif self.cfg.checkpoint.init_from:
            state, source = resume.read_init_from(Path(self.cfg.checkpoint.init_from))
            self.check_compatible(state["config"], source)
            resume.load_weights(self.task, state, source)
        if self.env.is_main:
            how = "resumed" if chosen else "init_from" if source else "new"
            resume.record(self.run_dir, self.cfg, how=how, step=self.step, source=source, changes=changes,
                          world_size=self.env.world_size)

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
    stop = StopOnSignal()  # first: a Ctrl-C while the config loads already exits cleanly

    def command() -> int:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            return print_config(cfg, [parser.prog, *(sys.argv[1:] if argv is None else argv)])
        return _train(cfg, stop)

    code = run_cli(command)
    stop.finish()  # the process ends now, whatever signal comes (see StopOnSignal.finish)
    return code


def run(cfg: Config, stop: StopOnSignal | None = None) -> int:
    """Train ``cfg`` as this process's rank (torchrun, SLURM or alone): 0 when done, 2 on a
    setup error, 128 + the signal when a signal stopped it (after its checkpoint). SIGINT and
    SIGTERM stop it (signals.py); launchers that handle more (SLURM's requeue) pass their own."""
    own = stop is None
    stop = stop or StopOnSignal()
    try:
        return run_cli(lambda: _train(cfg, stop))
    finally:
        if own:
            stop.restore()


def _train(cfg: Config, stop: StopOnSignal) -> int:
    require_training_data(cfg)  # before the process group or any file: a paper preset without shards
    env = setup(cfg.dist)
    try:
        from_main(lambda: ensure_dir(cfg.run.dir, "run.dir"))  # before its train.log; every rank fails alike
        setup_logging(env.rank, verbose=env.is_main, file=Path(cfg.run.dir) / "train.log" if env.is_main else None)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        log.info("rank %d of %d on %s (%s, %s)", env.rank, env.world_size, env.node, env.device, env.backend)
        _fit(Trainer(cfg, env), stop)
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # the frames hold the Trainer: let it go before teardown
        raise
    finally:
        # The Trainer (its DDP reducers hold the process group) must be gone before the group
        # is destroyed: a gloo group whose last reference a reducer drops is destroyed with the
        # GIL held, and deadlocks if gloo's thread still has a tensor to release (pytorch#56297;
        # seen once at the end of a 2-rank run). Dropped by the group's own binding, it is not.
        gc.collect()
        teardown()
    return stop.exit_code


def _fit(trainer: Trainer, stop: StopOnSignal) -> None:
    """Train, then say where things are; the trainer is dropped when this returns."""
    stop.arm()
    trainer.fit(stop)
    if trainer.env.is_main:
        last = ckpt.list_checkpoints(trainer.run_dir)
        log.info("%s at step %d; checkpoint: %s; samples: %s",
                 "done" if trainer.step >= trainer.cfg.train.max_steps else "stopped", trainer.step,
                 last[-1] if last else "none", trainer.run_dir / "samples")


if __name__ == "__main__":
    sys.exit(main())
