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

Samples stay uint8 from decoding through flips and collate (``data.batch``): the step
converts each batch once, on its device.

Bad samples are skipped, logged as they happen and counted (``data.on_error=skip``,
``data.skips``) or raise with shard and key. A stream that has read every unit of the
endless sequence since its last usable sample (a full pass over every shard, part by part)
stops with ``NoUsableSample`` quoting the reasons by kind, instead of reading on forever.
Errors of a worker reach the trainer as they were raised (type and message), not as
torch's re-raise with the worker's traceback in the message.

Workers die with the process that started them (Linux: PR_SET_PDEATHSIG): a SIGKILLed
trainer leaves no orphan holding memory, files or (see telemetry) the metrics port.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ssgan_dist.data.batch import collate
from ssgan_dist.data.schema import BadSample, decode_sample
from ssgan_dist.data.shards import iter_tar
from ssgan_dist.data.skips import NoUsableSample, SkipLog, Skipped, Tally, hints
from ssgan_dist.errors import SetupError
from ssgan_dist.rng import seeded_numpy
from ssgan_dist.signals import shield_worker

PR_SET_PDEATHSIG = 1  # linux/prctl.h


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


def _read_shard(path: str, on_error: str) -> tuple[list[dict[str, Any]], BadSample | None]:
    """All samples of one tar, grouped by key; a broken tar is one bad sample (none of it is read)."""
    try:
        return list(iter_tar(path)), None
    except BadSample as bad:
        if on_error == "raise":
            raise
        return [], bad


@dataclass
class Failure:
    """An error of a stream, handed to the trainer's process as an item (see the module doc)."""

    error: SetupError


class ShardStreams(IterableDataset):
    """One rank's streams; each DataLoader worker serves one logical stream."""

    def __init__(self, spec: StreamSpec):
        self.spec = spec

    def __iter__(self) -> Iterator[dict[str, Any] | Failure]:
        info = get_worker_info()
        workers = max(self.spec.num_workers, 1)
        physical = info.id if info is not None else 0
        logical = (physical + self.spec.position.rotation) % workers
        try:
            yield from self._stream(logical)
        except SetupError as exc:
            yield Failure(exc)

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
        items: list[dict[str, Any]] = []
        flips: list[bool] = []
        skipped, skip_log = Skipped(), SkipLog(f"data (rank {s.rank}, stream {logical})")
        barren: set[tuple[int, int]] = set()  # units read whole since the last usable sample
        tally = Tally()  # and what was wrong in them

        def skip(bad: BadSample) -> None:
            skipped.add(str(bad))
            skip_log.skip(bad)
            tally.add(bad)

        while True:
            slot = stream_id + j * n_streams
            epoch, shard, part = self._unit_at(slot, parts)
            path = s.shards[shard]
            shard_name = os.path.basename(path)
            samples, broken = _read_shard(path, s.on_error)
            if broken is not None and part == 0:
                skip(broken)
            elif broken is not None:
                tally.add(broken)  # a broken tar is skipped (counted) once, not once per part
            elif not samples:
                tally.add(BadSample(shard_name, "<tar>", "the tar holds no sample", "empty"))
            order = seeded_numpy(s.seed, 0x0DE7, epoch, shard).permutation(len(samples))[part::parts]
            usable = False
            for i in range(offset, len(order)):
                try:
                    item = decode_sample(samples[order[i]], shard=shard_name, num_classes=s.num_classes,
                                         image_size=s.image_size)
                except BadSample as bad:
                    if s.on_error == "raise":
                        raise
                    skip(bad)
                    continue
                if not usable:
                    usable = True
                    barren.clear()
                    if tally.kinds:
                        tally = Tally()
                items.append(item)
                flips.append(s.flip and seeded_numpy(s.seed, 0xF11B, slot, i).random() < 0.5)
                if len(items) == s.batch_size:
                    next_pos = (j, i + 1) if i + 1 < len(order) else (j + 1, 0)
                    yield {**collate(items, flips), "skipped": skipped, "position": (logical, *next_pos)}
                    items, flips, skipped = [], [], Skipped()
            if not usable and offset == 0:
                barren.add((shard, part))
                if len(barren) == len(s.shards) * parts:
                    skip_log.flush()
                    where = f"the {len(s.shards)} shards ({s.shards[0]}{', ...' if len(s.shards) > 1 else ''})"
                    raise NoUsableSample.after(where, tally, hints(s.image_size, s.num_classes))
            j, offset = j + 1, 0


def _die_with_parent(parent: int, worker_id: int) -> None:
    """worker_init_fn: have the kernel SIGKILL this worker when its parent dies (Linux; the
    parent thread, in fact: the one that iterates the loader)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def _init_worker(parent: int, worker_id: int) -> None:
    """worker_init_fn: the worker dies with its parent, and outlives a stop signal sent to the
    whole process group until the parent, having finished its step, stops it (signals.py)."""
    _die_with_parent(parent, worker_id)
    shield_worker(worker_id)


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
            worker_init_fn=functools.partial(_init_worker, os.getpid()),
        )
        return iter(loader)

    def __iter__(self) -> "TorchShardLoader":
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iter is None:
            self._iter = self._start()
        batch = next(self._iter)
        if isinstance(batch, Failure):
            self._iter = None  # its workers stop with it
            raise batch.error
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
