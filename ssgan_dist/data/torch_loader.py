"""Batches from webdataset tar shards with an order that can be resumed exactly.

Why not a plain ``wds.WebDataset(...).shuffle(n)``: its shuffle buffer is state that a
checkpoint cannot hold, and its node/worker splitting gives ranks unequal sample counts
(a DDP hang) when shards do not divide evenly. Here the order is a pure function of
(seed, rank, worker, position):

* The unit of reading is a part of a shard: with fewer shards than streams each shard is
  cut into P = ceil(streams / shards) interleaved parts, otherwise P = 1. The units form an
  endless sequence S = perm_0 ++ perm_1 ++ ..., perm_e a permutation of all units drawn
  from (seed, e). There are ``world_size * num_workers`` streams; stream k reads S[k],
  S[k + n_streams], ... so within one pass no two streams share a sample, every stream is
  endless (equal batches on every rank for any shard count) and none is empty.
* A shard is read whole (a few tens of MB at 256 px); its samples are permuted with a seed
  drawn from (seed, epoch, shard) and part p takes every P-th of them from the p-th on;
  flips are drawn from (seed, slot, sample index).
* The position of stream k is (j, offset): the j-th shard of the stream, samples consumed.
  Each batch carries its stream's position after it, so the loader always knows the
  position of what the training loop has actually consumed, not what workers prefetched.
* torch's DataLoader hands out worker batches round-robin from worker 0. On resume the
  workers are rotated so that the stream whose turn it was comes first.

Bad samples are skipped and reported (``data.on_error=skip``) or raise with shard and key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ssgan_dist.data.schema import BadSample, decode_sample
from ssgan_dist.data.shards import iter_tar
from ssgan_dist.errors import SetupError
from ssgan_dist.rng import seeded_numpy
from ssgan_dist.signals import shield_worker


@dataclass
class DataPosition:
    """Where every stream of one rank stands; saved in the checkpoint."""

    streams: list[list[int]]  # per logical stream: [shard index within the stream, samples consumed]
    rotation: int = 0  # the logical stream whose batch comes next

    @classmethod
    def start(cls, num_streams: int) -> "DataPosition":
        return cls([[0, 0] for _ in range(num_streams)], 0)

    def state_dict(self) -> dict[str, Any]:
        return {"streams": [list(s) for s in self.streams], "rotation": self.rotation}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "DataPosition":
        return cls([list(map(int, s)) for s in state["streams"]], int(state["rotation"]))


@dataclass
class StreamSpec:
    """Everything a worker needs to produce its batches; plain data so it pickles."""

    shards: list[str]
    seed: int
    rank: int
    world_size: int
    num_workers: int
    batch_size: int
    num_classes: int
    image_size: int
    on_error: str
    flip: bool
    position: DataPosition = field(default_factory=lambda: DataPosition.start(1))


def _read_shard(path: str, on_error: str) -> tuple[list[dict[str, Any]], list[str]]:
    """All samples of one tar, grouped by key; a broken tar is one bad sample (none of it is read)."""
    try:
        return list(iter_tar(path)), []
    except BadSample as bad:
        if on_error == "raise":
            raise
        return [], [str(bad)]


class ShardStreams(IterableDataset):
    """One rank's streams; each DataLoader worker serves one logical stream."""

    def __init__(self, spec: StreamSpec):
        self.spec = spec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers = max(self.spec.num_workers, 1)
        physical = info.id if info is not None else 0
        logical = (physical + self.spec.position.rotation) % workers
        yield from self._stream(logical)

    def _unit_at(self, global_slot: int, parts: int) -> tuple[int, int, int]:
        """(epoch, shard index, part) read at a position of the endless unit sequence."""
        n_units = len(self.spec.shards) * parts
        epoch, index = divmod(global_slot, n_units)
        shard, part = divmod(int(seeded_numpy(self.spec.seed, 0x5EED, epoch).permutation(n_units)[index]), parts)
        return epoch, shard, part

    def _stream(self, logical: int) -> Iterator[dict[str, Any]]:
        s = self.spec
        workers = max(s.num_workers, 1)
        stream_id = s.rank * workers + logical
        n_streams = s.world_size * workers
        parts = -(-n_streams // len(s.shards))
        j, offset = s.position.streams[logical]
        batch: list[dict[str, torch.Tensor]] = []
        skipped: list[str] = []
        while True:
            slot = stream_id + j * n_streams
            epoch, shard, part = self._unit_at(slot, parts)
            path = s.shards[shard]
            shard_name = os.path.basename(path)
            samples, broken = _read_shard(path, s.on_error)
            skipped += broken if part == 0 else []
            order = seeded_numpy(s.seed, 0x0DE7, epoch, shard).permutation(len(samples))[part::parts]
            for i in range(offset, len(order)):
                raw = samples[order[i]]
                try:
                    item = decode_sample(raw, shard=shard_name, num_classes=s.num_classes, image_size=s.image_size)
                except BadSample as bad:
                    if s.on_error == "raise":
                        raise
                    skipped.append(str(bad))
                    continue
                if s.flip and seeded_numpy(s.seed, 0xF11B, slot, i).random() < 0.5:
                    item = {k: (v.flip(-1) if isinstance(v, torch.Tensor) else v) for k, v in item.items()}
                batch.append(item)
                if len(batch) == s.batch_size:
                    next_pos = (j, i + 1) if i + 1 < len(order) else (j + 1, 0)
                    yield _collate(batch, skipped, logical, next_pos)
                    batch, skipped = [], []
            j, offset = j + 1, 0


def _collate(items: list[dict[str, Any]], skipped: list[str], logical: int, pos: tuple[int, int]) -> dict[str, Any]:
    return {
        "key": [it["key"] for it in items],
        "sketch": torch.stack([it["sketch"] for it in items]),
        "label": torch.stack([it["label"] for it in items]),
        "image": torch.stack([it["image"] for it in items]),
        "skipped": list(skipped),
        "position": (logical, pos[0], pos[1]),
    }


class TorchShardLoader:
    """Iterates batches forever and tracks the position of what was consumed."""

    def __init__(self, spec: StreamSpec, pin_memory: bool = False):
        self.spec = spec
        self.position = DataPosition.start(max(spec.num_workers, 1))
        self.pin_memory = pin_memory
        self._iter: Iterator[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {**self.position.state_dict(), "num_workers": max(self.spec.num_workers, 1)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("loader", "torch") != "torch":
            raise SetupError(f"data.loader: the checkpoint's data position was saved by the {state['loader']} loader; "
                             f"resume it with data.loader={state['loader']} (or start over with checkpoint.resume=false)")
        workers = max(self.spec.num_workers, 1)
        if int(state["num_workers"]) != workers:
            raise SetupError(
                f"data.num_workers: the checkpoint's data position was saved with "
                f"{state['num_workers']} workers, this run has {workers}; set data.num_workers="
                f"{state['num_workers']} to resume exactly"
            )
        self.position = DataPosition.from_state(state)
        self._iter = None

    def _start(self) -> Iterator[dict[str, Any]]:
        spec = StreamSpec(**{**self.spec.__dict__, "position": self.position})
        loader = DataLoader(
            ShardStreams(spec),
            batch_size=None,
            num_workers=self.spec.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            worker_init_fn=shield_worker,  # a stop signal to the process group waits for the step
        )
        return iter(loader)

    def __iter__(self) -> "TorchShardLoader":
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iter is None:
            self._iter = self._start()
        batch = next(self._iter)
        logical, j, offset = batch.pop("position")
        self.position.streams[logical] = [int(j), int(offset)]
        self.position.rotation = (logical + 1) % max(self.spec.num_workers, 1)
        return batch


def build_torch_loader(shards: list[str], *, seed: int, rank: int, world_size: int, num_workers: int,
                       batch_size: int, num_classes: int, image_size: int, on_error: str, flip: bool,
                       pin_memory: bool = False) -> TorchShardLoader:
    spec = StreamSpec(shards, seed, rank, world_size, num_workers, batch_size, num_classes,
                      image_size, on_error, flip)
    return TorchShardLoader(spec, pin_memory=pin_memory)
