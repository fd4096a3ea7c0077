"""The GAN task (``run.task=gan``): G and D, the hinge, feature-matching and VGG losses.

One step reads top to bottom: the learning rates of this step (``optim.decay_steps``), the
G step with D frozen (real and fake through D in one batch), the EMA of G (``train.ema``),
then the D step on fakes that ``train.d_fakes`` chooses: the G step's, detached (one G
forward less per step), or a new forward of the updated G, as NVlabs SPADE's D step does.
z is a pure function of (seed, step), so a resumed run draws the same noise and N ranks x B
draw the same z as 1 rank x N*B; the regenerated fakes use the same z.

Gradient accumulation (``train.accum_steps`` = k): the step's batch (k micro-batches, see
train.py) goes through G and D one micro-batch at a time, each micro-batch's loss weighted by
its share of the batch, gradients all-reduced only with the last (engine.micro_batch); then
one optimizer step per network. Exactly one batch k times larger, except where the batch
is a statistic: the SPADE BatchNorms normalise with each micro-batch's statistics (and
update their running statistics k times), and every training forward runs one more spectral
norm power iteration. D's instance norms are per sample: unaffected.

No host waits for the device in a step. With reuse (the default) D's update does not depend
on G's, so both networks' backward passes run first and one all-reduce of their two
non-finite flags decides both updates, on the device (engine.step, WeightAverage.update);
with regenerate D's forward needs G's update first, so each network has its own flag
all-reduce (still read by no host). Losses stay on the device until the loop logs them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ssgan_dist.config import Config, LossConfig
from ssgan_dist.data.batch import step_tensors
from ssgan_dist.distributed.engine import Engine, build_engine
from ssgan_dist.distributed.env import DistEnv
from ssgan_dist.distributed.optim import NetSpec, linear_decay
from ssgan_dist.ema import WeightAverage
from ssgan_dist.evaluation.evaluate import EvalSpec, evaluate_generator
from ssgan_dist.grid import make_grid
from ssgan_dist.compile import compile_mode, compile_module
from ssgan_dist.labels import onehot
from ssgan_dist.losses import VGGLoss, d_hinge_loss, feature_matching_loss, g_hinge_loss
from ssgan_dist.models import build_discriminator, build_generator, load_vgg19
from ssgan_dist.precision import autocast, memory_format
from ssgan_dist.rng import seeded_generator
from ssgan_dist.summary import count_flops
from ssgan_dist.tasks.base import StepOutput, nonfinite, nonfinite_anywhere
from ssgan_dist.telemetry import MetricSeries

log = logging.getLogger(__name__)

SERIES = MetricSeries(step_phases=("g_step", "d_step"), terms=("g_gan", "g_fm", "g_vgg", "g_total", "d_hinge"),
                      nets=("G", "D"), scores=("fid", "ssim"))


def build_vgg_loss(loss: LossConfig, device: torch.device) -> VGGLoss | None:
    """The perceptual loss, or None (logged) when loss.vgg or loss.lambda_vgg switches it off."""
    if not loss.vgg or loss.lambda_vgg == 0:
        log.info("perceptual (VGG19) loss skipped: loss.vgg=%s, loss.lambda_vgg=%s", loss.vgg, loss.lambda_vgg)
        return None
    return VGGLoss(load_vgg19(loss.vgg_weights, loss.vgg_input)).to(device)


Pred = list[list[torch.Tensor]]  # D's outputs: per scale, its features (the last: patch logits)


def split_real_fake(feats: Pred, n: int) -> tuple[Pred, Pred]:
    """D ran on cat([fake, real]): its outputs split back into (fake, real)."""
    return [[f[:n] for f in scale] for scale in feats], [[f[n:] for f in scale] for scale in feats]


class GANTask:
    """SSGAN's G and D in one engine, and the perceptual loss."""

    name: ClassVar[str] = "gan"
    series: ClassVar[MetricSeries] = SERIES
    progress_terms: ClassVar[dict[str, str]] = {"G": "g_total", "D": "d_hinge"}

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        o, t = cfg.optim, cfg.train
        nets = {
            "G": NetSpec(build_generator(cfg.model), o.lr_g, (o.beta1, o.beta2), o.eps, sync_bn=cfg.model.sync_bn,
                         grad_checkpoint=t.grad_checkpoint),
            "D": NetSpec(build_discriminator(cfg.model), o.lr_d, (o.beta1, o.beta2), o.eps),
        }
        mode = compile_mode(t, cfg.data.cache_dir)
        self.engine: Engine = build_engine(cfg.engine, env, nets, precision=t.precision,
                                           channels_last=t.channels_last, batch_size=t.batch_size, compile_mode=mode)
        self.vgg_loss = build_vgg_loss(cfg.loss, env.device)
        # The loss as the step calls it: compiled under train.compile (vgg_loss stays the module).
        self.perceptual = compile_module(self.vgg_loss, mode) if self.vgg_loss is not None and mode else self.vgg_loss
        # After the engine: the average copies G as trained (device, synchronized norms).
        self.ema = WeightAverage(self.G, t.ema) if t.ema > 0 else None

    @property
    def G(self) -> nn.Module:
        return self.engine.module("G")

    @property
    def D(self) -> nn.Module:
        return self.engine.module("D")

    @property
    def G_eval(self) -> nn.Module:
        """The generator that samples and evaluation use: the EMA when train.ema is on, else G."""
        return self.ema.module if self.ema is not None else self.G

    @staticmethod
    def flops_per_image(cfg: Config) -> float:
        """Forward counts from summary.count_flops, backward = 2x forward.

        G step: G forward + backward (3 G) and D on fake and real, forward + backward (3 x 2 D);
        D step: D on fake and real again (3 x 2 D), after one more G forward with
        train.d_fakes=regenerate. The frozen VGG19 of the perceptual loss is not the model and
        is left out, as MFU conventions leave out such fixed feature nets.
        """
        counts = count_flops(cfg.model)
        g = 4.0 if cfg.train.d_fakes == "regenerate" else 3.0
        return g * counts["generator"]["flops"] + 12.0 * counts["discriminator"]["flops"]

    @staticmethod
    def signature(config: dict[str, Any]) -> dict[str, Any]:
        """Every model.* setting but sync_bn, which changes no parameter."""
        return {f"model.{k}": v for k, v in config["model"].items() if k != "sync_bn"}

    def step_noise(self, step: int, batch: int) -> torch.Tensor | None:
        """This rank's slice of the global batch's z at ``step`` (None when model.use_z is off)."""
        m = self.cfg.model
        if not m.use_z:
            return None
        z = torch.randn(self.env.world_size * batch, m.z_dim, generator=seeded_generator(self.cfg.run.seed, step))
        return z[self.env.rank * batch:(self.env.rank + 1) * batch].to(self.env.device)

    def train_step(self, batch: dict[str, Any], step: int, lap: Callable[[str], None]) -> StepOutput:
        cfg, dev, engine = self.cfg, self.env.device, self.engine
        o = cfg.optim
        if o.decay_steps:
            factor = linear_decay(step, cfg.train.max_steps, o.decay_steps)
            engine.set_learning_rates({"G": o.lr_g * factor, "D": o.lr_d * factor})
        fmt = memory_format(cfg.train.channels_last)
        x = step_tensors(batch, dev, ("label", "image"))  # the loader's uint8 batch as floats, on the device
        images, labels = x["image"].contiguous(memory_format=fmt), x["label"]
        z = self.step_noise(step, images.shape[0])
        k = cfg.train.accum_steps
        micro = list(zip(images.chunk(k), labels.chunk(k), z.chunk(k) if z is not None else [None] * k))
        total = images.shape[0]
        losses = {t: torch.zeros((), device=dev) for t in SERIES.terms}
        bad_g, bad_d = torch.zeros((), device=dev), torch.zeros((), device=dev)
        fakes, masks = [], []

        def g_pass(i: int, real: torch.Tensor, m0: torch.Tensor, zi: torch.Tensor | None) -> torch.Tensor:
            """G's forward and backward on one micro-batch, D frozen; returns the fakes."""
            nonlocal bad_g
            n = real.shape[0]
            self.D.requires_grad_(False)
            with engine.micro_batch("G", last=i == k - 1), autocast(cfg.train.precision, dev):
                fake, mask = engine.wrapped("G")(m0, zi, return_masks=True)
                pred = engine.local("D")(torch.cat([m0, m0]), torch.cat([fake, real]))
                pred_fake, pred_real = split_real_fake(pred, n)
                g_gan = g_hinge_loss(pred_fake)
                g_fm = feature_matching_loss(pred_fake, pred_real) * cfg.loss.lambda_fm
                g_vgg = (self.perceptual(fake, real) * cfg.loss.lambda_vgg if self.perceptual is not None
                         else torch.zeros((), device=dev))
                g_total = g_gan + g_fm + g_vgg
                engine.backward("G", g_total * (n / total))
            self.D.requires_grad_(True)
            for term, value in (("g_gan", g_gan), ("g_fm", g_fm), ("g_vgg", g_vgg), ("g_total", g_total)):
                losses[term] += value.detach().float() * (n / total)
            bad_g = torch.maximum(bad_g, nonfinite(g_total))
            fakes.append(fake.detach())
            if mask:
                masks.append(mask[-1].detach())
            lap("g_step")  # its optimizer step is timed apart, see telemetry.PhaseTimer
            return fake

        def d_pass(i: int, real: torch.Tensor, m0: torch.Tensor, fake: torch.Tensor) -> None:
            """D's forward and backward on one micro-batch's real images and (detached) fakes."""
            nonlocal bad_d
            n = real.shape[0]
            with engine.micro_batch("D", last=i == k - 1), autocast(cfg.train.precision, dev):
                pred = engine.wrapped("D")(torch.cat([m0, m0]), torch.cat([fake, real]))
                pred_fake, pred_real = split_real_fake(pred, n)
                d_loss = d_hinge_loss(pred_real, pred_fake)
                engine.backward("D", d_loss * (n / total))
            losses["d_hinge"] += d_loss.detach().float() * (n / total)
            bad_d = torch.maximum(bad_d, nonfinite(d_loss))
            lap("d_step")

        def m0_of(label: torch.Tensor) -> torch.Tensor:
            return onehot(label, cfg.model.num_classes).contiguous(memory_format=fmt)

        if cfg.train.d_fakes == "reuse":  # D's update does not depend on G's: one flag all-reduce
            for i, (real, label, zi) in enumerate(micro):
                m0 = m0_of(label)
                fake = g_pass(i, real, m0, zi)
                d_pass(i, real, m0, fake.detach())
            skip_g, skip_d = nonfinite_anywhere(bad_g, bad_d)
            self._update_g(skip_g)
            engine.step("D", skip_d)
        else:  # regenerate: D sees the updated G's fakes, so G steps first
            for i, (real, label, zi) in enumerate(micro):
                g_pass(i, real, m0_of(label), zi)
            (skip_g,) = nonfinite_anywhere(bad_g)
            self._update_g(skip_g)
            lap("g_step")
            for i, (real, label, zi) in enumerate(micro):
                m0 = m0_of(label)
                with torch.no_grad(), autocast(cfg.train.precision, dev):  # G in train mode: batch statistics
                    fake_d = engine.local("G")(m0, zi)
                d_pass(i, real, m0, fake_d)
            (skip_d,) = nonfinite_anywhere(bad_d)
            engine.step("D", skip_d)
        lap("d_step")

        visuals = {"fake": torch.cat(fakes) if k > 1 else fakes[0], "label": labels,
                   **({"z": z} if z is not None else {}),
                   **({"mask": torch.cat(masks) if k > 1 else masks[0]} if masks else {})}
        return StepOutput(losses, torch.maximum(skip_g, skip_d), visuals)

    def _update_g(self, skip: torch.Tensor) -> None:
        """G's optimizer step and the EMA's, both skipped on the device where ``skip``."""
        self.engine.step("G", skip)
        if self.ema is not None:
            self.ema.update(self.G, skip)

    def sample_grid(self, batch: dict[str, Any], out: StepOutput) -> np.ndarray:
        """Rows of sketch | label | generated | real | argmax of the SFM's last learned mask; with
        train.ema the EMA generator's images of the step's inputs (eval mode), else the step's own."""
        visuals, x = out.visuals, step_tensors(batch, torch.device("cpu"))
        fake, mask = visuals["fake"], visuals.get("mask")
        if self.ema is not None:
            with torch.no_grad():
                m0 = onehot(visuals["label"], self.cfg.model.num_classes)
                fake, masks = self.ema.module(m0, visuals.get("z"), return_masks=True)
            mask = masks[-1] if masks else None
        return make_grid(x["sketch"], x["label"], [fake], x["image"], mask)

    def evaluate(self, step: int) -> dict[str, Any] | None:
        """FID and SSIM every eval.every steps (evaluation.evaluate), logged."""
        e = self.cfg.eval
        if not (e.every and step % e.every == 0):
            return None
        result = evaluate_generator(self.G_eval, self.cfg.model, self.env, EvalSpec.for_training(e, self.cfg.data))
        log.info("eval at step %d: FID %.3f  SSIM %.4f  (%d samples, %.1f s)", step, result["fid"], result["ssim"],
                 result["samples"], result["seconds"])
        return result

    def state_dict(self) -> dict[str, Any]:
        """The engine's state, and the EMA of G as ``G_ema`` (the weights evaluation and generate
        prefer) with its update count as ``G_ema_updates``."""
        state = self.engine.state_dict()
        if self.ema is not None:
            ema = self.ema.state_dict()
            state.update(G_ema=ema["weights"], G_ema_updates=ema["updates"])
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state)
        if self.ema is None:
            return
        if "G_ema" in state:
            self.ema.load_state_dict({"weights": state["G_ema"], "updates": state["G_ema_updates"]})
        else:  # a checkpoint written without train.ema: the average starts from its G
            log.info("the checkpoint has no EMA of G (train.ema was off): the average starts from its G")
            self.ema = WeightAverage(self.G, self.cfg.train.ema)
