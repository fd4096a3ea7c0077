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

import torch
import torch.distributed as dist

from ssgan_dist.config import Config
from ssgan_dist.data.dali_loader import DaliShardLoader, build_dali_loader, dali_available
from ssgan_dist.data.torch_loader import TorchShardLoader, build_torch_loader, resolve_shards
from ssgan_dist.data.writer import build_synthetic_shards
from ssgan_dist.distributed.env import DistEnv

log = logging.getLogger(__name__)


def cache_root(cfg: Config) -> Path:
    """Where generated data lives: data.cache_dir, else $SSGAN_CACHE, else ~/.cache/ssgan_dist."""
    return Path(cfg.data.cache_dir or os.environ.get("SSGAN_CACHE") or Path.home() / ".cache" / "ssgan_dist")


def synthetic_cache_dir(cfg: Config) -> Path:
    root = cache_root(cfg)
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


def choose_loader(choice: str, device: torch.device) -> tuple[str, str]:
    """(loader, why) for ``data.loader``: auto takes DALI only when it is installed and the
    run has a GPU (DALI on CPU works but is no faster than the torch loader there)."""
    if choice != "auto":
        return choice, f"data.loader={choice}"
    if device.type == "cuda" and dali_available():
        return "dali", "data.loader=auto: DALI installed and a GPU present"
    return "torch", f"data.loader=auto: {'DALI not installed' if device.type == 'cuda' else 'no GPU'}"


def training_loader(cfg: Config, env: DistEnv) -> TorchShardLoader | DaliShardLoader:
    """The batch iterator of this rank, chosen by ``data.loader``."""
    spec = cfg.data.shards or str(ensure_synthetic_shards(cfg, env))
    shards = resolve_shards(spec)
    kind, why = choose_loader(cfg.data.loader, env.device)
    common = dict(seed=cfg.run.seed, rank=env.rank, world_size=env.world_size, num_workers=cfg.data.num_workers,
                  batch_size=cfg.train.batch_size, num_classes=cfg.model.num_classes,
                  image_size=cfg.model.image_size, on_error=cfg.data.on_error, flip=cfg.data.flip)
    if kind == "dali":
        log.info("data: DALI loader over %d shards (%s), %d threads, decoding on %s (%s)", len(shards), spec,
                 max(cfg.data.num_workers, 1), "GPU" if env.device.type == "cuda" else "CPU", why)
        return build_dali_loader(shards, **common, device=env.device)
    log.info("data: torch loader over %d shards (%s), %d workers (%s)", len(shards), spec, cfg.data.num_workers, why)
    return build_torch_loader(shards, **common, pin_memory=env.device.type == "cuda")
