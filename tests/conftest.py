"""Shared fixtures: a tiny model config and small synthetic shards written once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ssgan_dist.config import Config, load_config

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# A model small enough that a training step takes milliseconds on one core.
TINY = [
    "model.image_size=32", "model.ngf=4", "model.ndf=8", "model.spade_hidden=8",
    "model.z_dim=16", "model.sfm_hidden=4", "train.batch_size=2", "train.progress=false",
    "data.num_workers=0", "checkpoint.every=1000", "train.sample_every=1000", "train.log_every=1000",
    "train.ema=0",  # the demo keeps an EMA of G; tests of G itself see G, the EMA tests set train.ema
]


def tiny_config(run_dir: Path, shards: Path | str, *extra: str) -> Config:
    return load_config("demo", [*TINY, f"run.dir={run_dir}", f"data.shards={shards}", *extra])


@pytest.fixture(scope="session")
def shards32(tmp_path_factory) -> Path:
    """24 synthetic 32px samples in 3 shards of 8."""
    from ssgan_dist.data.writer import build_synthetic_shards

    out = tmp_path_factory.mktemp("shards32")
    build_synthetic_shards(out, count=24, samples_per_shard=8, size=32, seed=1, num_classes=20)
    return out


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, shards32) -> Path:
    """A checkpoint of a real (2-step) tiny training run on shards32."""
    from ssgan_dist.distributed.env import setup
    from ssgan_dist.train import Trainer

    run = tmp_path_factory.mktemp("trained")
    Trainer(tiny_config(run, shards32, "train.max_steps=2"), setup()).fit()
    return run / "ckpt-000000002.pt"


# -- comparing two trainings without tuning to one CPU's float noise ----------------------
# Equivalence tests compare the gradients of ONE step (and the buffers it updates) with a
# relative tolerance over a whole network: float noise from another summation order (another
# CPU, another reduction tree, another memory layout) is ~1e-6 of the norm, a real difference
# (BatchNorm statistics of another batch, a lost term) is ~1e-1. Parameters after several
# Adam steps are not compared: Adam divides by sqrt(v) and moves a parameter whose gradient
# is noise around 0 by +-lr, whatever the noise's size.
EQUIVALENT = 1e-2  # relative difference below which two gradient sets are the same computation
# (measured on an AMD EPYC: channels_last 5e-5, 2 ranks vs 1 ~1e-5; a real difference: 0.1-1)


def grads_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter's .grad (zeros where it has none), cloned, in logical (NCHW) order."""
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone().contiguous()
            for n, p in module.named_parameters()}


def capture_applied_grads(engine) -> dict[str, dict[str, torch.Tensor]]:
    """From now on, {network: the gradients its last optimizer step applied} (grads_of, taken
    inside ``engine.step``: the engine drops the gradients after the step)."""
    captured: dict[str, dict[str, torch.Tensor]] = {}
    original = engine.step

    def step(name: str, skip: torch.Tensor) -> None:
        captured[name] = grads_of(engine.module(name))
        original(name, skip)

    engine.step = step
    return captured


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||a|| over every tensor of ``a`` (floating point ones) taken as one vector."""
    names = [n for n, t in a.items() if t.is_floating_point()]
    x = torch.cat([a[n].detach().double().flatten() for n in names])
    y = torch.cat([b[n].detach().double().contiguous().flatten() for n in names])
    return float((x - y).norm() / x.norm().clamp_min(1e-30))
