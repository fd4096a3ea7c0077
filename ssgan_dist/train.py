"""``python -m ssgan_dist.train [--config NAME|PATH] [key=value ...]``: the training loop.

The Trainer composes its parts, each built by one function: the launcher environment
(device, backend, rank), G and D, their optimizers, the losses, the data loader and the
checkpoint manager. One step reads top to bottom: G step with D frozen, D step on the
detached fakes of that G step, then logging, samples and checkpoints. ``run.task=segmenter``
trains the sketch segmenter through the same loop (``segmenter_trainer.SegmenterTrainer``
overrides the networks, the step and the samples).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from ssgan_dist import checkpoint as ckpt
from ssgan_dist.config import Config, ConfigError, load_config, save_config
from ssgan_dist.data.schema import onehot
from ssgan_dist.data.sources import training_loader
from ssgan_dist.errors import SetupError
from ssgan_dist.distributed.engines import build_engine
from ssgan_dist.distributed.env import DistEnv, setup, teardown
from ssgan_dist.grid import make_grid, save_png
from ssgan_dist.losses import VGGLoss, d_hinge_loss, feature_matching_loss, g_hinge_loss
from ssgan_dist.telemetry import build_telemetry
from ssgan_dist.models import build_discriminator, build_generator, load_vgg19

log = logging.getLogger("ssgan_dist.train")


def configure_logging(run_dir: Path, env: DistEnv) -> None:
    """Rank 0 logs INFO to stderr and run_dir/train.log; other ranks only warnings."""
    level = logging.INFO if env.is_main else logging.WARNING
    fmt = logging.Formatter(f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(level)
    for h in list(root.handlers):
        root.removeHandler(h)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(run_dir / "train.log")
        file.setFormatter(fmt)
        root.addHandler(file)


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse, before any work, a precision the device cannot run."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.precision=bf16: {torch.cuda.get_device_name(device)} has no bf16; use fp16")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def step_noise(cfg: Config, env: DistEnv, step: int, batch: int) -> torch.Tensor | None:
    """This rank's slice of the global batch's z at ``step``: a pure function of (seed, step),
    so resume needs no RNG state and N ranks x B draw the same z as 1 rank x N*B."""
    if not cfg.model.use_z:
        return None
    gen = torch.Generator().manual_seed(hash((cfg.run.seed, step)) & 0x7FFFFFFFFFFFFFFF)
    z = torch.randn(env.world_size * batch, cfg.model.z_dim, generator=gen)
    return z[env.rank * batch:(env.rank + 1) * batch].to(env.device)


def build_vgg_loss(cfg: Config, device: torch.device) -> VGGLoss | None:
    if not cfg.loss.vgg or cfg.loss.lambda_vgg == 0:
        log.info("perceptual (VGG19) loss skipped: loss.vgg=%s, loss.lambda_vgg=%s",
                 cfg.loss.vgg, cfg.loss.lambda_vgg)
        return None
    return VGGLoss(load_vgg19(cfg.loss.vgg_weights)).to(device)


def split_real_fake(feats: list[list[torch.Tensor]], n: int) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """D ran on cat([fake, real]): its outputs split back into (fake, real)."""
    return [[f[:n] for f in scale] for scale in feats], [[f[n:] for f in scale] for scale in feats]


@dataclass
class StepOutput:
    losses: dict[str, float]
    fake: torch.Tensor
    masks: list[torch.Tensor] = field(default_factory=list)
    skipped: bool = False


class Trainer:
    """Owns the parts of one run and the loop over steps."""

    task = "gan"  # the run.task this class trains
    progress_terms = {"G": "g_total", "D": "d_hinge"}  # progress bar label -> loss term

    def __init__(self, cfg: Config, env: DistEnv):
        if cfg.run.task != self.task:
            raise ConfigError(f"run.task={cfg.run.task}: {type(self).__name__} trains run.task={self.task}; "
                              "train.build_trainer picks the Trainer of a task")
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.run.dir)
        check_precision(cfg.train.precision, env.device)
        self.telemetry = build_telemetry(cfg, env)  # first: a taken metrics port fails before heavy work
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        self.build_networks()
        self.data = training_loader(cfg, env)
        self.ckpt = ckpt.CheckpointManager(self.run_dir, cfg.checkpoint.keep)
        self.step = 0
        self.skipped_samples = 0
        self.nonfinite_steps = 0

    def build_networks(self) -> None:
        """G and D in their engine, and the perceptual loss."""
        self.engine = build_engine(self.cfg, self.env, build_generator(self.cfg.model),
                                   build_discriminator(self.cfg.model))
        self.G, self.D = self.engine.g_module, self.engine.d_module
        self.vgg_loss = build_vgg_loss(self.cfg, self.env.device)

    # -- state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything to continue exactly; per-rank parts (data position, RNG) of every rank."""
        per_rank = gather_to_all(self.env, {"data": self.data.state_dict(), "rng": torch.get_rng_state()})
        return {
            "step": self.step,
            "world_size": self.env.world_size,
            "config": self.cfg.to_dict(),
            **self.engine.state_dict(),
            "ranks": per_rank,
            "skipped_samples": self.skipped_samples,
            "nonfinite_steps": self.nonfinite_steps,
            "telemetry": self.telemetry.state_dict(),
        }

    def check_compatible(self, saved: dict[str, Any], source: Path) -> None:
        """Refuse a checkpoint of another task or model configuration (``saved``: its config)."""
        ckpt.check_task(saved, self.task, source)
        ckpt.check_compatible(saved["model"], self.cfg.model_signature(), source)

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        self.check_compatible(state["config"], source)
        if state["world_size"] != self.env.world_size:
            raise SetupError(
                f"{source} was written by {state['world_size']} ranks and this run has "
                f"{self.env.world_size}: the data position cannot be carried over exactly; "
                f"run with {state['world_size']} ranks or a new run.dir"
            )
        self.engine.load_state_dict(state)
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
            self.engine.load_sharded(path)
            log.info("resumed from %s at step %d", path, self.step)

    def save_checkpoint(self) -> Path:
        path = self.ckpt.save(self.step, self.state_dict(), self.env, self.engine)
        self.telemetry.checkpoint_saved()
        log.info("checkpoint %s", path)
        return path

    # -- one step --------------------------------------------------------------------
    def nonfinite_anywhere(self, loss: torch.Tensor) -> bool:
        """True on every rank when the loss is not finite on any rank (one tiny all-reduce)."""
        flag = (~torch.isfinite(loss.detach().float())).float().reshape(1)
        if self.env.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def train_step(self, batch: dict[str, Any]) -> StepOutput:
        cfg, dev, engine = self.cfg, self.env.device, self.engine
        fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        real = batch["image"].to(dev, non_blocking=True).contiguous(memory_format=fmt)
        m0 = onehot(batch["label"].to(dev, non_blocking=True), cfg.model.num_classes).contiguous(memory_format=fmt)
        z = step_noise(cfg, self.env, self.step, real.shape[0])
        n = real.shape[0]

        # G step: D frozen; real and fake through D in one batch.
        self.D.requires_grad_(False)
        with autocast(cfg.train.precision, dev):
            fake, masks = engine.g(m0, z, return_masks=True)
            pred_fake, pred_real = split_real_fake(engine.d_frozen(torch.cat([m0, m0]), torch.cat([fake, real])), n)
            g_gan = g_hinge_loss(pred_fake)
            g_fm = feature_matching_loss(pred_fake, pred_real) * cfg.loss.lambda_fm
            g_vgg = self.vgg_loss(fake, real) * cfg.loss.lambda_vgg if self.vgg_loss else torch.zeros((), device=dev)
            g_total = g_gan + g_fm + g_vgg
        skip_g = self.nonfinite_anywhere(g_total)
        engine.backward_step("G", g_total, skip_g)
        self.telemetry.lap("g_step")  # its optimizer step is timed apart, see telemetry.PhaseTimer
        self.D.requires_grad_(True)

        # D step on the fakes of this step, detached from G.
        with autocast(cfg.train.precision, dev):
            pred_fake, pred_real = split_real_fake(engine.d(torch.cat([m0, m0]), torch.cat([fake.detach(), real])), n)
            d_loss = d_hinge_loss(pred_real, pred_fake)
        skip_d = self.nonfinite_anywhere(d_loss)
        engine.backward_step("D", d_loss, skip_d)
        self.telemetry.lap("d_step")

        losses = {"g_gan": g_gan, "g_fm": g_fm, "g_vgg": g_vgg, "g_total": g_total, "d_hinge": d_loss}
        values = torch.stack([v.detach().float() for v in losses.values()]).tolist()  # one device sync
        return StepOutput(dict(zip(losses, values)), fake.detach(), masks,
                          skipped=skip_g or skip_d)

    def save_samples(self, batch: dict[str, Any], out: StepOutput) -> Path:
        mask = out.masks[-1] if out.masks else None
        grid = make_grid(batch["sketch"], batch["label"], [out.fake], batch["image"], mask)
        return save_png(grid, self.run_dir / "samples" / f"step-{self.step:09d}.png")

    # -- the loop --------------------------------------------------------------------
    def fit(self, stop_requested: Callable[[], bool] | None = None) -> dict[str, float]:
        """Train to train.max_steps, or until ``stop_requested`` (asked after every step, on
        every rank alike, so it may hold a collective) says to stop: then checkpoint and return."""
        cfg = self.cfg
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.maybe_resume()
        global_batch = cfg.train.batch_size * self.env.world_size
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, disable=not (self.env.is_main and cfg.train.progress),
                   unit="step", dynamic_ncols=True)
        losses: dict[str, float] = {}
        t_window, n_window = time.perf_counter(), 0
        while self.step < cfg.train.max_steps:
            self.telemetry.begin_step()
            batch = next(self.data)
            self.telemetry.lap("data_wait")
            self._count_skipped(batch.pop("skipped"))
            out = self.train_step(batch)
            self.telemetry.end_step(len(batch["image"]), out.losses, self.engine.learning_rates(), out.skipped)
            self.step += 1
            n_window += 1
            losses = out.losses
            if out.skipped:
                self.nonfinite_steps += 1
                log.warning("step %d skipped on every rank: non-finite loss %s", self.step, losses)
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                elapsed = time.perf_counter() - t_window
                ips = n_window * global_batch / max(elapsed, 1e-9)
                log.info("step %d  %.1f img/s  %s", self.step, ips, "  ".join(f"{k} {v:.4f}" for k, v in losses.items()))
                bar.set_postfix({"img/s": f"{ips:.1f}", **{k: f"{losses[t]:.3f}" for k, t in self.progress_terms.items()}})
                t_window, n_window = time.perf_counter(), 0
            if self.env.is_main and (self.step % cfg.train.sample_every == 0 or self.step == cfg.train.max_steps):
                self.save_samples(batch, out)
            if self.step % cfg.checkpoint.every == 0 or self.step == cfg.train.max_steps:
                self.save_checkpoint()
            if cfg.eval.every and self.step % cfg.eval.every == 0:
                from ssgan_dist.evaluate import evaluate_generator  # Inception loads only for runs that evaluate
                self.last_eval = evaluate_generator(self.G, cfg, self.env)
                log.info("eval at step %d: FID %.3f  SSIM %.4f  (%d samples, %.1f s)", self.step,
                         self.last_eval["fid"], self.last_eval["ssim"], self.last_eval["samples"],
                         self.last_eval["seconds"])
            if self.step < cfg.train.max_steps and stop_requested is not None and stop_requested():
                if self.step % cfg.checkpoint.every:
                    self.save_checkpoint()
                log.info("stop requested: leaving at step %d, the next start resumes there", self.step)
                break
            bar.update(1)
        bar.close()
        self.telemetry.close()
        return losses

    def _count_skipped(self, skipped: list[str]) -> None:
        for reason in skipped:
            log.warning("skipped bad sample: %s", reason)
        self.skipped_samples += len(skipped)
        self.telemetry.samples_skipped(len(skipped))


def build_trainer(cfg: Config, env: DistEnv) -> Trainer:
    """The Trainer of run.task: the GAN's, or the sketch segmenter's (same loop, its own step)."""
    if cfg.run.task == "segmenter":
        from ssgan_dist.segmenter_trainer import SegmenterTrainer  # a Trainer subclass: imported late

        return SegmenterTrainer(cfg, env)
    return Trainer(cfg, env)


def gather_to_all(env: DistEnv, obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (a list of one without a process group)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def parse_args(argv: list[str] | None) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m ssgan_dist.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="preset name (ssgan_dist/configs) or YAML path; default: demo")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def main(argv: list[str] | None = None) -> int:
    preset, overrides = parse_args(argv)
    try:
        cfg = load_config(preset, overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    return run(cfg)


def run(cfg: Config, stop_requested: Callable[[], bool] | None = None) -> int:
    """Train ``cfg`` as this process's rank (torchrun, SLURM or alone): 0 when done or
    stopped on request, 2 on a setup error. Launchers that stop runs early (SLURM
    preemption) pass ``stop_requested``, see Trainer.fit."""
    env = setup()
    try:
        configure_logging(Path(cfg.run.dir), env)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        log.info("rank %d of %d on %s (%s, %s)", env.rank, env.world_size, env.node, env.device, env.backend)
        trainer = build_trainer(cfg, env)
        trainer.fit(stop_requested)
        if env.is_main:
            last = ckpt.list_checkpoints(trainer.run_dir)
            log.info("%s at step %d; checkpoint: %s; samples: %s",
                     "done" if trainer.step >= cfg.train.max_steps else "stopped", trainer.step,
                     last[-1] if last else "none", trainer.run_dir / "samples")
    except SetupError as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
