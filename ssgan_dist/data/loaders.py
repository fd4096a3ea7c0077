"""Where a run's batches come from: the shard loader of ``data.loader`` over ``data.shards``
(or the synthetic cache), for this rank, after the checks of ``preflight`` (rank 0 makes
them, every rank stops alike on what they find)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ssgan_dist.config import DataConfig
from ssgan_dist.data.dali_loader import DaliShardLoader, build_dali_loader, dali_available
from ssgan_dist.data.preflight import preflight
from ssgan_dist.data.shards import resolve_shards
from ssgan_dist.data.synthetic_cache import ensure_synthetic_shards
from ssgan_dist.data.torch_loader import TorchShardLoader, build_torch_loader
from ssgan_dist.distributed.collectives import from_main
from ssgan_dist.distributed.env import DistEnv

log = logging.getLogger(__name__)

ShardLoader = TorchShardLoader | DaliShardLoader


def choose_loader(choice: str, device: torch.device) -> tuple[str, str]:
    """(loader, why) for ``data.loader``: auto takes DALI only when it is installed and the
    run has a GPU (DALI on CPU works but is no faster than the torch loader there)."""
    if choice != "auto":
        return choice, f"data.loader={choice}"
    if device.type == "cuda" and dali_available():
        return "dali", "data.loader=auto: DALI installed and a GPU present"
    return "torch", f"data.loader=auto: {'DALI not installed' if device.type == 'cuda' else 'no GPU'}"


def build_training_loader(data: DataConfig, env: DistEnv, *, seed: int, batch_size: int, image_size: int,
                          num_classes: int, background_classes: Sequence[int]) -> ShardLoader:
    """The endless, resumable batch iterator of this rank (a collective when the synthetic
    shards are made on first use)."""
    spec = data.shards or str(ensure_synthetic_shards(data, env, image_size=image_size, num_classes=num_classes,
                                                      background_classes=background_classes, seed=seed))
    shards = resolve_shards(spec)

    def check() -> Exception | None:
        try:
            preflight(spec, shards, image_size=image_size, num_classes=num_classes, on_error=data.on_error)
        except Exception as exc:  # noqa: BLE001 -- handed to every rank, which raises it
            return exc
        return None

    if (problem := from_main(check)) is not None:
        raise problem
    kind, why = choose_loader(data.loader, env.device)
    common = dict(seed=seed, rank=env.rank, world_size=env.world_size, num_workers=data.num_workers,
                  batch_size=batch_size, num_classes=num_classes, image_size=image_size, on_error=data.on_error,
                  flip=data.flip)
    if kind == "dali":
        log.info("data: DALI loader over %d shards (%s), %d threads, decoding on %s (%s)", len(shards), spec,
                 max(data.num_workers, 1), "GPU" if env.device.type == "cuda" else "CPU", why)
        return build_dali_loader(shards, **common, device=env.device)
    log.info("data: torch loader over %d shards (%s), %d workers (%s)", len(shards), spec, data.num_workers, why)
    return build_torch_loader(shards, **common, pin_memory=env.device.type == "cuda")
