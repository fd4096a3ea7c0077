"""``python -m ssgan_dist.train [--config NAME|PATH] [key=value ...]``: the training loop.

The Trainer composes its parts, each built by one function: the launcher environment
(device, backend, rank), G and D, their optimizers, the losses, the data loader and the
checkpoint manager. One step reads top to bottom: G step with D frozen, D step on the
detached fakes of that G step, then logging, samples and checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from ssgan_dist import checkpoint as ckpt
from ssgan_dist.config import Config, ConfigError, load_config, save_config
from ssgan_dist.data.schema import onehot
from ssgan_dist.data.sources import training_loader
from ssgan_dist.errors import SetupError
from ssgan_dist.distributed.env import DistEnv, setup, teardown
from ssgan_dist.grid import make_grid, save_png
from ssgan_dist.losses import VGGLoss, d_hinge_loss, feature_matching_loss, g_hinge_loss
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
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.precision=bf16: {torch.cuda.get_device_name(device)} has no bf16; use fp16")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def step_noise(cfg: Config, env: DistEnv, step: int, batch: int) -> torch.Tensor | None:
    """z for one step: a pure function of (seed, rank, step), so resume needs no RNG state."""
    if not cfg.model.use_z:
        return None
    gen = torch.Generator().manual_seed(hash((cfg.run.seed, env.rank, step)) & 0x7FFFFFFFFFFFFFFF)
    return torch.randn(batch, cfg.model.z_dim, generator=gen).to(env.device)


def build_vgg_loss(cfg: Config, device: torch.device) -> VGGLoss | None:
    if not cfg.loss.vgg or cfg.loss.lambda_vgg == 0:
        log.info("perceptual (VGG19) loss skipped: loss.vgg=%s, loss.lambda_vgg=%s",
                 cfg.loss.vgg, cfg.loss.lambda_vgg)
        return None
    return VGGLoss(load_vgg19(cfg.loss.vgg_weights)).to(device)


def build_optimizers(cfg: Config, g: nn.Module, d: nn.Module) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    betas = (float(cfg.optim.beta1), float(cfg.optim.beta2))
    return (torch.optim.Adam(g.parameters(), lr=cfg.optim.lr_g, betas=betas),
            torch.optim.Adam(d.parameters(), lr=cfg.optim.lr_d, betas=betas))


@dataclass
class StepOutput:
    losses: dict[str, float]
    fake: torch.Tensor
    masks: list[torch.Tensor] = field(default_factory=list)


class Trainer:
    """Owns the parts of one run and the loop over steps."""

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.run.dir)
        check_precision(cfg.train.precision, env.device)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        self.G = build_generator(cfg.model).to(env.device)
        self.D = build_discriminator(cfg.model).to(env.device)
        self.vgg_loss = build_vgg_loss(cfg, env.device)
        self.opt_g, self.opt_d = build_optimizers(cfg, self.G, self.D)
        # fp16 needs a loss scaler per network: G's and D's gradients differ in scale.
        fp16 = cfg.train.precision == "fp16"
        self.scaler_g = torch.amp.GradScaler(env.device.type, enabled=fp16)
        self.scaler_d = torch.amp.GradScaler(env.device.type, enabled=fp16)
        self.data = training_loader(cfg, env)
        self.ckpt = ckpt.CheckpointManager(self.run_dir, cfg.checkpoint.keep)
        self.step = 0
        self.skipped_samples = 0

    # -- state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "config": self.cfg.to_dict(),
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "scaler_g": self.scaler_g.state_dict(),
            "scaler_d": self.scaler_d.state_dict(),
            "data": self.data.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "skipped_samples": self.skipped_samples,
        }

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        ckpt.check_compatible(state["config"]["model"], self.cfg.model_signature(), source)
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.scaler_g.load_state_dict(state["scaler_g"])
        self.scaler_d.load_state_dict(state["scaler_d"])
        self.data.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"]["torch"])
        self.step = int(state["step"])
        self.skipped_samples = int(state["skipped_samples"])

    def maybe_resume(self) -> None:
        if not self.cfg.checkpoint.resume:
            return
        found = self.ckpt.load_latest(map_location="cpu")
        if found is not None:
            state, path = found
            self.load_state_dict(state, path)
            log.info("resumed from %s at step %d", path, self.step)

    def save_checkpoint(self) -> Path | None:
        if not self.env.is_main:
            return None
        path = self.ckpt.save(self.step, self.state_dict())
        log.info("checkpoint %s", path)
        return path

    # -- one step --------------------------------------------------------------------
    def train_step(self, batch: dict[str, Any]) -> StepOutput:
        cfg, dev = self.cfg, self.env.device
        real = batch["image"].to(dev, non_blocking=True)
        m0 = onehot(batch["label"].to(dev, non_blocking=True), cfg.model.num_classes)
        z = step_noise(cfg, self.env, self.step, real.shape[0])
        amp = lambda: autocast(cfg.train.precision, dev)  # noqa: E731

        # G step: D frozen; real and fake through D in one batch.
        self.D.requires_grad_(False)
        with amp():
            fake, masks = self.G(m0, z, return_masks=True)
            feats = self.D(torch.cat([m0, m0]), torch.cat([fake, real]))
            pred_fake = [[f[: real.shape[0]] for f in scale] for scale in feats]
            pred_real = [[f[real.shape[0]:] for f in scale] for scale in feats]
            g_gan = g_hinge_loss(pred_fake)
            g_fm = feature_matching_loss(pred_fake, pred_real) * cfg.loss.lambda_fm
            g_vgg = self.vgg_loss(fake, real) * cfg.loss.lambda_vgg if self.vgg_loss else torch.zeros((), device=dev)
            g_total = g_gan + g_fm + g_vgg
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler_g.scale(g_total).backward()
        self.scaler_g.step(self.opt_g)
        self.scaler_g.update()
        self.D.requires_grad_(True)

        # D step on the fakes of this step, detached from G.
        with amp():
            feats = self.D(torch.cat([m0, m0]), torch.cat([fake.detach(), real]))
            pred_fake = [[f[: real.shape[0]] for f in scale] for scale in feats]
            pred_real = [[f[real.shape[0]:] for f in scale] for scale in feats]
            d_loss = d_hinge_loss(pred_real, pred_fake)
        self.opt_d.zero_grad(set_to_none=True)
        self.scaler_d.scale(d_loss).backward()
        self.scaler_d.step(self.opt_d)
        self.scaler_d.update()

        losses = {"g_gan": g_gan, "g_fm": g_fm, "g_vgg": g_vgg, "g_total": g_total, "d_hinge": d_loss}
        return StepOutput({k: float(v.detach()) for k, v in losses.items()}, fake.detach(), masks)

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
            batch = next(self.data)
            self._count_skipped(batch.pop("skipped"))
            out = self.train_step(batch)
            self.step += 1
            n_window += 1
            losses = out.losses
            if not all(math.isfinite(v) for v in losses.values()):
                log.warning("non-finite loss at step %d: %s", self.step, losses)
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                elapsed = time.perf_counter() - t_window
                ips = n_window * global_batch / max(elapsed, 1e-9)
                log.info("step %d  %.1f img/s  %s", self.step, ips, "  ".join(f"{k} {v:.4f}" for k, v in losses.items()))
                bar.set_postfix({"img/s": f"{ips:.1f}", "G": f"{losses['g_total']:.3f}", "D": f"{losses['d_hinge']:.3f}"})
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
        return losses

    def _count_skipped(self, skipped: list[str]) -> None:
        for reason in skipped:
            log.warning("skipped bad sample: %s", reason)
        self.skipped_samples += len(skipped)


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
        trainer = Trainer(cfg, env)
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
