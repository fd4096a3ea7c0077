"""Every sample of a shard set exactly once, in a fixed order: for evaluation and inference.

The training loader is an endless, shuffled, flipped stream. A metric needs each held-out
sample once, in the same order on every run, and split across ranks without padding, so
here the tars are read in the order given and their samples in tar order; sample i belongs
to rank ``i % world_size``. Every rank walks all tar members (cheap) but decodes only its
own samples, so all ranks agree on the indices without talking to each other.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import torch

from ssgan_dist.data.batch import collate, step_tensors
from ssgan_dist.data.schema import BadSample, decode_sample
from ssgan_dist.data.shards import iter_tar
from ssgan_dist.data.tarindex import fresh_index


class OrderedSamples:
    """Iterates (index, decoded sample) of one rank's share; bad samples skipped or raised.

    ``skipped`` collects the reasons of this rank's skipped samples (``on_error="skip"``).
    """

    def __init__(self, shards: list[str], *, num_classes: int, image_size: int, on_error: str = "raise",
                 rank: int = 0, world_size: int = 1, max_samples: int = 0):
        self.shards, self.num_classes, self.image_size = shards, num_classes, image_size
        self.on_error, self.rank, self.world_size, self.max_samples = on_error, rank, world_size, max_samples
        self.skipped: list[str] = []

    def _raw(self) -> Iterator[tuple[str, dict[str, Any] | BadSample]]:
        """(shard name, raw sample) in order; an unreadable tar yields one BadSample."""
        for path in self.shards:
            name = os.path.basename(path)
            try:
                for raw in iter_tar(path):
                    yield name, raw
            except BadSample as bad:
                yield name, bad

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        for index, (name, raw) in enumerate(self._raw()):
            if self.max_samples and index >= self.max_samples:
                return
            if index % self.world_size != self.rank:
                continue
            try:
                if isinstance(raw, BadSample):
                    raise raw
                yield index, decode_sample(raw, shard=name, num_classes=self.num_classes,
                                           image_size=self.image_size)
            except BadSample as bad:
                if self.on_error == "raise":
                    raise
                self.skipped.append(str(bad))

    def expected(self) -> int | None:
        """This rank's share of the samples by the shards' index files (bad ones included), or
        None when a shard has no up-to-date index: a progress bar's total, nothing more."""
        total = 0
        for path in self.shards:
            samples = fresh_index(path)
            if samples is None:
                return None
            total += len(samples)
        if self.max_samples:
            total = min(total, self.max_samples)
        return len(range(self.rank, total, self.world_size))

    def batches(self, batch_size: int) -> Iterator[dict[str, Any]]:
        """Batches of up to ``batch_size``: {"index": list[int], "key", and "sketch", "label",
        "image" as a step takes them (``data.batch.step_tensors``, on the CPU)}."""
        items: list[tuple[int, dict[str, Any]]] = []
        for item in self:
            items.append(item)
            if len(items) == batch_size:
                yield _batch(items)
                items = []
        if items:
            yield _batch(items)


def _batch(items: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    samples = [s for _, s in items]
    return {"index": [i for i, _ in items], "key": [s["key"] for s in samples],
            **step_tensors(collate(samples, [False] * len(samples)), torch.device("cpu"))}
