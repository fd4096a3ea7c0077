"""The embedded default's data: synthetic shards matching the model, made once per machine.

With ``data.shards`` empty, local rank 0 builds them in the cache directory (``cache.py``)
under a temporary name and renames the directory into place, so a crash never leaves a
half-built cache; later runs with the same settings reuse it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from ssgan_dist.cache import cache_root
from ssgan_dist.config import DataConfig
from ssgan_dist.data.writer import MANIFEST, build_synthetic_shards
from ssgan_dist.distributed.collectives import barrier
from ssgan_dist.distributed.env import DistEnv
from ssgan_dist.files import atomic_dir

log = logging.getLogger(__name__)


def synthetic_cache_dir(data: DataConfig, *, image_size: int, num_classes: int, background_classes: Sequence[int],
                        seed: int) -> Path:
    """Named by every setting the shards depend on, so other settings never share a cache."""
    bg = "-".join(map(str, background_classes))
    return cache_root(data.cache_dir) / (f"synthetic-{image_size}px-c{num_classes}-bg{bg}-n{data.synthetic_count}"
                                         f"-p{data.synthetic_per_shard}-s{seed}")


def ensure_synthetic_shards(data: DataConfig, env: DistEnv, *, image_size: int, num_classes: int,
                            background_classes: Sequence[int], seed: int) -> Path:
    """Build the shards on first use; every rank gets the same path (a collective)."""
    out = synthetic_cache_dir(data, image_size=image_size, num_classes=num_classes,
                              background_classes=background_classes, seed=seed)
    if env.local_rank == 0 and not (out / MANIFEST).is_file():
        log.info("generating %d synthetic %dpx samples into %s (first use)", data.synthetic_count, image_size, out)
        with atomic_dir(out, keep_existing=True) as tmp:
            build_synthetic_shards(tmp, count=data.synthetic_count, samples_per_shard=data.synthetic_per_shard,
                                   size=image_size, seed=seed, num_classes=num_classes,
                                   background_classes=tuple(background_classes))
    barrier()
    log.info("using synthetic shards in %s", out)
    return out
