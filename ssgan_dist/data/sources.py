"""Where a run's batches come from: the configured shards, or the embedded synthetic set.

With ``data.shards`` empty, synthetic shards matching the model (size, classes) are made
once per machine in a cache directory (by local rank 0, written to a temp directory and
renamed, so a crash never leaves a half-built cache) and reused by later runs.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch.distributed as dist

from ssgan_dist.config import Config, ConfigError
from ssgan_dist.data.torch_loader import TorchShardLoader, build_torch_loader, resolve_shards
from ssgan_dist.data.writer import build_synthetic_shards
from ssgan_dist.distributed.env import DistEnv

log = logging.getLogger(__name__)


def synthetic_cache_dir(cfg: Config) -> Path:
    root = Path(cfg.data.cache_dir or os.environ.get("SSGAN_CACHE", Path.home() / ".cache" / "ssgan_dist"))
    m, d = cfg.model, cfg.data
    bg = "-".join(map(str, m.background_classes))
    return root / f"synthetic-{m.image_size}px-c{m.num_classes}-bg{bg}-n{d.synthetic_count}-p{d.synthetic_per_shard}-s{cfg.run.seed}"


def ensure_synthetic_shards(cfg: Config, env: DistEnv) -> Path:
    """Build the embedded default's shards on first use; every rank gets the same path."""
    out = synthetic_cache_dir(cfg)
    if env.local_rank == 0 and not (out / "manifest.json").is_file():
        log.info("generating %d synthetic %dpx samples into %s (first use)",
                 cfg.data.synthetic_count, cfg.model.image_size, out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            build_synthetic_shards(
                tmp, count=cfg.data.synthetic_count, samples_per_shard=cfg.data.synthetic_per_shard,
                size=cfg.model.image_size, seed=cfg.run.seed, num_classes=cfg.model.num_classes,
                background_classes=tuple(cfg.model.background_classes),
            )
            try:
                os.replace(tmp, out)
            except OSError:  # another process on this machine finished first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if dist.is_initialized():
        dist.barrier()
    log.info("using synthetic shards in %s", out)
    return out


def training_loader(cfg: Config, env: DistEnv) -> TorchShardLoader:
    """The batch iterator of this rank, chosen by ``data.loader``."""
    spec = cfg.data.shards or str(ensure_synthetic_shards(cfg, env))
    if cfg.data.loader == "dali":
        raise ConfigError("data.loader=dali: the DALI pipeline is not part of this build yet; use data.loader=torch")
    shards = resolve_shards(spec)
    log.info("data: torch loader over %d shards (%s), %d workers", len(shards), spec, cfg.data.num_workers)
    return build_torch_loader(
        shards, seed=cfg.run.seed, rank=env.rank, world_size=env.world_size,
        num_workers=cfg.data.num_workers, batch_size=cfg.train.batch_size,
        num_classes=cfg.model.num_classes, image_size=cfg.model.image_size,
        on_error=cfg.data.on_error, flip=cfg.data.flip, pin_memory=env.device.type == "cuda",
    )
